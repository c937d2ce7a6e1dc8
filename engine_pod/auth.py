"""API keys: where the engine server gets them (flags, a key file, the environment) and how it checks one.

Several keys are several tenants: any one of them opens the API. Keys are compared in constant time, by
digest, so that neither a key's bytes nor its length leak through response timing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence

ENV_VARS = ("NANOSERVE_API_KEY", "VLLM_API_KEY")  # ours, and vLLM's (for drop-in deployments)


def read_key_file(path: str) -> list[str]:
    """One key per line; blank lines and lines starting with '#' are skipped."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def load_api_keys(
    keys: Sequence[str] | None = None, key_file: str | None = None, environ: Mapping[str, str] = os.environ
) -> list[str]:
    """Every configured key, in order, without duplicates: `--api-key`s, the key file's, then the env's."""
    found = [k.strip() for k in ([keys] if isinstance(keys, str) else keys or [])]
    if key_file:
        found += read_key_file(key_file)
    found += [environ[v].strip() for v in ENV_VARS if environ.get(v, "").strip()]
    if "" in found:
        raise ValueError("an empty API key was given")
    return list(dict.fromkeys(found))


def _digest(key: str) -> bytes:
    # surrogateescape: how aiohttp decodes header bytes and os.environ/argv decode theirs
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class KeyRing:
    """The configured keys, kept as digests for constant-time matching."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = list(keys)
        self._digests = [_digest(k) for k in self.keys]

    def __bool__(self) -> bool:
        return bool(self.keys)

    def match(self, authorization: str) -> str | None:
        """The key an `Authorization: Bearer <key>` header carries, if it is configured, else None."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        token_digest, found = _digest(token.strip()), None
        for key, digest in zip(self.keys, self._digests):  # no early exit: which key matched does not show
            if hmac.compare_digest(token_digest, digest):
                found = key
        return found
