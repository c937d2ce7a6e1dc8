"""Prompts as the router sees them: token ids by the engine's recipe, text for text-prefix affinity; and the
gateway never imports torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nanoserve.common.block_hash import block_hashes, salt_root, tenant_salt
from nanoserve.gateway.prompt import TEXT_CHUNK, Prompt, build_prompt, load_tokenizer, request_text, text_hashes

MESSAGES = [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "w3 w4 w5"}]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return load_tokenizer(tiny_tokenizer)


def ids(tok, path, body):
    return build_prompt(path, body, [tok]).ids_for(tok)


def test_chat_is_rendered_with_the_template_without_special_tokens(tok, tiny_tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_tokenizer)
    text = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    expected = hf.encode(text, add_special_tokens=False)
    got = ids(tok, CHAT, {"messages": MESSAGES})
    assert got == expected
    assert hf.bos_token_id not in got  # the template, not encode(), decides on special tokens


def test_chat_messages_are_normalised_like_the_engine_does(tok):
    """Text parts are joined, "developer" is "system", extra keys are dropped (common/chat.py)."""
    plain = ids(tok, CHAT, {"messages": MESSAGES})
    fancy = [
        {"role": "developer", "content": "w1 w2", "name": "ops"},
        {"role": "user", "content": [{"type": "text", "text": "w3 "}, {"type": "text", "text": "w4 w5"}]},
    ]
    assert ids(tok, CHAT, {"messages": fancy}) == plain
    assert request_text(CHAT, {"messages": fancy}) == request_text(CHAT, {"messages": MESSAGES})


def test_completion_prompts(tok, tiny_tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_tokenizer)
    assert ids(tok, "/v1/completions", {"prompt": "w7 w8"}) == hf.encode("w7 w8")
    assert ids(tok, "/v1/completions", {"prompt": ["w7 w8", "w9"]}) == hf.encode("w7 w8")


def test_token_id_prompts_need_no_tokenizer():
    p = build_prompt("/v1/completions", {"prompt": [[5, 6], [7]]}, [])
    assert p.ids_for(None) == [5, 6] and p.hashes(2) == block_hashes([5, 6], 2)
    assert build_prompt("/v1/completions", {"prompt": [5, 6, 7]}, []).given_ids == [5, 6, 7]


def test_unroutable_bodies_give_no_ids_and_no_text(tok):
    for path, body in [
        ("/v1/completions", {}),
        ("/v1/completions", {"prompt": 3}),
        (CHAT, {"messages": "hi"}),
        (CHAT, {"messages": [{"role": "user", "content": 5}]}),
    ]:
        p = build_prompt(path, body, [tok])
        assert p.ids_for(tok) is None and p.text is None and p.text_hashes() == []


def test_hashes_per_block_size():
    token_ids = list(range(50))
    p = Prompt(token_ids=token_ids)
    assert p.hashes(16) == block_hashes(token_ids, 16) and len(p.hashes(16)) == len(token_ids) // 16
    assert p.hashes(8) == block_hashes(token_ids, 8)
    assert p.hashes(16) is p.hashes(16)  # computed once


def test_text_hashes_chain_over_full_chunks_so_later_turns_extend_earlier_ones():
    first = [{"role": "user", "content": "x" * 150}]
    later = first + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "é" * 100}]
    a, b = (text_hashes(request_text(CHAT, {"messages": m})) for m in (first, later))
    assert len(a) == len(request_text(CHAT, {"messages": first}).encode()) // TEXT_CHUNK == 2
    assert b[: len(a)] == a and len(b) > len(a)
    other = text_hashes(request_text(CHAT, {"messages": [{"role": "system", "content": "x" * 150}]}))
    assert other[0] != a[0]  # roles are part of the text
    assert text_hashes("\ud800" * 40)  # lone surrogates hash too (they cannot be encoded strictly)


def test_cache_salt_salts_block_and_text_hashes_as_the_engine_does(tok):
    """The engine chains a salted request's first block to salt_root(salt): so does the router, for both
    token and text hashes, so a salted prompt routes where that salt's blocks are."""
    token_ids = list(range(40))
    plain = build_prompt("/v1/completions", {"prompt": token_ids}, [])
    salted = build_prompt("/v1/completions", {"prompt": token_ids, "cache_salt": "s"}, [])
    assert salted.hashes(16) == block_hashes(token_ids, 16, salt_root("s")) != plain.hashes(16)
    body = {"messages": [{"role": "user", "content": "w3 " * 200}], "cache_salt": "s"}
    chat = build_prompt(CHAT, body, [tok])
    assert chat.hashes(16, tok) == block_hashes(chat.ids_for(tok), 16, salt_root("s"))
    assert chat.text_hashes() and chat.text_hashes() == text_hashes(chat.text, "s") != text_hashes(chat.text)
    for bad in ["", 5, None]:  # the engine refuses a bad salt (or takes null for none): routed unsalted
        assert build_prompt("/v1/completions", {"prompt": token_ids, "cache_salt": bad}, []).hashes(16) == plain.hashes(
            16
        )
    # Engines under --cache-salt-by-api-key salt by the client's key too: the caller passes it as salt_key.
    keyed = build_prompt("/v1/completions", {"prompt": token_ids, "cache_salt": "s"}, [], salt_key="k")
    assert keyed.hashes(16) == block_hashes(token_ids, 16, salt_root(tenant_salt("k", "s")))


def test_gateway_does_not_import_torch(tiny_tokenizer):
    # As in the gateway image: torch is absent (transformers imports torch whenever it can find it, so
    # "not in sys.modules" would test transformers; None makes any import of it fail, and hides it from find_spec).
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import nanoserve.gateway, nanoserve.gateway.cli, nanoserve.gateway.app\n"
        "from nanoserve.gateway.prompt import build_prompt, load_tokenizer\n"
        f"tok = load_tokenizer({tiny_tokenizer!r})\n"
        "assert build_prompt('/v1/chat/completions', {'messages': [{'role': 'user', 'content': 'w1'}]}, [tok]).ids\n"
        "assert sys.modules['torch'] is None, 'torch was imported'\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONSAFEPATH": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
