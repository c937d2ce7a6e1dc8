"""What a `nanoserve serve` process logs: a banner with its URL, model and KV blocks once ready, one access
line per request (tokens and status, never the prompt's text), none with --disable-log-requests, and a
periodic throughput line while there is work."""

import asyncio
import re
from collections import Counter

import openai
import prelaunch
import pytest
from poll import until_async
from procs import ServerProcess

from nanoserve.engine_pod import server_logs


def test_banner_and_access_lines(tiny_server):
    client = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0)
    client.completions.create(model="tiny", prompt="w31 w32 w33 secretword", max_tokens=3)
    list(client.completions.create(model="tiny", prompt="w31 w32", max_tokens=2, stream=True))
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="w31", max_tokens=-1)
    out = tiny_server.output()
    assert re.search(
        rf"nanoserve \S+ serving tiny at http://127\.0\.0\.1:{tiny_server.port}/v1 \(device cpu, "
        r"float32, .*512 KV blocks of 16 tokens\)",
        out,
    )
    assert re.search(r"POST /v1/completions 200 prompt_tokens=4 completion_tokens=3 [\d.]+ms", out)
    assert re.search(r"POST /v1/completions 200 prompt_tokens=2 completion_tokens=2 [\d.]+ms", out)
    assert re.search(r"POST /v1/completions 400 [\d.]+ms", out)
    assert "secretword" not in out
    assert not re.search(r"GET /ready \d+", out)  # probes log at DEBUG only


# Started ahead of its test (tests/prelaunch.py).
quiet_server = prelaunch.server_fixture(
    "quiet_server",
    lambda get: ServerProcess(
        get("tiny_models")["qwen3"], "--num-kvcache-blocks", "64", "--disable-log-requests", "--log-level", "WARNING"
    ),
)


def test_disable_log_requests(quiet_server, tiny_models):
    server = quiet_server
    openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0).completions.create(
        model=tiny_models["qwen3"], prompt="w5", max_tokens=2
    )
    out = server.output()
    assert "/v1/completions" not in out and "serving" not in out  # WARNING: no INFO lines at all


def test_stats_line_reports_throughput_while_there_is_work():
    class Counts:
        running, kv_usage = 2, 0.25

    class Engine:
        """Its totals: 0 when the stats loop starts, then 500 prompt and 200 generated tokens."""

        counts, num_waiting, prefix_queries, prefix_hits = Counts(), 1, 100, 40

        def __init__(self) -> None:
            self.reads: Counter[str] = Counter()

        def _total(self, name: str, later: int) -> int:
            self.reads[name] += 1
            return 0 if self.reads[name] == 1 else later

        prompt_tokens_total = property(lambda self: self._total("prompt", 500))
        generation_tokens_total = property(lambda self: self._total("generation", 200))

    engine = Engine()
    lines = []

    class Catch:
        def info(self, fmt, *args):
            lines.append(fmt % args)

    async def go():
        task = asyncio.ensure_future(server_logs.log_stats(engine, interval=0.01))
        await until_async(lambda: lines, "a stats line")
        task.cancel()

    original, server_logs.stats = server_logs.stats, Catch()
    try:
        asyncio.run(go())
    finally:
        server_logs.stats = original
    assert re.match(
        r"prompt throughput [\d.]+ tokens/s, generation throughput [\d.]+ tokens/s, running 2, "
        r"waiting 1, KV cache usage 25\.0%, prefix cache hit rate 40\.0%",
        lines[0],
    )
    assert not lines[0].startswith("prompt throughput 0.0")
