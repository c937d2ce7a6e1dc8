"""The engine's tokenizer as files that the gateway loads, and a fingerprint that tells whether two agree.

The engine exports what `save_pretrained` writes of the tokenizer it really uses, so every model source
(builtin, a PVC folder, a Hugging Face download) looks the same to the gateway, which needs no volume and
no download of its own. The fingerprint hashes the vocabulary, the chat template and the ids of a probe text
and a probe conversation: a copy that tokenizes differently, or an engine that lies, shows up as a different
fingerprint before its hashes steer any request. Torch-free (the gateway image has no torch).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

from nanoserve.common.chat import chat_prompt_ids

# Text that exercises normalisation and pre-tokenisation: spaces, digits, code, accents, CJK, emoji, markup.
PROBE_TEXT = (
    "Hello, world!  The year 2026: 3.14159 \u00d7 10\u207b\u00b3 \u2014 caf\u00e9 na\u00efve "
    "\u65e5\u672c\u8a9e\u306e\u6587 \U0001f642\U0001f680 <s></s> <|im_start|>user\n"
    "def f(x):\n\treturn x ** 2  # ok\r\n  \u00a0end"
)
PROBE_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. R\u00e9ponds bri\u00e8vement."},
    {"role": "user", "content": "What is 2 + 2? \u4e8c\u52a0\u4e8c"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And \U0001f642 \u00d7 3?"},
]
MAX_FILE_BYTES = 64 << 20  # one tokenizer file; the largest published tokenizer.json files are ~30 MB


def fingerprint(tokenizer: Any) -> str:
    """A hex digest that equal tokenizers share: vocabulary (added tokens included), chat template, and
    the ids of the probe text and conversation."""
    h = hashlib.sha256()
    vocab = sorted(tokenizer.get_vocab().items())
    h.update(json.dumps(vocab, ensure_ascii=False).encode())
    h.update(json.dumps(str(getattr(tokenizer, "chat_template", None))).encode())
    h.update(json.dumps(tokenizer.encode(PROBE_TEXT)).encode())
    try:
        chat = chat_prompt_ids(tokenizer, PROBE_MESSAGES)
    except ValueError as e:  # a template that refuses a system message still has a stable answer
        chat = f"refused: {type(e).__name__}"
    h.update(json.dumps(chat).encode())
    return h.hexdigest()


def export_files(tokenizer: Any) -> dict[str, bytes]:
    """The files `save_pretrained` writes for the tokenizer (tokenizer.json, its config, the chat template)."""
    with tempfile.TemporaryDirectory(prefix="nanoserve-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        out = {}
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    out[name] = f.read()
        return out


def tokenizer_info(tokenizer: Any, files: dict[str, bytes], model: str, block_size: int) -> dict:
    """The body of the engine's GET /v1/tokenizer: what to download, and what the copy must reproduce."""
    return {
        "model": model,
        "fingerprint": fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "block_size": block_size,
        "files": [
            {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in files.items()
        ],
    }
