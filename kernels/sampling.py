# pyright: reportArgumentType=false, reportCallIssue=false, reportOperatorIssue=false, reportAttributeAccessIssue=false
# (Triton's DSL: launches take constexprs and num_warps, and tl values are not Python's types)
"""Triton kernels: sample one token per row from softmax(logits / T) by inverting its CDF, reading the
logits once in their own dtype and drawing one random number a row.

Reference: `sampling_ref.sample_ref` (same rule, torch's generator instead of Philox). Greedy rows
(temperature 0) take the plain argmax (first index on ties). The vocabulary is split over several
programs per row (a 150k vocabulary is 300 KB of logits a row, too much for one program at small
batches): the first kernel gives each split its maximum and its sum of exp((x - max) / T); the second,
one program a row, draws u in [0, total), finds the split where the running sum passes u and rescans
only that split for the token. (A Gumbel-max draw needs a random number and two logarithms per logit:
on an H200 that kernel took 129 us at batch 256, Philox being most of it.)
"""

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
NO_INDEX = tl.constexpr(2**31 - 1)


@triton.jit
def _split_stats_kernel(
    logits_ptr,
    temp_ptr,
    max_ptr,
    sum_ptr,
    idx_ptr,
    stride_row,
    vocab,
    num_splits,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Sampled rows: the split's max of x / T (in log2 units) and its sum of 2^(x / T - max).
    Greedy rows: the split's max logit and its first index."""
    row, split = tl.program_id(0), tl.program_id(1)
    t = tl.load(temp_ptr + row).to(tl.float32)
    base = logits_ptr + row.to(tl.int64) * stride_row
    i = tl.arange(0, BLOCK)
    out = row * num_splits + split
    if t > 0:
        scale = LOG2E / t
        m = float("-inf")
        s = 0.0
        for start in range(split * CHUNK, split * CHUNK + CHUNK, BLOCK):
            cols = start + i
            x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32) * scale
            m_new = tl.maximum(m, tl.max(x, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked block adds nothing
            s = s * tl.math.exp2(m - m_safe) + tl.sum(tl.math.exp2(x - m_safe), 0)
            m = m_new
        tl.store(max_ptr + out, m)
        tl.store(sum_ptr + out, s)
    else:
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_idx = tl.zeros([BLOCK], tl.int32)
        for start in range(split * CHUNK, split * CHUNK + CHUNK, BLOCK):
            cols = start + i
            x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            better = x > best  # strict: each lane keeps its first maximum
            best, best_idx = tl.where(better, x, best), tl.where(better, cols, best_idx)
        top = tl.max(best, 0)
        tl.store(max_ptr + out, top)
        tl.store(idx_ptr + out, tl.min(tl.where(best == top, best_idx, NO_INDEX), 0))


@triton.jit
def _pick_kernel(
    logits_ptr,
    temp_ptr,
    seed_ptr,
    max_ptr,
    sum_ptr,
    idx_ptr,
    out_ptr,
    stride_row,
    vocab,
    num_splits,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    SPLITS_P: tl.constexpr,
):
    row = tl.program_id(0)
    t = tl.load(temp_ptr + row).to(tl.float32)
    sp = tl.arange(0, SPLITS_P)
    ok = sp < num_splits
    m = tl.load(max_ptr + row * num_splits + sp, mask=ok, other=float("-inf"))
    top = tl.max(m, 0)
    if t > 0:
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        mass = tl.where(
            m > float("-inf"),
            tl.load(sum_ptr + row * num_splits + sp, mask=ok, other=0.0) * tl.math.exp2(m - top_safe),
            0.0,
        )
        u = tl.sum(tl.rand(tl.load(seed_ptr + row), tl.arange(0, 1)), 0)  # the row's one uniform
        target = u * tl.sum(mass, 0)
        split = tl.min(tl.where((tl.cumsum(mass, 0) > target) & ok, sp, num_splits - 1), 0)
        target -= tl.sum(tl.where(sp < split, mass, 0.0), 0)
        # Rescan the chosen split: the first column where the running sum passes the target. Rounding may
        # leave the target just past the split's recomputed sum: then its last column with any mass.
        base = logits_ptr + row.to(tl.int64) * stride_row
        scale = LOG2E / t
        i = tl.arange(0, BLOCK)
        running = 0.0
        pick = NO_INDEX
        last = split * CHUNK
        for start in range(split * CHUNK, split * CHUNK + CHUNK, BLOCK):
            cols = start + i
            x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32) * scale
            p = tl.math.exp2(x - top_safe)
            passed = (running + tl.cumsum(p, 0) > target) & (p > 0)
            pick = tl.minimum(pick, tl.min(tl.where(passed, cols, NO_INDEX), 0))
            last = tl.maximum(last, tl.max(tl.where(p > 0, cols, -1), 0))
            running += tl.sum(p, 0)
        pick = tl.where(pick == NO_INDEX, last, pick)
    else:
        idx = tl.load(idx_ptr + row * num_splits + sp, mask=ok, other=NO_INDEX)
        pick = tl.min(tl.where(m == top, idx, NO_INDEX), 0)
    tl.store(out_ptr + row, pick.to(tl.int64))


def sample(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """logits [rows, vocab] (any float dtype, last dim contiguous); temperatures [rows] float (0: greedy);
    seeds [rows] int64. -> int64 [rows]."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1
    block = 1024
    chunk = block * max(1, min(8, triton.cdiv(vocab, 16 * block)))  # >= 16 splits for big vocabularies
    splits = triton.cdiv(vocab, chunk)
    maxes = torch.empty(rows, splits, dtype=torch.float32, device=logits.device)
    sums = torch.empty(rows, splits, dtype=torch.float32, device=logits.device)
    idx = torch.empty(rows, splits, dtype=torch.int32, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    _split_stats_kernel[(rows, splits)](
        logits, temperatures, maxes, sums, idx, logits.stride(0), vocab, splits, CHUNK=chunk, BLOCK=block, num_warps=4
    )
    _pick_kernel[(rows,)](
        logits,
        temperatures,
        seeds,
        maxes,
        sums,
        idx,
        out,
        logits.stride(0),
        vocab,
        splits,
        CHUNK=chunk,
        BLOCK=block,
        SPLITS_P=triton.next_power_of_2(splits),
        num_warps=4,
    )
    return out
