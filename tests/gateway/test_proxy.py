"""The reverse proxy against fake engine processes: passthrough, retries, mid-stream failure, errors."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from poll import until_async

from nanoserve.gateway.endpoints import engine_id

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "w1 w2 w3"}]}


def events(raw: bytes) -> list[str]:
    """The data payloads of a server-sent event stream."""
    return [line[len("data: ") :] for line in raw.decode().split("\n") if line.startswith("data: ")]


async def post(session, url, body, **kw):
    async with session.post(url, json=body, **kw) as resp:
        return resp.status, resp.headers, await resp.read()


async def engine_state(session, url, change: dict | None = None) -> dict:
    async with session.request("POST" if change else "GET", url + "/fake/state", json=change) as resp:
        return await resp.json()


def test_stream_and_json_pass_through_unchanged(spawn_engines, start_gateway):
    [engine] = spawn_engines(1, latency=0.01)

    async def main():
        async with start_gateway([engine.url]) as gw, aiohttp.ClientSession() as s:
            for path, body in [
                ("/v1/chat/completions", {**CHAT, "stream": True}),
                ("/v1/completions", {"model": "fake-model", "prompt": "w1", "stream": True}),
                ("/v1/chat/completions", CHAT),
            ]:
                direct = await post(s, engine.url + path, body)
                via = await post(s, gw.url + path, body)
                assert via[0] == direct[0] == 200
                assert via[2] == direct[2]  # byte for byte
                assert via[1]["Content-Type"] == direct[1]["Content-Type"]
                assert via[1]["X-Nanoserve-Engine"] == engine_id(engine.url)
            stream = (await post(s, gw.url + "/v1/chat/completions", {**CHAT, "stream": True}))[2]
            assert events(stream)[-1] == "[DONE]"

    asyncio.run(main())


def test_retries_before_first_byte(spawn_engines, start_gateway):
    engines = spawn_engines(2, fail_status=429)  # overloaded: another engine may take it

    async def main():
        async with start_gateway([e.url for e in engines], max_attempts=3) as gw, aiohttp.ClientSession() as s:
            for e in engines:
                await engine_state(s, e.url, {"fail_next": 1})
            status, headers, body = await post(s, gw.url + "/v1/chat/completions", {**CHAT, "stream": True})
            assert status == 200 and events(body)[-1] == "[DONE]"
            served = [(await engine_state(s, e.url))["requests"] for e in engines]
            assert sum(served) == 3  # failed on both, then succeeded on the first again
            metrics = await (await s.get(gw.url + "/metrics")).text()
            assert 'nanoserve_gateway_retries_total{cause="status_429"} 2.0' in metrics

    asyncio.run(main())


def test_an_engine_error_is_passed_on_not_retried(spawn_engines, start_gateway):
    """A 500 says the request broke the engine: retrying it elsewhere could break every engine in turn."""
    engines = spawn_engines(2, fail_next=5)  # answers 500

    async def main():
        async with start_gateway([e.url for e in engines], max_attempts=3) as gw, aiohttp.ClientSession() as s:
            status, _, body = await post(s, gw.url + "/v1/completions", {"prompt": "w1", "max_tokens": 2})
            assert status == 500 and json.loads(body)["error"]["message"] == "injected failure"
            assert sum([(await engine_state(s, e.url))["requests"] for e in engines]) == 1

    asyncio.run(main())


def test_client_errors_are_not_retried(spawn_engines, start_gateway):
    engines = spawn_engines(2)

    async def main():
        async with start_gateway([e.url for e in engines]) as gw, aiohttp.ClientSession() as s:
            status, _, body = await post(s, gw.url + "/v1/completions", {"model": "fake-model"})
            assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
            assert sum([(await engine_state(s, e.url))["requests"] for e in engines]) == 1
            status, _, body = await post(s, gw.url + "/v1/completions", None, data=b"{not json")
            assert status == 400 and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}

    asyncio.run(main())


def test_overload_is_passed_on_when_every_engine_refuses(spawn_engines, start_gateway):
    engines = spawn_engines(2, fail_status=429, fail_next=10)

    async def main():
        async with start_gateway([e.url for e in engines], max_attempts=2) as gw, aiohttp.ClientSession() as s:
            status, headers, body = await post(s, gw.url + "/v1/chat/completions", CHAT)
            assert status == 429 and "Retry-After" in headers
            assert "error" in json.loads(body)
            assert sum([(await engine_state(s, e.url))["requests"] for e in engines]) == 2

    asyncio.run(main())


def test_engine_dying_before_first_byte_is_retried_elsewhere(spawn_engines, start_gateway):
    [dying] = spawn_engines(1, crash_after=0, crash_chunks=0)
    [healthy] = spawn_engines(1)

    async def main():
        async with start_gateway([dying.url, healthy.url], policy="round-robin") as gw, aiohttp.ClientSession() as s:
            for stream in (True, False, True, False):  # round-robin sends one of the first two to `dying`
                status, headers, body = await post(s, gw.url + "/v1/chat/completions", {**CHAT, "stream": stream})
                assert status == 200 and headers["X-Nanoserve-Engine"] == engine_id(healthy.url)
            assert dying.proc.wait(timeout=10) != 0
            assert [ep.url for ep in gw.pool.routable()] == [healthy.url]

    asyncio.run(main())


def test_engine_dying_mid_stream_ends_with_error_event(spawn_engines, start_gateway):
    [engine] = spawn_engines(1, crash_after=0, crash_chunks=2, tokens=5)

    async def main():
        async with start_gateway([engine.url]) as gw, aiohttp.ClientSession() as s:
            status, _, body = await post(s, gw.url + "/v1/chat/completions", {**CHAT, "stream": True})
            assert status == 200
            data = events(body)
            assert len(data) == 3 and "[DONE]" not in data
            assert all("choices" in json.loads(d) for d in data[:2])
            assert json.loads(data[2])["error"]["code"] == "upstream_disconnected"
            assert body.endswith(b"\n\n")
            metrics = await (await s.get(gw.url + "/metrics")).text()
            assert "nanoserve_gateway_stream_errors_total 1.0" in metrics

    asyncio.run(main())


def test_openai_client_sees_mid_stream_error(spawn_engines, start_gateway):
    openai = pytest.importorskip("openai")
    [engine] = spawn_engines(1, crash_after=1, crash_chunks=1)

    async def main():
        async with start_gateway([engine.url]) as gw:
            client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0)
            reply = await client.chat.completions.create(model="fake-model", messages=CHAT["messages"])
            assert reply.choices[0].message.content.startswith("ok")
            stream = await client.chat.completions.create(model="fake-model", messages=CHAT["messages"], stream=True)
            with pytest.raises(openai.APIError):
                async for _ in stream:
                    pass
            await client.close()

    asyncio.run(main())


def test_no_engine_gives_503(start_gateway, dead_url):
    async def main():
        async with start_gateway([dead_url], wait_routable=False) as gw, aiohttp.ClientSession() as s:
            ep = gw.pool.endpoints[dead_url]
            await until_async(lambda: ep.failures >= 3, "a few failed probes")
            assert (await s.get(gw.url + "/ready")).status == 503
            assert (await s.get(gw.url + "/health")).status == 200
            for path in ("/v1/chat/completions", "/v1/completions"):
                status, _, body = await post(s, gw.url + path, CHAT)
                assert status == 503
                assert json.loads(body)["error"]["code"] == "no_healthy_engine"
            assert (await s.get(gw.url + "/v1/models")).status == 503

    asyncio.run(main())


def test_models_are_aggregated(spawn_engines, start_gateway):
    engines = spawn_engines(2) + spawn_engines(1, model="other-model")

    async def main():
        async with start_gateway([e.url for e in engines]) as gw, aiohttp.ClientSession() as s:
            resp = await s.get(gw.url + "/v1/models")
            assert resp.status == 200
            ids = sorted(m["id"] for m in (await resp.json())["data"])
            assert ids == ["fake-model", "other-model"]

    asyncio.run(main())


def test_served_model_name_rejects_other_models(spawn_engines, start_gateway):
    [engine] = spawn_engines(1)

    async def main():
        async with start_gateway([engine.url], served_model_name="fake-model") as gw, aiohttp.ClientSession() as s:
            status, _, body = await post(s, gw.url + "/v1/chat/completions", {**CHAT, "model": "gpt-9"})
            assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
            assert (await post(s, gw.url + "/v1/chat/completions", CHAT))[0] == 200

    asyncio.run(main())


def test_metrics_count_requests_per_engine(spawn_engines, start_gateway):
    engines = spawn_engines(2)
    n = 6

    async def main():
        async with start_gateway([e.url for e in engines], policy="round-robin") as gw, aiohttp.ClientSession() as s:
            for _ in range(n):
                assert (await post(s, gw.url + "/v1/chat/completions", CHAT))[0] == 200
            text = await (await s.get(gw.url + "/metrics")).text()
            for e in engines:
                assert f'nanoserve_gateway_requests_total{{engine="{e.url}",status="200"}} {n // 2}.0' in text
                assert f'nanoserve_gateway_engine_up{{engine="{e.url}"}} 1.0' in text
            assert f'nanoserve_gateway_routing_decisions_total{{reason="round_robin"}} {n}.0' in text

    asyncio.run(main())


def test_in_process_fake_engine_drops_the_connection_mid_stream(start_gateway, fake_engine_module):
    """The fake engine also runs inside the test's event loop (no process to kill: it drops the socket)."""
    from aiohttp import web

    fake = fake_engine_module

    async def main():
        runner = web.AppRunner(fake.build_app(fake.FakeConfig(crash_after=0, crash_chunks=1, exit_on_crash=False)))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with start_gateway([url]) as gw, aiohttp.ClientSession() as s:
                status, _, body = await post(s, gw.url + "/v1/completions", {"prompt": "w1", "stream": True})
                data = events(body)
                assert status == 200 and len(data) == 2
                assert json.loads(data[1])["error"]["code"] == "upstream_disconnected"
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_engine_api_key_for_own_calls_and_client_keys_pass_through(start_gateway, fake_engine_module):
    from aiohttp import web

    fake = fake_engine_module

    async def main():
        runner = web.AppRunner(fake.build_app(fake.FakeConfig(api_key="sekret")))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with (
                start_gateway([url], engine_api_key="sekret", policy="cache-aware") as gw,
                aiohttp.ClientSession() as s,
            ):
                assert (await s.get(gw.url + "/v1/models")).status == 200
                # The feed authenticates too: its snapshot comes.
                await until_async(lambda: gw.pool.endpoints[url].cache.is_precise, "the keyed feed's snapshot")
                # Client requests carry the client's key, never the gateway's.
                assert (await post(s, gw.url + "/v1/chat/completions", CHAT))[0] == 401
                auth = {"Authorization": "Bearer sekret"}
                assert (await post(s, gw.url + "/v1/chat/completions", CHAT, headers=auth))[0] == 200
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_an_engines_cookie_goes_to_its_client_and_never_on_with_other_requests(local_engines, start_gateway):
    """A shared client session would keep the engine's Set-Cookie and send it with every later request (other
    clients' too): the gateway keeps no cookies. (By host name: aiohttp's jar ignores cookies of IP hosts.)"""

    async def main():
        async with local_engines({"set_cookie": "session=tenant-a"}) as [url]:
            by_name = url.replace("127.0.0.1", "localhost")
            async with start_gateway([by_name]) as gw, aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
                for _ in range(3):
                    async with s.post(gw.url + "/v1/completions", json={"prompt": "w1"}) as resp:
                        assert resp.status == 200 and resp.headers["Set-Cookie"] == "session=tenant-a"
                state = await engine_state(s, url)
                assert state["requests"] == 3 and state["cookies"] == 0

    asyncio.run(main())
