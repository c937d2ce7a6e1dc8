"""Active health checks, readiness and failover with fake engine processes."""

from __future__ import annotations

import asyncio

import aiohttp
from poll import until_async

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "w1 w2 w3"}]}


async def served_by(session, gw) -> str:
    """The URL of the engine that answered (the response names it by its opaque id)."""
    async with session.post(gw.url + "/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
        await resp.read()
        return gw.pool.by_id(resp.headers["X-Nanoserve-Engine"]).url


def test_killed_engine_is_dropped_and_a_restarted_one_is_routed_to_again(spawn_engines, start_gateway):
    engines = spawn_engines(2)
    victim, survivor = engines

    async def main():
        async with (
            start_gateway([e.url for e in engines], policy="round-robin", unhealthy_threshold=2) as gw,
            aiohttp.ClientSession() as s,
        ):
            ep = gw.pool.endpoints[victim.url]
            victim.kill()
            await until_async(lambda: not ep.healthy, "the probes to mark the killed engine down (no traffic)")
            assert {await served_by(s, gw) for _ in range(4)} == {survivor.url}
            assert (await s.get(gw.url + "/ready")).status == 200
            victim.restart()
            await until_async(lambda: ep.healthy, "the restarted engine to be healthy")
            assert {await served_by(s, gw) for _ in range(4)} == {victim.url, survivor.url}

    asyncio.run(main())


def test_not_ready_engine_gets_no_traffic(spawn_engines, start_gateway):
    loading, ready = spawn_engines(1, ready=False) + spawn_engines(1)

    async def main():
        async with (
            start_gateway([loading.url, ready.url], wait_routable=False, policy="round-robin") as gw,
            aiohttp.ClientSession() as s,
        ):
            await until_async(lambda: gw.pool.endpoints[ready.url].healthy, "the ready engine to be healthy")
            assert {await served_by(s, gw) for _ in range(4)} == {ready.url}
            await s.post(loading.url + "/fake/state", json={"ready": True})
            await until_async(lambda: gw.pool.endpoints[loading.url].healthy, "the loaded engine to be healthy")
            assert {await served_by(s, gw) for _ in range(4)} == {loading.url, ready.url}

    asyncio.run(main())


def test_draining_engine_is_retried_elsewhere_and_skipped(spawn_engines, start_gateway):
    draining, other = spawn_engines(2)

    async def main():
        # Slow probes: the 503 answer itself must take the engine out of rotation.
        async with (
            start_gateway([draining.url, other.url], policy="round-robin", health_interval=30) as gw,
            aiohttp.ClientSession() as s,
        ):
            await s.post(draining.url + "/fake/state", json={"fail_next": 100, "fail_status": 503})
            assert {await served_by(s, gw) for _ in range(4)} == {other.url}
            state = await (await s.get(draining.url + "/fake/state")).json()
            assert state["requests"] == 1
            assert not gw.pool.endpoints[draining.url].routable

    asyncio.run(main())


def test_discovery_readiness_gates_routing(spawn_engines, start_gateway):
    engines = spawn_engines(2)

    async def main():
        async with start_gateway([e.url for e in engines], policy="round-robin") as gw, aiohttp.ClientSession() as s:
            gw.set_targets({engines[0].url: False, engines[1].url: True})  # e.g. EndpointSlice ready=false
            assert {await served_by(s, gw) for _ in range(4)} == {engines[1].url}
            gw.set_targets({engines[0].url: True})  # engines[1] removed from the Service
            assert list(gw.pool.endpoints) == [engines[0].url]
            assert {await served_by(s, gw) for _ in range(4)} == {engines[0].url}

    asyncio.run(main())
