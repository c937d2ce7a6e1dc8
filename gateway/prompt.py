"""A request's prompt as the router sees it: token ids, exactly as the engine computes them, and text.

Token ids come from an engine's own tokenizer (gateway/tokenizers.py) or from the request itself (a
completion prompt of ids); their block hashes are the ones in the engine's prefix cache. The text form,
hashed in fixed chunks, steers routing while no tokenizer is verified: sgl-router's approximate text-prefix
tree, at a granularity of TEXT_CHUNK bytes. A request's `cache_salt` salts both, as it salts the engine's
blocks (common/block_hash.py): a salted prompt routes to the engine holding that salt's blocks.

transformers is imported lazily, inside `load_tokenizer`; it never imports torch (the gateway image has none).
"""

from __future__ import annotations

import json
from typing import Any

import xxhash

from nanoserve.common.block_hash import block_hashes, salt_root, tenant_salt
from nanoserve.common.chat import chat_prompt_ids, completion_prompt_ids, template_messages, template_options
from nanoserve.common.tokenizer_export import fingerprint

TEXT_CHUNK = 64  # bytes of prompt text per block of the text-prefix index


class PromptTokenizer:
    """Renders OpenAI request bodies to token ids the way the engine server does."""

    def __init__(self, tokenizer: Any, fingerprint: str, source: str) -> None:
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint  # common.tokenizer_export.fingerprint of `tokenizer`
        self.source = source  # where it came from (a folder, an engine URL), for logs

    def chat_ids(
        self, messages: list[dict], tools: Any = None, kwargs: Any = None, options: dict | None = None
    ) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages, tools, kwargs, options)

    def completion_ids(self, prompt: Any) -> list[int]:
        return completion_prompt_ids(self.tokenizer, _first_prompt(prompt))

    def ids(self, path: str, body: dict) -> list[int]:
        if path.endswith("/chat/completions"):
            return self.chat_ids(
                body["messages"], body.get("tools"), body.get("chat_template_kwargs"), template_options(body)
            )
        return self.completion_ids(body["prompt"])


def load_tokenizer(path: str, source: str | None = None) -> PromptTokenizer:
    """A tokenizer folder (--model, or files an engine served) -> PromptTokenizer with its fingerprint."""
    from transformers import AutoTokenizer  # lazy: a heavy import

    tok = AutoTokenizer.from_pretrained(path)
    return PromptTokenizer(tok, fingerprint(tok), source or path)


def _first_prompt(prompt: Any) -> Any:
    # A batch (list of prompts) is routed by its first prompt.
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return prompt[0]
    return prompt


def request_text(path: str, body: dict) -> str | None:
    """The prompt as text, in an order where a conversation's earlier turns are a prefix of its later ones."""
    try:
        if path.endswith("/chat/completions"):  # templates write the tools first (in the system turn)
            tools = json.dumps(body["tools"], sort_keys=True) if body.get("tools") else ""
            return tools + "".join(f"\x1e{m['role']}\x1f{m['content']}" for m in template_messages(body["messages"]))
        prompt = _first_prompt(body["prompt"])
        return prompt if isinstance(prompt, str) else None
    except (KeyError, TypeError, ValueError):
        return None


def text_hashes(text: str, salt: str | None = None) -> list[int]:
    """Chained hashes of each full TEXT_CHUNK-byte chunk of the text's UTF-8 bytes (the first one chained to
    the salt's root, as the engine chains its first block)."""
    data = text.encode("utf-8", "surrogatepass")
    root = salt_root(salt)
    out, parent = [], b"" if root is None else root.to_bytes(8, "little")
    for start in range(0, len(data) - TEXT_CHUNK + 1, TEXT_CHUNK):
        h = xxhash.xxh64_intdigest(parent + data[start : start + TEXT_CHUNK])
        out.append(h)
        parent = h.to_bytes(8, "little")
    return out


class Prompt:
    """One request's prompt: the client's own token ids, or ids under each engine tokenizer; and its text."""

    def __init__(self, text: str | None = None, token_ids: list[int] | None = None, salt: str | None = None) -> None:
        self.text = text
        self.salt = salt  # the engine's cache salt of this request (None: unsalted)
        self.given_ids = token_ids  # tokenizer-independent: the engine uses them as they are
        self.ids: dict[str, list[int]] = {}  # tokenizer fingerprint -> ids
        self._hashes: dict[tuple[str | None, int], list[int]] = {}
        self._text_hashes: list[int] | None = None

    def ids_for(self, tokenizer: PromptTokenizer | None) -> list[int] | None:
        if self.given_ids is not None:
            return self.given_ids
        return self.ids.get(tokenizer.fingerprint) if tokenizer is not None else None

    def hashes(self, block_size: int, tokenizer: PromptTokenizer | None = None) -> list[int]:
        """Block hashes of the ids under `tokenizer`, as the engine's prefix cache computes them."""
        key = (None if self.given_ids is not None or tokenizer is None else tokenizer.fingerprint, block_size)
        if key not in self._hashes:
            ids = self.ids_for(tokenizer)
            self._hashes[key] = block_hashes(ids, block_size, salt_root(self.salt)) if ids is not None else []
        return self._hashes[key]

    def text_hashes(self) -> list[int]:
        if self._text_hashes is None:
            self._text_hashes = text_hashes(self.text, self.salt) if self.text else []
        return self._text_hashes


def request_salt(body: dict, salt_key: str | None = None) -> str | None:
    """The salt the engine gives the request: its `cache_salt`, under its API key's when the engines salt by
    key (`salt_key`: the client's key; engine --cache-salt-by-api-key). A bad salt is the engine's to refuse."""
    salt = body.get("cache_salt")
    salt = salt if isinstance(salt, str) and salt else None
    return tenant_salt(salt_key, salt) if salt_key is not None else salt


def build_prompt(path: str, body: dict, tokenizers: list[PromptTokenizer], salt_key: str | None = None) -> Prompt:
    """The prompt under every given tokenizer. A tokenizer that cannot render the request is skipped (the
    engine reports what is wrong with it); routing then falls back to the text."""
    prompt = Prompt(request_text(path, body), salt=request_salt(body, salt_key))
    if not path.endswith("/chat/completions"):
        raw = _first_prompt(body.get("prompt"))
        if isinstance(raw, list) and set(map(type, raw)) <= {int}:  # (no bool: not a token id; C-speed)
            prompt.given_ids = raw
            return prompt
    for tok in tokenizers:
        try:
            prompt.ids[tok.fingerprint] = tok.ids(path, body)
        except Exception:  # noqa: BLE001 - malformed requests are the engine's to reject
            pass
    return prompt
