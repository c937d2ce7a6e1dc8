"""The sampling kernel and its reference: greedy rows equal torch's argmax (first index on ties), sampled
rows follow softmax(logits / T) (also when the mass is spread over the kernel's vocabulary splits), and a
row's draw depends only on its seed.

Triton's CPU interpreter runs one program a row (~10 ms each): too slow for the thousands of draws of a
frequency test. There the kernel is checked draw by draw instead, which is stronger: each row's pick must
be the inverse CDF of softmax(logits / T) at the row's own uniform (the kernel's Philox draw, recomputed
here for many seeds at once), on rows whose uniforms hit every token, next to both ends of its interval;
and those uniforms must be uniform over the seeds. The frequency tests run on the reference, and on the
kernel where there is a GPU.
"""

import pytest
import torch
import triton
import triton.language as tl

from nanoserve.kernels.sampling_ref import sample_ref

FREQUENCY_IMPLS = ["kernel", "ref"] if torch.cuda.is_available() else ["ref"]


def draw(impl, logits, temps, seeds):
    if impl == "ref":
        return sample_ref(logits, temps, seeds.tolist())
    from nanoserve.kernels.sampling import sample

    return sample(logits, temps, seeds)


@pytest.fixture(params=["kernel", "ref"])
def impl(request, device):
    return request.param


@triton.jit
def _uniforms_kernel(seed_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """The uniform each row's seed gives in the sampling kernel: tl.rand(seed, 0), as _pick_kernel draws it."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    seeds = tl.load(seed_ptr + i, mask=ok, other=0)
    tl.store(out_ptr + i, tl.rand(seeds, tl.zeros([BLOCK], tl.int32)), mask=ok)


def row_uniforms(seeds: torch.Tensor) -> torch.Tensor:
    """float64 [len(seeds)]: the kernel's uniform for each seed, a block of seeds per program."""
    out = torch.empty(len(seeds), dtype=torch.float32, device=seeds.device)
    _uniforms_kernel[(triton.cdiv(len(seeds), 1024),)](seeds, out, len(seeds), BLOCK=1024)
    return out.double().cpu()


def candidate_seeds(device: str, n: int = 1 << 16) -> torch.Tensor:
    return torch.randint(0, 1 << 62, (n,), generator=torch.Generator().manual_seed(7)).to(device)


def test_greedy_rows_are_argmax_with_first_index_on_ties(impl, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3001, generator=gen).to(device, dtype)  # not a multiple of the kernel's block
    logits[1, 5] = logits[1, 2900] = logits[1].max() + 1  # a tie: the first index wins
    logits[2, -1] = logits[2].max() + 1  # the maximum in the ragged last block
    temps = torch.zeros(6, device=device)
    seeds = torch.arange(6, device=device)
    got = draw(impl, logits, temps, seeds)
    assert got.dtype == torch.int64
    assert got.tolist() == logits.float().argmax(-1).tolist()
    assert got[1].item() == 5 and got[2].item() == 3000


SOFTMAX_BASE = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -3.0, 0.2, 1.5])


def split_row(vocab: int = 3072) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A vocabulary of many splits (1024 columns each): the mass sits in a few tokens over different splits
    (the last column of one, the first of the next, the very last), a whole split holds nothing (-inf, as
    top-k/top-p masking leaves it), the rest almost nothing. (row, the massive columns, their logits)"""
    cols = torch.tensor([5, 1023, 1024, 1500, 2047, 3071])
    values = torch.tensor([1.0, 0.5, 0.0, 2.0, -1.0, 1.5])
    row = torch.full((vocab,), -30.0)
    row[2048:3071] = float("-inf")
    row[cols] = values
    return row, cols, values


@pytest.mark.parametrize("impl", FREQUENCY_IMPLS)
def test_sampled_rows_follow_the_softmax(impl, device):
    rows, tolerance, temperature = 1500, 0.045, 0.7  # ~4 standard deviations
    logits = SOFTMAX_BASE.repeat(rows, 1).to(device)
    seeds = torch.randint(0, 1 << 62, (rows,), generator=torch.Generator().manual_seed(1)).to(device)
    got = draw(impl, logits, torch.full((rows,), temperature, device=device), seeds)
    freq = torch.bincount(got.cpu(), minlength=8).double() / rows
    expected = (SOFTMAX_BASE.double() / temperature).softmax(-1)
    assert (freq - expected).abs().max().item() < tolerance


@pytest.mark.parametrize("impl", FREQUENCY_IMPLS)
def test_sampled_rows_follow_the_softmax_across_splits(impl, device):
    rows, tolerance, temperature = 800, 0.06, 0.8  # ~3.5 standard deviations
    row, cols, values = split_row()
    seeds = torch.randint(0, 1 << 62, (rows,), generator=torch.Generator().manual_seed(3)).to(device)
    temps = torch.full((rows,), temperature, device=device, dtype=torch.float64)  # as the engine uploads them
    got = draw(impl, row.repeat(rows, 1).to(device), temps, seeds)
    freq = (got.cpu().unsqueeze(1) == cols).double().mean(0)
    expected = (values.double() / temperature).softmax(-1)
    assert (freq - expected).abs().max().item() < tolerance


def seeds_hitting_every_token(cdf: torch.Tensor, u: torch.Tensor, margin: float) -> tuple[list[int], list[int]]:
    """For each token whose interval [cdf[k-1], cdf[k]) of the unit interval is wider than 2 * margin: the
    seeds (indices into u) with the lowest, a middle and the highest uniform inside it, at least `margin` from
    its ends (the kernel sums in float32). -> (seed indices, the token each must draw)"""
    chosen, tokens = [], []
    lo = torch.cat([torch.zeros(1, dtype=cdf.dtype), cdf[:-1]])
    for token in torch.nonzero(cdf - lo > 2 * margin).flatten().tolist():
        inside = torch.nonzero((u >= lo[token] + margin) & (u < cdf[token] - margin)).flatten()
        assert len(inside) >= 3, f"no seed lands well inside token {token}'s interval"
        by_u = inside[u[inside].argsort()]
        for i in (by_u[0], by_u[len(by_u) // 2], by_u[-1]):
            chosen.append(int(i))
            tokens.append(token)
    return chosen, tokens


@pytest.mark.parametrize("case", ["softmax", "splits"])
def test_each_draw_is_the_inverse_cdf_at_its_rows_uniform(device, case):
    from nanoserve.kernels.sampling import sample

    if case == "softmax":
        row, temperature, temp_dtype = SOFTMAX_BASE, 0.7, torch.float32
    else:
        (row, _, _), temperature, temp_dtype = split_row(), 0.8, torch.float64  # float64: as the engine uploads
    seeds = candidate_seeds(device)
    u = row_uniforms(seeds)
    cdf = (row.double() / temperature).softmax(-1).cumsum(0)
    chosen, want = seeds_hitting_every_token(cdf, u, margin=1e-5)
    rows = len(chosen)
    got = sample(
        row.repeat(rows, 1).to(device), torch.full((rows,), temperature, dtype=temp_dtype, device=device), seeds[chosen]
    )
    assert got.tolist() == want


def test_the_rows_uniforms_are_uniform_over_seeds(device):
    """What the draw-by-draw test leaves to the generator: the uniforms of many seeds are spread evenly
    (their Kolmogorov-Smirnov distance is below the 99.9% bound for 65536 draws, 0.0076) and distinct."""
    u = row_uniforms(candidate_seeds(device)).sort().values
    n = len(u)
    ranks = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert 0 <= u[0] and u[-1] < 1
    assert max((ranks - u).max().item(), (u - (ranks - 1 / n)).max().item()) < 0.0076
    assert len(torch.unique(u)) > 0.99 * n


def test_draw_depends_only_on_the_seed(impl, device):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 500, generator=gen).to(device)
    temps = torch.ones(4, device=device)
    seeds = torch.tensor([11, 12, 11, 13], device=device)
    a = draw(impl, logits[[0, 0, 0, 0]], temps, seeds)
    b = draw(impl, logits[[0, 0, 0, 0]], temps, seeds)
    assert a.tolist() == b.tolist() and a[0] == a[2]
    many = draw(impl, logits[[0] * 64], torch.ones(64, device=device), torch.arange(64, device=device))
    assert len(set(many.tolist())) > 10  # different seeds, different draws
