"""The cache-feed client against a scripted event stream on a real socket."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web
from poll import until_async

from nanoserve.gateway.cache_feed import follow_feed, read_feed
from nanoserve.gateway.cache_index import CacheIndex

SNAPSHOT = list(range(1, 30_001))  # ~200 KB on one line: more than a default readline() accepts
BIG = 2**64 - 1  # hashes are unsigned 64-bit


def feed_app(events: list[bytes], status: int = 200) -> web.Application:
    async def handler(request):
        if status != 200:
            return web.Response(status=status)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for e in events:
            await resp.write(e)
            await asyncio.sleep(0)
        return resp  # the stream ends, as when the engine stops

    app = web.Application()
    app.router.add_get("/v1/cache/events", handler)
    return app


async def serving(app: web.Application):
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def read_all(events: list[bytes], index: CacheIndex) -> None:
    """Serve `events` as a feed and read it into `index` to its end (a clean end: read_feed is True)."""

    async def main():
        runner, url = await serving(feed_app(events))
        async with aiohttp.ClientSession() as s:
            assert await read_feed(s, url, index, idle_timeout=10) is True
        await runner.cleanup()

    asyncio.run(main())


def data(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def test_snapshot_pings_and_deltas_are_applied():
    snapshot = data({"type": "snapshot", "block_size": 32, "hashes": SNAPSHOT})
    events = [
        snapshot[:1000],
        snapshot[1000:],  # an event split across chunks
        b": ping\n\n",
        data({"type": "stored", "hashes": [BIG, 0]}),
        data({"type": "removed", "hashes": SNAPSHOT[:10]}),
    ]
    index = CacheIndex(block_size=16)

    read_all(events, index)
    assert index.block_size == 32
    assert len(index) == len(SNAPSHOT) - 10 + 2
    assert index.match([BIG, 0]) == 2 and index.match(SNAPSHOT[:11]) == 0


@pytest.mark.parametrize("status, has_feed", [(404, False), (503, True), (401, True)])
def test_missing_feed_is_reported_and_a_refusal_is_retried_soon(status, has_feed):
    """404: the engine has no feed (checked again rarely). 503 (an engine still loading its model) or 401 is
    retried at the normal interval: a fresh engine's feed starts as soon as it is ready."""

    async def main():
        runner, url = await serving(feed_app([], status=status))
        async with aiohttp.ClientSession() as s:
            assert await read_feed(s, url, CacheIndex(), idle_timeout=10) is has_feed
        await runner.cleanup()

    asyncio.run(main())


class RecordingIndex(CacheIndex):
    def __init__(self) -> None:
        super().__init__()
        self.log: list[str] = []

    def apply(self, event: dict) -> None:
        super().apply(event)
        self.log.append(event["type"])

    def feed_lost(self) -> None:
        super().feed_lost()
        self.log.append("lost")


def test_follow_feed_forgets_the_cache_when_the_stream_ends_and_reconnects():
    index = RecordingIndex()

    async def main():
        runner, url = await serving(feed_app([data({"type": "snapshot", "block_size": 16, "hashes": [7]})]))
        async with aiohttp.ClientSession() as s:
            task = asyncio.create_task(follow_feed(s, url, index, retry_interval=0.01, idle_timeout=10))
            await until_async(lambda: index.log.count("lost") >= 3, lambda: f"three feed cycles (seen {index.log})")
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()

    asyncio.run(main())
    assert index.log[:6] == ["snapshot", "lost"] * 3  # each connection: a snapshot, then forgotten at its end
    assert not index.is_precise or index.log[-1] == "snapshot"


def test_garbage_events_are_skipped_and_the_good_ones_still_applied(fake_engine_module):
    garbage = [b"data: " + line + b"\n\n" for line in fake_engine_module.FEED_GARBAGE]
    events = [
        data({"type": "snapshot", "block_size": 16, "hashes": [1, 2]}),
        *garbage,
        data({"type": "stored", "hashes": [3]}),
        *garbage,
        data({"type": "removed", "hashes": [1]}),
    ]
    index = CacheIndex(block_size=8)

    read_all(events, index)
    assert index.block_size == 16 and index.precise == {2, 3}


def test_the_follower_survives_anything_and_resyncs(monkeypatch):
    """Even a failure no one foresaw (here: in the index) only costs a reconnect, never the task."""
    index = RecordingIndex()
    calls = []

    def flaky_apply(event):
        calls.append(event["type"])
        if len(calls) == 1:
            raise AttributeError("a bug")
        RecordingIndex.apply(index, event)

    monkeypatch.setattr(index, "apply", flaky_apply)

    async def main():
        runner, url = await serving(
            feed_app([data({"type": "snapshot", "block_size": 16, "hashes": [7]}), b"data: \xff\n\n", b"data: 5\n\n"])
        )
        async with aiohttp.ClientSession() as s:
            task = asyncio.create_task(follow_feed(s, url, index, retry_interval=0.01, idle_timeout=10))
            await until_async(lambda: "snapshot" in index.log, "the next connection's snapshot")
            assert not task.done()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()

    asyncio.run(main())
    assert "snapshot" in index.log


def test_a_garbage_feed_through_the_gateway_keeps_routing(local_engines, start_gateway, tiny_tokenizer):
    """A fake engine whose feed sends every kind of garbage after its snapshot: requests still succeed and
    the index still learns what the engine stores."""

    async def main():
        async with (
            local_engines({"feed_garbage": True, "tokenizer": tiny_tokenizer}) as [url],
            start_gateway([url]) as gw,
            aiohttp.ClientSession() as s,
        ):
            ep = gw.pool.endpoints[url]
            await until_async(
                lambda: ep.cache.is_precise and ep.tokenizer is not None, "the feed's snapshot and the tokenizer"
            )
            async with s.post(gw.url + "/v1/completions", json={"prompt": " ".join(["w1"] * 40)}) as resp:
                assert resp.status == 200
            # 40 words + BOS: two full blocks of 16, stored
            await until_async(lambda: len(ep.cache) == 2, lambda: f"two blocks in the index (it holds {len(ep.cache)})")
            assert ep.cache.block_size == 16 and not ep.cache.pending

    asyncio.run(main())
