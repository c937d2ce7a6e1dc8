"""`nanoserve gateway ...` / `python -m nanoserve.gateway ...`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from nanoserve.common import event_loop
from nanoserve.common.flags import HelpFormatter, add_flags, settings_from_args
from nanoserve.common.torch_free import keep_torch_out
from nanoserve.gateway.config import GatewayConfig


def build_parser() -> argparse.ArgumentParser:
    """GatewayConfig's settings (gateway/config.py), and where keys come from (files, the environment)."""
    p = argparse.ArgumentParser(
        prog="nanoserve gateway",
        formatter_class=HelpFormatter,
        description="Prefix-cache-aware gateway in front of nanoserve engines.",
    )
    add_flags(p, GatewayConfig)
    p.add_argument("--engine-api-key-file", metavar="PATH", help="read --engine-api-key from this file (default: none)")
    p.add_argument(
        "--api-key-file", action="append", default=[], metavar="PATH", help="client keys, one per line (repeatable)"
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
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
    keys = [k.strip() for k in args.api_keys]
    keys += [k.strip() for k in os.environ.get("NANOSERVE_GATEWAY_API_KEYS", "").split(",")]
    for path in args.api_key_file:
        keys += read_keys(path)
    return list(dict.fromkeys(k for k in keys if k))


def engine_key(args: argparse.Namespace) -> str | None:
    if not args.engine_api_key_file:
        return args.engine_api_key or os.environ.get("NANOSERVE_API_KEY")
    keys = read_keys(args.engine_api_key_file)
    if len(keys) != 1:
        raise SystemExit(f"{args.engine_api_key_file}: expected one key, found {len(keys)}")
    return keys[0]


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    if not args.engines and not args.service:
        raise SystemExit("give --engine URL (repeatable) or --service NAME")
    settings = settings_from_args(GatewayConfig, args)
    if settings.get("workers", 1) < 1:
        raise SystemExit(f"--workers must be at least 1 (got {settings['workers']})")
    return GatewayConfig(**{**settings, "engine_api_key": engine_key(args), "api_keys": client_keys(args)})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.workers > 1:
        from nanoserve.gateway.workers import run_workers

        return run_workers(config, args.log_level)
    keep_torch_out()  # (the gateway image has none; where a venv has one, loading an engine's tokenizer must not)
    from nanoserve.gateway.app import run_gateway

    try:
        event_loop.run(run_gateway(config))
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass  # a signal cancelled the server after draining
    return 0


if __name__ == "__main__":
    main()
