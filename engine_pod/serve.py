"""`nanoserve serve`: listen first, load the model in the background, drain on SIGTERM, exit 0 (1 after an
engine fault or a drain that had to cut requests)."""

import asyncio
import logging
import signal
from typing import Any

from aiohttp import web

from nanoserve.common.gc_heap import freeze_heap
from nanoserve.common.http_logs import quiet_client_faults
from nanoserve.common.ports import LISTEN_BACKLOG
from nanoserve.common.tokenizer_export import export_files, tokenizer_info
from nanoserve.engine_pod.async_engine import AsyncEngine
from nanoserve.engine_pod.auth import load_api_keys
from nanoserve.engine_pod.default_model import existing_folder
from nanoserve.engine_pod.errors import ServerShutdown
from nanoserve.engine_pod.server import ServerState, create_app
from nanoserve.engine_pod.server_logs import banner, log_stats
from nanoserve.engine_pod.tool_choice import ChatConfig

log = logging.getLogger("nanoserve.serve")
FAILED_DRAIN_SECONDS = 5.0  # after an engine fault: time for the error answers to reach their clients
FAILED_LINGER_SECONDS = 1.0  # ... and at least this long up, so that probes and gateways read why (/health 500)


def load_tokenizers(folder: str | None, early: bool = False) -> tuple[Any, Any] | None:
    """The folder's tokenizer twice: one for the event loop, one for the bulk thread (a tokenizer is not to
    be shared by threads). None without a folder, once transformers is imported; `early` (while the engine
    loads): None on an error too, which the engine's load or the load after it then reports."""
    from transformers import AutoTokenizer

    if folder is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    except Exception:
        if not early:
            raise
        return None


async def run_server(
    engine_kwargs: dict,
    host: str = "0.0.0.0",
    port: int = 8000,
    served_model_name: str | None = None,
    api_key: list[str] | None = None,
    max_pending: int = 256,
    max_body_bytes: int = 8 << 20,
    drain_timeout: float = 120.0,
    api_key_file: str | None = None,
    public_metrics: bool = False,
    cache_salt_by_api_key: bool = False,
    chat: ChatConfig = ChatConfig(),
    log_requests: bool = True,
    version: str = "",
) -> int:
    """Serve until SIGTERM/SIGINT (then 0) or until the engine fails (then 1, after answering every request).
    API keys: `api_key` (a list), one per line of `api_key_file`, and $NANOSERVE_API_KEY / $VLLM_API_KEY."""
    model = engine_kwargs.pop("model")
    name = served_model_name or model  # as vLLM: the model as the user gave it
    try:
        keys = load_api_keys(api_key, api_key_file)
    except (OSError, ValueError) as e:
        raise SystemExit(f"nanoserve serve: API keys: {e}") from None
    if cache_salt_by_api_key and not keys:
        raise SystemExit(
            "nanoserve serve: --cache-salt-by-api-key needs API keys (--api-key-file or $NANOSERVE_API_KEY)"
        )
    if api_key:
        log.warning("--api-key on the command line shows in `ps`; prefer --api-key-file or $NANOSERVE_API_KEY")
    if keys:
        log.info("%d API key(s); /metrics %s", len(keys), "public" if public_metrics else "needs a key")
    state = ServerState(name, keys, max_pending, max_body_bytes, public_metrics, cache_salt_by_api_key, chat)
    state.log_requests = log_requests
    quiet_client_faults()
    # auto_decompress off: the server undoes Content-Encoding itself, with a bound, and answers errors in JSON.
    runner = web.AppRunner(create_app(state), access_log=None, shutdown_timeout=5, auto_decompress=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG).start()
    log.info("listening on %s:%d; loading %s", host, port, model)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    engine, code, stats_task = AsyncEngine(model, engine_kwargs, name), 0, None
    try:
        load = asyncio.ensure_future(engine.start())  # the engine core process loads the model
        # Meanwhile, on another core: transformers' import (a second) and, from a model folder, the tokenizers.
        early = asyncio.ensure_future(asyncio.to_thread(load_tokenizers, existing_folder(model), True))
        await asyncio.wait([load, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if not load.done():
            return 0  # stopped while loading
        load.result()
        # From the resolved folder, if there was none to start from (the built-in model's cache, for one).
        tokenizers = await early or await asyncio.to_thread(load_tokenizers, engine.config.model)
        assert tokenizers is not None
        state.tokenizer, state.bulk_tokenizer = tokenizers
        if chat.chat_template is not None:  # also in the files the gateway loads: it renders chats the same way
            state.tokenizer.chat_template = state.bulk_tokenizer.chat_template = chat.chat_template
        state.tokenizer_files = await asyncio.to_thread(export_files, state.tokenizer)
        state.tokenizer_info = await asyncio.to_thread(
            tokenizer_info, state.tokenizer, state.tokenizer_files, name, engine.config.kvcache_block_size
        )
        state.engine = engine
        freeze_heap()
        log.info(
            "ready: model %s, %d KV blocks of %d tokens; engine core pid %d",
            name,
            engine.loaded.num_blocks,
            engine.config.kvcache_block_size,
            engine.process.pid,
        )
        log.info(banner(f"http://{host}:{port}", name, engine, version))
        stats_task = asyncio.ensure_future(log_stats(engine))
        failed = asyncio.ensure_future(engine.failed.wait())
        await asyncio.wait([asyncio.ensure_future(stop.wait()), failed], return_when=asyncio.FIRST_COMPLETED)
        # Drain: /ready says 503, new requests get 503, running ones finish or time out.
        state.draining = True
        if failed.done():  # every request already got its error: exit, get restarted
            log.error("engine failed: %r; exiting so that the pod (or `nanoserve up`) restarts", engine.error)
            code, drain_timeout = 1, FAILED_DRAIN_SECONDS
            await asyncio.sleep(FAILED_LINGER_SECONDS)
        log.info("draining %d in-flight requests (up to %.0fs)", state.inflight, drain_timeout)
        deadline = loop.time() + drain_timeout
        while state.inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if state.inflight:  # out of time: each request still open ends with an error, not a cut connection
            log.warning("drain timeout: ending %d unfinished requests with an error", state.inflight)
            engine.end_all(
                ServerShutdown(f"the server shut down before the request finished (drain timeout {drain_timeout:.0f}s)")
            )
            code = 1  # work was lost
            deadline = loop.time() + 2.0
            while state.inflight and loop.time() < deadline:
                await asyncio.sleep(0.05)
    finally:
        if stats_task is not None:
            stats_task.cancel()
        await runner.cleanup()
        await engine.stop()
    return code
