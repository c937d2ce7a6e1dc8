"""The `nanoserve` command: `serve` and `generate` (the engine, engine_pod/cli.py), `gateway` (the router,
gateway/cli.py), `epp` (the router as an InferencePool's endpoint picker, gateway/epp.py) and `up` (a local
stack of engines and gateway, nanoserve_pkg/up.py).

`nanoserve gateway ...` and `nanoserve epp ...` go straight to the gateway's own parser: the gateway's image
runs them without importing any of the engine.
"""

import argparse
import sys

from nanoserve.common.version import package_version

DESCRIPTION = "nanoserve: serve an LLM (serve, generate), route to engines (gateway, epp), or both locally (up)."


def build_parser() -> argparse.ArgumentParser:
    from nanoserve import up
    from nanoserve.engine_pod import cli as engine_cli

    parser = argparse.ArgumentParser(prog="nanoserve", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"nanoserve {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    engine_cli.add_commands(sub)
    up.add_command(sub)
    sub.add_parser("gateway", help="the prefix-cache-aware router (nanoserve gateway --help)", add_help=False)
    sub.add_parser(
        "epp", help="the router as an InferencePool's endpoint picker (nanoserve epp --help)", add_help=False
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gateway"]:  # (which configures its own logging)
        from nanoserve.gateway.cli import main as gateway_main

        return gateway_main(argv[1:])
    if argv[:1] == ["epp"]:  # the gateway's image runs it too: no engine imports
        from nanoserve.gateway.epp import main as epp_main

        return epp_main(argv[1:])
    from nanoserve.engine_pod.cli import run_command

    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
