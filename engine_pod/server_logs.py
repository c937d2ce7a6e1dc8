"""What the server tells its operator: one access line per request, a banner once the model is up, and a
throughput line every few seconds while there is work (vLLM's "Avg prompt throughput ..." line).

An access line never holds the prompt or the output: method, path, status, the request's token counts, its
latency and, for a stream, that it was one. Probes (/health, /ready, /metrics, /ping) log at DEBUG only.
"""

import asyncio
import logging
import time

from aiohttp import web

access = logging.getLogger("nanoserve.access")
stats = logging.getLogger("nanoserve.stats")

TOKENS = web.RequestKey("tokens", tuple)  # (prompt, completion) tokens: set by the completion handlers
PROBES = {"/health", "/ready", "/metrics", "/ping"}
STATS_INTERVAL_S = 10.0


def access_logger(enabled: bool):
    """An aiohttp middleware that logs each request once it is answered (streams: once they end)."""

    @web.middleware
    async def log_access(request: web.Request, handler):
        if not enabled:
            return await handler(request)
        start = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            level = logging.DEBUG if request.path in PROBES else logging.INFO
            if access.isEnabledFor(level):
                tokens = request.get(TOKENS)
                counted = f" prompt_tokens={tokens[0]} completion_tokens={tokens[1]}" if tokens else ""
                access.log(
                    level,
                    "%s %s %s %d%s %.1fms",
                    request.remote,
                    request.method,
                    request.path,
                    status,
                    counted,
                    (time.perf_counter() - start) * 1e3,
                )

    return log_access


def banner(url: str, model: str, engine, version: str) -> str:
    cfg = engine.config
    return (
        f"nanoserve {version} serving {model} at {url}/v1 (device {cfg.device}, {cfg.dtype}, "
        f"tensor parallel {cfg.tensor_parallel_size}, max_model_len {cfg.max_model_len}, "
        f"{engine.info.num_blocks} KV blocks of {cfg.kvcache_block_size} tokens)"
    )


async def log_stats(engine, interval: float = STATS_INTERVAL_S) -> None:
    """Every `interval` seconds in which something ran: token throughputs, queues, KV use (until cancelled)."""
    last_prompt, last_generated, last = engine.prompt_tokens_total, engine.generation_tokens_total, time.monotonic()
    while True:
        await asyncio.sleep(interval)
        now, counts = time.monotonic(), engine.counts
        prompt, generated = engine.prompt_tokens_total, engine.generation_tokens_total
        if prompt != last_prompt or generated != last_generated or counts.running or engine.num_waiting:
            hit = engine.prefix_hits / engine.prefix_queries if engine.prefix_queries else 0.0
            stats.info(
                "prompt throughput %.1f tokens/s, generation throughput %.1f tokens/s, running %d, "
                "waiting %d, KV cache usage %.1f%%, prefix cache hit rate %.1f%%",
                (prompt - last_prompt) / (now - last),
                (generated - last_generated) / (now - last),
                counts.running,
                engine.num_waiting,
                100 * counts.kv_usage,
                100 * hit,
            )
        last_prompt, last_generated, last = prompt, generated, now
