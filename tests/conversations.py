"""Multi-turn chat conversations through a gateway, and what the engines' caches say about them.

Used by the gateway's routing tests and by the cluster end-to-end tests (real engines behind the rendered
gateway). Words w10..w249 are in every test vocabulary (fake engines', tiny models') and in real ones.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import aiohttp

SYSTEM = " ".join(f"w{i}" for i in range(10, 18))  # shared by all, short: first turns spread
MAX_TOKENS = 16  # real engines' replies (fake ones answer `tokens` chunks)


class Conversation:
    def __init__(
        self,
        seed: int,
        model: str = "fake-model",
        max_tokens: int = MAX_TOKENS,
        words: tuple[int, int] = (30, 50),
        shared_system: bool = True,
    ) -> None:
        self.rng = random.Random(seed)
        self.model = model
        self.max_tokens = max_tokens
        self.words = words
        # A system prompt shared by every conversation (first turns then hit a little anywhere), or its own.
        self.messages = [{"role": "system", "content": SYSTEM if shared_system else self.say(8, 9)}]
        self.engines: list[str] = []

    def say(self, least: int, most: int) -> str:
        # Words both vocabularies know (the fake engines' tokenizer and the tiny model's), none of them special.
        return " ".join(f"w{self.rng.randrange(10, 250)}" for _ in range(self.rng.randrange(least, most)))

    def next_request(self, stream: bool = False) -> dict:
        self.messages.append({"role": "user", "content": self.say(*self.words)})
        return {"model": self.model, "messages": list(self.messages), "stream": stream, "max_tokens": self.max_tokens}

    def answered(self, engine: str, text: str) -> None:
        self.engines.append(engine)
        self.messages.append({"role": "assistant", "content": text})


async def chat(
    session, gw_url: str, conv: Conversation, stream: bool = False, answering: Callable[[str], None] | None = None
) -> tuple[int, list[str]]:
    """One turn; returns (status, SSE data payloads or [json body]). `answering(engine id)` is called once the
    answer's headers are in (a stream's: its engine has sent its first bytes), before its body is read."""
    async with session.post(gw_url + "/v1/chat/completions", json=conv.next_request(stream)) as resp:
        if answering is not None and resp.status == 200:
            answering(resp.headers["X-Nanoserve-Engine"])
        raw = await resp.read()
        if resp.status != 200:
            return resp.status, [raw.decode()]
        if stream:
            data = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
            text = "".join(
                c["delta"].get("content", "") for d in data if d != "[DONE]" for c in json.loads(d).get("choices", [])
            )
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
        total += sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "vllm:prefix_cache_hits_total"
        )
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


async def run_conversations(
    gw_url: str, n_conv: int, turns: int, first_seed: int = 0, model: str = "fake-model", **options
) -> list[Conversation]:
    """`n_conv` conversations of `turns` turns, interleaved one request at a time; options: Conversation's."""
    convs = [Conversation(seed, model, **options) for seed in range(first_seed, first_seed + n_conv)]
    async with aiohttp.ClientSession() as s:
        for _ in range(turns):  # interleaved, one request at a time
            for conv in convs:
                status, _ = await chat(s, gw_url, conv)
                assert status == 200
    return convs
