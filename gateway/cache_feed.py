"""Follows an engine's cache-state feed (GET /v1/cache/events, server-sent events) into its CacheIndex."""
from __future__ import annotations

import asyncio
import json
import logging

import aiohttp

from nanoserve.gateway.cache_index import CacheIndex

log = logging.getLogger(__name__)

FEED_PATH = "/v1/cache/events"


async def read_feed(session: aiohttp.ClientSession, url: str, index: CacheIndex, idle_timeout: float) -> bool:
    """Apply one feed connection's events until it ends. False when the engine has no feed (404)."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=idle_timeout)
    async with session.get(url + FEED_PATH, timeout=timeout) as resp:
        if resp.status != 200:
            return False
        buf = b""
        # Lines can be megabytes (a snapshot of a large cache): split chunks ourselves instead of readline().
        async for chunk in resp.content.iter_any():
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.startswith(b"data:"):
                    index.apply(json.loads(line[5:]))
    return True


async def follow_feed(session: aiohttp.ClientSession, url: str, index: CacheIndex,
                      retry_interval: float, idle_timeout: float) -> None:
    """Keep the index in sync until cancelled, reconnecting (each connection starts with a snapshot)."""
    while True:
        try:
            has_feed = await read_feed(session, url, index, idle_timeout)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError) as e:
            log.debug("cache feed of %s: %r", url, e)
            has_feed = True
        if index.is_precise:
            index.feed_lost()
        # An engine without a feed stays in approximate mode; check again now and then (it may be upgraded).
        await asyncio.sleep(retry_interval if has_feed else retry_interval * 30)
