"""Cache-aware routing end to end: tokenizer + cache feed + policy, against engines that keep a prefix cache
(their `vllm:prefix_cache_hits_total` shows what routing saved). Tests taking `backend` run twice: on fake
engines and on real `nanoserve serve` processes with a tiny random model (words w0..w255)."""
from __future__ import annotations

import asyncio
import json
import random

import aiohttp

from nanoserve.gateway.prompt import Prompt

BLOCK = 8  # engines' block size, unlike the gateway's default: the feed's snapshot must win
SYSTEM = " ".join(f"w{i}" for i in range(10, 18))  # shared by all, short: first turns spread
MAX_TOKENS = 16  # real engines' replies (fake ones answer `tokens` chunks)


class Conversation:
    def __init__(self, seed: int, model: str = "fake-model") -> None:
        self.rng = random.Random(seed)
        self.model = model
        self.messages = [{"role": "system", "content": SYSTEM}]
        self.engines: list[str] = []

    def next_request(self, stream: bool = False) -> dict:
        # Words both vocabularies know (the fake engines' tokenizer and the tiny model's), none of them special.
        words = " ".join(f"w{self.rng.randrange(10, 250)}" for _ in range(self.rng.randrange(30, 50)))
        self.messages.append({"role": "user", "content": words})
        return {"model": self.model, "messages": list(self.messages), "stream": stream, "max_tokens": MAX_TOKENS}

    def answered(self, engine: str, text: str) -> None:
        self.engines.append(engine)
        self.messages.append({"role": "assistant", "content": text})


async def chat(session, gw_url: str, conv: Conversation, stream: bool = False) -> tuple[int, list[str]]:
    """One turn; returns (status, SSE data payloads or [json body])."""
    async with session.post(gw_url + "/v1/chat/completions", json=conv.next_request(stream)) as resp:
        raw = await resp.read()
        if resp.status != 200:
            return resp.status, [raw.decode()]
        if stream:
            data = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
            text = "".join(c["delta"].get("content", "") for d in data if d != "[DONE]"
                           for c in json.loads(d).get("choices", []))
        else:
            data = [raw.decode()]
            text = json.loads(raw)["choices"][0]["message"]["content"]
        conv.answered(resp.headers["X-Nanoserve-Engine"], text)
        return resp.status, data


async def total_hits(session, engines) -> float:
    """Prefix-cache hits summed over the engines, from their Prometheus /metrics (as real engines report)."""
    from prometheus_client.parser import text_string_to_metric_families
    total = 0.0
    for e in engines:
        text = await (await session.get(e.url + "/metrics")).text()
        total += sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                     if s.name == "vllm:prefix_cache_hits_total")
    return total


async def cached_hashes(session, engine_url: str) -> set[int]:
    """What an engine's prefix cache holds now: the snapshot that opens a fresh cache-event feed."""
    async with session.get(engine_url + "/v1/cache/events") as resp:
        async for line in resp.content:
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                assert event["type"] == "snapshot"
                return set(event["hashes"])
    raise AssertionError("the feed ended before its snapshot")


async def run_conversations(gw_url: str, n_conv: int, turns: int, first_seed: int = 0,
                            model: str = "fake-model") -> list[Conversation]:
    convs = [Conversation(seed, model) for seed in range(first_seed, first_seed + n_conv)]
    async with aiohttp.ClientSession() as s:
        for _ in range(turns):  # interleaved, one request at a time
            for conv in convs:
                status, _ = await chat(s, gw_url, conv)
                assert status == 200
    return convs


def test_precise_index_follows_the_feed(backend, start_gateway, until):
    engines = backend.spawn(2, block_size=BLOCK)

    async def main():
        async with start_gateway([e.url for e in engines], model=backend.tokenizer) as gw, \
                aiohttp.ClientSession() as s:
            [conv] = await run_conversations(gw.url, 1, 3, model=backend.model)
            await until(lambda: all(ep.cache.is_precise for ep in gw.pool.endpoints.values()))
            for e in engines:  # quiet now: the gateway's index converges to exactly what the engine holds
                ep = gw.pool.endpoints[e.url]
                assert ep.cache.block_size == BLOCK
                held = await cached_hashes(s, e.url)
                await until(lambda: ep.cache.precise == held)
            assert len(set(conv.engines)) == 1
            history = Prompt(gw.tokenizer.chat_ids(conv.messages)).hashes(BLOCK)
            assert gw.pool.endpoints[conv.engines[0]].cache.match(history) > 2
    asyncio.run(main())


def test_conversations_stick_and_hit_more_than_round_robin(backend, start_gateway):
    n_conv, turns = 5, 4  # 5 conversations on 3 engines: round-robin moves each one every turn
    engines = backend.spawn(3, block_size=BLOCK)
    hits = {}

    async def main(policy: str, first_seed: int) -> list[Conversation]:
        # Same engines for both policies, new conversations each time (no engine restart or reset needed;
        # the warm shared system prompt only helps the second run, round-robin).
        async with aiohttp.ClientSession() as s:
            before = await total_hits(s, engines)
            async with start_gateway([e.url for e in engines], model=backend.tokenizer, policy=policy) as gw:
                convs = await run_conversations(gw.url, n_conv, turns, first_seed, backend.model)
            hits[policy] = await total_hits(s, engines) - before
            return convs

    convs = asyncio.run(main("cache-aware", 0))
    assert all(len(set(c.engines)) == 1 for c in convs)  # every turn on one engine
    assert len({c.engines[0] for c in convs}) > 1        # but not all conversations on one
    asyncio.run(main("round-robin", 1000))
    assert hits["cache-aware"] > 2 * hits["round-robin"]


def test_approximate_mode_without_feed_still_sticks(spawn_engines, start_gateway, tiny_tokenizer):
    engines = spawn_engines(3, tokenizer=tiny_tokenizer, feed=False)

    async def main():
        async with start_gateway([e.url for e in engines], model=tiny_tokenizer) as gw:
            convs = await run_conversations(gw.url, 4, 3)
            assert not any(ep.cache.is_precise for ep in gw.pool.endpoints.values())
            assert all(len(set(c.engines)) == 1 for c in convs)
            assert len({c.engines[0] for c in convs}) > 1
    asyncio.run(main())


def test_killing_an_engine_mid_run_loses_no_unstarted_request(backend, start_gateway, until):
    engines = backend.spawn(3, block_size=BLOCK, latency=0.03, tokens=8)
    victim = engines[0]
    results: list[tuple[bool, int, list[str]]] = []

    async def converse(s, gw_url, conv: Conversation, turns: int) -> None:
        for t in range(turns):
            stream = (conv.rng.random() < 0.5)
            status, data = await chat(s, gw_url, conv, stream)
            results.append((stream, status, data))
            if status == 200 and stream and data[-1] != "[DONE]":
                conv.messages.pop()  # cut off: ask again

    async def main():
        async with start_gateway([e.url for e in engines], model=backend.tokenizer, unhealthy_threshold=1) as gw, \
                aiohttp.ClientSession() as s:
            convs = [Conversation(seed, backend.model) for seed in range(6)]
            run = asyncio.gather(*(converse(s, gw.url, c, 5) for c in convs))
            victim_ep = gw.pool.endpoints[victim.url]
            await until(lambda: len(results) >= 6 and victim_ep.in_flight > 0)
            victim.kill()  # with requests open on it
            await run
            for stream, status, data in results:
                assert status == 200, data
                if not stream or data[-1] == "[DONE]":
                    continue
                # Cut off mid-stream: only after it had started, and with an error event.
                assert len(data) >= 2 and "choices" in json.loads(data[0])
                assert json.loads(data[-1])["error"]["code"] == "upstream_disconnected"
            assert any(victim.url in c.engines for c in convs)  # the victim did serve before dying
            metrics = gw.metrics.render(gw.pool).decode()
            cut = sum(1 for stream, _, data in results if stream and data[-1] != "[DONE]")
            assert f"nanoserve_gateway_stream_errors_total {cut}.0" in metrics
            assert cut > 0 or "nanoserve_gateway_retries_total{" in metrics  # its open requests were handled
            assert victim.url not in [ep.url for ep in gw.pool.routable()]

            victim.restart()  # same URL, cold cache: new conversations go there first
            await until(lambda: gw.pool.endpoints[victim.url].routable)
            fresh = await run_conversations(gw.url, 2, 2, 100, backend.model)
            assert victim.url in {c.engines[0] for c in fresh}
    asyncio.run(main())


def test_long_prompts_are_routed_by_cache_too(start_gateway, tiny_tokenizer, fake_engine_module):
    """Prompts over the inline limit are tokenized in a worker thread; routing must not change."""
    from aiohttp import web
    fake = fake_engine_module
    prompt = " ".join(f"w{i % 500}" for i in range(4000))  # ~24 KB

    async def main():
        runners, urls = [], []
        for i in range(2):  # in-process engines without a feed: the gateway's approximate index decides
            runner = web.AppRunner(fake.build_app(fake.FakeConfig(name=f"e{i}", feed=False)))
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            runners.append(runner)
            urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
        try:
            async with start_gateway(urls, model=tiny_tokenizer) as gw, aiohttp.ClientSession() as s:
                served = []
                for _ in range(3):
                    async with s.post(gw.url + "/v1/completions", json={"prompt": prompt}) as r:
                        assert r.status == 200
                        served.append(r.headers["X-Nanoserve-Engine"])
                assert len(set(served)) == 1
                metrics = gw.metrics.render(gw.pool).decode()
                assert 'nanoserve_gateway_routing_decisions_total{reason="cache_hit"} 2.0' in metrics
        finally:
            for runner in runners:
                await runner.cleanup()
    asyncio.run(main())
