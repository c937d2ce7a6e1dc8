"""The decode GEMM against F.linear on fresh random inputs: ragged M and N, bias, forced tiles; on a
Hopper GPU also a CUDA graph of dependent-launched kernels replayed on new inputs (a missing wait would
read the previous replay's values)."""
import pytest
import torch
import torch.nn.functional as F


def rnd(*shape, seed, device, dtype):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def poison(device, dtype, *shape):
    """Leave NaNs where the caching allocator will place the next tensor of this shape."""
    if device == "cuda":
        torch.full(shape, float("nan"), device=device, dtype=dtype)


@pytest.mark.parametrize("m", [1, 5, 16, 33])
@pytest.mark.parametrize("n, k", [(48, 64), (200, 192)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_f_linear(device, m, n, k, with_bias):
    from nanoserve.kernels.gemm import linear
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, w = rnd(m, k, seed=m, device=device, dtype=dtype), rnd(n, k, seed=n + k, device=device, dtype=dtype)
    b = rnd(n, seed=1, device=device, dtype=dtype) if with_bias else None
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    poison(device, dtype, m, n)
    got = linear(x, w, b)
    assert got.shape == (m, n) and got.dtype == dtype
    assert rel_err(got, ref) < (1e-2 if device == "cuda" else 1e-5)


@pytest.mark.parametrize("tiles", [(16, 16, 64, 4, 2), (32, 64, 128, 4, 3), (64, 32, 64, 4, 4)])
def test_linear_any_tile(device, tiles):
    from nanoserve.kernels.gemm import linear
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, w = rnd(70, 256, seed=2, device=device, dtype=dtype), rnd(90, 256, seed=3, device=device, dtype=dtype)
    poison(device, dtype, 70, 90)
    assert rel_err(linear(x, w, tiles=tiles), F.linear(x.double(), w.double())) < (1e-2 if device == "cuda" else 1e-5)


def test_dependent_launch_chain_in_a_graph(device):
    from nanoserve.kernels import pdl
    if device != "cuda" or not pdl.use_pdl(torch.empty(0, device="cuda")):
        pytest.skip("programmatic dependent launch needs a Hopper GPU")
    from nanoserve.kernels.elementwise import rms_norm, silu_and_mul
    from nanoserve.kernels.gemm import linear
    dtype = torch.bfloat16
    x = rnd(48, 256, seed=4, device=device, dtype=dtype)
    norm_w = rnd(256, seed=5, device=device, dtype=dtype)
    up = rnd(2 * 512, 256, seed=6, device=device, dtype=dtype) * 0.1
    down = rnd(256, 512, seed=7, device=device, dtype=dtype) * 0.1

    def chain(t):
        for _ in range(4):  # each step reads what the one before wrote
            h = rms_norm(t, norm_w, 1e-6)
            t = linear(silu_and_mul(linear(h, up)), down) + t
        return t

    def ref(t):
        t = t.double()
        for _ in range(4):
            h = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_w.double()
            g, u = F.linear(h, up.double()).chunk(2, -1)
            t = F.linear(F.silu(g) * u, down.double()) + t
        return t

    chain(x)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(x)
    for seed in range(8, 13):
        x.copy_(rnd(48, 256, seed=seed, device=device, dtype=dtype))
        graph.replay()
        assert rel_err(out, ref(x)) < 3e-2
