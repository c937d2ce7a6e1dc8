"""A fake nanoserve engine for gateway tests (in the spirit of sgl-router's mock worker).

Speaks the engine HTTP API (completions and chat, streaming or not, /v1/models, /health, /ready, /metrics)
and the cache-state feed (/v1/cache/events), with a small LRU "prefix cache" of prompt block hashes so
routing quality shows up in `vllm:prefix_cache_hits_total`. Faults: latency, failing the next N requests,
crashing after N requests (process exit, or a dropped connection in-process), not ready, no feed, hanging
or answering garbage or a redirect to every request (while /ready says 200), a feed full of garbage.

Run as a process: python fake_engine.py --port 8001 --name e1 [--tokenizer DIR] [--crash-after 3] ...
or in-process: web.AppRunner(build_app(FakeConfig(...))). GET/POST /fake/state reads/changes the faults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields

from nanoserve.common.torch_free import keep_torch_out

if __name__ == "__main__":  # a process of its own needs no torch (transformers imports it if it can: ~2 s a start)
    keep_torch_out()

from aiohttp import web  # noqa: E402

from nanoserve.common.block_hash import block_hashes  # noqa: E402
from nanoserve.common.chat import chat_prompt_ids, completion_prompt_ids  # noqa: E402
from nanoserve.common.tokenizer_export import export_files, tokenizer_info  # noqa: E402


@dataclass
class FakeConfig:
    name: str = "fake"
    model: str = "fake-model"
    tokenizer: str | None = None  # HF folder; without it prompts are not hashed
    latency: float = 0.0  # seconds before each streamed chunk (and before a full reply)
    tokens: int = 4  # chunks per reply
    fail_next: int = 0  # answer the next N generation requests with fail_status
    fail_status: int = 500
    crash_after: int = -1  # serve N generation requests, then crash on the next one (-1: never)
    crash_chunks: int = 1  # chunks sent before crashing (0: die before answering)
    exit_on_crash: bool = True  # exit the process; False (in-process): drop the connection
    feed: bool = True  # serve /v1/cache/events
    ready: bool = True
    block_size: int = 16
    cache_blocks: int = 4096
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>" (as the engine server)
    serve_tokenizer: bool = True  # GET /v1/tokenizer (with a tokenizer): as the engine server
    tokenizer_fault: str = ""  # error: 500 | vocab: reports a wrong vocabulary size | file: serves other bytes
    # | swap: serves another tokenizer's files under its own description | hold: answers once the fault changes
    fault: str = ""  # every generation request: hang (accepted, never answered) | garbage (bytes
    # that are not HTTP) | redirect (307 to redirect_to)
    redirect_to: str = ""
    set_cookie: str = ""  # a Set-Cookie header on every non-streaming reply (a proxy must keep none)
    feed_garbage: bool = False  # the feed sends FEED_GARBAGE after its snapshot, then carries on


# Malformed cache-feed events a gateway must survive (each line is one event's data).
FEED_GARBAGE = [
    b"5",
    b"[1, 2]",
    b'"snapshot"',
    b"{not json",
    b"\xff\xfe\x80 not utf-8",
    b"[" * 100_000 + b"]" * 100_000,
    b'{"type": "stored", "hashes": "x"}',
    b'{"type": "stored", "hashes": 5}',
    b'{"type": "stored", "hashes": [1, "x", null]}',
    b'{"type": "removed"}',
    b'{"type": "removed", "hashes": [[1]]}',
    b'{"type": 7}',
    b'{"type": "stored", "hashes": [true]}',
    b'{"type": "stored", "hashes": [' + b"9" * 5000 + b"]}",
    b'{"type": "snapshot", "block_size": 0, "hashes": []}',
    b'{"type": "snapshot", "block_size": -16, "hashes": []}',
    b'{"type": "snapshot", "block_size": "16", "hashes": []}',
    b'{"type": "snapshot", "block_size": 16.5, "hashes": []}',
    b'{"type": "snapshot", "block_size": 16, "hashes": [{"a": 1}]}',
    b'{"type": "snapshot", "block_size": 16, "hashes": [], "tokenizer": 3}',
    b'{"type": "snapshot", "block_size": 16}',
]


class FakeEngine:
    def __init__(self, cfg: FakeConfig) -> None:
        self.cfg = cfg
        self.tok = None
        self.tokenizer_info, self.tokenizer_files = None, {}
        if cfg.tokenizer:
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
            self.tokenizer_files = export_files(self.tok)
            self.tokenizer_info = tokenizer_info(self.tok, self.tokenizer_files, cfg.model, cfg.block_size)
        self.requests = 0  # generation requests received
        self.cookies = 0  # of which came with a Cookie header
        self.running = 0
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of which cached
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.subscribers: list[asyncio.Queue] = []

    # Prefix cache.

    def prompt_ids(self, path: str, body: dict) -> list[int]:
        if self.tok is None:
            return []
        if path.endswith("/chat/completions"):
            return chat_prompt_ids(self.tok, body["messages"])
        return completion_prompt_ids(self.tok, body["prompt"])

    def use_cache(self, ids: list[int]) -> None:
        hashes = block_hashes(ids, self.cfg.block_size)
        hit = 0
        while hit < len(hashes) and hashes[hit] in self.cache:
            hit += 1
        self.queries += len(ids)
        self.hits += hit * self.cfg.block_size
        stored = [h for h in hashes if h not in self.cache]
        for h in hashes:
            self.cache[h] = None
            self.cache.move_to_end(h)
        removed = []
        while len(self.cache) > self.cfg.cache_blocks:
            removed.append(self.cache.popitem(last=False)[0])
        for kind, hs in (("stored", stored), ("removed", removed)):
            if hs:
                self.publish({"type": kind, "hashes": hs})

    def publish(self, event: dict | None) -> None:
        for q in self.subscribers:
            q.put_nowait(event)

    # Routes.

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests += 1
        self.cookies += "Cookie" in request.headers
        cfg = self.cfg
        if cfg.fault:
            return await self.misbehave(request)
        if cfg.fail_next > 0:
            cfg.fail_next -= 1
            headers = {"Retry-After": "1"} if cfg.fail_status == 429 else None
            return web.json_response(
                {"error": {"message": "injected failure", "type": "server_error", "param": None, "code": None}},
                status=cfg.fail_status,
                headers=headers,
            )
        if "messages" not in body and "prompt" not in body:
            return web.json_response(
                {
                    "error": {
                        "message": "prompt or messages required",
                        "param": None,
                        "type": "invalid_request_error",
                        "code": None,
                    }
                },
                status=400,
            )
        crash = cfg.crash_after >= 0 and self.requests > cfg.crash_after
        if crash and cfg.crash_chunks == 0:
            return await self.die(request)
        self.use_cache(self.prompt_ids(request.path, body))
        chat = request.path.endswith("/chat/completions")
        self.running += 1
        try:
            if body.get("stream"):
                return await self.stream(request, chat, crash)
            await asyncio.sleep(cfg.latency)
            text = "ok " * cfg.tokens
            choice = {"index": 0, "finish_reason": "length"}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            return web.json_response(
                {
                    "id": f"cmpl-{cfg.name}",
                    "object": "chat.completion" if chat else "text_completion",
                    "model": self.cfg.model,
                    "engine": cfg.name,
                    "choices": [choice],
                },
                headers={"Set-Cookie": cfg.set_cookie} if cfg.set_cookie else None,
            )
        finally:
            self.running -= 1

    async def stream(self, request: web.Request, chat: bool, crash: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(self.cfg.tokens):
            if crash and i == self.cfg.crash_chunks:
                return await self.die(request)
            await asyncio.sleep(self.cfg.latency)
            last = i == self.cfg.tokens - 1
            choice = {"index": 0, "finish_reason": "length" if last else None}
            choice.update({"delta": {"content": "ok "}} if chat else {"text": "ok "})
            chunk = {
                "id": f"cmpl-{self.cfg.name}",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "model": self.cfg.model,
                "engine": self.cfg.name,
                "choices": [choice],
            }
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def misbehave(self, request: web.Request) -> web.StreamResponse:
        if self.cfg.fault == "redirect":
            raise web.HTTPTemporaryRedirect(self.cfg.redirect_to + request.path)  # 307: the client re-POSTs
        if self.cfg.fault == "garbage":
            request.transport.write(b"\x00\xffNOT HTTP AT ALL\r\n\r\n")
            request.transport.close()
            raise asyncio.CancelledError
        while request.transport is not None and not request.transport.is_closing():
            await asyncio.sleep(0.05)  # hang until the client gives up
        raise asyncio.CancelledError

    async def die(self, request: web.Request) -> web.StreamResponse:
        if self.cfg.exit_on_crash:
            os._exit(1)
        request.transport.abort()  # in-process: drop the connection mid-response
        raise asyncio.CancelledError

    async def cache_events(self, request: web.Request) -> web.StreamResponse:
        if not self.cfg.feed:
            raise web.HTTPNotFound()
        q: asyncio.Queue = asyncio.Queue()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        snapshot = {
            "type": "snapshot",
            "block_size": self.cfg.block_size,
            "hashes": list(self.cache),
            "tokenizer": self.tokenizer_info["fingerprint"] if self.tokenizer_info else None,
        }
        self.subscribers.append(q)
        try:
            await resp.write(b"data: " + json.dumps(snapshot).encode() + b"\n\n")
            if self.cfg.feed_garbage:
                for line in FEED_GARBAGE:
                    await resp.write(b"data: " + line + b"\n\n")
            while True:
                try:
                    event = await asyncio.wait_for(q.get(), timeout=1.0)
                except TimeoutError:
                    await resp.write(b": ping\n\n")
                    continue
                if event is None:
                    break
                await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        finally:
            self.subscribers.remove(q)
        return resp

    async def tokenizer(self, request: web.Request) -> web.Response:
        fault = self.cfg.tokenizer_fault
        if not self.cfg.serve_tokenizer or self.tokenizer_info is None:
            raise web.HTTPNotFound()
        if fault == "error":
            return web.json_response({"error": {"message": "injected failure"}}, status=500)
        while self.cfg.tokenizer_fault == "hold":  # until /fake/state lifts it
            await asyncio.sleep(0.01)
        info = {**self.tokenizer_info, "block_size": self.cfg.block_size}  # as /fake/state last set it
        if fault == "vocab":
            info["vocab_size"] += 1
        if fault == "swap":  # files of a different tokenizer, described truthfully, under this one's fingerprint
            info["files"] = tokenizer_info(self.tok, _swapped_files(self.tokenizer_files), "", 1)["files"]
        return web.json_response(info)

    async def tokenizer_file(self, request: web.Request) -> web.Response:
        files = self.tokenizer_files
        if self.cfg.tokenizer_fault == "swap":
            files = _swapped_files(files)
        data = files.get(request.match_info["name"])
        if data is None:
            raise web.HTTPNotFound()
        if self.cfg.tokenizer_fault == "file":
            data = data[:-1] + b" "
        return web.Response(body=data, content_type="application/octet-stream")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.cfg.model, "object": "model", "owned_by": "nanoserve"}]}
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        return web.json_response({"ready": self.cfg.ready}, status=200 if self.cfg.ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        label = f'{{model_name="{self.cfg.model}"}}'
        lines = [
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{label} {self.running}",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{label} 0",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{label} {len(self.cache) / self.cfg.cache_blocks}",
            "# TYPE vllm:prefix_cache_queries counter",
            f"vllm:prefix_cache_queries_total{label} {self.queries}",
            "# TYPE vllm:prefix_cache_hits counter",
            f"vllm:prefix_cache_hits_total{label} {self.hits}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def state(self, request: web.Request) -> web.Response:
        """GET: counters and faults; POST a JSON object to change faults (e.g. {"fail_next": 2}),
        or {"reset": true} to empty the cache and zero the counters (reuse between test runs)."""
        if request.method == "POST":
            for k, v in (await request.json()).items():
                if k == "reset":
                    self.cache.clear()
                    self.requests = self.queries = self.hits = self.cookies = 0
                else:
                    setattr(self.cfg, k, v)
        return web.json_response(
            {
                "requests": self.requests,
                "cookies": self.cookies,
                "queries": self.queries,
                "hits": self.hits,
                "cached_blocks": len(self.cache),
                **asdict(self.cfg),
            }
        )


def _swapped_files(files: dict[str, bytes]) -> dict[str, bytes]:
    """The same tokenizer with two vocabulary entries' ids exchanged: it loads, with the same size, and
    tokenizes differently."""
    doc = json.loads(files["tokenizer.json"])
    vocab = doc["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    return {**files, "tokenizer.json": json.dumps(doc).encode()}


def build_app(cfg: FakeConfig) -> web.Application:
    engine = FakeEngine(cfg)

    @web.middleware
    async def auth(request: web.Request, handler):
        if (
            cfg.api_key
            and request.path.startswith("/v1/")
            and request.headers.get("Authorization") != f"Bearer {cfg.api_key}"
        ):
            return web.json_response(
                {
                    "error": {
                        "message": "invalid API key",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                },
                status=401,
            )
        return await handler(request)

    app = web.Application(middlewares=[auth])
    for path in ("/v1/completions", "/v1/chat/completions"):
        app.router.add_post(path, engine.generate)
    app.router.add_get("/v1/cache/events", engine.cache_events)
    app.router.add_get("/v1/models", engine.models)
    app.router.add_get("/v1/tokenizer", engine.tokenizer)
    app.router.add_get("/v1/tokenizer/files/{name}", engine.tokenizer_file)
    app.router.add_get("/health", engine.health)
    app.router.add_get("/ready", engine.ready)
    app.router.add_get("/metrics", engine.metrics)
    app.router.add_route("*", "/fake/state", engine.state)

    async def end_feeds(app: web.Application) -> None:
        engine.publish(None)  # the feed ends when the engine stops

    app.on_shutdown.append(end_feeds)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    for f in fields(FakeConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default)
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            p.add_argument(flag, type=kind, default=f.default)
    args = vars(p.parse_args())
    host, port = args.pop("host"), args.pop("port")
    web.run_app(build_app(FakeConfig(**args)), host=host, port=port, print=None, shutdown_timeout=0.5)


if __name__ == "__main__":
    main()
