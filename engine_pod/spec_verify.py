"""The verify step of speculative decoding: which draft tokens the target model accepts, and the token after.

A sequence with a k-token draft has k + 1 logits rows (its last token's and each draft token's). Draft token
j is accepted when every draft token before it was and, under greedy, it is the row's argmax; with sampling,
with probability p(draft) under the row's target distribution (after temperature, top-k and top-p; a draft is
a one-hot proposal, so min(1, p/q) = p). At the first rejection the next token is drawn from the target
distribution without the rejected token, renormalized; when all are accepted, from the last row (the bonus
token). The emitted tokens then have exactly the target's distribution (rejection sampling, lossless), and
under greedy they are the tokens decoding one at a time would give.

Everything runs on the device without a host sync; the host sends each row's seed and each draft's uniform.
"""

import random
from dataclasses import dataclass

import numpy as np
import torch

from nanoserve.engine_pod.logits_processing import apply_processing
from nanoserve.engine_pod.sampler import SamplingInputs, apply_min_p, apply_top_k_top_p, row_seed
from nanoserve.engine_pod.sequence import Sequence

_ACCEPT_STREAM = 0x5851F42D4C957F2D  # mixed into a seeded request's seed: acceptance draws apart from sampling


@dataclass
class SpecInputs:
    num_drafts: np.ndarray  # int64 [seqs]: draft tokens of each sampling row (0: it decodes one token)
    drafts: np.ndarray  # int64 [seqs, width], -1 padded; width = the most drafts in the step
    row_seeds: np.ndarray  # int64 [logits rows]: the seed of a draw from each row
    uniforms: np.ndarray  # float64 [logits rows]: the acceptance draw of the draft token each row verifies

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "spec_num_drafts": self.num_drafts,
            "spec_drafts": self.drafts.reshape(-1),
            "spec_row_seeds": self.row_seeds,
            "spec_uniforms": self.uniforms,
        }


def spec_inputs(seqs: list[Sequence], sampling: SamplingInputs, rng: random.Random) -> SpecInputs | None:
    """The drafts of a step's sampling rows (before their placeholders are appended), or None when no row has
    one. A row's first seed is the one plain decoding would use; seeded requests draw every later row's seed
    and uniform from their seed and the token's position, so they repeat."""
    counts = np.fromiter((len(s.draft_ids) for s in seqs), np.int64, len(seqs))
    if not counts.any():
        return None
    drafts = np.full((len(seqs), int(counts.max())), -1, np.int64)
    seeds, uniforms = [], []
    for row, seq in enumerate(seqs):
        drafts[row, : counts[row]] = seq.draft_ids
        p = seq.params
        seeds.append(int(sampling.seeds[row]))
        for j in range(1, int(counts[row]) + 1):
            position = seq.num_tokens + j
            seeds.append(0 if p.greedy else row_seed(p.seed, position) if p.seed is not None else rng.getrandbits(63))
        for j in range(int(counts[row])):
            if p.greedy:
                uniforms.append(0.0)
            elif p.seed is not None:  # 53 random bits from the seeded stream
                uniforms.append((row_seed(p.seed ^ _ACCEPT_STREAM, seq.num_tokens + j) >> 10) * 2.0**-53)
            else:
                uniforms.append(rng.random())
        uniforms.append(0.0)  # the last row verifies nothing
    return SpecInputs(counts, drafts, np.asarray(seeds, np.int64), np.asarray(uniforms, np.float64))


def verify(
    logits: torch.Tensor,
    host: SamplingInputs,
    spec: SpecInputs,
    dev: dict[str, torch.Tensor],
    prev: torch.Tensor | None = None,
) -> torch.Tensor:
    """int64 [seqs, width + 2] on the device: per sequence the number of tokens it emits (accepted drafts + 1),
    then those tokens, -1 after them. `logits` [rows, vocab]: each sequence's 1 + k rows in order."""
    num_seqs, width = spec.drafts.shape
    rows, device = logits.shape[0], logits.device
    counts = dev["spec_num_drafts"]
    drafts = dev["spec_drafts"].view(num_seqs, width)
    first = torch.cumsum(counts + 1, 0) - counts - 1  # each sequence's first row
    seq_of_row = torch.repeat_interleave(torch.arange(num_seqs, device=device), counts + 1, output_size=rows)
    if host.processing is not None:  # only rows without a draft have any (spec_decode.can_speculate)
        logits = logits.float().clone()
        logits[first] = apply_processing(logits[first], dev, prev)
    greedy_tokens = logits.argmax(-1)  # in the logits' dtype, as plain greedy decoding takes it
    j = torch.arange(width, device=device)
    at = (first.unsqueeze(1) + j).clamp(max=rows - 1)  # [seqs, width]: the row that verifies draft j
    ok = greedy_tokens[at] == drafts
    scaled = None
    if not host.all_greedy:
        temps = dev["temperatures"][seq_of_row]
        sampled = temps > 0
        scaled = logits.float() / torch.where(sampled, temps, 1.0).float().unsqueeze(1)
        if host.min_p is not None:
            scaled = apply_min_p(scaled, dev["min_p"][seq_of_row])
        if host.needs_top:
            scaled = apply_top_k_top_p(scaled, dev["top_k"][seq_of_row], dev["top_p"][seq_of_row].float())
        # p(draft) without a softmax over every row: a [rows, vocab] copy fewer on big vocabularies
        p_draft = (scaled[at, drafts.clamp(min=0)] - torch.logsumexp(scaled, -1)[at]).exp()
        ok = torch.where(sampled[at], dev["spec_uniforms"][at] < p_draft, ok)
    ok &= j < counts.unsqueeze(1)
    accepted = ok.long().cumprod(1).sum(1)  # [seqs]
    last = first + accepted  # the row the next token comes from
    final = greedy_tokens[last]
    if scaled is not None:
        final = torch.where(sampled[last], _draw_residual(scaled, last, drafts, accepted, counts, dev), final)
    columns = torch.cat([drafts, torch.full((num_seqs, 1), -1, dtype=drafts.dtype, device=device)], 1)
    c = torch.arange(width + 1, device=device)
    a = accepted.unsqueeze(1)
    emitted = torch.where(c < a, columns, torch.where(c == a, final.unsqueeze(1), -1))
    return torch.cat([(accepted + 1).unsqueeze(1), emitted], 1)


def _draw_residual(scaled, last, drafts, accepted, counts, dev) -> torch.Tensor:
    """A token from each sequence's row `last`, without its rejected draft token (if one was rejected)."""
    f = scaled[last]
    rejected = accepted < counts
    token = drafts.gather(1, accepted.clamp(max=drafts.shape[1] - 1).unsqueeze(1)).clamp(min=0)
    kept = f.gather(1, token)
    f = f.scatter(1, token, torch.where(rejected.unsqueeze(1), float("-inf"), kept))
    f = torch.where(torch.isinf(f).all(-1, keepdim=True), scaled[last], f)  # (no mass left: cannot happen)
    seeds = dev["spec_row_seeds"][last]
    ones = torch.ones(len(last), dtype=torch.float32, device=f.device)  # already scaled by the temperature
    if f.device.type == "cuda":
        from nanoserve.kernels.sampling import sample as sample_kernel

        return sample_kernel(f, ones, seeds)
    from nanoserve.kernels.sampling_ref import sample_ref

    return sample_ref(f, ones, seeds.tolist())


def shift_back(t: dict[str, torch.Tensor], shift: torch.Tensor, block_size: int) -> None:
    """The step after a verify step (async scheduling): the host laid out each sequence of that step as if it
    had accepted its whole draft, so its rows' positions, KV slots and context length move back by what the
    step rejected (`shift`, by the verify step's rows), in place in the uploaded arrays `t`, on the device."""
    cu = t["cu_seqlens_q"]
    num_seqs, num_tokens = cu.shape[0] - 1, t["positions"].shape[0]
    q_lens = cu[1:] - cu[:-1]
    first_rows = t["prev_rows"][cu[:-1]]  # each sequence's row in the step before (its first token's)
    back = torch.where(first_rows >= 0, shift[first_rows.clamp(min=0)], 0)
    per_token = torch.repeat_interleave(back, q_lens, output_size=num_tokens)
    seq_of = torch.repeat_interleave(torch.arange(num_seqs, device=cu.device), q_lens, output_size=num_tokens)
    positions = t["positions"] - per_token
    slots = t["block_tables"][seq_of, positions // block_size] * block_size + positions % block_size
    t["positions"] = positions
    t["slot_mapping"] = torch.where(per_token > 0, slots, t["slot_mapping"])
    t["context_lens"] = t["context_lens"] - back
