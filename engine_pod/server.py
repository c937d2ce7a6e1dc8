"""The engine pod's HTTP server: OpenAI-compatible API, health, readiness, metrics, cache-state feed.

With API keys set, everything but /health and /ready (and /metrics under --public-metrics) needs one.
The server listens before the model is loaded (/health answers, /ready says 503 until the engine is up),
sheds load with 429 past `max_pending` waiting requests, and on SIGTERM drains: /ready turns 503, new
requests get 503, running ones finish (up to `drain_timeout`), then it exits 0; requests still open then
end with a `server_shutdown` error (an SSE error event for streams) and it exits 1.
"""

import asyncio
import functools
import uuid

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nanoserve.common.json_body import LOOP_BYTES
from nanoserve.engine_pod.api_error import APIError
from nanoserve.engine_pod.errors import InvalidRequestError
from nanoserve.engine_pod.gateway_api import cache_events, tokenizer, tokenizer_file
from nanoserve.engine_pod.openai_protocol import parse_chat, parse_completion
from nanoserve.engine_pod.responses import engine_requests, respond
from nanoserve.engine_pod.server_logs import access_logger
from nanoserve.engine_pod.server_state import API_KEY, STATE, ServerState, engine_for, error_response, json_body
from nanoserve.engine_pod.tokenize_api import detokenize, server_version, tokenize


@web.middleware
async def errors_and_auth(request: web.Request, handler):
    state = request.app[STATE]
    if state.api_keys and request.path not in state.open_paths:  # the cache feed and /metrics included
        key = state.api_keys.match(request.headers.get("Authorization", ""))
        if key is None:
            return error_response(
                401, "missing or invalid API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"
            )
        request[API_KEY] = key
    try:
        return await handler(request)
    except APIError as e:
        return web.json_response(e.body(), status=e.status, headers={"Retry-After": "1"} if e.status == 429 else None)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(
            e.status, e.reason if e.status != 413 else f"request body too large (limit {state.max_body_bytes} bytes)"
        )
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as e:  # a bug, not bad input: still answer in OpenAI's shape
        return web.json_response(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status=500)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=True)


async def _serve(request: web.Request, chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    body = await json_body(request)
    engine = engine_for(state, body)
    cfg = engine.config
    parse = functools.partial(parse_chat, chat=state.chat) if chat else parse_completion
    parse = functools.partial(parse, defaults=cfg.sampling_defaults)  # the model's (generation_config)
    salt_key = request.get(API_KEY) if state.cache_salt_by_api_key else None  # tenants share no cached block
    args = (cfg.hf_config["vocab_size"], cfg.max_model_len, salt_key)
    if len(await request.read()) > LOOP_BYTES:  # (read() is cached) long prompts tokenize off the event loop,
        # with their own tokenizer: a Rust tokenizer must not be used by two threads at once.
        req = await asyncio.get_running_loop().run_in_executor(state.bulk, parse, body, state.bulk_tokenizer, *args)
    else:
        req = parse(body, state.tokenizer, *args)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    state.inflight += 1
    submitted = []
    try:
        try:  # the engine's own admission checks (e.g. a request that could never fit in the KV cache); a
            # structured-output grammar compiles in the engine core process, off its loop, before this returns
            for _, prompt_ids, params in engine_requests(req):
                submitted.append(await engine.submit(prompt_ids, params, req.stream))
        except InvalidRequestError as e:
            raise APIError.invalid(e) from None
        return await respond(request, state, engine, submitted, req, rid, chat)
    finally:
        for one in submitted:
            engine.release(one)
        state.inflight -= 1


def _model_card(state: ServerState) -> dict:
    max_len = state.engine.config.max_model_len if state.engine else None
    return {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "nanoserve",
        "max_model_len": max_len,
    }


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request.app[STATE])]})


async def model_by_id(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if request.match_info["model"] != state.model_name:
        raise APIError(404, f"The model `{request.match_info['model']}` does not exist.", "model", "model_not_found")
    return web.json_response(_model_card(state))


async def health(request: web.Request) -> web.Response:
    engine = request.app[STATE].engine
    if engine is not None and engine.error is not None:
        return web.json_response({"status": "engine failed", "error": repr(engine.error)}, status=500)
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.engine is None or state.draining or state.engine.error is not None:  # a failed engine takes no traffic
        return web.json_response(
            {
                "ready": False,
                "draining": state.draining,
                "failed": state.engine is not None and state.engine.error is not None,
            },
            status=503,
        )
    return web.json_response({"ready": True})


async def metrics(request: web.Request) -> web.Response:
    engine = request.app[STATE].engine
    data = generate_latest(engine.metrics.registry) if engine else b""
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(state: ServerState) -> web.Application:
    app = web.Application(
        middlewares=[access_logger(state.log_requests), errors_and_auth], client_max_size=state.max_body_bytes
    )
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
