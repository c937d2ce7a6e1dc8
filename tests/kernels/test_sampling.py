"""The sampling kernel and its reference: greedy rows equal torch's argmax (first index on ties), sampled
rows follow softmax(logits / T) (also when the mass is spread over the kernel's vocabulary splits), and a
row's draw depends only on its seed."""

import pytest
import torch

from nanoserve.kernels.sampling_ref import sample_ref


def draw(impl, logits, temps, seeds):
    if impl == "ref":
        return sample_ref(logits, temps, seeds.tolist())
    from nanoserve.kernels.sampling import sample

    return sample(logits, temps, seeds)


@pytest.fixture(params=["kernel", "ref"])
def impl(request, device):
    return request.param


def sample_size(impl: str, device: str, rows: int, tolerance: float) -> tuple[int, float]:
    """Triton's CPU interpreter runs a program a row: there, a quarter of the rows and twice the tolerance
    (the same number of standard deviations); the GPU suite and the reference keep the full count."""
    return (rows, tolerance) if impl == "ref" or device == "cuda" else (rows // 4, 2 * tolerance)


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


def test_sampled_rows_follow_the_softmax(impl, device):
    (rows, tolerance), temperature = sample_size(impl, device, 1500, 0.045), 0.7  # ~4 standard deviations
    base = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -3.0, 0.2, 1.5])
    logits = base.repeat(rows, 1).to(device)
    seeds = torch.randint(0, 1 << 62, (rows,), generator=torch.Generator().manual_seed(1)).to(device)
    got = draw(impl, logits, torch.full((rows,), temperature, device=device), seeds)
    freq = torch.bincount(got.cpu(), minlength=8).double() / rows
    expected = (base.double() / temperature).softmax(-1)
    assert (freq - expected).abs().max().item() < tolerance


def test_sampled_rows_follow_the_softmax_across_splits(impl, device):
    """A vocabulary of many splits: the mass sits in a few tokens spread over different splits (the last
    column of one, the first of the next, the very last), whole splits hold nothing (-inf, as top-k/top-p
    masking leaves them) or almost nothing."""
    (rows, tolerance), temperature, vocab = sample_size(impl, device, 800, 0.06), 0.8, 3072  # ~3.5 std devs
    cols = torch.tensor([5, 1023, 1024, 1500, 2047, 3071])
    values = torch.tensor([1.0, 0.5, 0.0, 2.0, -1.0, 1.5])
    row = torch.full((vocab,), -30.0)
    row[2048:3071] = float("-inf")
    row[cols] = values
    seeds = torch.randint(0, 1 << 62, (rows,), generator=torch.Generator().manual_seed(3)).to(device)
    temps = torch.full((rows,), temperature, device=device, dtype=torch.float64)  # as the engine uploads them
    got = draw(impl, row.repeat(rows, 1).to(device), temps, seeds)
    freq = (got.cpu().unsqueeze(1) == cols).double().mean(0)
    expected = (values.double() / temperature).softmax(-1)
    assert (freq - expected).abs().max().item() < tolerance


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
