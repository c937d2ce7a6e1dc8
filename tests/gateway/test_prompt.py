"""Prompt tokenization matches the engine's recipe, and the gateway never imports torch."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nanoserve.common.block_hash import block_hashes
from nanoserve.gateway.prompt import Prompt, load_tokenizer, prompt_of

MESSAGES = [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "w3 w4 w5"}]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return load_tokenizer(tiny_tokenizer)


def test_chat_is_rendered_with_the_template_without_special_tokens(tok, tiny_tokenizer):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(tiny_tokenizer)
    text = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    expected = hf.encode(text, add_special_tokens=False)
    p = prompt_of(tok, "/v1/chat/completions", {"messages": MESSAGES})
    assert p.token_ids == expected
    assert hf.bos_token_id not in p.token_ids  # the template, not encode(), decides on special tokens


def test_chat_messages_are_normalised_like_the_engine_does(tok):
    """Text parts are joined, "developer" is "system", extra keys are dropped (engine_pod/openai_protocol.py)."""
    plain = prompt_of(tok, "/v1/chat/completions", {"messages": MESSAGES}).token_ids
    fancy = [{"role": "developer", "content": "w1 w2", "name": "ops"},
             {"role": "user", "content": [{"type": "text", "text": "w3 "}, {"type": "text", "text": "w4 w5"}]}]
    assert prompt_of(tok, "/v1/chat/completions", {"messages": fancy}).token_ids == plain


def test_completion_prompts(tok, tiny_tokenizer):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(tiny_tokenizer)
    assert prompt_of(tok, "/v1/completions", {"prompt": "w7 w8"}).token_ids == hf.encode("w7 w8")
    assert prompt_of(tok, "/v1/completions", {"prompt": [5, 6, 7]}).token_ids == [5, 6, 7]
    assert prompt_of(tok, "/v1/completions", {"prompt": ["w7 w8", "w9"]}).token_ids == hf.encode("w7 w8")
    assert prompt_of(tok, "/v1/completions", {"prompt": [[5, 6], [7]]}).token_ids == [5, 6]


def test_unroutable_bodies_give_no_prompt(tok):
    assert prompt_of(tok, "/v1/completions", {}) is None
    assert prompt_of(tok, "/v1/completions", {"prompt": 3}) is None
    assert prompt_of(tok, "/v1/chat/completions", {"messages": "hi"}) is None
    assert prompt_of(None, "/v1/completions", {"prompt": "w1"}) is None


def test_hashes_per_block_size():
    ids = list(range(50))
    p = Prompt(ids)
    assert p.hashes(16) == block_hashes(ids, 16) and len(p.hashes(16)) == len(ids) // 16
    assert p.hashes(8) == block_hashes(ids, 8)
    assert p.hashes(16) is p.hashes(16)  # computed once


def test_gateway_does_not_import_torch(tiny_tokenizer):
    # As in the gateway image: torch is absent (transformers imports torch whenever it can find it, so
    # "not in sys.modules" would test transformers; None makes any import of it fail, and hides it from find_spec).
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import nanoserve.gateway, nanoserve.gateway.cli, nanoserve.gateway.app\n"
        "from nanoserve.gateway.prompt import load_tokenizer, prompt_of\n"
        f"tok = load_tokenizer({tiny_tokenizer!r})\n"
        "assert prompt_of(tok, '/v1/chat/completions', {'messages': [{'role': 'user', 'content': 'w1'}]})\n"
        "assert sys.modules['torch'] is None, 'torch was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONSAFEPATH": "1"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
