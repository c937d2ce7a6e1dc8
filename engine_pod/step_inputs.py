"""One step's batch, flattened for the model: built on the host from the scheduled sequences, pickled to
the tensor-parallel workers, and moved to the device in a single copy; and the sampled tokens' way back.

Host time per step matters (it is the GPU's idle time), so the common decode case has its own short
path and the block tables go through numpy instead of nested Python lists.

With overlapped scheduling a decode row's input token may still be on the GPU (sampled by the step
before, not yet copied back): its id here is PLACEHOLDER and `prev_rows` says which row of the previous
step's sampled tokens replaces it on the device. After a verify step its sequence's positions, slots and
context length assume every draft token was accepted; the device corrects them (spec_verify.shift_back).
"""

from dataclasses import dataclass

import numpy as np
import torch

from nanoserve.engine_pod.sampler import SamplingInputs
from nanoserve.engine_pod.sequence import PLACEHOLDER, Sequence
from nanoserve.engine_pod.spec_verify import SpecInputs
from nanoserve.engine_pod.structured_output import GrammarMask


@dataclass
class StepInputs:
    input_ids: np.ndarray  # [tokens] int64
    positions: np.ndarray  # [tokens]
    slot_mapping: np.ndarray  # [tokens] cache slot of each token's KV
    cu_seqlens_q: np.ndarray  # [seqs + 1]
    context_lens: np.ndarray  # [seqs]
    block_tables: np.ndarray  # [seqs, max_blocks], -1 padded
    logits_indices: np.ndarray  # rows whose logits are needed (last token of each sequence that samples)
    max_seqlen_q: int
    max_seqlen_k: int
    prev_rows: np.ndarray | None = None  # [tokens]: row of the previous step's tokens to use, or -1
    prev_count: int = 0  # rows the previous step sampled (what rank 0 broadcasts)
    prev_verified: bool = False  # ... in a verify step: rows of its sequences are too far by what it rejected
    sampling: SamplingInputs | None = None  # the rows that sample (in logits_indices order), or None
    grammar: GrammarMask | None = None  # structured output: the constrained rows' token mask (rank 0 only)
    defer_sampling: bool = False  # rank 0 keeps the logits; sample_deferred(mask) samples once the mask is made
    # prompt_logprobs: the rows whose logits score the next prompt token, those tokens, the most top logprobs
    # asked, and (seq_id, rows) per sequence in row order
    prompt_rows: np.ndarray | None = None
    prompt_targets: np.ndarray | None = None
    prompt_k: int = 0
    prompt_slices: list[tuple[int, int]] | None = None
    spec: SpecInputs | None = None  # speculative decoding: the sampling rows' drafts (a verify step)
    padded_rows: np.ndarray | None = None  # a verify graph's step: each token's row (cuda_graphs.padded_rows)


def prepare(batch: list[tuple[Sequence, int]], block_size: int) -> tuple[StepInputs, list[Sequence]]:
    """Flatten `(sequence, tokens to compute)` pairs, longest context first; also return the sequences
    that sample a token (in row order)."""
    # The decode attention kernel starts its programs in row order: longest first leaves the shortest
    # sequences for its last wave (H200, batch 256: 2-3% faster attention from mean context 850 up).
    batch = sorted(batch, key=lambda pair: pair[0].num_computed_tokens + pair[1], reverse=True)
    B = block_size
    input_ids, positions, slots, cu, ctx, logits_idx, sampling = [], [], [], [0], [], [], []
    pending_at, pending_rows = [], []
    scored: list[tuple[Sequence, int, int, int]] = []  # prompt_logprobs: (seq, first row, first position, rows)
    max_q = 0
    for seq, n in batch:
        start = seq.num_computed_tokens
        end = start + n
        table = seq.block_table
        if n == 1:  # decode
            token = seq.token_ids[start]
            if token == PLACEHOLDER:
                pending_at.append(cu[-1])
                pending_rows.append(seq.pending_row)
            input_ids.append(token)
            positions.append(start)
            slots.append(table[start // B] * B + start % B)
        else:  # a prefill chunk, or a verify step: the last token and its draft, each row giving logits
            if seq.draft_ids:
                token = seq.token_ids[start]
                if token == PLACEHOLDER:
                    pending_at.append(cu[-1])
                    pending_rows.append(seq.pending_row)
                input_ids += [token, *seq.draft_ids]
            else:
                input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [table[p // B] * B + p % B for p in range(start, end)]
        if seq.params.prompt_logprobs is not None:
            scored += _prompt_scoring(seq, start, end, cu[-1])
        max_q = max(max_q, n)
        cu.append(cu[-1] + n)
        ctx.append(end)
        if seq.draft_ids:  # every row of a verify step has logits: the target's token after each
            logits_idx += range(cu[-1] - n, cu[-1])
            sampling.append(seq)
        elif end == seq.num_tokens:  # the prompt is done: this step yields a token
            logits_idx.append(cu[-1] - 1)
            sampling.append(seq)
    arrays = [s.block_table_array() for s, _ in batch]
    lens = np.fromiter(map(len, arrays), np.int64, len(batch))
    tables = np.full((len(batch), int(lens.max())), -1, np.int64)
    tables[np.arange(tables.shape[1]) < lens[:, None]] = np.concatenate(arrays)  # row-major: rows in order
    prev_rows = None
    if pending_at:
        prev_rows = np.full(cu[-1], -1, np.int64)
        prev_rows[pending_at] = pending_rows
    i64 = lambda v: np.asarray(v, np.int64)
    inputs = StepInputs(
        i64(input_ids),
        i64(positions),
        i64(slots),
        i64(cu),
        i64(ctx),
        tables,
        i64(logits_idx),
        max_q,
        max(ctx),
        prev_rows,
    )
    if scored:
        inputs.prompt_rows = np.concatenate([np.arange(r, r + n) for _, r, _, n in scored])
        inputs.prompt_targets = np.concatenate(
            [np.asarray(s.token_ids[p + 1 : p + 1 + n], np.int64) for s, _, p, n in scored]
        )  # position p scores token p + 1
        inputs.prompt_k = max(s.params.prompt_logprobs or 0 for s, _, _, _ in scored)
        inputs.prompt_slices = [(s.seq_id, n) for s, _, _, n in scored]
    return inputs, sampling


def _prompt_scoring(seq: Sequence, start: int, end: int, row: int) -> list[tuple[Sequence, int, int, int]]:
    """prompt_logprobs: the rows of this chunk (its first at `row`) that score a prompt token not yet scored
    (position p scores token p + 1; a recomputed chunk after a preemption scores nothing twice)."""
    first = max(start, len(seq.prompt_logprobs))
    last = min(end, seq.num_prompt_tokens - 1)
    return [(seq, row + first - start, first, last - first)] if last > first else []


UPLOADED = [
    "input_ids",
    "positions",
    "slot_mapping",
    "cu_seqlens_q",
    "context_lens",
    "logits_indices",
    "block_tables",
    "prev_rows",
    "prompt_rows",
    "prompt_targets",
    "padded_rows",
]


class Uploader:
    """Moves a step's arrays to the device in one copy, through reused pinned buffers on CUDA (pinning a
    fresh buffer every step costs more than the copy).

    Two buffers alternate: with async scheduling step N's copy may still be queued behind step N-1 on the
    GPU while step N+1 is prepared. A buffer is rewritten only once the copy out of it has happened (an
    event per buffer; by then it always has, so the wait costs nothing).
    Every array starts 16-byte aligned on the device: Triton compiles a kernel variant per pointer
    alignment, and a variant compiled in the middle of serving costs a second of GPU idle time."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pinned = [torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)]
        self.copied: list = [None, None]  # per buffer: event recorded after its last copy
        self.turn = 0

    def __call__(self, x: StepInputs) -> dict[str, torch.Tensor]:
        arrays = {name: getattr(x, name) for name in UPLOADED}
        arrays["block_tables"] = x.block_tables.reshape(-1)
        if x.sampling is not None:
            arrays.update(x.sampling.arrays())
        if x.spec is not None:
            arrays.update(x.spec.arrays())
        floats = {k for k, v in arrays.items() if v is not None and v.dtype == np.float64}  # travel as their bits
        arrays = {k: (v.view(np.int64) if k in floats else v) for k, v in arrays.items() if v is not None}
        sizes = {k: v.size + v.size % 2 for k, v in arrays.items()}  # even: 16-byte aligned starts
        flat = np.zeros(sum(sizes.values()), np.int64)
        offset = 0
        for k, v in arrays.items():
            flat[offset : offset + v.size] = v
            offset += sizes[k]
        dev = self._upload(flat)
        out, offset = {}, 0
        for k, v in arrays.items():
            out[k] = dev[offset : offset + v.size]
            offset += sizes[k]
            if k in floats:
                out[k] = out[k].view(torch.float64)
        out["block_tables"] = out["block_tables"].view(x.block_tables.shape)
        return out

    def _upload(self, flat: np.ndarray) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.from_numpy(flat).to(self.device)
        self.turn ^= 1
        if self.copied[self.turn] is not None:
            self.copied[self.turn].synchronize()
        if self.pinned[self.turn].numel() < flat.size:
            self.pinned[self.turn] = torch.empty(
                max(flat.size, 2 * self.pinned[self.turn].numel()), dtype=torch.int64, pin_memory=True
            )
        host = self.pinned[self.turn][: flat.size]
        host.numpy()[:] = flat
        out = host.to(self.device, non_blocking=True)
        self.copied[self.turn] = torch.cuda.Event()
        self.copied[self.turn].record()
        return out


class SampledTokens:
    """A step's sampled token ids (and logprobs, when asked) on their way to the host: the copy is queued
    behind the step on the GPU, and `wait()` is the only place the host waits for the GPU."""

    def __init__(
        self,
        tokens: torch.Tensor,
        pinned: torch.Tensor | None,
        logprobs: torch.Tensor | None = None,
        pinned_logprobs: torch.Tensor | None = None,
    ):
        self.logprobs = None
        if tokens.device.type != "cuda" or pinned is None:
            self.host, self.event, self.logprobs = tokens, None, logprobs
            return
        self.host = pinned[: tokens.numel()]
        self.host.copy_(tokens, non_blocking=True)
        if logprobs is not None and pinned_logprobs is not None:
            self.logprobs = pinned_logprobs[: logprobs.numel()].view(logprobs.shape)
            self.logprobs.copy_(logprobs, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def wait(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()

    def logprob_rows(self) -> np.ndarray | None:
        """After `wait()`: sampler.token_logprobs' rows, or None when no row asked for logprobs."""
        return None if self.logprobs is None else self.logprobs.numpy()


class Downloader:
    """Pinned host buffers for sampled tokens, alternating like the Uploader's. A buffer is reused two
    sampling steps later, when the engine has always read the tokens of the step that used it before:
    each launch is followed by applying the previous sampling step's tokens."""

    def __init__(self, device: torch.device, max_rows: int):
        self.pinned = (
            [torch.empty(max_rows, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            if device.type == "cuda"
            else [None, None]
        )
        self.pinned_logprobs: list[torch.Tensor | None] = [None, None]  # made when a request first asks
        self.turn = 0

    def __call__(self, tokens: torch.Tensor, logprobs: torch.Tensor | None = None) -> SampledTokens:
        self.turn ^= 1
        if logprobs is not None and logprobs.device.type == "cuda":
            buffer = self.pinned_logprobs[self.turn]
            if buffer is None or buffer.numel() < logprobs.numel():
                buffer = self.pinned_logprobs[self.turn] = torch.empty(
                    max(logprobs.numel(), 2 * (buffer.numel() if buffer is not None else 0)), pin_memory=True
                )
            return SampledTokens(tokens, self.pinned[self.turn], logprobs, buffer)
        return SampledTokens(tokens, self.pinned[self.turn], logprobs)
