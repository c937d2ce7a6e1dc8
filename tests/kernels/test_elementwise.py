"""Fused elementwise Triton kernels against the layers' plain-PyTorch functions, on fresh random inputs."""
import random

import pytest
import torch

from nanoserve.engine_pod.layers.activation import silu_and_mul as silu_ref
from nanoserve.engine_pod.layers.layernorm import add_rms_norm, rms_norm as rms_ref
from nanoserve.engine_pod.layers.rotary import RotaryEmbedding, apply_rotary as rotary_ref


def rnd(*shape, device, dtype):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(random.randrange(1 << 30))).to(device, dtype)


def close(a, b, dtype):
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    return ((a.double() - b.double()).norm() / b.double().norm()).item() < tol


@pytest.fixture
def dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


@pytest.mark.parametrize("n", [64, 100])
def test_rms_norm(device, dtype, n):
    from nanoserve.kernels.elementwise import rms_norm
    x, res, w = rnd(5, n, device=device, dtype=dtype), rnd(5, n, device=device, dtype=dtype), rnd(n, device=device, dtype=dtype)
    assert close(rms_norm(x, w, 1e-6), rms_ref(x, w, 1e-6), dtype)
    out, new_res = rms_norm(x, w, 1e-6, res)
    ref_out, ref_res = add_rms_norm(x, res, w, 1e-6)
    assert close(out, ref_out, dtype) and close(new_res, ref_res, dtype)
    heads = rnd(5, 3 * (n + 8), device=device, dtype=dtype)[:, :3 * n].view(5, 3, n)  # strided per-head view
    assert close(rms_norm(heads, w, 1e-6), rms_ref(heads, w, 1e-6), dtype)


@pytest.mark.parametrize("dim", [32, 40])
def test_rotary(device, dtype, dim):
    from nanoserve.kernels.elementwise import apply_rotary
    rope = RotaryEmbedding(dim, 64, 10000.0, {}).to(device)
    qkv = rnd(6, (4 + 2 * 2) * dim, device=device, dtype=dtype)
    q, k, _ = qkv.split([4 * dim, 2 * dim, 2 * dim], -1)
    q, k = q.view(6, 4, dim), k.view(6, 2, dim)
    pos = torch.tensor([0, 3, 7, 8, 40, 63], device=device)
    got, ref = apply_rotary(pos, q, k, rope.cos_sin), rotary_ref(pos, q, k, rope.cos_sin)
    assert close(got[0], ref[0], dtype) and close(got[1], ref[1], dtype)


def test_silu_and_mul(device, dtype):
    from nanoserve.kernels.elementwise import silu_and_mul
    x = rnd(7, 2 * 1500, device=device, dtype=dtype)
    assert close(silu_and_mul(x), silu_ref(x), dtype)
