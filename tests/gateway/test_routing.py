"""Cache-aware routing end to end: tokenizer + cache feed + policy, against engines that keep a prefix cache
(their `vllm:prefix_cache_hits_total` shows what routing saved). Tests taking `backend` run twice: on fake
engines and on real `nanoserve serve` processes with a tiny random model (words w0..w255)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from conversations import Conversation, cached_hashes, chat, run_conversations, total_hits
from poll import until_async

from nanoserve.gateway.endpoints import engine_id
from nanoserve.gateway.prompt import Prompt

BLOCK = 8  # engines' block size, unlike the gateway's default: the feed's snapshot must win


def test_precise_index_follows_the_feed(backend, start_gateway):
    engines = backend.spawn(2, block_size=BLOCK)

    async def main():
        async with start_gateway([e.url for e in engines], model=backend.tokenizer) as gw, aiohttp.ClientSession() as s:
            [conv] = await run_conversations(gw.url, 1, 3, model=backend.model)
            await until_async(
                lambda: all(ep.cache.is_precise for ep in gw.pool.endpoints.values()), "every feed's snapshot"
            )
            for e in engines:  # quiet now: the gateway's index converges to exactly what the engine holds
                ep = gw.pool.endpoints[e.url]
                assert ep.cache.block_size == BLOCK
                held = await cached_hashes(s, e.url)
                await until_async(
                    lambda ep=ep, held=held: ep.cache.precise == held, f"the index of {e.url} to converge"
                )
            assert len(set(conv.engines)) == 1
            history = Prompt(token_ids=gw.tokenizer.chat_ids(conv.messages)).hashes(BLOCK)
            assert gw.pool.by_id(conv.engines[0]).cache.match(history) > 2

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
    assert len({c.engines[0] for c in convs}) > 1  # but not all conversations on one
    asyncio.run(main("round-robin", 1000))
    assert hits["cache-aware"] > 2 * hits["round-robin"]


def test_approximate_mode_without_feed_still_sticks(fake_engines_shared, start_gateway, tiny_tokenizer):
    engines = fake_engines_shared(3, feed=False)

    async def main():
        async with start_gateway([e.url for e in engines], model=tiny_tokenizer) as gw:
            convs = await run_conversations(gw.url, 4, 3)
            assert not any(ep.cache.is_precise for ep in gw.pool.endpoints.values())
            assert all(len(set(c.engines)) == 1 for c in convs)
            assert len({c.engines[0] for c in convs}) > 1

    asyncio.run(main())


def test_killing_an_engine_mid_run_loses_no_unstarted_request(backend, start_gateway):
    """An engine is killed while it streams an answer, with other requests open on it or on their way: that
    stream ends with an error event, and every request still gets its 200 (those the dead engine had not
    started, retried elsewhere)."""
    # Long answers (fake: 16 chunks 30 ms apart; real: 64 tokens): one just started cannot be over when
    # its engine is killed, a moment after its first bytes reach the client.
    engines = backend.spawn(3, block_size=BLOCK, latency=0.03, tokens=16)
    results: list[tuple[bool, int, list[str]]] = []
    victims: list = []  # the engine killed (one at most)
    cut_streams: list[list[str]] = []  # the stream it was killed in

    def kill_if_first(gw, engine: str) -> bool:
        """Once six answers are in, the first stream to start: its engine is killed, at once."""
        if victims or len(results) < 6:
            return False
        victims.append(next(e for e in engines if e.url == gw.pool.by_id(engine).url))
        victims[0].kill()
        return True

    async def converse(s, gw, conv: Conversation, turns: int) -> None:
        for _ in range(turns):
            stream = conv.rng.random() < 0.5
            killed_here: list[bool] = []
            on_start = (lambda engine, k=killed_here: k.append(kill_if_first(gw, engine))) if stream else None
            status, data = await chat(s, gw.url, conv, stream, answering=on_start)
            results.append((stream, status, data))
            if any(killed_here):
                cut_streams.append(data)
            if status == 200 and stream and data[-1] != "[DONE]":
                conv.messages.pop()  # cut off: ask again

    async def main():
        async with (
            start_gateway([e.url for e in engines], model=backend.tokenizer, unhealthy_threshold=1) as gw,
            aiohttp.ClientSession() as s,
        ):
            convs = [Conversation(seed, backend.model, max_tokens=64) for seed in range(6)]
            await asyncio.gather(*(converse(s, gw, c, 5) for c in convs))
            assert victims, "no stream started after the first six answers"
            [victim], [cut_stream] = victims, cut_streams
            # The stream its engine died in: started, then an error event instead of [DONE].
            assert len(cut_stream) >= 2 and "choices" in json.loads(cut_stream[0])
            assert json.loads(cut_stream[-1])["error"]["code"] == "upstream_disconnected"
            for stream, status, data in results:
                assert status == 200, data
                if not stream or data[-1] == "[DONE]":
                    continue
                # Cut off mid-stream: only after it had started, and with an error event.
                assert len(data) >= 2 and "choices" in json.loads(data[0])
                assert json.loads(data[-1])["error"]["code"] == "upstream_disconnected"
            metrics = gw.metrics_text().decode()
            cut = sum(1 for stream, _, data in results if stream and data[-1] != "[DONE]")
            assert f"nanoserve_gateway_stream_errors_total {cut}.0" in metrics
            assert victim.url not in [ep.url for ep in gw.pool.routable()]

            victim.restart()  # same URL, cold cache: new conversations go there first
            await until_async(lambda: gw.pool.endpoints[victim.url].routable, "the restarted engine to be routable")
            fresh = await run_conversations(gw.url, 2, 2, 100, backend.model)
            assert engine_id(victim.url) in {c.engines[0] for c in fresh}

    asyncio.run(main())


def test_long_prompts_are_routed_by_cache_too(start_gateway, tiny_tokenizer, local_engines):
    """Prompts over the inline limit are tokenized in a worker thread; routing must not change."""
    prompt = " ".join(f"w{i % 500}" for i in range(4000))  # ~24 KB

    async def main():
        # Engines without a feed: the gateway's approximate index decides.
        async with (
            local_engines({"feed": False}, {"feed": False}) as urls,
            start_gateway(urls, model=tiny_tokenizer) as gw,
            aiohttp.ClientSession() as s,
        ):
            # Engines without /v1/tokenizer: the gateway's --model tokenizer.
            await until_async(lambda: gw.routing_mode_now() == "tokens", "routing by the --model tokenizer")
            served = []
            for _ in range(3):
                async with s.post(gw.url + "/v1/completions", json={"prompt": prompt}) as r:
                    assert r.status == 200
                    served.append(r.headers["X-Nanoserve-Engine"])
            assert len(set(served)) == 1
            metrics = gw.metrics_text().decode()
            assert 'nanoserve_gateway_routing_decisions_total{reason="cache_hit"} 2.0' in metrics
            assert 'nanoserve_gateway_prompt_match_mode_total{mode="tokens"} 3.0' in metrics

    asyncio.run(main())
