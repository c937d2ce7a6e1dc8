"""What gateways read from an engine: the prefix-cache feed (server-sent events of block hashes) and the
tokenizer (fingerprint, files), so that a gateway hashes prompts exactly as this engine does."""

import asyncio
import json

from aiohttp import web

from nanoserve.engine_pod.api_error import APIError
from nanoserve.engine_pod.async_engine import FeedDelta
from nanoserve.engine_pod.server_state import STATE, ServerState, engine_for


async def cache_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: a snapshot of the cached block hashes, then stored/removed deltas."""
    state = request.app[STATE]
    engine = engine_for(state, {})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    q = engine.subscribe_cache_events()
    block_size = engine.config.kvcache_block_size
    idle = 0
    try:
        while not state.draining:  # checked every second: an open feed must not hold up a drain
            try:
                deltas = [await asyncio.wait_for(q.get(), timeout=1)]
            except TimeoutError:
                idle += 1
                if idle % 10 == 0:
                    await resp.write(b": ping\n\n")
                continue
            while not q.empty():  # what piled up while this gateway's socket was busy: one write
                deltas.append(q.get_nowait())
            await resp.write(b"".join(_sse(d, block_size, state) for d in deltas))
    except ConnectionResetError:
        pass
    finally:
        engine.unsubscribe_cache_events(q)
    return resp


def _sse(delta: FeedDelta, block_size: int, state: ServerState) -> bytes:
    if delta.kind == "snapshot":  # what the hashes mean: a gateway whose tokenizer differs must not use them
        fingerprint = state.tokenizer_info["fingerprint"] if state.tokenizer_info else None
        event = {"type": "snapshot", "hashes": delta.hashes, "block_size": block_size, "tokenizer": fingerprint}
        return f"data: {json.dumps(event)}\n\n".encode()
    if delta.sse is None:  # the same for every subscriber: the first one encodes it
        delta.sse = f"data: {json.dumps({'type': delta.kind, 'hashes': delta.hashes})}\n\n".encode()
    return delta.sse


async def tokenizer(request: web.Request) -> web.Response:
    """The tokenizer's fingerprint, vocabulary size, block size and file list (gateways tokenize with it)."""
    state = request.app[STATE]
    if state.tokenizer_info is None:
        raise APIError(503, "model is still loading", type="service_unavailable")
    return web.json_response(state.tokenizer_info)


async def tokenizer_file(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["name"]
    data = state.tokenizer_files.get(name)  # a lookup by exact name: nothing else on disk is reachable
    if data is None:
        raise APIError(404, f"no tokenizer file named {name!r}", "name", "not_found")
    resp = web.Response(body=data, content_type="application/octet-stream")
    resp.enable_compression()  # tokenizer.json is JSON: several times smaller compressed
    return resp
