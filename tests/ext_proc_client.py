"""A gRPC client driving the endpoint picker's ext-proc stream as Envoy does (tests/gateway/test_epp*.py)."""

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
from nanoserve.gateway.ext_proc import DESTINATION, LB_NAMESPACE, SUBSET_KEY, SUBSET_NAMESPACE

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


async def refused(stub, body: bytes | None = None, **fields) -> tuple[int, dict]:
    s = Stream(stub)
    s.send(request_headers=headers("/v1/chat/completions"), protocol_config=DUPLEX, **fields)
    s.send(request_body=pb.HttpBody(body=body or completion("w1"), end_of_stream=True))
    resp = (await s.recv()).immediate_response
    await s.close()
    return resp.status.code, json.loads(resp.body)
