"""The gateway tokenizes with the engines' own tokenizer, fetched from them and verified; without one it
routes by text prefix, and a broken or lying engine never makes it route by wrong hashes."""

from __future__ import annotations

import asyncio
import os

import aiohttp
import pytest
from conversations import run_conversations
from poll import until_async
from procs import reserve_port

from nanoserve.common.block_hash import block_hashes
from nanoserve.common.tokenizer_export import export_files, tokenizer_info
from nanoserve.engine_pod.openai_protocol import parse_chat, parse_completion
from nanoserve.gateway.endpoints import engine_id
from nanoserve.gateway.prompt import build_prompt
from nanoserve.gateway.tokenizers import TokenizerError, check_info, load_verified

CHATS = [
    [{"role": "user", "content": "Hello there"}],
    [
        {"role": "system", "content": "You are terse. Réponds en français."},
        {"role": "user", "content": "Quelle est la capitale du Japon ? 日本の首都は？ 🙂"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "w1 w2 w3"},
        {"role": "assistant", "content": "w4 w5"},
        {"role": "developer", "content": "w6"},
        {"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "part two\n\t"}]},
    ],
]
PROMPTS = ["The capital of France is", "  leading spaces, ünïcödé, 中文, emoji 🚀 and\nnew lines", "w7 w8 w9", "x"]


def exported(tokenizer, tmp_path, block_size=16):
    """What an engine serves at /v1/tokenizer, written where the gateway would put the download."""
    files = export_files(tokenizer)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tokenizer_info(tokenizer, files, "m", block_size)


@pytest.mark.parametrize("which", ["default", "qwen3", "bos"])
def test_the_copy_gives_the_engines_ids_and_block_hashes(which, tmp_path, request, tiny_models, tiny_tokenizer):
    from transformers import AutoTokenizer

    folder = {
        "default": lambda: request.getfixturevalue("default_model_path"),
        "qwen3": lambda: tiny_models["qwen3"],
        "bos": lambda: tiny_tokenizer,
    }[which]()
    engine_tok = AutoTokenizer.from_pretrained(folder)
    info = check_info(exported(engine_tok, tmp_path))
    copy = load_verified(str(tmp_path), info, "engine")
    vocab = len(engine_tok) + 1000
    for messages in CHATS:
        body = {"messages": messages}
        want = parse_chat(body, engine_tok, vocab, 1 << 20).prompt_ids
        got = build_prompt("/v1/chat/completions", body, [copy]).ids_for(copy)
        assert got == want and len(want) > 0
        assert block_hashes(got, 16) == block_hashes(want, 16)
    for text in PROMPTS:
        body = {"prompt": text}
        want = parse_completion(body, engine_tok, vocab, 1 << 20).prompt_ids
        p = build_prompt("/v1/completions", body, [copy])
        assert p.ids_for(copy) == want
        assert p.hashes(4, copy) == block_hashes(want, 4)


def test_a_copy_that_tokenizes_differently_is_refused(tmp_path, tiny_tokenizer):
    from transformers import AutoTokenizer

    info = exported(AutoTokenizer.from_pretrained(tiny_tokenizer), tmp_path)
    with pytest.raises(TokenizerError) as e:
        load_verified(str(tmp_path), {**info, "vocab_size": info["vocab_size"] + 1}, "engine")
    assert e.value.reason == "mismatch"
    with pytest.raises(TokenizerError) as e:
        load_verified(str(tmp_path), {**info, "fingerprint": "0" * 64}, "engine")
    assert e.value.reason == "mismatch"
    os.remove(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError) as e:
        load_verified(str(tmp_path), info, "engine")
    assert e.value.reason == "invalid"


@pytest.mark.parametrize("bad", [None, [], {"fingerprint": "xyz"}, {"files": "../etc/passwd"}])
def test_malformed_descriptions_are_refused(bad, tmp_path, tiny_tokenizer):
    from transformers import AutoTokenizer

    info = exported(AutoTokenizer.from_pretrained(tiny_tokenizer), tmp_path)
    for body in [bad] if not isinstance(bad, dict) else [{**info, **bad}]:
        with pytest.raises(TokenizerError):
            check_info(body)
    with pytest.raises(TokenizerError):  # names are file names, never paths
        check_info({**info, "files": [{**info["files"][0], "name": "../tokenizer.json"}]})


def metric(gw, name: str) -> dict[str, float]:
    """Samples of one gateway metric, by their label string."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(gw.metrics_text().decode()):
        for s in family.samples:
            if s.name == name:
                out[",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))] = s.value
    return out


def test_engines_serve_the_tokenizer_the_gateway_routes_by(fake_engines_shared, start_gateway):
    """No --model: the gateway fetches the engines' tokenizer, downloads it once, and routes by their hashes."""
    engines = fake_engines_shared(2, block_size=8)

    async def main():
        async with start_gateway([e.url for e in engines]) as gw:
            await until_async(lambda: gw.routing_mode_now() == "tokens", "routing by the engines' tokenizer")
            (fp,) = gw.tokenizers.loaded  # one download for both engines
            assert {ep.tokenizer.fingerprint for ep in gw.pool.endpoints.values()} == {fp}
            assert all(ep.cache.block_size == 8 for ep in gw.pool.endpoints.values())
            convs = await run_conversations(gw.url, 4, 3)
            assert all(len(set(c.engines)) == 1 for c in convs)
            assert (metric(gw, "nanoserve_gateway_routing_mode"))["mode=tokens"] == 1
            assert (metric(gw, "nanoserve_gateway_prompt_match_mode_total")) == {"mode=tokens": 12}
            async with aiohttp.ClientSession() as s:  # the engines' caches hold what the gateway predicted
                state = [await (await s.get(e.url + "/fake/state")).json() for e in engines]
            assert sum(st["hits"] for st in state) > 0

    asyncio.run(main())


@pytest.mark.parametrize("fault", ["error", "vocab", "file", "swap", "none served"])
def test_a_broken_or_lying_engine_leaves_routing_by_text(
    fault, local_engines, start_gateway, tiny_tokenizer, tiny_models
):
    # The good engine serves another tokenizer: the bad one's files must be downloaded from the bad one.
    bad = {"serve_tokenizer": False} if fault == "none served" else {"tokenizer_fault": fault}

    async def main():
        async with (
            local_engines(
                {"tokenizer": tiny_models["qwen3"], "block_size": 8},
                {"tokenizer": tiny_tokenizer, "block_size": 8, **bad},
            ) as (good, liar),
            start_gateway([good, liar]) as gw,
        ):
            await until_async(lambda: gw.pool.endpoints[good].tokenizer is not None, "the good engine's tokenizer")
            reason = {"vocab": "mismatch", "file": "mismatch", "swap": "mismatch"}.get(fault, "unavailable")
            errors = lambda: metric(gw, "nanoserve_gateway_tokenizer_errors_total")
            await until_async(lambda: errors().get(f"reason={reason}"), lambda: f"a {reason} error (seen {errors()})")
            assert gw.pool.endpoints[liar].tokenizer is None and gw.routing_mode_now() == "text"
            convs = await run_conversations(gw.url, 4, 3)  # never by the lying engine's hashes: by text
            assert all(len(set(c.engines)) == 1 for c in convs)
            assert {c.engines[0] for c in convs} == {engine_id(good), engine_id(liar)}
            assert metric(gw, "nanoserve_gateway_prompt_match_mode_total") == {"mode=text": 12}
            assert gw.pool.endpoints[liar].routable  # the engine itself still serves

    asyncio.run(main())


def test_text_prefix_affinity_without_any_tokenizer(local_engines, start_gateway):
    async def main():
        async with local_engines(*[{"serve_tokenizer": False}] * 3) as urls, start_gateway(urls) as gw:
            convs = await run_conversations(gw.url, 5, 4)
            assert gw.routing_mode_now() == "text"
            assert all(len(set(c.engines)) == 1 for c in convs)  # each conversation sticks to one engine
            assert len({c.engines[0] for c in convs}) > 1  # and they spread
            assert metric(gw, "nanoserve_gateway_routing_decisions_total")["reason=cache_hit"] == 5 * 3

    asyncio.run(main())


def test_engines_with_other_models_each_get_their_own(local_engines, start_gateway, tiny_tokenizer, tiny_models):
    """Mid rolling update to another model: each engine is matched in its own tokenizer's ids; the old
    tokenizer is dropped once no engine uses it."""

    async def main():
        async with (
            local_engines(
                {"tokenizer": tiny_tokenizer, "block_size": 8}, {"tokenizer": tiny_models["qwen3"], "block_size": 8}
            ) as (old, new),
            start_gateway([old, new]) as gw,
        ):
            await until_async(lambda: gw.routing_mode_now() == "tokens", "routing by each engine's own tokenizer")
            assert len(gw.tokenizers.loaded) == 2
            body = {"messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(10, 60))}]}
            ids = build_prompt("/v1/chat/completions", body, list(gw.tokenizers.loaded.values())).ids
            assert len(set(map(tuple, ids.values()))) == 2  # the two tokenizers' ids differ
            async with aiohttp.ClientSession() as s:
                for _ in range(2):
                    async with s.post(gw.url + "/v1/chat/completions", json=body) as r:
                        assert r.status == 200
            assert metric(gw, "nanoserve_gateway_prompt_match_mode_total") == {"mode=tokens": 2}
            assert metric(gw, "nanoserve_gateway_routing_decisions_total")["reason=cache_hit"] == 1
            gw.set_targets({new: True})  # the old engine's pod is gone
            assert [ep.tokenizer.source for ep in gw.pool.endpoints.values()] == [new]
            assert len(gw.tokenizers.loaded) == 1

    asyncio.run(main())


def test_an_engine_restarted_with_another_model_is_reverified(
    start_gateway, tiny_tokenizer, tiny_models, fake_engine_module
):
    """Same address, new model (a pod replaced in place): the gateway notices (its probes or the feed's
    snapshot fingerprint) and verifies the new tokenizer before routing by it again."""
    from aiohttp import web

    fake = fake_engine_module

    async def serve(tokenizer: str, port: int) -> web.AppRunner:
        runner = web.AppRunner(fake.build_app(fake.FakeConfig(tokenizer=tokenizer, block_size=8)))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    async def main():
        port = reserve_port()  # held: nothing else takes it while the engine is replaced
        runner = await serve(tiny_tokenizer, port)
        url = f"http://127.0.0.1:{port}"
        try:
            async with start_gateway([url]) as gw:
                ep = gw.pool.endpoints[url]
                await until_async(lambda: ep.tokenizer is not None, "the first tokenizer")
                first = ep.tokenizer.fingerprint
                await runner.cleanup()
                runner = await serve(tiny_models["qwen3"], port)
                await until_async(
                    lambda: ep.tokenizer is not None and ep.tokenizer.fingerprint != first and ep.cache.is_precise,
                    "the new tokenizer verified and the new engine's feed snapshot",
                )
                assert ep.cache.tokenizer == ep.tokenizer.fingerprint  # the feed's hashes are the new tokenizer's
                assert list(gw.tokenizers.loaded) == [ep.tokenizer.fingerprint]  # the old one is dropped
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_descriptions_are_checked_under_python_O_too():
    """Served file names become paths: their check must not be an `assert` that -O strips."""
    import subprocess
    import sys

    code = (
        "from nanoserve.gateway.tokenizers import TokenizerError, check_info\n"
        "info = {'fingerprint': 'a' * 16, 'vocab_size': 5, 'block_size': 16,\n"
        "        'files': [{'name': '../../escape', 'size': 1, 'sha256': 'b' * 64}]}\n"
        "try:\n    check_info(info)\nexcept TokenizerError:\n    raise SystemExit(0)\nraise SystemExit(1)\n"
    )
    assert subprocess.run([sys.executable, "-O", "-c", code], env={**os.environ, "PYTHONSAFEPATH": "1"}).returncode == 0


def test_the_gateway_is_ready_once_an_engines_tokenizer_is_settled(local_engines, start_gateway, tiny_tokenizer):
    """Loading a tokenizer holds the GIL for seconds (transformers' import, the files): /ready waits for the
    first fetch to end, so that no burst lands on a gateway busy loading one. A policy that ignores caches
    needs no tokenizer; an engine that serves none settles at once."""

    async def ready(s: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
        async with s.get(url + "/ready") as r:
            return r.status, await r.json()

    async def main():
        async with (
            local_engines({"tokenizer": tiny_tokenizer, "tokenizer_fault": "hold"}, {"serve_tokenizer": False}) as (
                held,
                without,
            ),
            aiohttp.ClientSession() as s,
        ):
            async with start_gateway([held], wait_tokenizers=False) as gw:  # (once the engine is routable)
                assert await ready(s, gw.url) == (503, {"ready": False, "engines": 1, "tokenizers_pending": 1})
                async with start_gateway([held], wait_tokenizers=False, policy="round-robin") as rr:
                    assert await ready(s, rr.url) == (200, {"ready": True, "engines": 1, "tokenizers_pending": 0})
                await s.post(held + "/fake/state", json={"tokenizer_fault": ""})
                await until_async(lambda: gw.pool.endpoints[held].tokenizer_settled, "the tokenizer's fetch to end")
                assert await ready(s, gw.url) == (200, {"ready": True, "engines": 1, "tokenizers_pending": 0})
                assert gw.routing_mode_now() == "tokens"
            async with start_gateway([without]) as gw:
                await until_async(lambda: gw.pool.endpoints[without].tokenizer_settled, "the refusal to settle it")
                assert await ready(s, gw.url) == (200, {"ready": True, "engines": 1, "tokenizers_pending": 0})
                assert gw.routing_mode_now() == "text"

    asyncio.run(main())
