"""The gateway's own errors are OpenAI-shaped; hostile bodies are 400s; compressed bodies work as direct."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib

import aiohttp

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "w1 w2 w3"}]}
SHAPE = {"message", "type", "param", "code"}


async def call(session, method, url, **kw):
    async with session.request(method, url, **kw) as resp:
        return resp.status, resp.headers, await resp.read()


def error_of(body: bytes) -> dict:
    err = json.loads(body)["error"]
    assert set(err) == SHAPE
    return err


def test_unknown_path_wrong_method_and_too_large_are_openai_errors(local_engines, start_gateway):
    async def main():
        async with (
            local_engines({}) as urls,
            start_gateway(urls, max_body_bytes=1000) as gw,
            aiohttp.ClientSession() as s,
        ):
            status, _, body = await call(s, "GET", gw.url + "/v1/nothing-here")
            assert status == 404 and error_of(body)["type"] == "invalid_request_error"
            status, headers, body = await call(s, "GET", gw.url + "/v1/chat/completions")
            assert status == 405 and "POST" in headers["Allow"] and error_of(body)
            status, _, body = await call(s, "POST", gw.url + "/v1/completions", data=b"x" * 2000)
            assert status == 413 and "1000" in error_of(body)["message"]
            # The limit holds for the decompressed size (no gzip bomb gets through).
            status, _, body = await call(
                s,
                "POST",
                gw.url + "/v1/completions",
                data=gzip.compress(b" " * 5000),
                headers={"Content-Encoding": "gzip"},
            )
            assert status == 413 and error_of(body)

    asyncio.run(main())


def test_a_bug_is_a_500_in_openai_shape_without_engine_urls(local_engines, start_gateway):
    async def main():
        async with local_engines({}) as urls, start_gateway(urls) as gw, aiohttp.ClientSession() as s:

            def broken():
                raise RuntimeError(f"cannot reach {urls[0]}")

            gw.pool.routable = broken
            status, _, body = await call(s, "POST", gw.url + "/v1/chat/completions", json=CHAT)
            assert status == 500 and error_of(body)["type"] == "server_error"
            assert urls[0] not in body.decode() and "127.0.0.1" not in body.decode()

    asyncio.run(main())


def test_hostile_json_is_a_400(local_engines, start_gateway):
    bodies = [
        b"[" * 100_000 + b"]" * 100_000,  # RecursionError in json
        b'{"prompt": "w1", "max_tokens": ' + b"9" * 5000 + b"}",  # int() digit limit: ValueError
        b'{"prompt": "w1 \xff\xfe"}',  # not UTF-8
        b'{"prompt": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001,
        b"[1, 2]",
        b"",
        b"\x00",
    ]

    async def main():
        async with local_engines({}) as urls, start_gateway(urls) as gw, aiohttp.ClientSession() as s:
            for raw in bodies:
                status, _, body = await call(
                    s, "POST", gw.url + "/v1/completions", data=raw, headers={"Content-Type": "application/json"}
                )
                assert status == 400, raw[:40]
                assert error_of(body)["type"] == "invalid_request_error"
            assert (await call(s, "POST", gw.url + "/v1/chat/completions", json=CHAT))[0] == 200  # still serving

    asyncio.run(main())


def test_odd_prompts_are_routed_by_load_and_judged_by_the_engine(local_engines, start_gateway):
    """Bodies the prompt code cannot hash (ids beyond int64, odd types) never 500 at the gateway: it routes
    them by load, and the engine (this fake one hashes nothing without a tokenizer) answers."""
    odd = [
        {"prompt": [2**70] * 40},
        {"prompt": [-1] * 40},
        {"messages": [1, 2]},
        {"messages": "w1"},
        {"prompt": {"a": 1}},
        {"messages": [{"role": "user", "content": {"x": 1}}]},
        {"prompt": None},
    ]

    async def main():
        async with local_engines({}) as urls, start_gateway(urls) as gw, aiohttp.ClientSession() as s:
            for body in odd:
                path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
                status, _, raw = await call(s, "POST", gw.url + path, json=body)
                assert status == 200, (body, status, raw)
            metrics = gw.metrics_text().decode()
            assert f'nanoserve_gateway_routing_decisions_total{{reason="fallback"}} {len(odd)}.0' in metrics

    asyncio.run(main())


def test_compressed_bodies_work_as_direct_to_the_engine(local_engines, start_gateway):
    """aiohttp decodes the body the gateway reads: it goes on decoded, without the Content-Encoding."""
    raw = json.dumps({**CHAT, "stream": True}).encode()
    encodings = {"gzip": gzip.compress(raw), "deflate": zlib.compress(raw)}

    async def main():
        async with local_engines({}) as urls, start_gateway(urls) as gw, aiohttp.ClientSession() as s:
            for enc, data in encodings.items():
                headers = {"Content-Encoding": enc, "Content-Type": "application/json"}
                direct = await call(s, "POST", urls[0] + "/v1/chat/completions", data=data, headers=headers)
                via = await call(s, "POST", gw.url + "/v1/chat/completions", data=data, headers=headers)
                assert via[0] == direct[0] == 200
                assert via[2] == direct[2]  # byte for byte
            status, _, body = await call(
                s,
                "POST",
                gw.url + "/v1/chat/completions",
                data=b"garbage, not deflate",
                headers={"Content-Encoding": "deflate"},
            )
            assert status == 400 and error_of(body)["type"] == "invalid_request_error"
            assert (await call(s, "POST", gw.url + "/v1/chat/completions", json=CHAT))[0] == 200

    asyncio.run(main())
