"""The gateway's own answers in OpenAI's error shape, and its optional client auth.

Every 4xx/5xx the gateway itself produces (unknown path, wrong method, body too large or undecodable, a
bug) is {"error": {"message", "type", "param", "code"}}, like the engine's: clients parse one shape.
Messages never carry engine URLs or exception text (which may hold them); the log has the details.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from nanoserve.gateway.config import GatewayConfig
from nanoserve.gateway.errors import error_response

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_error_middleware(config: GatewayConfig):
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
            message = {
                404: f"no route {request.path!r}",
                405: f"method {request.method} not allowed here",
                413: f"request body too large (limit {config.max_body_bytes} bytes)",
            }.get(e.status, e.reason)
            return error_response(
                e.status, message, "invalid_request_error" if e.status < 500 else "server_error", headers=headers
            )
        except RequestPayloadError:
            # A body aiohttp could not decode (bad gzip/deflate, broken chunking). Close the connection:
            # the rest of that body cannot be read past.
            resp = error_response(
                400,
                "the request body could not be read (bad Content-Encoding or transfer encoding)",
                "invalid_request_error",
            )
            resp.force_close()
            request.content.feed_eof()  # nothing left to drain: aiohttp would re-raise (and log) the error
            return resp
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception:  # a bug, not bad input: still answer in OpenAI's shape
            log.exception("unhandled error on %s %s", request.method, request.path)
            return error_response(500, "internal gateway error", "server_error", "internal_error")

    return errors


def bearer_ok(header: str, keys: list[str]) -> bool:
    """Is `header` "Bearer <one of keys>"? Every key is compared in constant time."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    ok = False
    for key in keys:  # no early exit: the time taken does not tell which key came close
        ok |= hmac.compare_digest(token.strip().encode(), key.encode())
    return ok


def needs_key(path: str, config: GatewayConfig) -> bool:
    """/v1/* always, /metrics unless public; /health and /ready stay open for probes."""
    return path.startswith("/v1/") or (path == "/metrics" and not config.public_metrics)


def make_auth_middleware(config: GatewayConfig):
    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Before the handler: an unauthenticated request is neither routed nor recorded in any index.
        if needs_key(request.path, config) and not bearer_ok(request.headers.get("Authorization", ""), config.api_keys):
            return error_response(
                401,
                "missing or invalid API key (send 'Authorization: Bearer <key>')",
                "invalid_request_error",
                "invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    return auth


def middlewares(config: GatewayConfig) -> list:
    """Outermost first: errors wrap auth, so that even a failing auth check answers in OpenAI's shape."""
    out = [make_error_middleware(config)]
    if config.api_keys:
        out.append(make_auth_middleware(config))
    return out
