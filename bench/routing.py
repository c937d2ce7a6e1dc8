"""Routing benchmark: cache-aware vs round-robin vs least-loaded on the same real engines and requests.

Multi-turn chat: many users, each with one of a few long shared system prompts, several short turns each, users
arriving as a Poisson process (each user's turns are sequential, with a think time). Greedy decoding, so every
policy sees the same conversations. The engines' KV caches are small: one engine holds about two of the system
prompts, the fleet all of them. Each policy gets freshly started engines (cold caches) and the gateway in front;
reported: engine prefix-cache hit rate (from their /metrics), two oracle hit rates computed offline from the prompts,
  fleet oracle: each prompt sent to the engine whose cache (simulated LRU of the engines' size) holds most of it;
  one engine:   all prompts through one LRU cache of an engine's size (shows one engine cannot hold the working set);
  unbounded:    one infinite cache (the workload's reuse ceiling);
TTFT (first content token, at the client) p50/p90, the engines' mean queue time, output tokens/s.

    python bench/routing.py                      # SmolLM2-135M, 3 CPU engines, about 3 minutes a policy on 2 cores
    python bench/routing.py --model tiny         # a tiny random qwen3: fast, but prefill is too cheap to matter
    python bench/routing.py --gpu --model qwen3-0.6b --system-words 2000 ...   # engines share one GPU (gpu_all.sh)

`qwen3-0.6b` is Qwen3-0.6B's shape with random bf16 weights and a word-level tokenizer (bench/common.py):
each "wN" word of the prompts is one token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass, field

import aiohttp

from nanoserve.common.block_hash import block_hashes
from nanoserve.common.ports import PortReservation
from nanoserve.up import start_engine, stop_engines

TINY = dict(
    model_type="qwen3",
    vocab_size=512,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=4096,
    initializer_range=0.25,
    tie_word_embeddings=True,
    eos_token_id=None,
    bos_token_id=None,
)


def tiny_model(folder: str = "/tmp/nanoserve-bench/routing-tiny") -> str:
    from nanoserve.engine_pod.random_model import save_random_model

    if not os.path.isfile(os.path.join(folder, "config.json")):
        save_random_model(folder, TINY, seed=0)
    return folder


@dataclass
class Turn:
    sent: float  # seconds since the run started
    messages: list[dict]
    ttft: float = -1.0
    latency: float = -1.0
    tokens: int = 0


@dataclass
class Run:
    policy: str
    turns: list[Turn] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)  # summed over the engines' /metrics
    seconds: float = 0.0


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(10, 500)}" for _ in range(n))


async def user(s: aiohttp.ClientSession, url: str, args, uid: int, start: float, t0: float, run: Run) -> None:
    rng = random.Random(uid)
    system = words(random.Random(1000 + uid % args.systems), args.system_words)
    messages = [{"role": "system", "content": system}]
    await asyncio.sleep(max(0.0, start - (time.monotonic() - t0)))
    for _ in range(args.turns):
        messages.append({"role": "user", "content": words(rng, rng.randrange(10, 20))})
        turn = Turn(time.monotonic() - t0, list(messages))
        body = {
            "model": "bench",
            "messages": messages,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        text, sent = [], time.monotonic()
        async with s.post(url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                for choice in json.loads(line[6:]).get("choices", []):
                    piece = choice["delta"].get("content")
                    if piece:
                        if turn.ttft < 0:
                            turn.ttft = time.monotonic() - sent
                        text.append(piece)
                        turn.tokens += 1
        turn.latency = time.monotonic() - sent
        run.turns.append(turn)
        messages.append({"role": "assistant", "content": "".join(text)})
        await asyncio.sleep(rng.expovariate(1 / args.think))


COUNTERS = (
    "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total",
    "vllm:request_queue_time_seconds_sum",
    "vllm:request_queue_time_seconds_count",
)


def engine_counters(urls: list[str]) -> dict[str, float]:
    """COUNTERS summed over the engines (prefix-cache ones in prompt tokens)."""
    from prometheus_client.parser import text_string_to_metric_families

    sums = dict.fromkeys(COUNTERS, 0.0)
    for url in urls:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            for family in text_string_to_metric_families(r.read().decode()):
                for sample in family.samples:
                    if sample.name in sums:
                        sums[sample.name] += sample.value
    return sums


def wait_ready(urls: list[str], procs, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    for url, proc in zip(urls, procs):
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"engine {url} did not come up")
            try:
                with urllib.request.urlopen(url + "/ready", timeout=1):
                    break
            except OSError:
                time.sleep(0.2)


async def run_policy(policy: str, model: str, args) -> Run:
    from nanoserve.gateway import GatewayConfig, serve

    held = [PortReservation() for _ in range(args.engines)]  # until the engines are stopped (common/ports.py)
    ports = [h.port for h in held]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    # max_model_len: a prompt must fit the (small) cache, else the engine could never schedule it.
    kwargs = dict(
        model=model,
        device="cuda" if args.gpu else "cpu",
        kvcache_block_size=args.block_size,
        num_kvcache_blocks=args.kv_blocks,
        max_model_len=min(4096, args.kv_blocks * args.block_size),
    )
    procs = [start_engine(kwargs, p, "bench", drain_timeout=5) for p in ports]
    run = Run(policy)
    try:
        await asyncio.to_thread(wait_ready, urls, procs)
        cfg = GatewayConfig(
            host="127.0.0.1",
            port=0,
            engines=urls,
            model=model,
            policy=policy,
            health_interval=0.2,
            metrics_interval=0.5,
        )
        async with serve(cfg) as gw, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
            while len(gw.pool.routable()) < len(urls):
                await asyncio.sleep(0.05)
            rng = random.Random(0)  # the same arrivals for every policy
            starts, t = [], 0.0
            for _ in range(args.users):
                starts.append(t)
                t += rng.expovariate(args.rate)
            t0 = time.monotonic()
            await asyncio.gather(*(user(s, gw.url, args, u, starts[u], t0, run) for u in range(args.users)))
            run.seconds = time.monotonic() - t0
        run.counters = engine_counters(urls)
    finally:
        stop_engines(procs, timeout=30)
        for h in held:
            h.close()
    return run


def oracle_hit_rates(prompts: list[list[int]], block: int, engines: int, capacity: int) -> tuple[float, float]:
    """(fleet oracle, unbounded) hit rates in prompt tokens, prompts in arrival order. Fleet: `engines` LRU
    caches of `capacity` blocks; each prompt goes to the cache holding its longest prefix (ties: the emptier).
    A prompt's blocks are touched tail first, so its head is the most recent, as in the engine (which frees a
    finished request's tail blocks first). Decode blocks, which engines also cache, are left out."""
    caches: list[OrderedDict] = [OrderedDict() for _ in range(engines)]
    seen: set[int] = set()
    total = fleet = unbounded = 0
    for ids in prompts:
        hashes = block_hashes(ids, block)
        total += len(ids)
        unbounded += block * next((i for i, h in enumerate(hashes) if h not in seen), len(hashes))
        seen.update(hashes)
        matches = [next((i for i, h in enumerate(hashes) if h not in c), len(hashes)) for c in caches]
        best = max(range(engines), key=lambda e: (matches[e], -len(caches[e])))
        fleet += block * matches[best]
        cache = caches[best]
        for h in reversed(hashes):
            cache[h] = None
            cache.move_to_end(h)
        while len(cache) > capacity:
            cache.popitem(last=False)
    return fleet / total, unbounded / total


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="model folder, smollm2-135m, tiny (a small random qwen3) or qwen3-0.6b (random weights)",
    )
    p.add_argument("--gpu", action="store_true", help="engines on CUDA (all on the first GPU)")
    p.add_argument("--engines", type=int, default=3)
    p.add_argument("--users", type=int, default=30)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--systems", type=int, default=6, help="distinct shared system prompts")
    p.add_argument("--system-words", type=int, default=100, help="about 4 SmolLM2 tokens a word")
    p.add_argument("--max-tokens", type=int, default=8, help="short outputs: TTFT is prefill, not decode")
    p.add_argument("--rate", type=float, default=0.25, help="new users per second (Poisson)")
    p.add_argument("--think", type=float, default=1.0, help="mean seconds between a reply and the next turn")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-blocks", type=int, default=80, help="per engine: about 2 of the system prompts")
    p.add_argument("--engine-threads", type=int, default=1, help="torch threads per engine (3 engines share 2 cores)")
    p.add_argument("--policies", default="cache-aware,round-robin,least-loaded")
    args = p.parse_args()
    from nanoserve.engine_pod.default_model import resolve_model
    from nanoserve.gateway.prompt import load_tokenizer

    os.environ["OMP_NUM_THREADS"] = str(args.engine_threads)  # inherited by the engines; oversubscription hurts
    if args.model == "qwen3-0.6b":
        sys.path.insert(0, os.path.dirname(__file__))
        from common import qwen3_0_6b_path

        model = qwen3_0_6b_path()
    else:
        model = tiny_model() if args.model == "tiny" else resolve_model(args.model)
    tok = load_tokenizer(model)
    system_tokens = len(tok.chat_ids([{"role": "system", "content": words(random.Random(1000), args.system_words)}]))
    print(
        f"model {args.model} on {'one GPU' if args.gpu else 'CPU'}, {args.engines} engines x {args.kv_blocks} "
        f"blocks of {args.block_size} "
        f"({args.engine_threads} thread each), {args.users} users x {args.turns} turns, {args.systems} system "
        f"prompts of ~{system_tokens} tokens, {args.rate}/s users, {args.think} s think, "
        f"{args.max_tokens} output tokens",
        flush=True,
    )
    print(
        "| policy | engine hit rate | fleet oracle | one-engine oracle | unbounded | TTFT p50 | TTFT p90 "
        "| engine queue mean | output tok/s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for policy in args.policies.split(","):
        run = asyncio.run(run_policy(policy, model, args))
        turns = sorted(run.turns, key=lambda t: t.sent)
        prompts = [tok.chat_ids(t.messages) for t in turns]
        fleet, unbounded = oracle_hit_rates(prompts, args.block_size, args.engines, args.kv_blocks)
        one, _ = oracle_hit_rates(prompts, args.block_size, 1, args.kv_blocks)
        ttft, c = [t.ttft for t in turns], run.counters
        queue = c["vllm:request_queue_time_seconds_sum"] / max(1.0, c["vllm:request_queue_time_seconds_count"])
        print(
            f"| {policy} | {c['vllm:prefix_cache_hits_total'] / c['vllm:prefix_cache_queries_total']:.1%} | "
            f"{fleet:.1%} | {one:.1%} | {unbounded:.1%} | {percentile(ttft, 0.5) * 1e3:.0f} ms | "
            f"{percentile(ttft, 0.9) * 1e3:.0f} ms | {queue * 1e3:.0f} ms | "
            f"{sum(t.tokens for t in turns) / run.seconds:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
