"""Triton kernel: sample one token per row with Gumbel-max, reading the logits once in their own dtype.

Reference: `sampling_ref.sample_ref` (same rule, torch's generator instead of Philox). Replaces the
float32 copy, temperature division, softmax, noise and argmax that eager sampling runs as separate
passes over [rows, vocab]; greedy rows (temperature 0) take the plain argmax (first index on ties).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _sample_kernel(logits_ptr, temp_ptr, seed_ptr, out_ptr, stride_row, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    t = tl.load(temp_ptr + row).to(tl.float32)
    seed = tl.load(seed_ptr + row)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + cols, mask=cols < vocab,
                    other=float("-inf")).to(tl.float32)
        if t > 0:
            u = tl.maximum(tl.rand(seed, cols), 1e-20)
            x = x / t - tl.log(-tl.log(u))
        better = x > best  # strict: each lane keeps its first maximum
        best = tl.where(better, x, best)
        best_idx = tl.where(better, cols, best_idx)
    top = tl.max(best, 0)
    tl.store(out_ptr + row, tl.min(tl.where(best == top, best_idx, vocab), 0).to(tl.int64))


def sample(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """logits [rows, vocab] (any float dtype, last dim contiguous); temperatures [rows] float (0: greedy);
    seeds [rows] int64. -> int64 [rows]."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    _sample_kernel[(rows,)](logits, temperatures, seeds, out, logits.stride(0), vocab, BLOCK=2048, num_warps=8)
    return out
