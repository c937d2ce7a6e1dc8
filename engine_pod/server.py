"""The engine pod's HTTP server: OpenAI-compatible API, health, readiness, metrics, cache-state feed.

With API keys set, everything but /health and /ready (and /metrics under --public-metrics) needs one.
The server listens before the model is loaded (/health answers, /ready says 503 until the engine is up),
sheds load with 429 past `max_pending` waiting requests, and on SIGTERM drains: /ready turns 503, new
requests get 503, running ones finish (up to `drain_timeout`), then it exits 0; requests still open then
end with a `server_shutdown` error (an SSE error event for streams) and it exits 1.
"""
import asyncio
import contextlib
import functools
import json
import time
import uuid

from aiohttp import web
from nanoserve.common.json_body import LOOP_BYTES
from nanoserve.engine_pod.chat_output import ChatOutput
from nanoserve.engine_pod.errors import InvalidRequestError, ServerShutdown
from nanoserve.engine_pod.gateway_api import cache_events, tokenizer, tokenizer_file
from nanoserve.engine_pod.openai_protocol import (
    APIError,
    ParsedRequest,
    parse_chat,
    parse_completion,
)
from nanoserve.engine_pod.server_state import (
    API_KEY,
    STATE,
    ServerState,
    engine_for,
    error_response,
    json_body,
)
from nanoserve.engine_pod.text_stream import TextStream
from nanoserve.engine_pod.tokenize_api import detokenize, server_version, tokenize
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


@web.middleware
async def errors_and_auth(request: web.Request, handler):
    state: ServerState = request.app[STATE]
    if state.api_keys and request.path not in state.open_paths:  # the cache feed and /metrics included
        key = state.api_keys.match(request.headers.get("Authorization", ""))
        if key is None:
            return error_response(401, "missing or invalid API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")
        request[API_KEY] = key
    try:
        return await handler(request)
    except APIError as e:
        return web.json_response(e.body(), status=e.status, headers={"Retry-After": "1"} if e.status == 429 else None)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(e.status, e.reason if e.status != 413 else
                      f"request body too large (limit {state.max_body_bytes} bytes)")
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as e:  # a bug, not bad input: still answer in OpenAI's shape
        return web.json_response(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status=500)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=True)


async def _serve(request: web.Request, chat: bool) -> web.StreamResponse:
    state: ServerState = request.app[STATE]
    body = await json_body(request)
    engine = engine_for(state, body)
    cfg = engine.config
    parse = functools.partial(parse_chat, chat=state.chat) if chat else parse_completion
    salt_key = request.get(API_KEY) if state.cache_salt_by_api_key else None  # tenants share no cached block
    args = (cfg.hf_config["vocab_size"], cfg.max_model_len, salt_key)
    if len(await request.read()) > LOOP_BYTES:  # (read() is cached) long prompts tokenize off the event loop,
        # with their own tokenizer: a Rust tokenizer must not be used by two threads at once.
        req = await asyncio.get_running_loop().run_in_executor(state.bulk, parse, body, state.bulk_tokenizer, *args)
    else:
        req = parse(body, state.tokenizer, *args)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    state.inflight += 1
    submitted = None
    try:
        try:  # the engine's own admission checks (e.g. a request that could never fit in the KV cache); a
            # structured-output grammar compiles in the engine core process, off its loop, before this returns
            submitted = await engine.submit(req.prompt_ids, req.params, req.stream)
        except InvalidRequestError as e:
            raise APIError(400, str(e), e.param) from None
        if req.stream:
            return await _stream(request, state, engine, submitted, req, rid, chat)
        return await _complete(request, state, engine, submitted, req, rid, chat)
    finally:
        if submitted is not None:
            engine.release(submitted)
        state.inflight -= 1


def _client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


def _chat_output(req: ParsedRequest) -> ChatOutput:
    return ChatOutput(req.tool_use, req.reasoning, req.thinking_in_prompt)


def _usage(req: ParsedRequest, completion_tokens: int, cached: int) -> dict:
    n = len(req.prompt_ids)
    return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def _complete(request, state, engine, submitted, req, rid, chat) -> web.Response:
    text = TextStream(state.tokenizer, req.params.stop)  # the same text as streaming gives
    pieces: list[str] = []
    finish, cached, count = None, 0, 0
    gen = engine.generate(submitted, gone=lambda: _client_gone(request))
    try:
        async for delta in gen:  # one delta, at the end
            finish, cached, count = delta.finish_reason, delta.num_cached_tokens, count + len(delta.token_ids)
            pieces.append(text.push(delta.token_ids, finish is not None))
    except ServerShutdown as e:
        raise APIError(503, str(e), code="server_shutdown", type="service_unavailable") from None
    finally:
        await gen.aclose()
    if finish is None:  # the client left: nobody reads an answer
        return web.Response(status=499)
    content = "".join(pieces)
    if chat:
        output = _chat_output(req)
        output.push(content, True)
        choice = {"index": 0, "message": output.message(), "logprobs": None,
                  "finish_reason": output.finish_reason(finish)}
    else:
        choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish}
    return web.json_response({"id": rid, "object": "chat.completion" if chat else "text_completion",
                              "created": int(time.time()), "model": state.model_name, "choices": [choice],
                              "usage": _usage(req, count, cached)})


async def _stream(request, state, engine, submitted, req, rid, chat) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    created, obj = int(time.time()), "chat.completion.chunk" if chat else "text_completion"
    # A stream sends thousands of chunks that differ only in their text: the rest is encoded once.
    head = ("data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": state.model_name})[:-1]
            + ', "choices": [{"index": 0, ').encode()

    async def send(choices: list, **extra) -> None:
        chunk = {"id": rid, "object": obj, "created": created, "model": state.model_name, "choices": choices, **extra}
        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())

    output = _chat_output(req) if chat else None

    async def send_text(text: str, finish: str | None) -> None:
        if output is not None and not output.plain:  # reasoning or tool calls: a delta object a step
            delta = output.push(text, finish is not None).to_openai()
            if delta or finish:
                await send([{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": output.finish_reason(finish)}])
            return
        if chat:
            delta = f'{{"content": {json.dumps(text)}}}' if text or not finish else "{}"
            body = f'"delta": {delta}, "logprobs": null, "finish_reason": {json.dumps(finish)}}}]}}\n\n'
        else:
            body = f'"text": {json.dumps(text)}, "logprobs": null, "finish_reason": {json.dumps(finish)}}}]}}\n\n'
        await resp.write(head + body.encode())

    text = TextStream(state.tokenizer, req.params.stop)
    cached = count = 0
    gen = engine.generate(submitted, gone=lambda: _client_gone(request))
    try:
        if chat:
            await send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}])
        async for delta in gen:
            if _client_gone(request):
                return resp  # released by the caller: the engine aborts it and frees its blocks
            finish, cached, count = delta.finish_reason, delta.num_cached_tokens, count + len(delta.token_ids)
            piece = text.push(delta.token_ids, finish is not None)
            if piece or finish:
                await send_text(piece, finish)
        if req.include_usage:
            await send([], usage=_usage(req, count, cached))
        await resp.write(b"data: [DONE]\n\n")
    except ConnectionResetError:
        pass  # client went away mid-write
    except Exception as e:  # noqa: BLE001 - the engine failed mid-stream: say so in the stream, then end it
        body = (APIError(503, str(e), code="server_shutdown") if isinstance(e, ServerShutdown) else
                APIError(500, f"engine failed: {type(e).__name__}: {e}", code="engine_failed")).body()
        with contextlib.suppress(ConnectionResetError):
            await resp.write(f"data: {json.dumps(body)}\n\n".encode())
    finally:
        await gen.aclose()
    return resp


async def models(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    max_len = state.engine.config.max_model_len if state.engine else None
    return web.json_response({"object": "list", "data": [{"id": state.model_name, "object": "model",
                                                          "created": state.created, "owned_by": "nanoserve",
                                                          "max_model_len": max_len}]})


async def model_by_id(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    if request.match_info["model"] != state.model_name:
        raise APIError(404, f"The model `{request.match_info['model']}` does not exist.", "model", "model_not_found")
    listing = json.loads((await models(request)).body)
    return web.json_response(listing["data"][0])


async def health(request: web.Request) -> web.Response:
    engine = request.app[STATE].engine
    if engine is not None and engine.error is not None:
        return web.json_response({"status": "engine failed", "error": repr(engine.error)}, status=500)
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    if state.engine is None or state.draining or state.engine.error is not None:  # a failed engine takes no traffic
        return web.json_response({"ready": False, "draining": state.draining,
                                  "failed": state.engine is not None and state.engine.error is not None}, status=503)
    return web.json_response({"ready": True})


async def metrics(request: web.Request) -> web.Response:
    engine = request.app[STATE].engine
    data = generate_latest(engine.metrics.registry) if engine else b""
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(state: ServerState) -> web.Application:
    app = web.Application(middlewares=[errors_and_auth], client_max_size=state.max_body_bytes)
    app[STATE] = state
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", model_by_id)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/version", server_version)
    app.router.add_route("*", "/ping", health)  # SageMaker's and vLLM's liveness path
    app.router.add_get("/v1/cache/events", cache_events)
    app.router.add_get("/v1/tokenizer", tokenizer)
    app.router.add_get("/v1/tokenizer/files/{name}", tokenizer_file)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    return app
