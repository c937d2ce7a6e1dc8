"""The engine under fuzzed input (issue 16): any request body, any mutation of the HTTP bytes.

Asserted for every example: never a 5xx, every error OpenAI-shaped JSON; after the run the engine is healthy
and serves a normal request.
"""

import gzip
import json
import zlib

import pytest
from fuzz_requests import PATIENCE, check_answer, http_request, mutated, request_body, send_raw
from hypothesis import HealthCheck, given, settings

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SAMPLE = http_request("/v1/completions", json.dumps({"prompt": "w5 w6", "max_tokens": 3, "stream": True}).encode())


@pytest.fixture(scope="module")
def fuzz_server(tiny_servers):
    return tiny_servers("sync")


def _healthy(server) -> None:
    status, _, body = send_raw(
        "127.0.0.1",
        server.port,
        http_request("/v1/completions", json.dumps({"prompt": "w5", "max_tokens": 2}).encode()),
    )
    assert status == 200 and json.loads(body)["choices"][0]["finish_reason"] == "length", body
    status, _, _ = send_raw("127.0.0.1", server.port, b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200
    assert server.proc.poll() is None


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_fuzzed_bodies_never_get_a_5xx(fuzz_server, chat):
    path = "/v1/chat/completions" if chat else "/v1/completions"

    @FUZZ
    @given(body=request_body(chat))
    def check(body):
        status, headers, answer = send_raw("127.0.0.1", fuzz_server.port, http_request(path, json.dumps(body).encode()))
        check_answer(status, headers, answer, f"{path} {body!r}")

    check()
    _healthy(fuzz_server)


_GOOD = json.dumps({"prompt": "w5", "max_tokens": 2}).encode()


@pytest.mark.parametrize(
    "headers, body, status",
    [
        ({"Content-Type": "application/json; charset=utf-16"}, _GOOD.decode().encode("utf-16"), 200),
        ({"Content-Type": "application/json; charset=klingon"}, _GOOD, 400),
        ({"Content-Encoding": "gzip"}, gzip.compress(_GOOD), 200),
        ({"Content-Encoding": "deflate"}, zlib.compress(_GOOD), 200),
        ({"Content-Encoding": "deflate"}, b"not deflated at all", 400),
        ({"Content-Encoding": "gzip"}, b"\x1f\x8b garbage", 400),
        ({"Content-Encoding": "gzip"}, gzip.compress(_GOOD)[:-12], 400),
        ({"Content-Encoding": "gzip"}, gzip.compress(b" " * (9 << 20)), 413),  # 9 MiB in 9 KiB: over the limit
        ({"Content-Encoding": "br"}, b"?", 415),
        ({}, b'{"prompt": "\\ud800 w5", "max_tokens": 2}', 400),
        ({}, b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}', 400),
    ],
    ids=[
        "utf16",
        "unknown-charset",
        "gzip",
        "deflate",
        "deflate-garbage",
        "gzip-garbage",
        "gzip-truncated",
        "gzip-bomb",
        "brotli",
        "surrogate-prompt",
        "surrogate-content",
    ],
)
def test_encodings_are_undone_or_refused_in_json(fuzz_server, headers, body, status):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    got, answer_headers, answer = send_raw("127.0.0.1", fuzz_server.port, http_request(path, body, headers))
    check_answer(got, answer_headers, answer, repr(body[:100]))
    assert got == status, answer


@FUZZ
@given(data=mutated(SAMPLE))
def test_mutated_http_bytes_never_get_a_5xx(fuzz_server, data):
    status, headers, answer = send_raw("127.0.0.1", fuzz_server.port, data, timeout=10, patience=PATIENCE)
    if status is None:
        return  # the server closed the connection on bytes that are not HTTP: fine
    assert status < 500, (data, answer[:300])
    if status >= 400 and headers.get("Content-Type", "").startswith("application/json"):
        check_answer(status, headers, answer, repr(data))


def test_the_engine_is_healthy_after_the_mutations(fuzz_server):
    _healthy(fuzz_server)


def test_a_prompt_too_long_to_tokenize_on_the_event_loop_gets_the_same_answer(fuzz_server):
    """Bodies over 64 KiB are parsed and tokenized on a worker thread, with the same checks."""
    for words in (30_000, 30):
        prompt = " ".join(["w7"] * words)
        body = json.dumps({"prompt": prompt, "max_tokens": 2}).encode()
        status, headers, answer = send_raw("127.0.0.1", fuzz_server.port, http_request("/v1/completions", body))
        check_answer(status, headers, answer, "long prompt")
        payload = json.loads(answer)
        if words > 100:
            assert status == 400 and payload["error"]["code"] == "context_length_exceeded", payload
            assert str(words) in payload["error"]["message"]
        else:
            assert status == 200 and payload["usage"]["prompt_tokens"] == words, payload
