"""Hostile and careless OpenAI requests, as hypothesis strategies, and a raw-HTTP client to send them.

Shared by the engine's and the gateway's fuzz suites: whatever is sent, the answer must be a 2xx or a 4xx
with an OpenAI-shaped JSON body, never a 5xx, and the fleet must stay healthy.
"""

import json
import socket
import string

from hypothesis import strategies as st

# Every value JSON can carry, nested a little, with the numbers and strings that broke parsers before.
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 5e-324, -0.0]),
    st.text(max_size=20),
    st.sampled_from(["", "\ud800", "\udfff x", "\x00", "w5 w6", "<|im_start|>", "é" * 3]),
)
any_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

_small_int = st.integers(-3, 40)
_prompt = st.one_of(
    st.sampled_from(["w5", "w5 w6 w7", "", " "]),
    st.text(max_size=30),
    st.lists(st.integers(-5, 300), max_size=12),
    st.lists(st.text(max_size=5), max_size=3),
    st.lists(st.lists(st.integers(0, 300), max_size=4), max_size=3),
)
_role = st.sampled_from(["user", "assistant", "system", "tool", "developer", "wizard", ""])
_content = st.one_of(
    st.text(max_size=30),
    st.none(),
    st.integers(),
    st.lists(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"]), "text": st.text(max_size=10)}),
        max_size=2,
    ),
)
_message = st.one_of(
    st.fixed_dictionaries({"role": _role, "content": _content}),
    st.dictionaries(st.sampled_from(["role", "content", "name", "tool_calls", "tool_call_id"]), any_json, max_size=4),
    any_json,
)
_messages = st.one_of(st.lists(_message, max_size=4), any_json)

# The fields of OpenAI's (and vLLM's) request schema, each with plausible values and, sometimes, anything.
FIELDS = {
    "model": st.one_of(st.just("tiny"), any_json),
    "max_tokens": st.one_of(_small_int, any_json),
    "max_completion_tokens": st.one_of(_small_int, any_json),
    "temperature": st.one_of(st.floats(-1, 3), any_json),
    "top_p": st.one_of(st.floats(-0.5, 1.5), any_json),
    "top_k": st.one_of(st.integers(-2, 300), any_json),
    "seed": st.one_of(st.integers(), any_json),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=3), any_json),
    "stop_token_ids": st.one_of(st.lists(st.integers(-3, 300), max_size=3), any_json),
    "stream": st.one_of(st.booleans(), any_json),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), any_json),
    "ignore_eos": st.one_of(st.booleans(), any_json),
    "priority": st.one_of(_small_int, any_json),
    "n": st.one_of(st.integers(0, 3), any_json),
    "best_of": any_json,
    "logprobs": any_json,
    "top_logprobs": any_json,
    "echo": any_json,
    "suffix": any_json,
    "logit_bias": any_json,
    "tools": any_json,
    "presence_penalty": any_json,
    "frequency_penalty": any_json,
    "response_format": any_json,
    "user": any_json,
    "cache_salt": st.one_of(st.text(max_size=6), any_json),
}


@st.composite
def request_body(draw, chat: bool) -> dict:
    """A request body: the prompt field (usually), some known fields, sometimes unknown ones."""
    body = {}
    if draw(st.integers(0, 9)):
        body["messages" if chat else "prompt"] = draw(_messages if chat else _prompt)
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=6, unique=True)):
        body[name] = draw(FIELDS[name])
    if draw(st.integers(0, 9)) == 0:
        body.update(
            draw(st.dictionaries(st.text(string.ascii_lowercase, min_size=1, max_size=8), any_json, max_size=2))
        )
    # Keep generation short: the point is parsing, and a long valid request only costs time.
    if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
        body["max_tokens"] = min(body["max_tokens"], 40)
    body.setdefault("max_tokens", 8)
    return body


# How long mutated bytes may get silence before the sending side is closed: a request whose framing promises
# more than was sent waits that long (a few in a hundred); complete ones are answered in milliseconds.
PATIENCE = 0.5


def http_request(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    head = [
        f"POST {path} HTTP/1.1",
        "Host: fuzz",
        "Connection: close",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in {"Content-Type": "application/json", **(headers or {})}.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """`data` with a few bytes replaced, deleted or inserted anywhere (head or body)."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(out)))
        op = draw(st.sampled_from(["replace", "delete", "insert"]))
        chunk = draw(st.binary(min_size=1, max_size=6))
        if op == "replace":
            out[i : i + len(chunk)] = chunk
        elif op == "delete":
            del out[i : i + len(chunk)]
        else:
            out[i:i] = chunk
    return bytes(out)


def send_raw(
    host: str, port: int, data: bytes, timeout: float = 30.0, patience: float | None = None
) -> tuple[int | None, dict, bytes]:
    """Send bytes, read to EOF: (status or None if nothing parseable came back, headers, body). With
    `patience`, a server still silent after that many seconds gets the end of the sending side (for bytes
    whose framing promises more than is sent: the server then sees the end instead of waiting)."""
    with socket.create_connection((host, port), timeout=patience or timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                if patience is None or s.gettimeout() == timeout:
                    raise
                s.shutdown(socket.SHUT_WR)
                s.settimeout(timeout)
                continue
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) < 2 or not parts[1].isdigit():
        return None, {}, raw
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    if headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return int(parts[1]), headers, body


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size, _, rest = data.partition(b"\r\n")
        n = int(size.split(b";")[0] or b"0", 16)
        if n == 0:
            break
        out += rest[:n]
        data = rest[n + 2 :]
    return bytes(out)


def check_answer(status: int | None, headers: dict, body: bytes, what: str) -> None:
    """Never a 5xx; every error OpenAI-shaped JSON."""
    assert status is not None, f"{what}: no HTTP answer: {body[:200]!r}"
    assert status < 500, f"{what}: {status} {body[:300]!r}"
    if status >= 400:
        payload = json.loads(body)
        error = payload["error"]
        assert isinstance(error["message"], str) and error["message"], payload
        assert error["type"] and "param" in error and "code" in error, payload
