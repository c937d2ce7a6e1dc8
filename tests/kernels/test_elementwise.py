"""Fused elementwise Triton kernels against the layers' plain-PyTorch functions, on fresh random inputs."""

import random

import pytest
import torch

from nanoserve.engine_pod.layers.activation import gelu_tanh_and_mul as gelu_ref
from nanoserve.engine_pod.layers.activation import silu_and_mul as silu_ref
from nanoserve.engine_pod.layers.layernorm import add_rms_norm
from nanoserve.engine_pod.layers.layernorm import rms_norm as rms_ref
from nanoserve.engine_pod.layers.rotary import RotaryEmbedding
from nanoserve.engine_pod.layers.rotary import apply_rotary as rotary_ref
from nanoserve.kernels.attention_ref import store_kvcache_ref


def rnd(*shape, device, dtype):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(random.randrange(1 << 30))).to(device, dtype)


def close(a, b, dtype):
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    return ((a.double() - b.double()).norm() / b.double().norm()).item() < tol


@pytest.fixture
def dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def norm_weight(n, device, dtype, gemma):
    """A norm's weight: in the model dtype, or Gemma's folded 1 + w in float32 (scaled in float32, then cast)."""
    return (1 + rnd(n, device=device, dtype=torch.float32)) if gemma else rnd(n, device=device, dtype=dtype)


@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("n", [64, 100])
def test_rms_norm(device, dtype, n, gemma):
    from nanoserve.kernels.elementwise import rms_norm

    x, res, w = (
        rnd(5, n, device=device, dtype=dtype),
        rnd(5, n, device=device, dtype=dtype),
        norm_weight(n, device, dtype, gemma),
    )
    assert rms_norm(x, w, 1e-6).dtype == dtype
    assert close(rms_norm(x, w, 1e-6), rms_ref(x, w, 1e-6), dtype)
    out, new_res = rms_norm(x, w, 1e-6, res)
    ref_out, ref_res = add_rms_norm(x, res, w, 1e-6)
    assert close(out, ref_out, dtype) and close(new_res, ref_res, dtype)
    heads = rnd(5, 3 * (n + 8), device=device, dtype=dtype)[:, : 3 * n].view(5, 3, n)  # strided per-head view
    assert close(rms_norm(heads, w, 1e-6), rms_ref(heads, w, 1e-6), dtype)


@pytest.mark.parametrize("with_norm", [False, True, "gemma"])
@pytest.mark.parametrize("dim, heads, kv_heads", [(32, 4, 2), (40, 6, 3)])
def test_qk_norm_rotary(device, dtype, dim, heads, kv_heads, with_norm):
    from nanoserve.kernels.elementwise import qk_norm_rotary

    rope = RotaryEmbedding(dim, 64, 10000.0, {}).to(device)
    qkv = rnd(6, (heads + 2 * kv_heads) * dim, device=device, dtype=dtype)  # q and k: strided views
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    q, k = q.view(6, heads, dim), k.view(6, kv_heads, dim)
    pos = torch.tensor([0, 3, 7, 8, 40, 63], device=device)
    if with_norm:
        qw, kw = (norm_weight(dim, device, dtype, with_norm == "gemma") for _ in range(2))
        got = qk_norm_rotary(pos, q, k, rope.cos_sin, qw, kw, 1e-6)
        ref = rotary_ref(pos, rms_ref(q, qw, 1e-6), rms_ref(k, kw, 1e-6), rope.cos_sin)
    else:
        got, ref = qk_norm_rotary(pos, q, k, rope.cos_sin), rotary_ref(pos, q, k, rope.cos_sin)
    assert got[0].is_contiguous() and got[1].is_contiguous()
    assert close(got[0], ref[0], dtype) and close(got[1], ref[1], dtype)


@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("dim, heads, kv_heads", [(32, 4, 2), (40, 6, 3)])
def test_qk_norm_rotary_store(device, dtype, dim, heads, kv_heads, with_norm):
    """The fused kernel's q equals the reference's; rotated k and v land in their slots, -1 is skipped, and
    no other slot of the caches changes."""
    from nanoserve.kernels.elementwise import qk_norm_rotary_store

    rope = RotaryEmbedding(dim, 64, 10000.0, {}).to(device)
    qkv = rnd(6, (heads + 2 * kv_heads) * dim, device=device, dtype=dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    q, k, v = q.view(6, heads, dim), k.view(6, kv_heads, dim), v.view(6, kv_heads, dim)
    pos = torch.tensor([0, 3, 7, 8, 40, 63], device=device)
    slots = torch.tensor([0, 5, -1, 17, 3, 30], device=device)
    k_cache, v_cache = (
        rnd(4, 8, kv_heads, dim, device=device, dtype=dtype),
        rnd(4, 8, kv_heads, dim, device=device, dtype=dtype),
    )
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    norms = (rnd(dim, device=device, dtype=dtype), rnd(dim, device=device, dtype=dtype), 1e-6) if with_norm else ()
    got_q = qk_norm_rotary_store(pos, q, k, v, rope.cos_sin, k_cache, v_cache, slots, *norms)
    nq, nk = (rms_ref(q, norms[0], 1e-6), rms_ref(k, norms[1], 1e-6)) if with_norm else (q, k)
    ref_q, ref_k = rotary_ref(pos, nq, nk, rope.cos_sin)
    store_kvcache_ref(ref_k, v, ref_k_cache, ref_v_cache, slots)
    assert close(got_q, ref_q, dtype) and close(k_cache, ref_k_cache, dtype)
    assert torch.equal(v_cache, ref_v_cache)  # v is copied bit for bit
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[[0, 5, 17, 3, 30]] = False
    assert torch.equal(k_cache.view(32, -1)[untouched.to(device)], ref_k_cache.view(32, -1)[untouched.to(device)])
    assert close(k_cache.view(32, kv_heads, dim)[17], ref_k[3], dtype)


def test_silu_and_mul(device, dtype):
    from nanoserve.kernels.elementwise import silu_and_mul

    x = rnd(7, 2 * 1500, device=device, dtype=dtype)
    assert close(silu_and_mul(x), silu_ref(x), dtype)


def test_gelu_tanh_and_mul(device, dtype):
    from nanoserve.kernels.elementwise import gelu_tanh_and_mul

    x = rnd(7, 2 * 1500, device=device, dtype=dtype) * 2  # into the tails of tanh
    got = gelu_tanh_and_mul(x)
    assert got.shape == (7, 1500) and close(got, gelu_ref(x), dtype)
    assert not close(got, silu_ref(x), dtype)
