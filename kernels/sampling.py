"""Triton kernels: sample one token per row with Gumbel-max, reading the logits once in their own dtype.

Reference: `sampling_ref.sample_ref` (same rule, torch's generator instead of Philox). Replaces the
float32 copy, temperature division, softmax, noise and argmax that eager sampling runs as separate
passes over [rows, vocab]; greedy rows (temperature 0) take the plain argmax (first index on ties).
The vocabulary is split over several programs per row (a 150k vocabulary is 300 KB of logits a row, too
much for one program at small batches), then a second kernel picks each row's best split.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _perturb(x, u, t):
    """x / t + Gumbel noise from uniform u (t > 0)."""
    return x / t - tl.log(-tl.log(tl.maximum(u, 1e-20)))


@triton.jit
def _keep_best(x, cols, best, best_idx):
    better = x > best  # strict: each lane keeps its first maximum
    return tl.where(better, x, best), tl.where(better, cols, best_idx)


@triton.jit
def _sample_split_kernel(logits_ptr, temp_ptr, seed_ptr, best_ptr, idx_ptr, stride_row, vocab, num_splits,
                         CHUNK: tl.constexpr, QUARTER: tl.constexpr):
    """Each step handles 4 * QUARTER columns as four contiguous quarters; one Philox call gives the four
    uniforms of column i of every quarter (Philox is most of the work, and it makes 4 numbers a call)."""
    row, split = tl.program_id(0), tl.program_id(1)
    t = tl.load(temp_ptr + row).to(tl.float32)
    seed = tl.load(seed_ptr + row)
    base = logits_ptr + row.to(tl.int64) * stride_row
    best = tl.full([QUARTER], float("-inf"), tl.float32)
    best_idx = tl.zeros([QUARTER], tl.int32)
    i = tl.arange(0, QUARTER)
    for start in range(split * CHUNK, split * CHUNK + CHUNK, 4 * QUARTER):
        c0, c1, c2, c3 = start + i, start + QUARTER + i, start + 2 * QUARTER + i, start + 3 * QUARTER + i
        x0 = tl.load(base + c0, mask=c0 < vocab, other=float("-inf")).to(tl.float32)
        x1 = tl.load(base + c1, mask=c1 < vocab, other=float("-inf")).to(tl.float32)
        x2 = tl.load(base + c2, mask=c2 < vocab, other=float("-inf")).to(tl.float32)
        x3 = tl.load(base + c3, mask=c3 < vocab, other=float("-inf")).to(tl.float32)
        if t > 0:
            u0, u1, u2, u3 = tl.rand4x(seed, start // 4 + i)
            x0, x1, x2, x3 = _perturb(x0, u0, t), _perturb(x1, u1, t), _perturb(x2, u2, t), _perturb(x3, u3, t)
        best, best_idx = _keep_best(x0, c0, best, best_idx)  # in column order: ties keep the first
        best, best_idx = _keep_best(x1, c1, best, best_idx)
        best, best_idx = _keep_best(x2, c2, best, best_idx)
        best, best_idx = _keep_best(x3, c3, best, best_idx)
    top = tl.max(best, 0)
    tl.store(best_ptr + row * num_splits + split, top)
    tl.store(idx_ptr + row * num_splits + split, tl.min(tl.where(best == top, best_idx, vocab), 0))


@triton.jit
def _pick_split_kernel(best_ptr, idx_ptr, out_ptr, num_splits, SPLITS_P: tl.constexpr):
    row = tl.program_id(0)
    s = tl.arange(0, SPLITS_P)
    ok = s < num_splits
    best = tl.load(best_ptr + row * num_splits + s, mask=ok, other=float("-inf"))
    idx = tl.load(idx_ptr + row * num_splits + s, mask=ok, other=2**31 - 1)
    top = tl.max(best, 0)
    tl.store(out_ptr + row, tl.min(tl.where(best == top, idx, 2**31 - 1), 0).to(tl.int64))


def sample(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """logits [rows, vocab] (any float dtype, last dim contiguous); temperatures [rows] float (0: greedy);
    seeds [rows] int64. -> int64 [rows]."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1
    block = 1024
    chunk = block * max(1, min(8, triton.cdiv(vocab, 16 * block)))  # >= 16 splits for big vocabularies
    splits = triton.cdiv(vocab, chunk)
    best = torch.empty(rows, splits, dtype=torch.float32, device=logits.device)
    idx = torch.empty(rows, splits, dtype=torch.int32, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    _sample_split_kernel[(rows, splits)](logits, temperatures, seeds, best, idx, logits.stride(0), vocab, splits,
                                         CHUNK=chunk, QUARTER=block // 4, num_warps=4)
    _pick_split_kernel[(rows,)](best, idx, out, splits, SPLITS_P=triton.next_power_of_2(splits))
    return out
