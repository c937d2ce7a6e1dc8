"""Prompt token ids, produced exactly as the engine produces them, and their prefix block hashes.

transformers is imported lazily, inside `load_tokenizer`, so that importing the gateway stays light;
it never imports torch for a tokenizer (the gateway image has none).
"""
from __future__ import annotations

from typing import Any

from nanoserve.common.block_hash import block_hashes
from nanoserve.common.chat import template_messages


class Prompt:
    """A request's prompt token ids, with block hashes computed once per block size."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids
        self._hashes: dict[int, list[int]] = {}

    def hashes(self, block_size: int) -> list[int]:
        if block_size not in self._hashes:
            self._hashes[block_size] = block_hashes(self.token_ids, block_size)
        return self._hashes[block_size]


class PromptTokenizer:
    """Renders OpenAI request bodies to token ids the way the engine server does."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(template_messages(messages), tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def completion_ids(self, prompt: Any) -> list[int]:
        # A batch (list of prompts) is routed by its first prompt.
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return prompt
        raise ValueError("prompt must be a string or a list of token ids")


def load_tokenizer(path: str) -> PromptTokenizer:
    from transformers import AutoTokenizer  # lazy: heavy import, and only needed with --model
    return PromptTokenizer(AutoTokenizer.from_pretrained(path))


def prompt_of(tokenizer: PromptTokenizer | None, path: str, body: dict) -> Prompt | None:
    """The prompt of a request body, or None when it cannot be tokenized (then routing goes by load;
    the engine reports any real error in the request itself)."""
    if tokenizer is None:
        return None
    try:
        if path.endswith("/chat/completions"):
            return Prompt(tokenizer.chat_ids(body["messages"]))
        return Prompt(tokenizer.completion_ids(body["prompt"]))
    except Exception:  # noqa: BLE001 - malformed requests are the engine's to reject
        return None
