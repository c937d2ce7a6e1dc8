"""What the engine server's handlers share: the state (engine, tokenizers, keys, drain counters), the
request's API key, and the checks every generation or feed request passes first."""

import concurrent.futures
import time
from typing import Any

from aiohttp import web

from nanoserve.common.json_body import BodyError, read_json
from nanoserve.engine_pod.api_error import APIError
from nanoserve.engine_pod.async_engine import AsyncEngine
from nanoserve.engine_pod.auth import KeyRing
from nanoserve.engine_pod.tool_choice import ChatConfig

API_KEY = web.RequestKey("api_key", str)  # the key a request authenticated with


class ServerState:
    """What the handlers share: the engine once loaded, and the drain and load counters."""

    def __init__(
        self,
        model_name: str,
        api_keys: list[str] | None = None,
        max_pending: int = 256,
        max_body_bytes: int = 8 << 20,
        public_metrics: bool = False,
        cache_salt_by_api_key: bool = False,
        chat: ChatConfig = ChatConfig(),
    ):
        self.model_name, self.api_keys, self.max_pending = model_name, KeyRing(api_keys or []), max_pending
        self.chat = chat  # tool-call and reasoning parsers
        self.max_body_bytes = max_body_bytes
        # Open without a key: the kubelet's probes, and /metrics for Prometheus scrapes when asked for.
        self.open_paths = {"/health", "/ready", "/ping", "/version"} | ({"/metrics"} if public_metrics else set())
        self.cache_salt_by_api_key = cache_salt_by_api_key  # tenants (keys) then share no prefix-cache block
        self.engine: AsyncEngine | None = None  # set when the model is loaded
        self.tokenizer: Any = None  # a transformers tokenizer: the server's own (the engine core process loads its own)
        self.bulk_tokenizer: Any = None  # another, for long prompts on the `bulk` thread
        self.bulk = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self.tokenizer_info: dict | None = None  # GET /v1/tokenizer, and its files: what the gateway loads
        self.tokenizer_files: dict[str, bytes] = {}
        self.draining = False
        self.log_requests = True  # an access line per request (server_logs.py)
        self.inflight = 0
        self.created = int(time.time())


STATE = web.AppKey("state", ServerState)


def error_response(status: int, message: str, param=None, code=None) -> web.Response:
    return web.json_response(APIError(status, message, param, code).body(), status=status)


def engine_for(state: ServerState, body: dict) -> AsyncEngine:
    """The engine for a request naming `body["model"]`, or the APIError that says why not now."""
    model = body.get("model")
    if model is not None and model != state.model_name:
        raise APIError(
            404,
            f"The model `{model}` does not exist. This server serves `{state.model_name}`.",
            "model",
            "model_not_found",
        )
    if state.draining:
        raise APIError(503, "server is shutting down", type="service_unavailable")
    if state.engine is None:
        raise APIError(503, "model is still loading", type="service_unavailable")
    if state.engine.error is not None:
        raise APIError(500, f"engine failed: {state.engine.error!r}")
    if state.engine.num_waiting >= state.max_pending:
        raise APIError(
            429, f"too many requests waiting ({state.engine.num_waiting}); retry later", type="rate_limit_error"
        )
    return state.engine


async def json_body(request: web.Request) -> dict:
    try:
        return await read_json(request, request.app[STATE].max_body_bytes)
    except BodyError as e:
        raise APIError(e.status, str(e)) from None
