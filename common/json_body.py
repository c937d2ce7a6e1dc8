"""A request's JSON body, decoded by the server itself: its Content-Encoding undone with a size bound (a
small gzip can hold gigabytes), its charset honoured, large bodies parsed off the event loop.

Every way a body can be wrong is a `BodyError` with the HTTP status and a message for the client.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import zlib

from aiohttp import web

LOOP_BYTES = 64 << 10  # larger bodies are decoded on a worker thread: streams keep flowing meanwhile
# zlib's window bits: gzip framing, zlib framing, raw deflate (some clients send raw deflate as "deflate").
_WBITS = {
    "gzip": (16 + zlib.MAX_WBITS,),
    "x-gzip": (16 + zlib.MAX_WBITS,),
    "deflate": (zlib.MAX_WBITS, -zlib.MAX_WBITS),
}


class BodyError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decompress(raw: bytes, content_encoding: str, limit: int) -> bytes:
    """Undo each listed encoding (the last one applied first), never producing more than `limit` bytes."""
    data = raw
    for coding in reversed([c.strip().lower() for c in content_encoding.split(",") if c.strip()]):
        if coding == "identity":
            continue
        if coding not in _WBITS:
            raise BodyError(415, f"unsupported Content-Encoding {coding!r} (gzip, deflate or identity)")
        data = _inflate(data, coding, limit)
    return data


def _inflate(data: bytes, coding: str, limit: int) -> bytes:
    for wbits in _WBITS[coding]:
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(data, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit:
            raise BodyError(413, f"request body too large once decompressed (limit {limit} bytes)")
        if not inflater.eof:
            break  # truncated
        return out
    raise BodyError(400, f"request body is not valid {coding} data")


def parse(raw: bytes, charset: str) -> object:
    try:
        codecs.lookup(charset)
    except LookupError:
        raise BodyError(400, f"unknown charset {charset!r} in Content-Type") from None
    try:
        return json.loads(raw.decode(charset))
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5,000-digit number, deep nesting
        raise BodyError(400, f"request body is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from None


async def read_json(request: web.Request, limit: int) -> dict:
    """The body as a JSON object. The server must run with auto_decompress=False (this undoes the encoding)."""
    raw = await request.read()
    encoding = request.headers.get("Content-Encoding", "")
    if encoding:
        raw = await asyncio.to_thread(decompress, raw, encoding, limit)
    charset = request.charset or "utf-8"
    body = await asyncio.to_thread(parse, raw, charset) if len(raw) > LOOP_BYTES else parse(raw, charset)
    if not isinstance(body, dict):
        raise BodyError(400, "request body must be a JSON object")
    return body
