"""The gateway under fuzzed input (issue 16), in front of two real engines, as `nanoserve gateway` runs.

Asserted for every example: never a 5xx, every error OpenAI-shaped JSON. After the run (which includes
issue 16's poison request), both engines are healthy and the gateway still routes to both.
"""

import json
import subprocess
import sys

import pytest
from fuzz_requests import PATIENCE, check_answer, http_request, mutated, request_body, send_raw
from hypothesis import HealthCheck, given, settings
from procs import reserve_port, wait_http

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
POISON = {"prompt": "hi", "max_tokens": 2, "top_k": 9223372036854775808}


@pytest.fixture(scope="module")
def fuzz_gateway(real_engine_pool, tmp_path_factory):
    engines = real_engine_pool(2)
    port = reserve_port()
    log = open(tmp_path_factory.mktemp("gateway") / "gateway.log", "w")  # a file: a full pipe would block it
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nanoserve.cli",
            "gateway",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--health-interval",
            "0.2",
            "--served-model-name",
            "tiny",
            *(a for e in engines for a in ("--engine", e.url)),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", 60, proc)
        yield port, engines, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _get(port: int, path: str) -> tuple[int | None, dict, bytes]:
    return send_raw("127.0.0.1", port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_fuzzed_bodies_through_the_gateway_never_get_a_5xx(fuzz_gateway, chat):
    port, _, _ = fuzz_gateway
    path = "/v1/chat/completions" if chat else "/v1/completions"

    @FUZZ
    @given(body=request_body(chat))
    def check(body):
        status, headers, answer = send_raw("127.0.0.1", port, http_request(path, json.dumps(body).encode()))
        check_answer(status, headers, answer, f"{path} {body!r}")

    check()


@FUZZ
@given(data=mutated(http_request("/v1/completions", json.dumps({"prompt": "w5", "max_tokens": 3}).encode())))
def test_mutated_http_bytes_through_the_gateway_never_get_a_5xx(fuzz_gateway, data):
    port, _, _ = fuzz_gateway
    status, headers, answer = send_raw("127.0.0.1", port, data, timeout=10, patience=PATIENCE)
    if status is None:
        return
    assert status < 500, (data, answer[:300])
    if status >= 400 and headers.get("Content-Type", "").startswith("application/json"):
        check_answer(status, headers, answer, repr(data))


def test_the_poison_request_leaves_both_engines_healthy(fuzz_gateway):
    port, engines, proc = fuzz_gateway
    for _ in range(4):  # whichever engine each lands on
        status, headers, answer = send_raw(
            "127.0.0.1", port, http_request("/v1/completions", json.dumps(POISON).encode())
        )
        assert status == 200, answer
    for engine in engines:
        assert engine.proc.poll() is None
        assert _get(engine.port, "/ready")[0] == 200 and _get(engine.port, "/health")[0] == 200
    status, _, answer = _get(port, "/ready")
    assert status == 200 and json.loads(answer)["engines"] == 2, answer
    assert proc.poll() is None
