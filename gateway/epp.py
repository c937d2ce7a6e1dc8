"""The endpoint picker (EPP) of a Gateway API InferencePool: `nanoserve epp` / `python -m nanoserve.gateway.epp`.

The gateway itself (its HTTP proxy, /ready, /metrics and the state they share: endpoint discovery, probes,
cache feeds, tokenizers) plus Envoy's ext-proc gRPC service on `grpc_port` (gateway/ext_proc.py) and gRPC
health checks beside it (gateway/picker_health.py): requests through a Gateway API implementation (Envoy
Gateway, Istio, kgateway) and through the gateway's own HTTP port are routed by the same code on the same
state. Flags: every `nanoserve gateway` flag, and EppConfig's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

from nanoserve.common.flags import add_flags, setting, settings_argv, settings_from_args
from nanoserve.gateway.config import GatewayConfig

log = logging.getLogger(__name__)


@dataclass
class EppConfig:
    grpc_host: str = setting("0.0.0.0", "the address the ext-proc gRPC service listens on")
    grpc_port: int = setting(9002, "the ext-proc gRPC port (the InferencePool's endpointPickerRef port)")
    grpc_grace: float = setting(5.0, "on SIGTERM, seconds open ext-proc streams may still run")


def epp_argv(settings: dict) -> list[str]:
    """EppConfig settings (field name -> value) as `nanoserve epp` flags (the operator's pods)."""
    return settings_argv(EppConfig, settings)


@contextlib.asynccontextmanager
async def serve_epp(gateway: GatewayConfig, epp: EppConfig) -> AsyncIterator[tuple]:
    """Serve the gateway and the ext-proc service inside an `async with`; yields (Gateway, gRPC port), port 0
    picking a free one."""
    import grpc  # lazy: `nanoserve epp --help` needs neither grpc nor the app
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
    from grpc_health.v1 import health_pb2_grpc

    from nanoserve.gateway.app import serve
    from nanoserve.gateway.ext_proc import EndpointPicker
    from nanoserve.gateway.picker_health import PickerHealth

    async with serve(gateway) as gw:
        # A BUFFERED body comes as one message: gRPC's 4 MiB default must not refuse what the gateway takes.
        limit = gateway.max_body_bytes + (1 << 16)
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit)])
        pb_grpc.add_ExternalProcessorServicer_to_server(EndpointPicker(gw), server)
        health_pb2_grpc.add_HealthServicer_to_server(PickerHealth(gw), server)
        port = server.add_insecure_port(f"{epp.grpc_host}:{epp.grpc_port}")
        await server.start()
        try:
            yield gw, port
        finally:
            await server.stop(epp.grpc_grace)


async def run_epp(gateway: GatewayConfig, epp: EppConfig) -> None:
    """Serve until cancelled; SIGTERM and SIGINT cancel (the gateway then drains as `nanoserve gateway` does)."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, task.cancel)
    async with serve_epp(gateway, epp) as (gw, port):
        log.info("endpoint picker: ext-proc on :%d, gateway on %s, policy %s", port, gw.url, gateway.policy)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    from nanoserve.common.torch_free import keep_torch_out
    from nanoserve.gateway import cli

    parser = cli.build_parser()
    parser.prog = "nanoserve epp"
    parser.description = "Endpoint picker of a Gateway API InferencePool: the gateway, plus Envoy's ext-proc gRPC."
    add_flags(parser, EppConfig)
    args = parser.parse_args(argv)
    gateway, epp = cli.config_from_args(args), EppConfig(**settings_from_args(EppConfig, args))
    if gateway.workers > 1:  # one ext-proc server per process would need its own port: scale with replicas
        raise SystemExit("nanoserve epp runs one gateway process: --workers 1 (more pods: more replicas)")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keep_torch_out()
    try:
        asyncio.run(run_epp(gateway, epp))  # (asyncio's own loop: grpc.aio's poller is built for it)
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    return 0


if __name__ == "__main__":
    main()
