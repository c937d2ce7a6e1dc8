"""OpenAI-shaped errors, as JSON responses and as a server-sent event."""

from __future__ import annotations

import json

from aiohttp import web

from nanoserve.common.api_errors import error_body


def error_response(
    status: int, message: str, type_: str, code: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(error_body(message, type_, code=code), status=status, headers=headers)


def sse_error(message: str, code: str) -> bytes:
    """The event that ends a stream cut off mid-way (clients such as openai-python raise it as APIError)."""
    return b"data: " + json.dumps(error_body(message, "server_error", code=code)).encode() + b"\n\n"
