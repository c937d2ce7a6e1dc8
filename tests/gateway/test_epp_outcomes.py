"""What the endpoint picker learns after its pick: the response's status (the engine's circuit breaker), the
endpoint the data plane says served, and its gRPC health."""

from __future__ import annotations

import asyncio

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from ext_proc_client import DUPLEX, Stream, completion, headers, picked, picker, refused, subset_hint
from google.protobuf import struct_pb2

from nanoserve.gateway.ext_proc import LB_NAMESPACE, SERVED, address


async def answered(stub, status: int, subset: list[str] | None = None, served: str | None = None) -> str:
    """One request through the picker whose engine answers `status`; returns the picked endpoint."""
    s = Stream(stub)
    meta = {"metadata_context": subset_hint(subset)} if subset else {}
    s.send(request_headers=headers("/v1/completions"), protocol_config=DUPLEX, **meta)
    s.send(request_body=pb.HttpBody(body=completion("w1 w2"), end_of_stream=True))
    destination, _ = picked(await s.recv(), "request_headers")
    await s.body()
    lb = struct_pb2.Struct()
    lb.update({SERVED: served or destination})
    status_header = base_pb2.HeaderValue(key=":status", raw_value=str(status).encode())
    s.send(
        response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[status_header])),
        metadata_context=base_pb2.Metadata(filter_metadata={LB_NAMESPACE: lb}),
    )
    assert (await s.recv()).HasField("response_headers")
    await s.close()
    return destination


def test_the_engines_breaker_learns_from_the_response_status_as_the_proxys_does(local_engines):
    async def main():
        async with local_engines({}) as urls, picker({"breaker_threshold": 2}, urls) as (gw, stub, _):
            (ep,) = gw.pool.endpoints.values()
            for status in (500, 200, 500):  # a served answer resets the count of consecutive failures
                await answered(stub, status)
            assert ep.routable
            await answered(stub, 503)  # two in a row: the breaker opens, nothing is left to route to
            assert not ep.routable
            assert (await refused(stub))[0] == 503

    asyncio.run(main())


def test_the_endpoint_the_data_plane_says_served_carries_the_request(local_engines):
    async def main():
        async with local_engines({}, {}) as urls, picker({}, urls) as (gw, stub, _):
            first, second = (gw.pool.endpoints[u] for u in urls)
            # Picked: the first; served (the data plane fell back down the list): the second, whose 500 counts.
            assert await answered(stub, 500, subset=[address(first.url)], served=address(second.url)) == address(
                first.url
            )
            assert (first.breaker.failures, second.breaker.failures) == (0, 1)
            assert first.in_flight == second.in_flight == 0

    asyncio.run(main())


def test_grpc_health_says_live_always_and_ready_with_a_routable_engine(local_engines):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    serving = health_pb2.HealthCheckResponse.SERVING

    async def check(channel, service: str) -> int:
        stub = health_pb2_grpc.HealthStub(channel)
        return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status

    async def main():
        for engines in ([{}], []):
            async with local_engines(*engines) as urls, picker({}, urls) as (_, _, channel):
                assert await check(channel, "liveness") == serving
                for service in ("readiness", "envoy.service.ext_proc.v3.ExternalProcessor", ""):
                    assert (await check(channel, service) == serving) == bool(urls), service
                try:
                    await check(channel, "nope")
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.NOT_FOUND
                else:
                    raise AssertionError("an unknown service must be NOT_FOUND")

    asyncio.run(main())
