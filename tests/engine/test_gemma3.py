"""Gemma 3 (text, Gemma3ForCausalLM): greedy tokens equal transformers' (float32, CPU) on a tiny random model
whose windows (8) matter within the prompts, whose two rope bases differ and whose (1 + w) norms are random
(transformers initialises them to 0), under chunked prefill, prefix-cache hits, preemption and TP=2; the
final logit soft-cap through logprobs; each layer type's rotary table; the multimodal checkpoint refused."""

import pytest
import torch
from parity import MAX_TOKENS, engine_greedy, hf_greedy, random_prompts

from nanoserve.engine_pod import LLM, SamplingParams
from nanoserve.engine_pod.errors import ModelLoadError
from nanoserve.engine_pod.layers.rotary import RotaryEmbedding
from nanoserve.engine_pod.models import build_model
from nanoserve.engine_pod.rope_params import rope_parameters
from nanoserve.engine_pod.sliding_window import layer_sliding_windows

GEMMA = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,  # 5 sliding : 1 global
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=1024,
    initializer_range=0.25,
    sliding_window=8,
    query_pre_attn_scalar=24,  # a scale other than head_dim**-0.5
    rope_theta=1000.0,
    rope_local_base_freq=10.0,
    rope_scaling={"rope_type": "linear", "factor": 2.0},  # the global layers' only
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)
PROMPTS = random_prompts(240, [1, 5, 16, 17, 40, 77], seed=7)


def build_gemma3(folder: str, seed: int = 0, **overrides) -> str:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from nanoserve.engine_pod.random_model import save_tokenizer

    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**{**GEMMA, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    save_tokenizer(folder, GEMMA["vocab_size"])
    return folder


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    path = build_gemma3(str(tmp_path_factory.mktemp("gemma3") / "m"))
    return path, hf_greedy(path, PROMPTS, MAX_TOKENS)


def test_config_shapes_the_layers(gemma):
    import json

    cfg = json.load(open(f"{gemma[0]}/config.json"))
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert layer_sliding_windows(cfg) == [8] * 5 + [None]
    model = build_model(cfg, 64)
    attn = [layer.self_attn for layer in model.model.layers]
    assert attn[0].attn.scale == 24**-0.5 and attn[0].attn.sliding_window == 8 and attn[5].attn.sliding_window is None
    assert not torch.equal(attn[0].rotary_emb.cos_sin, attn[5].rotary_emb.cos_sin)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied


def test_greedy_equals_transformers(gemma):
    path, expected = gemma
    assert engine_greedy(path, PROMPTS) == expected
    # 16 tokens a step: prompts cut into chunks, sharing steps with other sequences' decodes
    assert engine_greedy(path, PROMPTS, max_num_batched_tokens=16, kvcache_block_size=8) == expected


def test_prefix_cache_hits_and_preemption_keep_tokens(gemma):
    path, _ = gemma
    a = PROMPTS[5]
    b = a[:40] + PROMPTS[4][:9]  # shares 5 blocks of 8 with a, more than the window
    expected = hf_greedy(path, [a, b], MAX_TOKENS)
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm = LLM(path, num_kvcache_blocks=64, kvcache_block_size=8)
    try:
        got = [llm.generate([p], greedy)[0]["token_ids"] for p in (a, b)]
        assert llm.block_manager.prefix_hits == 40
        assert got == expected
    finally:
        llm.exit()
    # 14 blocks of 8 cannot hold six sequences of up to 89 tokens: sequences get preempted
    llm = LLM(path, num_kvcache_blocks=14, kvcache_block_size=8)
    try:
        outs = llm.generate(PROMPTS, greedy)
        assert llm.scheduler.num_preemptions > 0
        assert [o["token_ids"] for o in outs] == gemma[1]
    finally:
        llm.exit()


def test_tp2_equals_transformers(gemma):
    path, expected = gemma
    assert engine_greedy(path, PROMPTS[2:], tensor_parallel_size=2, max_num_batched_tokens=32) == expected[2:]


def test_final_logit_softcap_in_logprobs(tmp_path):
    """Greedy cannot see the final cap (tanh keeps the order): the logprobs do. The attention cap is set too,
    and unused, as in transformers' Gemma 3 (a cap of 0.5 on the scores would change every token)."""
    from transformers import AutoModelForCausalLM

    path = build_gemma3(str(tmp_path / "m"), seed=1, final_logit_softcapping=2.0, attn_logit_softcapping=0.5)
    prompts = PROMPTS[1:4]
    assert engine_greedy(path, prompts) == hf_greedy(path, prompts, MAX_TOKENS)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(path, num_kvcache_blocks=64)
    try:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
        for prompt, out in zip(prompts, llm.generate(prompts, params)):
            ids = prompt + out["token_ids"]
            with torch.no_grad():
                logits = hf(torch.tensor([ids])).logits[0, len(prompt) - 1 : -1]
            assert logits.abs().max() <= 2.0  # capped
            expected = logits.log_softmax(-1).gather(1, torch.tensor(out["token_ids"])[:, None])[:, 0]
            assert [e.logprob for e in out["logprobs"]] == pytest.approx(expected.tolist(), abs=1e-4)
    finally:
        llm.exit()


def test_rotary_tables_per_layer_type_equal_transformers():
    """Both config styles: transformers 5's per-layer-type rope_parameters and 4.x's rope_theta,
    rope_local_base_freq and rope_scaling (the global layers' only)."""
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    hf = Gemma3TextConfig(**GEMMA)
    v5 = hf.to_dict()
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types")}
    v4 |= dict(rope_theta=1000.0, rope_local_base_freq=10.0, rope_scaling=GEMMA["rope_scaling"])
    positions = torch.arange(64)
    for layer_type in ("sliding_attention", "full_attention"):
        cos, sin = Gemma3RotaryEmbedding(hf)(torch.zeros(1), positions[None], layer_type)
        for cfg in (v5, v4):
            ours = RotaryEmbedding(32, 64, *rope_parameters(cfg, layer_type)).cos_sin
            torch.testing.assert_close(ours, torch.cat([cos[0, :, :16], sin[0, :, :16]], -1), rtol=1e-6, atol=1e-6)
    assert rope_parameters(v4, "sliding_attention") == (10.0, {"rope_type": "default"})


def test_multimodal_checkpoint_is_a_clear_error():
    cfg = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": {}}
    with pytest.raises(ModelLoadError, match="Gemma3ForConditionalGeneration .* not supported.*Gemma3ForCausalLM"):
        build_model(cfg, 64)
