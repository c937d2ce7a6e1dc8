"""API keys from flags, a key file and the environment; which paths need one; tenants salted apart in the
prefix cache (--cache-salt-by-api-key); and the gateway's own calls to a keyed engine. Real HTTP."""

import asyncio
import json
import subprocess
import sys

import aiohttp
import prelaunch
import pytest
from poll import until_async
from procs import ServerProcess

from nanoserve.engine_pod.auth import KeyRing, load_api_keys

KEYS = {"alpha": "from the file", "beta": "from the file", "gamma": "VLLM_API_KEY", "delta": "--api-key"}
PROMPT = list(range(40, 73))  # two full blocks of 16 and one token


def call(url: str, method: str, path: str, key: str | None = None, body: dict | None = None) -> tuple[int, dict | str]:
    async def go():
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with aiohttp.ClientSession(headers=headers) as s:
            async with s.request(method, url + path, json=body) as r:
                if r.content_type == "text/event-stream":
                    return r.status, (await r.content.readline()).decode()  # the feed's snapshot
                return r.status, await r.json() if r.content_type == "application/json" else await r.text()

    return asyncio.run(go())


def cached(url: str, key: str, **extra) -> int:
    status, body = call(url, "POST", "/v1/completions", key, {"prompt": PROMPT, "max_tokens": 1, **extra})
    assert status == 200, body
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


def check_every_key_opens_everything_but_probes_need_none(keyed):
    for path in ["/health", "/ready"]:
        assert call(keyed.url, "GET", path)[0] == 200
    for path in ["/v1/models", "/metrics", "/v1/cache/events", "/v1/tokenizer"]:
        for key in [None, "wrong", "alph", "alphaa"]:
            status, body = call(keyed.url, "GET", path, key)
            assert status == 401 and body["error"]["code"] == "invalid_api_key", (path, key)
        for key in KEYS:
            status, body = call(keyed.url, "GET", path, key)
            assert status == 200, (path, key, KEYS[key])
    assert "vllm:num_requests_running" in call(keyed.url, "GET", "/metrics", "alpha")[1]
    assert json.loads(call(keyed.url, "GET", "/v1/cache/events", "beta")[1][len("data: ") :])["type"] == "snapshot"


def check_tenants_share_no_cached_prefix(keyed):
    assert cached(keyed.url, "alpha") == 0
    assert cached(keyed.url, "beta") == 0  # tenant B cannot see that A sent this prompt
    assert cached(keyed.url, "alpha") == 32  # each tenant keeps its own cache
    assert cached(keyed.url, "beta") == 32
    assert cached(keyed.url, "alpha", cache_salt="x") == 0  # a request's own salt adds to its tenant's
    assert cached(keyed.url, "alpha", cache_salt="x") == 32
    assert cached(keyed.url, "beta", cache_salt="x") == 0


def check_a_bad_cache_salt_is_refused_by_name(keyed):
    for salt in ["", 5, ["a"], None]:
        for path, body in [
            ("/v1/completions", {"prompt": "w5"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}]}),
        ]:
            status, answer = call(keyed.url, "POST", path, "alpha", {**body, "max_tokens": 1, "cache_salt": salt})
            if salt is None:  # JSON null: no salt, as vLLM
                assert status == 200
            else:
                assert status == 400 and answer["error"]["param"] == "cache_salt", answer


def check_gateway_own_calls_carry_its_key(keyed):
    """The gateway reads a keyed engine's cache feed, tokenizer and /metrics with its engine_api_key."""
    from nanoserve.gateway import GatewayConfig
    from nanoserve.gateway.app import serve

    async def main():
        config = GatewayConfig(
            host="127.0.0.1",
            port=0,
            engines=[keyed.url],
            engine_api_key="gamma",
            metrics_interval=0.1,
            health_interval=0.1,
        )
        async with serve(config) as gw:
            ep = gw.pool.endpoints[keyed.url]
            await until_async(
                lambda: ep.cache.is_precise and ep.tokenizer is not None and ep.metrics_at > 0,
                "the keyed engine's feed snapshot, tokenizer and a /metrics scrape",
            )

    asyncio.run(main())


def launch_keyed_server(get) -> ServerProcess:
    """Keys from all three places, salting by key."""
    keys = get("tmp_path_factory").mktemp("keys") / "keys"
    keys.write_text("# tenants\nalpha\n\n  beta  \n")
    return ServerProcess(
        get("tiny_models")["qwen3"],
        "--num-kvcache-blocks",
        "128",
        "--max-model-len",
        "256",
        "--api-key-file",
        str(keys),
        "--api-key",
        "delta",
        "--cache-salt-by-api-key",
        env={"VLLM_API_KEY": "gamma", "NANOSERVE_API_KEY": ""},
    )


keyed_server = prelaunch.server_fixture("keyed_server", launch_keyed_server)  # started ahead (tests/prelaunch.py)


def test_keyed_server(keyed_server):
    """One server (starting one is the slow part) with keys from all three places, salting by key."""
    keyed = keyed_server
    check_every_key_opens_everything_but_probes_need_none(keyed)
    check_tenants_share_no_cached_prefix(keyed)
    check_a_bad_cache_salt_is_refused_by_name(keyed)
    check_gateway_own_calls_carry_its_key(keyed)
    keyed.proc.kill()  # nothing here tests the drain, which waits out the feeds left open above


def test_keys_come_from_flags_file_and_env(tmp_path):
    (tmp_path / "k").write_text("a\n# not a key\n\nb\na\n")
    env = {"NANOSERVE_API_KEY": " c ", "VLLM_API_KEY": "d"}
    assert load_api_keys(["e"], str(tmp_path / "k"), env) == ["e", "a", "b", "c", "d"]
    assert load_api_keys(None, None, {}) == []
    with pytest.raises(ValueError):
        load_api_keys([""], None, {})
    with pytest.raises(OSError):  # the server refuses to start: a key file that cannot be read
        load_api_keys(None, str(tmp_path / "missing"), {})
    ring = KeyRing(["a", "b"])
    assert ring.match("Bearer b") == "b" and ring.match("bearer a") == "a"
    assert ring.match("Bearer c") is ring.match("b") is ring.match("Basic b") is ring.match("") is None


@prelaunch.plan("serve_without_keys", prelaunch.uses("serve_without_keys"), stop=lambda proc: proc.kill())
def launch_serve_without_keys(get) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "nanoserve.cli",
        "serve",
        "--model",
        get("tiny_models")["qwen3"],
        "--device",
        "cpu",
        "--port",
        "0",
        "--cache-salt-by-api-key",
    ]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PYTHONSAFEPATH": "1", "PATH": "/usr/bin:/bin"},
    )  # no key in the environment


@pytest.fixture
def serve_without_keys(request):
    """`nanoserve serve --cache-salt-by-api-key` with no key anywhere: (exit code, stderr)."""
    proc = prelaunch.take("serve_without_keys", request.getfixturevalue)
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, stderr


def test_salting_by_key_without_keys_is_refused_at_start(serve_without_keys):
    returncode, stderr = serve_without_keys
    assert returncode != 0 and "--cache-salt-by-api-key needs API keys" in stderr, stderr
