"""Reverse proxy for the generation endpoints: route, forward, stream back, retry before the first byte."""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from nanoserve.gateway.endpoints import Endpoint, routing_mode
from nanoserve.gateway.errors import error_response, sse_error
from nanoserve.gateway.prompt import build_prompt

if TYPE_CHECKING:
    from nanoserve.gateway.app import Gateway

log = logging.getLogger(__name__)

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "trailers", "transfer-encoding", "upgrade", "host", "content-length"}
# Overload and draining: another engine may do. Not 500: an engine that failed on this request says the
# request broke it, and sending it on would let one poison request take down every engine in turn.
RETRY_STATUSES = {429, 503}
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)
ENGINE_HEADER = "X-Nanoserve-Engine"  # which engine answered (for clients, tests and debugging)


@dataclass
class Failure:
    """An attempt that failed before anything was sent to the client."""
    cause: str
    status: int | None = None  # the engine's answer, passed on if every attempt fails
    headers: dict[str, str] | None = None
    body: bytes = b""


def _forward_headers(headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


async def handle_generate(gw: Gateway, request: web.Request) -> web.StreamResponse:
    """POST /v1/completions and /v1/chat/completions."""
    raw = await request.read()
    try:
        body = json.loads(raw)
        if not isinstance(body, dict):
            raise ValueError("not an object")
    except ValueError:
        return error_response(400, "request body must be a JSON object", "invalid_request_error")
    served = gw.config.served_model_name
    if served and body.get("model") not in (None, served):
        return error_response(404, f"model {body.get('model')!r} does not exist", "invalid_request_error",
                              "model_not_found")
    endpoints = gw.pool.routable()
    if not endpoints:
        return error_response(503, "no healthy engine", "server_error", "no_healthy_engine")
    prompt = None
    if gw.policy.uses_cache:
        tokenizers = list({ep.tokenizer.fingerprint: ep.tokenizer for ep in endpoints if ep.tokenizer}.values())
        build = functools.partial(build_prompt, request.path, body, tokenizers)
        # Long prompts are tokenized off the event loop (the Rust tokenizer releases the GIL): streams keep flowing.
        prompt = await asyncio.to_thread(build) if len(raw) > 16384 else build()
    mode = routing_mode(endpoints, prompt)
    decision = gw.policy.rank(gw.pool.candidates(endpoints, prompt, mode))
    gw.metrics.decisions.labels(decision.reason).inc()
    gw.metrics.prompt_modes.labels(mode).inc()
    gw.metrics.matched_blocks.observe(decision.matched)

    headers = _forward_headers(request.headers)
    failure = Failure("none")
    attempt = 0
    for i in range(gw.config.max_attempts):
        ep = gw.pool.endpoints.get(decision.ranked[i % len(decision.ranked)])
        if ep is None or not ep.routable:
            continue  # marked down by an earlier attempt, or removed
        if attempt:
            gw.metrics.retries.labels(failure.cause).inc()
            await asyncio.sleep(gw.config.retry_backoff * 2 ** (attempt - 1))
        attempt += 1
        if prompt is not None:
            ep.record(prompt, mode)
        result = await _attempt(gw, request, ep, raw, headers)
        if not isinstance(result, Failure):
            return result
        failure = result
        log.info("engine %s failed before the first byte (%s)", ep.url, failure.cause)
    if failure.status is not None:  # every engine refused: pass the last answer on (e.g. 429 + Retry-After)
        return web.Response(status=failure.status, body=failure.body, headers=failure.headers)
    return error_response(502, f"no engine could serve the request ({failure.cause})", "server_error",
                          "upstream_unavailable")


async def _attempt(gw: Gateway, request: web.Request, ep: Endpoint, raw: bytes,
                   headers: dict[str, str]) -> web.StreamResponse | Failure:
    """One try on one engine: a prepared response once bytes reached the client, else a Failure."""
    cfg = gw.config
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout, sock_read=cfg.read_timeout)
    start = time.monotonic()
    resp: web.StreamResponse | None = None
    ep.in_flight += 1
    try:
        async with gw.session.post(ep.url + request.path, data=raw, headers=headers, timeout=timeout) as up:
            if up.status in RETRY_STATUSES:
                body = await up.read()
                if up.status == 503:
                    ep.healthy = False  # draining or loading: stop routing here until probes pass
                gw.metrics.requests.labels(ep.url, str(up.status)).inc()
                return Failure(f"status_{up.status}", up.status, _forward_headers(up.headers), body)
            first = await up.content.readany()  # a failure up to here is still retryable
            gw.metrics.ttfb.labels(ep.url).observe(time.monotonic() - start)
            resp = web.StreamResponse(status=up.status, headers=_forward_headers(up.headers))
            if "Content-Length" in up.headers:
                resp.content_length = int(up.headers["Content-Length"])
            resp.headers[ENGINE_HEADER] = ep.url
            await resp.prepare(request)
            await _pump(gw, ep, up, resp, first)
            gw.metrics.requests.labels(ep.url, str(up.status)).inc()
            gw.metrics.latency.labels(ep.url).observe(time.monotonic() - start)
            return resp
    except UPSTREAM_ERRORS as e:
        if resp is not None and resp.prepared:
            return resp  # the client left while we answered: nothing to retry
        if isinstance(e, aiohttp.ClientConnectionError):
            ep.mark_down()  # refused or dropped connection: probes bring it back
        gw.metrics.requests.labels(ep.url, "error").inc()
        return Failure(type(e).__name__)
    finally:
        ep.in_flight -= 1


async def _pump(gw: Gateway, ep: Endpoint, up: aiohttp.ClientResponse, resp: web.StreamResponse, first: bytes) -> None:
    """Copy the engine's bytes as they arrive. If the engine dies mid-way, end an event stream with an
    error event (a JSON body can only be cut off). A client that goes away ends the copy (and the
    upstream connection, so the engine stops generating)."""
    tail = first
    chunk = first
    try:
        while chunk:
            await resp.write(chunk)
            tail = chunk
            try:
                chunk = await up.content.readany()
            except UPSTREAM_ERRORS as e:
                log.warning("engine %s failed mid-response: %r", ep.url, e)
                gw.metrics.stream_errors.inc()
                ep.mark_down()
                if up.content_type == "text/event-stream":
                    sep = b"" if tail.endswith(b"\n\n") else b"\n\n"  # never inject inside an event
                    await resp.write(sep + sse_error(f"engine failed mid-stream: {type(e).__name__}",
                                                     "upstream_disconnected"))
                else:
                    resp.force_close()
                break
        await resp.write_eof()
    except ConnectionResetError:  # the client left
        pass
