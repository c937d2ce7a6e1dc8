"""The endpoint picker's ext-proc exchange, driven by a gRPC client as Envoy drives it: request headers, the
body in chunks, end of stream; FULL_DUPLEX_STREAMED and BUFFERED; the immediate responses."""

from __future__ import annotations

import asyncio
import contextlib
import json

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import json_format, struct_pb2
from poll import until_async

from nanoserve.gateway.epp import EppConfig, serve_epp
from nanoserve.gateway.ext_proc import (
    DESTINATION,
    LB_NAMESPACE,
    SERVED,
    SUBSET_KEY,
    SUBSET_NAMESPACE,
    EndpointPicker,
    Exchange,
    address,
)

DUPLEX = pb.ProtocolConfiguration(
    request_body_mode=processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED,
    response_body_mode=processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED,
)


def headers(path: str, method: str = "POST", eos: bool = False, **extra: str) -> pb.HttpHeaders:
    pairs = {":path": path, ":method": method, ":authority": "pool", "content-type": "application/json", **extra}
    hv = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=hv), end_of_stream=eos)


def subset_hint(addresses: list[str]) -> base_pb2.Metadata:
    hint = struct_pb2.Struct()
    hint.update({SUBSET_KEY: addresses})
    return base_pb2.Metadata(filter_metadata={SUBSET_NAMESPACE: hint})


class Stream:
    """One ext-proc stream, fed message by message: `send` then `recv` what the picker answers."""

    def __init__(self, stub: pb_grpc.ExternalProcessorStub) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.call = stub.Process(self._requests())

    async def _requests(self):
        while (req := await self.queue.get()) is not None:
            yield req

    def send(self, **fields) -> None:
        self.queue.put_nowait(pb.ProcessingRequest(**fields))

    async def recv(self) -> pb.ProcessingResponse:
        return await asyncio.wait_for(self.call.read(), 10)

    async def body(self) -> bytes:
        """A FULL_DUPLEX_STREAMED body as the picker sends it on, to its last chunk."""
        out = b""
        while True:
            streamed = (await self.recv()).request_body.response.body_mutation.streamed_response
            out += streamed.body
            if streamed.end_of_stream:
                return out

    async def close(self) -> None:
        """Envoy's half-close; the picker then ends the stream, having nothing more to say."""
        self.queue.put_nowait(None)
        assert await self.recv() is grpc.aio.EOF
        assert await self.call.code() == grpc.StatusCode.OK


@contextlib.asynccontextmanager
async def picker(overrides: dict, urls: list[str]):
    cfg = dict(host="127.0.0.1", port=0, engines=urls, health_interval=0.1, metrics_interval=0.1, drain_timeout=0.1)
    from nanoserve.gateway import GatewayConfig

    async with serve_epp(GatewayConfig(**{**cfg, **overrides}), EppConfig("127.0.0.1", 0, 0.1)) as (gw, p):
        if urls:
            await until_async(lambda: len(gw.pool.routable()) == len(urls), "every engine routable")
            await until_async(lambda: not gw.tokenizers_pending(gw.pool.routable()), "the tokenizers' fetches")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{p}") as channel:
            yield gw, pb_grpc.ExternalProcessorStub(channel), channel


def picked(resp: pb.ProcessingResponse, part: str) -> tuple[str, list[str]]:
    """(the destination header, the envoy.lb ranking) of a request_headers or request_body answer."""
    common = getattr(resp, part).response
    (h,) = common.header_mutation.set_headers
    assert h.header.key == DESTINATION and common.clear_route_cache
    assert h.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD  # never the client's own
    ranking = json_format.MessageToDict(resp.dynamic_metadata)[LB_NAMESPACE][DESTINATION]
    return h.header.raw_value.decode(), ranking.split(",")


def completion(prompt: str, **extra) -> bytes:
    return json.dumps({"model": "fake-model", "prompt": prompt, "max_tokens": 2, **extra}).encode()


def test_full_duplex_holds_the_headers_until_the_body_is_in_then_streams_it_back(local_engines):
    body = completion(" ".join(f"w{i}" for i in range(40)))

    async def main():
        async with local_engines({}, {}) as urls, picker({}, urls) as (gw, stub, _):
            # The pick needs the whole prompt: nothing goes back for the headers and the first chunk.
            held, ex = EndpointPicker(gw), Exchange()
            assert (
                await held.handle(
                    ex, pb.ProcessingRequest(request_headers=headers("/v1/completions"), protocol_config=DUPLEX)
                )
                == []
            )
            assert await held.handle(ex, pb.ProcessingRequest(request_body=pb.HttpBody(body=body[:10]))) == []
            s = Stream(stub)
            s.send(request_headers=headers("/v1/completions"), protocol_config=DUPLEX)
            s.send(request_body=pb.HttpBody(body=body[:10]))
            s.send(request_body=pb.HttpBody(body=body[10:], end_of_stream=True))
            first = await s.recv()
            destination, ranking = picked(first, "request_headers")
            assert destination == ranking[0] and sorted(ranking) == sorted(address(u) for u in urls)
            assert await s.body() == body  # the body goes on unchanged, the last chunk ending it
            ep = next(ep for ep in gw.pool.endpoints.values() if address(ep.url) == destination)
            assert ep.in_flight == 1  # until the stream ends
            # The engine's answer passes through the picker unchanged.
            s.send(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap()))
            assert (await s.recv()).HasField("response_headers")
            s.send(response_body=pb.HttpBody(body=b"data: x\n\n", end_of_stream=True))
            out = (await s.recv()).response_body.response.body_mutation.streamed_response
            assert (out.body, out.end_of_stream) == (b"data: x\n\n", True)
            await s.close()
            await until_async(lambda: ep.in_flight == 0, "the stream's end to release the engine")

    asyncio.run(main())


def test_a_body_ended_by_trailers_is_picked_on_them(local_engines):
    body = completion("w1 w2 w3")

    async def main():
        async with local_engines({}) as urls, picker({}, urls) as (_, stub, _):
            s = Stream(stub)
            s.send(request_headers=headers("/v1/completions"), protocol_config=DUPLEX)
            s.send(request_body=pb.HttpBody(body=body))
            s.send(request_trailers=pb.HttpTrailers(trailers=base_pb2.HeaderMap()))
            assert picked(await s.recv(), "request_headers")[0] == address(urls[0])
            streamed = (await s.recv()).request_body.response.body_mutation.streamed_response
            assert (streamed.body, streamed.end_of_stream) == (body, False)  # the trailers end the request
            assert (await s.recv()).HasField("request_trailers")
            await s.close()

    asyncio.run(main())


def test_buffered_answers_the_headers_at_once_and_picks_on_the_body(local_engines):
    async def main():
        async with local_engines({}, {}) as urls, picker({}, urls) as (_, stub, _):
            s = Stream(stub)
            s.send(request_headers=headers("/v1/completions"))  # no protocol_config: Envoy's BUFFERED
            assert not (await s.recv()).request_headers.response.HasField("header_mutation")
            s.send(request_body=pb.HttpBody(body=completion("w1 w2"), end_of_stream=True))
            destination, ranking = picked(await s.recv(), "request_body")
            assert destination in {address(u) for u in urls} and destination == ranking[0]
            await s.close()
            # One message of the whole body, past gRPC's 4 MiB default.
            s = Stream(stub)
            s.send(request_headers=headers("/v1/completions"))
            await s.recv()
            s.send(request_body=pb.HttpBody(body=completion("w1 " * 2_000_000), end_of_stream=True))
            assert picked(await s.recv(), "request_body")[0] in {address(u) for u in urls}
            await s.close()

    asyncio.run(main())


def test_a_request_without_a_body_goes_by_load(local_engines):
    async def main():
        async with local_engines({}) as urls, picker({}, urls) as (_, stub, _):
            s = Stream(stub)
            s.send(request_headers=headers("/v1/models", "GET", eos=True), protocol_config=DUPLEX)
            assert picked(await s.recv(), "request_headers") == (address(urls[0]), [address(urls[0])])
            await s.close()

    asyncio.run(main())


async def refused(stub, body: bytes | None = None, **fields) -> tuple[int, dict]:
    s = Stream(stub)
    s.send(request_headers=headers("/v1/chat/completions"), protocol_config=DUPLEX, **fields)
    s.send(request_body=pb.HttpBody(body=body or completion("w1"), end_of_stream=True))
    resp = (await s.recv()).immediate_response
    await s.close()
    return resp.status.code, json.loads(resp.body)


def test_garbage_is_400_and_no_routable_engine_is_503(local_engines, dead_url):
    async def main():
        async with local_engines({}) as urls, picker({}, urls) as (_, stub, _):
            status, body = await refused(stub, b"\xff{not json")
            assert status == 400 and body["error"]["type"] == "invalid_request_error"
        async with picker({}, []) as (_, stub, _):
            status, body = await refused(stub)
            assert status == 503 and body["error"]["code"] == "no_healthy_engine"

    asyncio.run(main())


def test_the_data_planes_subset_hint_limits_the_pick(local_engines):
    async def main():
        async with local_engines({}, {}) as urls, picker({}, urls) as (_, stub, _):
            only = address(urls[1])
            for _ in range(3):
                s = Stream(stub)
                s.send(
                    request_headers=headers("/v1/completions"),
                    protocol_config=DUPLEX,
                    metadata_context=subset_hint([only]),
                )
                s.send(request_body=pb.HttpBody(body=completion("w1 w2 w3"), end_of_stream=True))
                assert picked(await s.recv(), "request_headers") == (only, [only])
                await s.body()
                await s.close()
            # None of the allowed endpoints is eligible: 503, as the protocol says.
            status, _ = await refused(stub, metadata_context=subset_hint(["10.9.9.9:8000"]))
            assert status == 503

    asyncio.run(main())


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
