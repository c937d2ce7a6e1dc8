"""Follows an engine's cache-state feed (GET /v1/cache/events, server-sent events) into its CacheIndex.

The feed only steers routing, so a broken one must never break requests: a malformed event is skipped
(the index may miss a delta until the next connection's snapshot), a feed that cannot be read at all is
reconnected, and the follower task itself only ends when cancelled.
"""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp

from nanoserve.gateway.cache_index import CacheIndex

log = logging.getLogger(__name__)

FEED_PATH = "/v1/cache/events"
MAX_LINE = 256 * 1024 * 1024  # a snapshot of a huge cache is long; an endless line is an engine fault


def parse_event(data: bytes) -> dict | None:
    """A feed event with the fields the index uses, of the right types; None for anything else."""
    try:
        event = json.loads(data)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, a 5,000-digit number, deep nesting
        return None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return None
    kind = event["type"]
    if kind in ("snapshot", "stored", "removed"):
        hashes = event.get("hashes")
        if not isinstance(hashes, list) or not all(type(h) is int for h in hashes):  # bool is no hash
            return None
    if kind == "snapshot":
        block_size = event.get("block_size")
        if type(block_size) is not int or block_size < 1:
            return None
        if not isinstance(event.get("tokenizer"), (str, type(None))):
            return None
    return event


async def read_feed(session: aiohttp.ClientSession, url: str, index: CacheIndex, idle_timeout: float) -> bool:
    """Apply one feed connection's events until it ends. False when the engine has no feed (404); any other
    refusal (503 while it loads its model, 401) is retried at the normal interval, like a lost connection."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=idle_timeout)
    async with session.get(url + FEED_PATH, timeout=timeout, allow_redirects=False) as resp:
        if resp.status == 404:
            return False
        if resp.status != 200:
            log.debug("cache feed of %s: answered %d", url, resp.status)
            return True
        buf = bytearray()
        skipped = 0
        # Lines can be megabytes (a snapshot of a large cache): split chunks ourselves instead of readline().
        async for chunk in resp.content.iter_any():
            search = len(buf)  # only the new bytes can hold the next newline
            buf += chunk
            while (end := buf.find(b"\n", search)) >= 0:
                line = bytes(buf[:end])
                del buf[: end + 1]
                search = 0
                if not line.startswith(b"data:"):
                    continue  # comments (pings), other SSE fields
                event = parse_event(line[5:])
                if event is None:
                    skipped += 1
                    if skipped == 1:
                        log.warning("cache feed of %s: skipping a malformed event: %r", url, line[:200])
                    continue
                index.apply(event)
            if len(buf) > MAX_LINE:
                raise ValueError(f"cache feed line over {MAX_LINE} bytes")
    return True


async def follow_feed(
    session: aiohttp.ClientSession, url: str, index: CacheIndex, retry_interval: float, idle_timeout: float
) -> None:
    """Keep the index in sync until cancelled, reconnecting (each connection starts with a snapshot)."""
    while True:
        try:
            has_feed = await read_feed(session, url, index, idle_timeout)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
            log.debug("cache feed of %s: %r", url, e)
            has_feed = True
        except Exception:  # noqa: BLE001 - a bug must not end the feed for good: log it and resync
            log.exception("cache feed of %s failed", url)
            has_feed = True
        if index.is_precise:
            index.feed_lost()
        # An engine without a feed stays in approximate mode; check again now and then (it may be upgraded).
        await asyncio.sleep(retry_interval if has_feed else retry_interval * 30)
