"""Bad input, disconnects, overload, auth, body limits, metrics and the cache-state feed, over real HTTP."""

import asyncio
import json
import os
import signal

import aiohttp
import prelaunch
import pytest
from poll import until, until_async
from procs import ServerProcess
from prometheus_client.parser import text_string_to_metric_families

from nanoserve.common.block_hash import block_hashes


def post(url, path, body, headers=None, raw=None):
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.post(
                url + path,
                data=raw if raw is not None else json.dumps(body),
                headers={"Content-Type": "application/json", **(headers or {})},
            ) as r:
                return r.status, await r.json(content_type=None), r.headers

    return asyncio.run(go())


def get_metrics(url) -> dict[str, float]:
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/metrics") as r:
                return await r.text()

    values = {}
    for family in text_string_to_metric_families(asyncio.run(go())):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0) + sample.value
    return values


@pytest.mark.parametrize(
    "path, body, raw, param",
    [
        ("/v1/completions", None, b"{not json", None),
        ("/v1/completions", None, b"[1, 2]", None),
        ("/v1/completions", {"model": "tiny"}, None, "prompt"),
        ("/v1/completions", {"prompt": 12}, None, "prompt"),
        ("/v1/completions", {"prompt": "w5", "max_tokens": -1}, None, "max_tokens"),
        ("/v1/completions", {"prompt": "w5", "max_tokens": "ten"}, None, "max_tokens"),
        ("/v1/completions", {"prompt": "w5", "temperature": -1}, None, "temperature"),
        ("/v1/completions", {"prompt": "w5", "top_p": 2}, None, "top_p"),
        ("/v1/completions", {"prompt": "", "max_tokens": 3}, None, "prompt"),
        ("/v1/completions", {"prompt": [1, 99999]}, None, "prompt"),
        ("/v1/completions", {"prompt": " ".join(["w9"] * 600)}, None, "prompt"),
        ("/v1/completions", {"prompt": "w5 w6", "max_tokens": 511}, None, "max_tokens"),
        ("/v1/completions", {"prompt": "w5", "n": -1}, None, "n"),
        ("/v1/completions", {"prompt": ["w5", 12]}, None, "prompt"),
        ("/v1/completions", {"prompt": ["w5", ""]}, None, "prompt"),
        ("/v1/completions", {"prompt": "w5", "stream": "yes"}, None, "stream"),
        ("/v1/chat/completions", {"messages": []}, None, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, None, "messages[0]"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, None, "messages[0].content"),
        ("/v1/chat/completions", {}, None, "messages"),
        # Found by fuzzing (issue 16): each was a 500, or accepted although invalid.
        ("/v1/completions", {"prompt": "w5", "max_completion_tokens": 0}, None, "max_tokens"),
        ("/v1/completions", None, b'{"prompt": "w5", "temperature": 1e400}', "temperature"),
        ("/v1/completions", None, b'{"prompt": "w5", "temperature": NaN}', "temperature"),
        ("/v1/completions", None, b'{"prompt": "w5", "top_p": Infinity}', "top_p"),
        ("/v1/completions", {"prompt": "w5", "temperature": 10**400}, None, "temperature"),
        ("/v1/completions", None, b'{"prompt": "w5", "max_tokens": ' + b"9" * 5000 + b"}", None),
        ("/v1/completions", None, b"[" * 100000 + b"]" * 100000, None),
        ("/v1/completions", None, b'{"prompt": "\xff\xfe w5"}', None),
    ],
)
def test_bad_input_is_400_with_a_message(tiny_server, path, body, raw, param):
    status, payload, _ = post(tiny_server.url, path, body, raw=raw)
    assert status == 400, payload
    assert payload["error"]["message"] and payload["error"]["type"] == "invalid_request_error"
    assert payload["error"]["param"] == param


def test_the_poison_request_of_issue_16_is_harmless(tiny_server):
    """A top_k beyond int64 crashed the engine thread; now it means "no top-k", and the engine lives on."""
    for body in (
        {"prompt": "w5", "max_tokens": 2, "top_k": 9223372036854775808},
        {"prompt": "w5", "max_tokens": 2, "temperature": 0.5, "seed": -(2**70)},
    ):
        status, payload, _ = post(tiny_server.url, "/v1/completions", body)
        assert status == 200 and payload["choices"][0]["finish_reason"] == "length", payload
    status, payload, _ = post(tiny_server.url, "/v1/completions", {"prompt": "w5", "max_tokens": 2})
    assert status == 200


def test_unknown_model_is_404_model_not_found(tiny_server):
    status, payload, _ = post(tiny_server.url, "/v1/completions", {"model": "gpt-9", "prompt": "w5"})
    assert status == 404 and payload["error"]["code"] == "model_not_found"
    assert "gpt-9" in payload["error"]["message"]


def test_disconnecting_100_streams_frees_every_block(tiny_server):
    async def one(session, i):
        async with session.post(
            tiny_server.url + "/v1/completions",
            json={"prompt": [i % 200 + 3] * 40, "max_tokens": 400, "stream": True, "ignore_eos": True},
        ) as r:
            assert r.status == 200
            await r.content.readline()  # the first token arrived: the request holds blocks
            # leaving the block drops the connection mid-stream

    async def main():
        async with aiohttp.ClientSession() as s:
            await asyncio.gather(*(one(s, i) for i in range(100)))

    def idle() -> dict[str, float] | None:
        """The metrics once no request runs or waits and no block is used, else None."""
        m = get_metrics(tiny_server.url)
        busy = m["vllm:kv_cache_usage_perc"], m["vllm:num_requests_running"], m["vllm:num_requests_waiting"]
        return m if busy == (0, 0, 0) else None

    before = get_metrics(tiny_server.url)  # the server is shared: its counters count earlier tests' requests
    asyncio.run(main())
    m = until(idle, lambda: f"every block freed and no request left ({get_metrics(tiny_server.url)})")
    # The aborts are counted (as finished_reason="abort"), and they really stopped early.
    assert m["vllm:request_success_total"] - before["vllm:request_success_total"] == 100
    assert m["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < 100 * 400


def test_metrics_parse_and_carry_vllm_names(tiny_server):
    before = get_metrics(tiny_server.url)  # the server is shared: earlier tests' requests are counted too
    status, payload, _ = post(
        tiny_server.url, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True}
    )
    after = get_metrics(tiny_server.url)
    names = set(after)

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0)

    assert status == 200
    assert grew("vllm:request_prompt_tokens_sum") == 3 and grew("vllm:request_generation_tokens_sum") == 3
    assert grew("vllm:request_prompt_tokens_count") == 1 and grew("vllm:request_decode_time_seconds_count") == 1
    assert grew("vllm:time_per_output_token_seconds_count") == 2  # three tokens: two gaps
    assert grew("vllm:iteration_tokens_total_sum") == 3 + 2  # the prompt's prefill, then two decodes
    assert after["vllm:cache_config_info"] == 1
    assert after["vllm:gpu_cache_usage_perc"] == after["vllm:kv_cache_usage_perc"]  # V0's names, for routers
    assert (
        after["vllm:gpu_prefix_cache_hit_rate"]
        == after["vllm:prefix_cache_hits_total"] / after["vllm:prefix_cache_queries_total"]
    )
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:request_queue_time_seconds_bucket",
        "vllm:request_prefill_time_seconds_bucket",
        "vllm:request_inference_time_seconds_bucket",
        "vllm:request_time_per_output_token_seconds_bucket",
    ]:
        assert name in names


def test_cache_events_feed_reports_stored_blocks(tiny_server):
    prompt = list(range(100, 150))  # 3 full blocks

    async def main():
        async with aiohttp.ClientSession() as s:
            async with s.get(tiny_server.url + "/v1/cache/events") as feed:
                first = json.loads((await feed.content.readline()).decode()[len("data: ") :])
                await feed.content.readline()
                async with s.post(tiny_server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}) as r:
                    assert r.status == 200
                stored = set()
                while not set(block_hashes(prompt, 16)) <= stored:
                    line = (await asyncio.wait_for(feed.content.readline(), 10)).decode()
                    if line.startswith("data: "):
                        event = json.loads(line[len("data: ") :])
                        if event["type"] == "stored":
                            stored |= set(event["hashes"])
                return first, stored

    snapshot, stored = asyncio.run(main())
    assert snapshot["type"] == "snapshot" and snapshot["block_size"] == 16
    assert set(block_hashes(prompt, 16)) <= stored


# This module's own servers, each for one test, started ahead of it (tests/prelaunch.py).
auth_server = prelaunch.server_fixture(
    "auth_server",
    lambda get: ServerProcess(
        get("tiny_models")["llama"],
        "--num-kvcache-blocks",
        "256",
        "--max-num-seqs",
        "1",
        "--max-pending",
        "2",
        "--max-body-bytes",
        "2000",
        "--drain-timeout",
        "60",
        "--public-metrics",
        env={"NANOSERVE_API_KEY": "sesame"},
    ),
)
# 4 blocks of 16 tokens.
small_cache_server = prelaunch.server_fixture(
    "small_cache_server",
    lambda get: ServerProcess(get("tiny_models")["qwen3"], "--num-kvcache-blocks", "4", "--max-model-len", "512"),
)


def test_auth_body_limit_overload_and_drain(auth_server):
    server = auth_server
    auth = {"Authorization": "Bearer sesame"}
    status, payload, _ = post(server.url, "/v1/completions", {"prompt": "w5"})
    assert status == 401 and payload["error"]["code"] == "invalid_api_key"
    assert "vllm:num_requests_waiting" in get_metrics(server.url)  # --public-metrics: Prometheus needs no key

    async def feed_status():
        async with aiohttp.ClientSession() as s, s.get(server.url + "/v1/cache/events") as r:
            return r.status

    assert asyncio.run(feed_status()) == 401  # the cache feed still does
    status, payload, _ = post(server.url, "/v1/completions", {"prompt": "w5 " * 1000}, headers=auth)
    assert status == 413 and "too large" in payload["error"]["message"]

    async def burst():
        async with aiohttp.ClientSession(headers=auth) as s:

            async def one(i):
                async with s.post(
                    server.url + "/v1/completions", json={"prompt": [i + 3] * 8, "max_tokens": 30, "ignore_eos": True}
                ) as r:
                    return r.status, r.headers.get("Retry-After")

            return await asyncio.gather(*(one(i) for i in range(12)))

    results = asyncio.run(burst())
    assert {s for s, _ in results} == {200, 429}
    assert all(retry == "1" for s, retry in results if s == 429)

    async def drain():
        async with aiohttp.ClientSession(headers=auth) as s:

            async def draining() -> bool:
                async with s.get(server.url + "/ready") as ready:
                    return ready.status == 503

            async with s.post(
                server.url + "/v1/completions",
                json={"prompt": "w5 w6", "max_tokens": 300, "ignore_eos": True, "stream": True},
            ) as r:
                first = await r.content.readline()  # the stream is running
                server.proc.send_signal(signal.SIGTERM)
                await until_async(draining, "/ready to say 503 once SIGTERM is in")
                async with s.post(server.url + "/v1/completions", json={"prompt": "w5"}) as late:
                    late_status = late.status
                return (first + await r.read()).decode(), late_status

    body, late = asyncio.run(drain())
    assert late == 503
    assert body.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in body
    assert server.proc.wait(timeout=60) == 0


def test_request_that_can_never_fit_the_cache_is_400_and_the_engine_lives(small_cache_server):
    # 4 blocks of 16 tokens: a 20-token prompt with 100 new tokens could never fit, even alone.
    server = small_cache_server
    status, payload, _ = post(server.url, "/v1/completions", {"prompt": [5] * 20, "max_tokens": 100})
    assert status == 400 and "KV-cache blocks" in payload["error"]["message"]
    assert payload["error"]["param"] == "max_tokens"
    status, payload, _ = post(server.url, "/v1/completions", {"prompt": [5] * 20, "max_tokens": 20})
    assert status == 200 and payload["usage"]["completion_tokens"] == 20


def patched_server(get, patch: str, *args: str) -> ServerProcess:
    """`nanoserve serve` on the tiny qwen3 with `patch` run at the start of each of its Python processes (a
    sitecustomize module): the engine runs in its own spawned process, which a patch made in the server's
    would not reach."""
    folder = get("tmp_path_factory").mktemp("patch")
    (folder / "sitecustomize.py").write_text(patch)
    path = os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])
    return ServerProcess(
        get("tiny_models")["qwen3"],
        *args,
        "--num-kvcache-blocks",
        "512",
        "--max-model-len",
        "512",
        env={"PYTHONPATH": path},
    )


FAULTY_STEP = """
import nanoserve.engine_pod.llm_engine as llm_engine
step, calls = llm_engine.LLMEngine.run_step, [0]
def faulty_step(self):  # the test's injected fault: the engine's 20th step raises
    calls[0] += 1
    if calls[0] >= 20:
        raise RuntimeError("injected step failure")
    return step(self)
llm_engine.LLMEngine.run_step = faulty_step
"""
faulty_server = prelaunch.server_fixture("faulty_server", lambda get: patched_server(get, FAULTY_STEP))


def test_a_failing_step_ends_every_request_with_an_error_and_the_server_exits(faulty_server):
    """Streams get an SSE error event, the others a 500, within seconds; then the process exits 1 so that
    Kubernetes (or `nanoserve up`) restarts it."""
    url, proc = faulty_server.url, faulty_server.proc
    try:

        async def one(session, i: int) -> tuple[int, list[str] | dict]:
            body = {"prompt": [i + 3] * 20, "max_tokens": 300, "ignore_eos": True, "stream": i % 2 == 0}
            async with session.post(url + "/v1/completions", json=body) as r:
                if body["stream"]:
                    return r.status, [line[6:] for line in (await r.text()).split("\n") if line.startswith("data: ")]
                return r.status, await r.json()

        async def main():
            async with aiohttp.ClientSession() as s:
                return await asyncio.wait_for(asyncio.gather(*(one(s, i) for i in range(6))), 10)

        results = asyncio.run(main())
        for i, (status, answer) in enumerate(results):
            if i % 2 == 0:  # streamed: it had started, and it ends with an error event instead of [DONE]
                assert status == 200 and json.loads(answer[-1])["error"]["code"] == "engine_failed", answer[-1]
            else:
                assert status == 500 and "injected step failure" in answer["error"]["message"]
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


SLOW_STEP = """
import time
import nanoserve.engine_pod.llm_engine as llm_engine
step = llm_engine.LLMEngine.run_step
def slow_step(self):  # the test's injected slowness: a request takes far longer than the drain timeout
    time.sleep(0.05)
    return step(self)
llm_engine.LLMEngine.run_step = slow_step
"""
slow_server = prelaunch.server_fixture(
    "slow_server", lambda get: patched_server(get, SLOW_STEP, "--drain-timeout", "1")
)


def test_requests_cut_by_the_drain_timeout_end_with_an_error_and_the_exit_code_says_so(slow_server):
    url, proc = slow_server.url, slow_server.proc
    try:

        async def one(session, stream: bool, started: asyncio.Event):
            body = {"prompt": "w5 w6", "max_tokens": 400, "ignore_eos": True, "stream": stream}
            async with session.post(url + "/v1/completions", json=body) as r:
                if not stream:
                    return r.status, await r.json()
                lines = [await r.content.readline()]
                started.set()
                lines += (await r.read()).split(b"\n")
                return r.status, [json.loads(line[6:]) for line in lines if line.startswith(b"data: {")]

        async def main():
            started = asyncio.Event()
            async with aiohttp.ClientSession() as s:
                tasks = [asyncio.ensure_future(one(s, stream, started)) for stream in (True, False, True)]
                await started.wait()
                proc.send_signal(signal.SIGTERM)
                return await asyncio.wait_for(asyncio.gather(*tasks), 30)

        (s1, events1), (s2, plain), (s3, events3) = asyncio.run(main())
        for status, events in ((s1, events1), (s3, events3)):
            assert status == 200 and events[-1]["error"]["code"] == "server_shutdown", events[-1]
        assert s2 == 503 and plain["error"]["code"] == "server_shutdown", plain
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
