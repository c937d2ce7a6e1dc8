"""`nanoserve gateway ...` / `python -m nanoserve.gateway ...`."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os

from nanoserve.gateway.config import GatewayConfig, RoutingConfig


def build_parser() -> argparse.ArgumentParser:
    d, r = GatewayConfig(), RoutingConfig()
    p = argparse.ArgumentParser(prog="nanoserve gateway",
                                description="Prefix-cache-aware gateway in front of nanoserve engines.")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--engine", action="append", default=[], metavar="URL",
                   help="engine base URL (repeatable), e.g. http://127.0.0.1:8000")
    p.add_argument("--service", help="Kubernetes Service of the engines (EndpointSlice discovery)")
    p.add_argument("--namespace", default=d.namespace)
    p.add_argument("--port-name", help="EndpointSlice port name (default: the first port)")
    p.add_argument("--model", help="a local copy of the engines' tokenizer (default: each engine serves its own "
                                   "at /v1/tokenizer; either way it is checked against the engine's fingerprint)")
    p.add_argument("--served-model-name", help="reject requests for other model names with 404")
    p.add_argument("--engine-api-key", default=os.environ.get("NANOSERVE_API_KEY"),
                   help="the engines' API key, for the gateway's own calls (default: $NANOSERVE_API_KEY)")
    p.add_argument("--policy", default=d.policy, choices=["cache-aware", "round-robin", "least-loaded"])
    p.add_argument("--cache-threshold", type=float, default=r.cache_threshold,
                   help="least fraction of the prompt's blocks a cache match must cover")
    p.add_argument("--balance-abs-threshold", type=int, default=r.balance_abs_threshold)
    p.add_argument("--balance-rel-threshold", type=float, default=r.balance_rel_threshold)
    p.add_argument("--block-size", type=int, default=d.block_size, help="until an engine's feed tells its own")
    p.add_argument("--approx-capacity-blocks", type=int, default=d.approx_capacity_blocks)
    p.add_argument("--health-interval", type=float, default=d.health_interval)
    p.add_argument("--unhealthy-threshold", type=int, default=d.unhealthy_threshold)
    p.add_argument("--healthy-threshold", type=int, default=d.healthy_threshold)
    p.add_argument("--max-attempts", type=int, default=d.max_attempts)
    p.add_argument("--connect-timeout", type=float, default=d.connect_timeout)
    p.add_argument("--read-timeout", type=float, default=d.read_timeout,
                   help="longest silence from an engine mid-response")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout,
                   help="on SIGTERM, seconds open requests may still run")
    p.add_argument("--log-level", default="INFO")
    return p


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    if not args.engine and not args.service:
        raise SystemExit("give --engine URL (repeatable) or --service NAME")
    routing = RoutingConfig(args.cache_threshold, args.balance_abs_threshold, args.balance_rel_threshold)
    return GatewayConfig(
        host=args.host, port=args.port, engines=args.engine, service=args.service, namespace=args.namespace,
        port_name=args.port_name, model=args.model, served_model_name=args.served_model_name,
        engine_api_key=args.engine_api_key, policy=args.policy, routing=routing, block_size=args.block_size,
        approx_capacity_blocks=args.approx_capacity_blocks, health_interval=args.health_interval,
        unhealthy_threshold=args.unhealthy_threshold, healthy_threshold=args.healthy_threshold,
        max_attempts=args.max_attempts, connect_timeout=args.connect_timeout, read_timeout=args.read_timeout,
        drain_timeout=args.drain_timeout)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from nanoserve.gateway.app import run_gateway
    try:
        asyncio.run(run_gateway(config))
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass  # a signal cancelled the server after draining


if __name__ == "__main__":
    main()
