"""Reverse proxy for the generation endpoints: route, forward, stream back, retry before the first byte.

Retried on the next engine: connection failures, invalid HTTP and first-byte timeouts (nothing reached the
client yet), and 429/503. Never a 500 or a 4xx (the request itself is the problem), nor a redirect (not
followed: the engine is misconfigured, and the prompt must not go where it points; the client gets a 502).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from nanoserve.gateway.endpoints import Endpoint
from nanoserve.gateway.errors import error_response, sse_error
from nanoserve.gateway.routing import Refusal, decide

if TYPE_CHECKING:
    from nanoserve.gateway.app import Gateway

log = logging.getLogger(__name__)

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
# Overload and draining: another engine may do. Not 500: an engine that failed on this request says the
# request broke it, and sending it on would let one poison request take down every engine in turn.
RETRY_STATUSES = {429, 503}
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)
ENGINE_HEADER = "X-Nanoserve-Engine"  # which engine answered, as its opaque id (endpoints.engine_id)
# W3C Server-Timing: the gateway's own share of the time to first byte (receipt to the request sent on:
# reading, tokenizing, routing, earlier attempts) and the engine's (request sent to its first byte).
TIMING_HEADER = "Server-Timing"


@dataclass
class Failure:
    """An attempt that failed before anything was sent to the client."""

    cause: str
    status: int | None = None  # the engine's answer, passed on if every attempt fails
    headers: dict[str, str] | None = None
    body: bytes = b""
    retry: bool = True  # may another engine take the request?


def _forward_headers(headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


def upstream_headers(headers) -> dict[str, str]:
    """The client's headers as sent on to the engine, its Authorization included (also with the gateway's
    own api_keys: an engine may check it again, and salts its cache by it with --cache-salt-by-api-key)."""
    # aiohttp has decompressed the body: it goes on decoded, so its Content-Encoding must not.
    return {k: v for k, v in _forward_headers(headers).items() if k.lower() != "content-encoding"}


async def handle_generate(gw: Gateway, request: web.Request) -> web.StreamResponse:
    """POST /v1/completions and /v1/chat/completions."""
    arrived = time.monotonic()
    raw = await request.read()
    routed = await decide(gw, request.path, raw, request.headers.get("Authorization", ""))
    if isinstance(routed, Refusal):
        return error_response(routed.status, routed.message, routed.type, routed.code)
    decision, mode, prompt, body = routed.decision, routed.mode, routed.prompt, routed.body
    headers = upstream_headers(request.headers)
    stream = body.get("stream") is True
    failure = Failure("none")
    attempt = 0
    for i in range(gw.config.max_attempts):
        ep = gw.pool.endpoints.get(decision.ranked[i % len(decision.ranked)])
        if ep is None or not ep.routable:
            continue  # marked down by an earlier attempt, or removed
        if attempt:
            gw.metrics.retries.labels(failure.cause).inc()
            await asyncio.sleep(gw.config.retry_backoff * 2 ** (attempt - 1))
            if not ep.routable:
                continue  # changed while we waited (e.g. its breaker's one trial was taken)
        attempt += 1
        if prompt is not None:
            ep.record(prompt, mode)
        result = await _attempt(gw, request, ep, raw, headers, stream, arrived)
        if not isinstance(result, Failure):
            return result
        failure = result
        log.info("engine %s failed before the first byte (%s)", ep.url, failure.cause)
        if not failure.retry:
            break
    if failure.status is not None:  # every engine refused: pass the last answer on (e.g. 429 + Retry-After)
        return web.Response(status=failure.status, body=failure.body, headers=failure.headers)
    # Never the engine's URL: clients see engine ids at most.
    return error_response(
        502, f"no engine could serve the request ({failure.cause})", "server_error", "upstream_unavailable"
    )


async def _attempt(
    gw: Gateway, request: web.Request, ep: Endpoint, raw: bytes, headers: dict[str, str], stream: bool, arrived: float
) -> web.StreamResponse | Failure:
    """One try on one engine: a prepared response once bytes reached the client, else a Failure. The
    engine's breaker learns the outcome: served (< 500), failed (5xx, broken, silent), or unknown."""
    cfg = gw.config
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout, sock_read=cfg.read_timeout)
    start = time.monotonic()
    resp: web.StreamResponse | None = None
    served: bool | None = None
    trial = ep.breaker.begin()
    ep.in_flight += 1
    try:
        first_byte = asyncio.timeout(cfg.first_byte_timeout if stream else None)
        try:
            async with first_byte:
                # Never follow a redirect: the prompt must not be re-posted to wherever an engine points.
                up = await gw.session.post(
                    ep.url + request.path, data=raw, headers=headers, timeout=timeout, allow_redirects=False
                )
        except TimeoutError:
            if not first_byte.expired():
                raise
            served = False
            ep.mark_down()  # accepted the request and went silent: hung (its /ready may still say 200)
            gw.metrics.requests.labels(ep.url, "first_byte_timeout").inc()
            return Failure("first_byte_timeout")
        async with up:
            gw.metrics.requests.labels(ep.url, str(up.status)).inc()
            if 300 <= up.status < 400:
                served = False
                log.warning("engine %s answered a redirect (%d): not followed", ep.url, up.status)
                return Failure(f"redirect_{up.status}", retry=False)
            if up.status in RETRY_STATUSES:
                body = await up.read()
                served = up.status == 429  # busy but alive; 503: loading or draining
                if up.status == 503:
                    ep.healthy = False  # stop routing here until probes pass
                return Failure(f"status_{up.status}", up.status, _forward_headers(up.headers), body)
            first = await up.content.readany()  # a failure up to here is still retryable
            served = up.status < 500
            ttfb = time.monotonic() - start
            gw.metrics.ttfb.labels(ep.url).observe(ttfb)
            resp = web.StreamResponse(status=up.status, headers=_forward_headers(up.headers))
            timing = f"gateway;dur={(start - arrived) * 1e3:.3f}, engine;dur={ttfb * 1e3:.3f}"
            resp.headers[TIMING_HEADER] = ", ".join(filter(None, (up.headers.get(TIMING_HEADER), timing)))
            if "Content-Length" in up.headers:
                resp.content_length = int(up.headers["Content-Length"])
            resp.headers[ENGINE_HEADER] = ep.id
            await resp.prepare(request)
            if not await _pump(gw, ep, up, resp, first):
                served = False
            gw.metrics.latency.labels(ep.url).observe(time.monotonic() - start)
            return resp
    except UPSTREAM_ERRORS as e:
        if resp is not None:
            return resp  # the client left while we answered: nothing to retry, nothing wrong with the engine
        # Refused, dropped, silent past read_timeout, or not speaking HTTP: probes bring it back.
        served = False
        ep.mark_down()
        gw.metrics.requests.labels(ep.url, "error").inc()
        return Failure(type(e).__name__)
    finally:
        ep.in_flight -= 1
        if served is True:
            ep.breaker.success()
        elif served is False:
            ep.breaker.failure()
        elif trial:
            ep.breaker.release()


async def _pump(gw: Gateway, ep: Endpoint, up: aiohttp.ClientResponse, resp: web.StreamResponse, first: bytes) -> bool:
    """Copy the engine's bytes as they arrive; False if the engine failed mid-way. Then an event stream
    ends with an error event (a JSON body can only be cut off). A client that goes away ends the copy (and
    the upstream connection, so the engine stops generating)."""
    tail = first
    chunk = first
    ok = True
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
                ok = False
                if up.content_type == "text/event-stream":
                    sep = b"" if tail.endswith(b"\n\n") else b"\n\n"  # never inject inside an event
                    await resp.write(
                        sep + sse_error(f"engine failed mid-stream: {type(e).__name__}", "upstream_disconnected")
                    )
                else:
                    resp.force_close()
                break
        await resp.write_eof()
    except ConnectionResetError:  # the client left
        pass
    return ok
