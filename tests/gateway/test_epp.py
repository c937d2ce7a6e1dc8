"""The endpoint picker's ext-proc exchange, driven by a gRPC client as Envoy drives it: request headers, the
body in chunks, end of stream; FULL_DUPLEX_STREAMED and BUFFERED; the immediate responses."""

from __future__ import annotations

import asyncio
import json

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from ext_proc_client import DUPLEX, Stream, completion, headers, picked, picker, refused, subset_hint
from poll import until_async

from nanoserve.gateway.ext_proc import EndpointPicker, Exchange, address


def test_full_duplex_holds_the_headers_until_the_body_is_in_then_streams_it_back(local_engines):
    body = completion(" ".join(f"w{i}" for i in range(40)))

    async def main():
        async with local_engines({}, {}) as urls, picker({}, urls) as (gw, stub, _):
            # The pick needs the whole prompt: nothing goes back for the headers and the first chunk.
            held, ex = EndpointPicker(gw), Exchange()
            opening = pb.ProcessingRequest(request_headers=headers("/v1/completions"), protocol_config=DUPLEX)
            assert await held.handle(ex, opening) == []
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


def test_the_gateways_client_keys_hold_through_the_picker_too(local_engines):
    async def main():
        async with local_engines({}) as urls, picker({"api_keys": ["k1"]}, urls) as (_, stub, _):
            s = Stream(stub)
            s.send(request_headers=headers("/v1/completions", authorization="Bearer k2"), protocol_config=DUPLEX)
            refusal = (await s.recv()).immediate_response  # on the headers: the body is never read
            assert refusal.status.code == 401 and json.loads(refusal.body)["error"]["code"] == "invalid_api_key"
            await s.close()
            s = Stream(stub)
            s.send(request_headers=headers("/v1/completions", authorization="Bearer k1"), protocol_config=DUPLEX)
            s.send(request_body=pb.HttpBody(body=completion("w1"), end_of_stream=True))
            assert picked(await s.recv(), "request_headers")[0] == address(urls[0])
            await s.body()
            await s.close()

    asyncio.run(main())
