"""The endpoint picker's gRPC health service (grpc.health.v1), as GAIE's endpoint picker protocol asks of it.

`liveness`: SERVING while the process answers. `readiness`, the ext-proc service's own name and "" (the server
as a whole): SERVING when the gateway's /ready says 200 (an engine routable, its first tokenizer fetch over).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

if TYPE_CHECKING:
    from nanoserve.gateway.app import Gateway

EXT_PROC = "envoy.service.ext_proc.v3.ExternalProcessor"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class PickerHealth(health_pb2_grpc.HealthServicer):
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def ready(self) -> bool:
        """As Gateway.ready decides."""
        endpoints = self.gw.pool.routable()
        return len(endpoints) > self.gw.tokenizers_pending(endpoints)

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:  # noqa: N802 - the gRPC method's name
        if request.service == "liveness":
            return health_pb2.HealthCheckResponse(status=SERVING)
        if request.service in ("", "readiness", EXT_PROC):
            return health_pb2.HealthCheckResponse(status=SERVING if self.ready() else NOT_SERVING)
        await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        raise AssertionError("abort raises")  # (for the type checker: abort never returns)
