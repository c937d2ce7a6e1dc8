"""`nanoserve gateway ...` / `python -m nanoserve.gateway ...`."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os

from nanoserve.common import event_loop
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
    p.add_argument("--engine-api-key-file", metavar="PATH", help="read --engine-api-key from this file")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="a client key of the gateway's own (repeatable; also $NANOSERVE_GATEWAY_API_KEYS, "
                        "comma-separated): /v1/* and /metrics then need 'Authorization: Bearer KEY'")
    p.add_argument("--api-key-file", action="append", default=[], metavar="PATH",
                   help="client keys, one per line (repeatable)")
    p.add_argument("--public-metrics", action="store_true", help="serve /metrics without a key")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help="largest client request body, after decompression")
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
    p.add_argument("--first-byte-timeout", type=float, default=d.first_byte_timeout,
                   help="streaming requests: longest wait for an engine's response headers before it counts "
                        "as hung (marked down, the request retried elsewhere)")
    p.add_argument("--breaker-threshold", type=int, default=d.breaker_threshold,
                   help="consecutive failed requests that open an engine's circuit breaker (0: never)")
    p.add_argument("--breaker-cooldown", type=float, default=d.breaker_cooldown,
                   help="seconds an open breaker keeps traffic away, doubled per failed trial")
    p.add_argument("--breaker-max-cooldown", type=float, default=d.breaker_max_cooldown)
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout,
                   help="on SIGTERM, seconds open requests may still run")
    p.add_argument("--log-level", default="INFO")
    return p


def read_keys(path: str) -> list[str]:
    """One key per line; blank lines and # comments are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"cannot read keys from {path}: {e}") from None
    return [line for line in lines if line and not line.startswith("#")]


def client_keys(args: argparse.Namespace) -> list[str]:
    keys = [k.strip() for k in args.api_key]
    keys += [k.strip() for k in os.environ.get("NANOSERVE_GATEWAY_API_KEYS", "").split(",")]
    for path in args.api_key_file:
        keys += read_keys(path)
    return list(dict.fromkeys(k for k in keys if k))


def engine_key(args: argparse.Namespace) -> str | None:
    if not args.engine_api_key_file:
        return args.engine_api_key
    keys = read_keys(args.engine_api_key_file)
    if len(keys) != 1:
        raise SystemExit(f"{args.engine_api_key_file}: expected one key, found {len(keys)}")
    return keys[0]


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    if not args.engine and not args.service:
        raise SystemExit("give --engine URL (repeatable) or --service NAME")
    routing = RoutingConfig(args.cache_threshold, args.balance_abs_threshold, args.balance_rel_threshold)
    return GatewayConfig(
        host=args.host, port=args.port, engines=args.engine, service=args.service, namespace=args.namespace,
        port_name=args.port_name, model=args.model, served_model_name=args.served_model_name,
        engine_api_key=engine_key(args), api_keys=client_keys(args), public_metrics=args.public_metrics,
        max_body_bytes=args.max_body_bytes, policy=args.policy, routing=routing, block_size=args.block_size,
        approx_capacity_blocks=args.approx_capacity_blocks, health_interval=args.health_interval,
        unhealthy_threshold=args.unhealthy_threshold, healthy_threshold=args.healthy_threshold,
        max_attempts=args.max_attempts, connect_timeout=args.connect_timeout, read_timeout=args.read_timeout,
        first_byte_timeout=args.first_byte_timeout, breaker_threshold=args.breaker_threshold,
        breaker_cooldown=args.breaker_cooldown, breaker_max_cooldown=args.breaker_max_cooldown,
        drain_timeout=args.drain_timeout)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from nanoserve.gateway.app import run_gateway
    try:
        event_loop.run(run_gateway(config))
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass  # a signal cancelled the server after draining


if __name__ == "__main__":
    main()
