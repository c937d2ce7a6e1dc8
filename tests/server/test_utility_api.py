"""vLLM's utility endpoints on a real server: /tokenize (prompts, and chat exactly as the chat API renders it),
/detokenize, /version, /ping, /v1/models/{id}."""

import json
import urllib.error
import urllib.request

import openai
import prelaunch
import pytest
from procs import ServerProcess
from transformers import AutoTokenizer

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


class Http:
    """Plain HTTP with the standard library: (status, JSON body)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        return self.call("POST", path, body)

    def get(self, path: str) -> tuple[int, dict]:
        return self.call("GET", path)


def test_tokenize_and_detokenize(bpe_server, bpe_model):
    tok = AutoTokenizer.from_pretrained(bpe_model)
    http = Http(bpe_server.url)
    _, out = http.post("/tokenize", {"prompt": "hello world", "return_token_strs": True})
    assert out["tokens"] == tok.encode("hello world") and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == 1024 and out["token_strs"] == tok.convert_ids_to_tokens(out["tokens"])
    assert http.post("/detokenize", {"tokens": out["tokens"]}) == (200, {"prompt": "hello world"})
    _, chat = http.post("/tokenize", {"messages": MESSAGES, "tools": TOOLS})
    client = openai.OpenAI(base_url=f"{bpe_server.url}/v1", api_key="unused", max_retries=0)
    usage = client.chat.completions.create(
        model="bpe", messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=1
    ).usage
    assert chat["count"] == usage.prompt_tokens and chat["token_strs"] is None
    for path, body, param in (
        ("/tokenize", {"prompt": "x", "n": 2}, "n"),
        ("/tokenize", {}, "prompt"),
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
        ("/tokenize", {"messages": [{"role": "user", "content": 1}]}, "messages[0].content"),
    ):
        status, answer = http.post(path, body)
        assert status == 400 and answer["error"]["param"] == param, answer


def test_version_ping_and_model_by_id(bpe_server):
    http = Http(bpe_server.url)
    status, answer = http.get("/version")
    assert status == 200 and isinstance(answer["version"], str)
    assert http.get("/ping")[0] == http.post("/ping", {})[0] == 200
    assert http.get("/v1/models/bpe")[1]["id"] == "bpe"
    status, answer = http.get("/v1/models/nope")
    assert status == 404 and answer["error"]["code"] == "model_not_found"


CUSTOM_TEMPLATE = (
    "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<<assistant>>{% endif %}"
)


def launch_custom_template_server(get) -> ServerProcess:
    path = get("tmp_path_factory").mktemp("template") / "template.jinja"
    path.write_text(CUSTOM_TEMPLATE)
    return ServerProcess(
        get("bpe_model"), "--chat-template", str(path), "--num-kvcache-blocks", "256", "--max-model-len", "512"
    )


# Started ahead of its test (tests/prelaunch.py).
custom_template_server = prelaunch.server_fixture("custom_template_server", launch_custom_template_server)


def test_chat_template_flag_renders_every_chat_and_reaches_the_gateways_files(bpe_model, custom_template_server):
    """vLLM's --chat-template (a file): the chat API, /tokenize and the tokenizer files a gateway loads all
    use it instead of the model's own."""
    server = custom_template_server
    http = Http(server.url)
    tok = AutoTokenizer.from_pretrained(bpe_model)
    want = tok.encode("<<system>> be brief\n<<user>> hello there\n<<assistant>>", add_special_tokens=False)
    status, answer = http.post("/tokenize", {"messages": MESSAGES})
    assert status == 200 and answer["tokens"] == want
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=bpe_model, messages=MESSAGES, max_tokens=2)
    assert reply.usage.prompt_tokens == len(want)
    status, info = http.call("GET", "/v1/tokenizer")
    texts = []
    for f in info["files"]:
        with urllib.request.urlopen(f"{server.url}/v1/tokenizer/files/{f['name']}", timeout=30) as r:
            texts.append(r.read().decode("utf-8", "replace"))
    assert any("<<assistant>>" in t for t in texts)


def test_a_broken_chat_template_stops_the_start_with_a_message():
    from nanoserve.engine_pod.cli import read_chat_template

    with pytest.raises(ValueError, match="not a valid Jinja template"):
        read_chat_template("{% for m in messages %}never closed")
    with pytest.raises(ValueError, match="no such file"):
        read_chat_template("/no/such/template.jinja")
    assert read_chat_template(CUSTOM_TEMPLATE) == CUSTOM_TEMPLATE
