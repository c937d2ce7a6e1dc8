"""The engines' tokenizers, fetched from the engines themselves and verified before they steer routing.

Each engine serves GET /v1/tokenizer (fingerprint, vocabulary size, block size, file list) and the files
under /v1/tokenizer/files/NAME. The gateway downloads one copy per fingerprint, loads it and recomputes
the fingerprint and vocabulary size: a copy that does not reproduce the engine's is refused (and that engine
is routed by text until it serves one that does). A tokenizer given with --model is used for the engines
that report its fingerprint, and for engines that serve none.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from nanoserve.common.tokenizer_export import MAX_FILE_BYTES
from nanoserve.gateway.endpoints import Endpoint
from nanoserve.gateway.prompt import PromptTokenizer, load_tokenizer

log = logging.getLogger(__name__)

INFO_PATH = "/v1/tokenizer"
MAX_FILES = 16
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a file name, never a path


class TokenizerError(Exception):
    """An engine's tokenizer cannot be used; `reason` labels the metric (unavailable, invalid, mismatch)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _need(ok: object) -> None:
    # Not `assert`: the checks must hold under python -O too (file names become paths).
    if not ok:
        raise AssertionError("check failed")


def check_info(info: Any) -> dict:
    """The shape of a GET /v1/tokenizer body, or TokenizerError("invalid")."""
    try:
        _need(isinstance(info, dict))
        _need(isinstance(info["fingerprint"], str) and re.fullmatch(r"[0-9a-f]{16,128}", info["fingerprint"]))
        _need(isinstance(info["vocab_size"], int) and info["vocab_size"] > 0)
        _need(isinstance(info["block_size"], int) and 1 <= info["block_size"] <= 1 << 16)
        files = info["files"]
        _need(isinstance(files, list) and 0 < len(files) <= MAX_FILES)
        for f in files:
            _need(isinstance(f["name"], str) and SAFE_NAME.fullmatch(f["name"]) and f["name"] not in (".", ".."))
            _need(isinstance(f["size"], int) and 0 <= f["size"] <= MAX_FILE_BYTES)
            _need(isinstance(f["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", f["sha256"]))
    except (AssertionError, KeyError, TypeError) as e:
        raise TokenizerError("invalid", f"malformed tokenizer description ({e!r})") from None
    return info


async def fetch_info(session: aiohttp.ClientSession, url: str, timeout: float) -> dict | None:
    """The engine's tokenizer description; None when it serves none (404: an older engine)."""
    try:
        async with session.get(
            url + INFO_PATH, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False
        ) as resp:
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise TokenizerError("unavailable", f"GET {INFO_PATH} answered {resp.status}")
            return check_info(await resp.json(content_type=None))
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError, RecursionError) as e:
        raise TokenizerError("unavailable", f"GET {INFO_PATH}: {e!r}") from None


async def fetch_files(session: aiohttp.ClientSession, url: str, info: dict, folder: str, timeout: float) -> None:
    """Download every listed file into `folder`, each checked against its size and sha256."""
    for f in info["files"]:
        try:
            async with session.get(
                f"{url}{INFO_PATH}/files/{f['name']}",
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                if resp.status != 200:
                    raise TokenizerError("unavailable", f"tokenizer file {f['name']}: status {resp.status}")
                data = bytearray()
                async for chunk in resp.content.iter_chunked(1 << 20):
                    data += chunk
                    if len(data) > f["size"]:
                        break  # more than described: no need to read the rest
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise TokenizerError("unavailable", f"tokenizer file {f['name']}: {e!r}") from None
        if len(data) != f["size"] or hashlib.sha256(data).hexdigest() != f["sha256"]:
            raise TokenizerError("mismatch", f"tokenizer file {f['name']} is not the one described")
        with open(os.path.join(folder, f["name"]), "wb") as out:
            out.write(data)


def load_verified(folder: str, info: dict, source: str) -> PromptTokenizer:
    """Load the downloaded files; the copy must have the engine's fingerprint and vocabulary size."""
    try:
        tok = load_tokenizer(folder, source)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises for files it cannot read
        raise TokenizerError("invalid", f"tokenizer files do not load: {type(e).__name__}: {e}") from None
    if len(tok.tokenizer) != info["vocab_size"]:
        raise TokenizerError(
            "mismatch", f"vocabulary of {len(tok.tokenizer)} tokens, the engine reports {info['vocab_size']}"
        )
    if tok.fingerprint != info["fingerprint"]:
        raise TokenizerError("mismatch", "the copy tokenizes differently from the engine (fingerprint differs)")
    return tok


class Tokenizers:
    """Verified tokenizers by fingerprint: one download however many engines share it."""

    def __init__(self, local: PromptTokenizer | None = None, timeout: float = 60.0) -> None:
        self.local = local
        self.timeout = timeout
        self.loaded: dict[str, PromptTokenizer] = {local.fingerprint: local} if local else {}
        self._loading: dict[str, asyncio.Task] = {}

    async def for_engine(self, session: aiohttp.ClientSession, url: str) -> tuple[PromptTokenizer, int | None]:
        """The engine's tokenizer and block size, or TokenizerError."""
        info = await fetch_info(session, url, self.timeout)
        if info is None:
            if self.local is None:
                raise TokenizerError("unavailable", f"the engine serves no {INFO_PATH}")
            return self.local, None  # the operator's word for it
        fp = info["fingerprint"]
        if fp not in self.loaded:
            task = self._loading.get(fp)
            if task is None:  # the first engine with this fingerprint downloads; others wait for it
                task = self._loading[fp] = asyncio.create_task(self._download(session, url, info))
                task.add_done_callback(lambda _: self._loading.pop(fp, None))
            self.loaded[fp] = await asyncio.shield(task)
        tok = self.loaded[fp]
        if len(tok.tokenizer) != info["vocab_size"]:  # a known fingerprint with another size: a lie
            raise TokenizerError(
                "mismatch",
                f"vocabulary size {info['vocab_size']} for tokenizer {fp[:12]} of {len(tok.tokenizer)} tokens",
            )
        return tok, info["block_size"]

    async def _download(self, session: aiohttp.ClientSession, url: str, info: dict) -> PromptTokenizer:
        with tempfile.TemporaryDirectory(prefix="nanoserve-gw-tokenizer-") as folder:
            await fetch_files(session, url, info, folder, self.timeout)
            return await asyncio.to_thread(load_verified, folder, info, url)

    def prune(self, in_use: set[str]) -> None:
        """Forget tokenizers no engine uses any more (after a rolling update to another model)."""
        for fp in list(self.loaded):
            if fp not in in_use and (self.local is None or fp != self.local.fingerprint):
                del self.loaded[fp]


async def follow_tokenizer(
    session: aiohttp.ClientSession,
    ep: Endpoint,
    tokenizers: Tokenizers,
    interval: float,
    retry_interval: float,
    on_change: Callable[[Endpoint, TokenizerError | None], None],
) -> None:
    """Keep `ep.tokenizer` right until cancelled: fetch it whenever the engine is up without one (it is
    cleared when the engine goes down or its cache feed reports another fingerprint)."""
    retry_at = 0.0
    while True:
        feed_fp = ep.cache.tokenizer
        if ep.tokenizer is not None and feed_fp is not None and feed_fp != ep.tokenizer.fingerprint:
            log.info("engine %s now reports tokenizer %s: reloading", ep.url, feed_fp[:12])
            ep.tokenizer = None  # routed by text until the new one is verified
        if ep.healthy and ep.tokenizer is None and time.monotonic() >= retry_at:
            try:
                tok, block_size = await tokenizers.for_engine(session, ep.url)
            except TokenizerError as e:
                retry_at = time.monotonic() + retry_interval
                ep.tokenizer_settled = True
                on_change(ep, e)
            else:
                if block_size is not None and not ep.cache.is_precise:
                    ep.cache.block_size = block_size  # the feed's snapshot, once live, says the same
                ep.tokenizer = tok
                ep.tokenizer_settled = True
                on_change(ep, None)
        # Until the first fetch, look often: the gateway's readiness waits for it.
        await asyncio.sleep(interval if ep.tokenizer_settled else min(interval, 0.1))
