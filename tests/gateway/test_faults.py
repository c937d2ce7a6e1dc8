"""Engines that hang, speak garbage, redirect or keep failing, while their /ready still says 200."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from poll import until_async

from nanoserve.gateway.endpoints import engine_id

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "w1 w2 w3"}]}
STREAM = {**CHAT, "stream": True}


async def post(session, url, body):
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        return resp.status, resp.headers, await resp.read()


async def requests_seen(session, url) -> int:
    async with session.get(url + "/fake/state") as resp:
        return (await resp.json())["requests"]


def test_a_hung_engine_is_marked_down_and_the_stream_retried(spawn_engines, start_gateway):
    [hung] = spawn_engines(1, fault="hang")
    [good] = spawn_engines(1)

    async def main():
        async with (
            start_gateway([hung.url, good.url], policy="round-robin", first_byte_timeout=0.3) as gw,
            aiohttp.ClientSession() as s,
        ):
            status, headers, body = await post(s, gw.url, STREAM)  # round-robin starts on `hung`
            assert status == 200 and headers["X-Nanoserve-Engine"] == engine_id(good.url)
            assert body.endswith(b"data: [DONE]\n\n")
            # Server-Timing: the gateway's share of the time to first byte holds the attempt that timed out
            timing = dict(m.strip().split(";dur=") for m in headers["Server-Timing"].split(","))
            assert set(timing) == {"gateway", "engine"} and float(timing["gateway"]) >= 300, timing
            assert await requests_seen(s, hung.url) == 1
            metrics = gw.metrics_text().decode()
            assert 'nanoserve_gateway_retries_total{cause="first_byte_timeout"} 1.0' in metrics
            assert f'requests_total{{engine="{hung.url}",status="first_byte_timeout"}} 1.0' in metrics
            assert gw.pool.endpoints[hung.url].breaker.failures == 1

    asyncio.run(main())


def test_a_slow_non_streaming_answer_is_not_cut_by_the_first_byte_timeout(local_engines, start_gateway):
    """Its first byte comes with its last token: only read_timeout bounds it."""

    async def main():
        async with (
            local_engines({"latency": 0.5}) as urls,
            start_gateway(urls, first_byte_timeout=0.05) as gw,
            aiohttp.ClientSession() as s,
        ):
            status, _, body = await post(s, gw.url, CHAT)
            assert status == 200 and json.loads(body)["choices"]
            assert gw.pool.endpoints[urls[0]].breaker.failures == 0

    asyncio.run(main())


def test_garbage_http_marks_the_engine_down_and_is_retried(local_engines, start_gateway):
    async def main():
        async with (
            local_engines({"fault": "garbage"}, {}) as (bad, good),
            start_gateway([bad, good], policy="round-robin", breaker_threshold=1, breaker_cooldown=30) as gw,
            aiohttp.ClientSession() as s,
        ):
            for _ in range(3):
                status, headers, _ = await post(s, gw.url, CHAT)
                assert status == 200 and headers["X-Nanoserve-Engine"] == engine_id(good)
            assert await requests_seen(s, bad) == 1  # then its breaker kept traffic away
            assert gw.pool.endpoints[bad].breaker.state() == "open"
            assert 'nanoserve_gateway_retries_total{cause="ClientResponseError"} 1.0' in gw.metrics_text().decode()

    asyncio.run(main())


def test_when_every_attempt_fails_the_client_gets_the_last_error_without_engine_urls(local_engines, start_gateway):
    async def main():
        async with (
            local_engines({"fault": "garbage"}, {"fault": "garbage"}) as urls,
            start_gateway(urls, max_attempts=3) as gw,
            aiohttp.ClientSession() as s,
        ):
            status, headers, body = await post(s, gw.url, STREAM)
            assert status == 502 and "X-Nanoserve-Engine" not in headers
            err = json.loads(body)["error"]
            assert err["code"] == "upstream_unavailable" and "ClientResponseError" in err["message"]
            assert "127.0.0.1" not in body.decode()
            assert [await requests_seen(s, u) for u in urls] == [1, 1]  # each marked down after its try

    asyncio.run(main())


def test_redirects_are_not_followed(local_engines, start_gateway):
    async def main():
        async with (
            local_engines({}) as [elsewhere],
            local_engines({"fault": "redirect", "redirect_to": elsewhere}) as [redirecting],
            local_engines({}) as [other],
            start_gateway([redirecting, other], policy="round-robin") as gw,
            aiohttp.ClientSession() as s,
        ):
            status, headers, body = await post(s, gw.url, CHAT)  # round-robin starts on `redirecting`
            assert status == 502 and "Location" not in headers
            assert elsewhere not in body.decode()
            assert await requests_seen(s, elsewhere) == 0  # the prompt never went where it pointed
            assert await requests_seen(s, other) == 0  # a redirect is not retried either

    asyncio.run(main())


def test_an_engine_that_keeps_failing_is_skipped_until_a_trial_succeeds(local_engines, start_gateway):
    async def main():
        async with (
            local_engines({"fail_next": 100}, {}) as (failing, good),
            start_gateway([failing, good], policy="round-robin", breaker_threshold=2, breaker_cooldown=0.2) as gw,
            aiohttp.ClientSession() as s,
        ):
            ep = gw.pool.endpoints[failing]

            async def trial_sent(requests: int, statuses: list[int]) -> bool:
                """Another request through the gateway (its status kept), until the failing engine has seen
                `requests`."""
                if await requests_seen(s, failing) >= requests:
                    return True
                statuses.append((await post(s, gw.url, CHAT))[0])
                return False

            statuses = [(await post(s, gw.url, CHAT))[0] for _ in range(4)]
            assert statuses == [500, 200, 500, 200]  # 500s are passed on, never retried elsewhere
            assert ep.breaker.trips == 1 and ep.healthy  # open (its probes still pass)
            # A failed trial reopens it, for longer.
            await until_async(ep.breaker.available, "the breaker's cooldown to end")
            await until_async(lambda: trial_sent(3, []), "the breaker's trial request")
            assert ep.breaker.trips == 2
            # Mended: the next trial closes the breaker.
            await s.post(failing + "/fake/state", json={"fail_next": 0})
            await until_async(ep.breaker.available, "the breaker's longer cooldown to end")
            mended: list[int] = []
            await until_async(lambda: trial_sent(4, mended), "the breaker's second trial request")
            assert mended and set(mended) == {200}
            assert ep.breaker.state() == "closed"

    asyncio.run(main())
