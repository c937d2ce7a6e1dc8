"""One step's batch, flattened for the model: built on the host from the scheduled sequences, pickled to
the tensor-parallel workers, and moved to the device in a single copy.

Host time per step matters (it is the GPU's idle time), so the common decode case has its own short
path and the block tables go through numpy instead of nested Python lists.
"""
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from nanoserve.engine_pod.sequence import Sequence


@dataclass
class StepInputs:
    input_ids: np.ndarray       # [tokens] int64
    positions: np.ndarray       # [tokens]
    slot_mapping: np.ndarray    # [tokens] cache slot of each token's KV
    cu_seqlens_q: np.ndarray    # [seqs + 1]
    context_lens: np.ndarray    # [seqs]
    block_tables: np.ndarray    # [seqs, max_blocks], -1 padded
    logits_indices: np.ndarray  # rows whose logits are needed (last token of each sequence that samples)
    max_seqlen_q: int
    max_seqlen_k: int


def prepare(batch: list[tuple[Sequence, int]], block_size: int) -> tuple[StepInputs, list[Sequence]]:
    """Flatten `(sequence, tokens to compute)` pairs; also return the sequences that sample a token."""
    B = block_size
    input_ids, positions, slots, cu, ctx, logits_idx, sampling = [], [], [], [0], [], [], []
    max_q = 0
    for seq, n in batch:
        start = seq.num_computed_tokens
        end = start + n
        table = seq.block_table
        if n == 1:  # decode
            input_ids.append(seq.token_ids[start])
            positions.append(start)
            slots.append(table[start // B] * B + start % B)
        else:
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [table[p // B] * B + p % B for p in range(start, end)]
        max_q = max(max_q, n)
        cu.append(cu[-1] + n)
        ctx.append(end)
        if end == seq.num_tokens:  # the prompt is done: this step yields a token
            logits_idx.append(cu[-1] - 1)
            sampling.append(seq)
    lens = np.fromiter((len(s.block_table) for s, _ in batch), np.int64, len(batch))
    flat = np.fromiter(chain.from_iterable(s.block_table for s, _ in batch), np.int64, int(lens.sum()))
    tables = np.full((len(batch), int(lens.max())), -1, np.int64)
    rows = np.repeat(np.arange(len(batch)), lens)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
    tables[rows, cols] = flat
    i64 = lambda v: np.asarray(v, np.int64)
    return StepInputs(i64(input_ids), i64(positions), i64(slots), i64(cu), i64(ctx), tables, i64(logits_idx),
                      max_q, max(ctx)), sampling


class Uploader:
    """Moves a step's arrays to the device in one copy, through a reused pinned buffer on CUDA (pinning a
    fresh buffer every step costs more than the copy). Safe to reuse: each step waits for the previous
    one's sampled tokens, hence for its copy, before it uploads."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pinned = torch.empty(0, dtype=torch.int64)

    def __call__(self, x: StepInputs) -> dict[str, torch.Tensor]:
        parts = [x.input_ids, x.positions, x.slot_mapping, x.cu_seqlens_q, x.context_lens, x.logits_indices,
                 x.block_tables.reshape(-1)]
        return _split(self._upload(np.concatenate(parts)), parts, x.block_tables.shape)

    def _upload(self, flat: np.ndarray) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.from_numpy(flat).to(self.device)
        if self.pinned.numel() < flat.size:
            self.pinned = torch.empty(max(flat.size, 2 * self.pinned.numel()), dtype=torch.int64, pin_memory=True)
        host = self.pinned[:flat.size]
        host.numpy()[:] = flat
        return host.to(self.device, non_blocking=True)


def _split(flat: torch.Tensor, parts: list[np.ndarray], table_shape) -> dict[str, torch.Tensor]:
    names = ["input_ids", "positions", "slot_mapping", "cu_seqlens_q", "context_lens", "logits_indices", "block_tables"]
    out, offset = {}, 0
    for name, part in zip(names, parts):
        out[name] = flat[offset:offset + part.size]
        offset += part.size
    out["block_tables"] = out["block_tables"].view(table_shape)
    return out
