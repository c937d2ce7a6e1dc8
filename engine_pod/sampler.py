"""Token sampling for a batch of sequences with per-request parameters, on the device, without a host sync.

The host side (`sampling_inputs`) turns each sampling row's parameters into arrays that travel with the
step's inputs in its one upload; the device side (`sample`) masks top-k/top-p when asked and draws by
inverting the softmax's CDF with one uniform a row (kernels/sampling.py on CUDA, its torch reference
elsewhere). Every row draws from its own seed: a seeded request's seed mixed with the token's position,
so its tokens do not depend on the batch around it; other rows take fresh random seeds.
"""

import random
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from nanoserve.engine_pod.logits_processing import apply_processing, processing_inputs
from nanoserve.engine_pod.sequence import Sequence

_MASK63 = (1 << 63) - 1


@dataclass
class SamplingInputs:
    temperatures: np.ndarray  # float64 [rows]; 0 = greedy
    top_k: np.ndarray  # int64 [rows]; -1 = off
    top_p: np.ndarray  # float64 [rows]
    seeds: np.ndarray  # int64 [rows]
    all_greedy: bool  # decided on the host, so the device needs no check
    needs_top: bool  # some row has top-k or top-p
    min_p: np.ndarray | None = None  # float64 [rows], when some sampled row has min_p
    processing: dict[str, np.ndarray] | None = None  # logits_processing's arrays, when some row needs them
    num_logprobs: int = -1  # the most top logprobs a row asks for; -1: no row wants logprobs

    def arrays(self) -> dict[str, np.ndarray]:
        """What the step uploads for sampling."""
        out = {"temperatures": self.temperatures, "top_k": self.top_k, "top_p": self.top_p, "seeds": self.seeds}
        if self.min_p is not None:
            out["min_p"] = self.min_p
        return out | (self.processing or {})


def row_seed(seed: int, position: int) -> int:
    """A request seed and a token position mixed into one 63-bit seed (splitmix64's finalizer)."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 1) & ((1 << 64) - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (x ^ (x >> 31)) & _MASK63


def sampling_inputs(seqs: list[Sequence], rng: random.Random, eos_ids: Iterable[int] = ()) -> SamplingInputs:
    """The sampling rows of one step, in the order of their logits. A row samples the token at position
    `seq.num_tokens` (before its placeholder is appended)."""
    params = [s.params for s in seqs]
    greedy = [p.greedy for p in params]
    temps = np.array([0.0 if g else p.temperature for p, g in zip(params, greedy)], np.float64)
    seeds = np.array(
        [
            0 if g else row_seed(p.seed, s.num_tokens) if p.seed is not None else rng.getrandbits(63)
            for s, p, g in zip(seqs, params, greedy)
        ],
        np.int64,
    )
    top_k = np.array([p.top_k for p in params], np.int64)
    top_p = np.array([p.top_p for p in params], np.float64)
    needs_top = any(not g and (p.top_k > 0 or p.top_p < 1) for p, g in zip(params, greedy))
    if not any(p.extras for p in params):
        return SamplingInputs(temps, top_k, top_p, seeds, all(greedy), needs_top)
    min_p = None
    if any(not g and p.min_p > 0 for p, g in zip(params, greedy)):
        min_p = np.array([p.min_p for p in params], np.float64)
    num_logprobs = max((p.logprobs for p in params if p.logprobs is not None), default=-1)
    return SamplingInputs(
        temps, top_k, top_p, seeds, all(greedy), needs_top, min_p, processing_inputs(seqs, list(eos_ids)), num_logprobs
    )


def apply_min_p(scaled: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the most likely one's (`scaled`: logits / T)."""
    threshold = scaled.max(-1, keepdim=True).values + min_p.float().log().unsqueeze(1)  # log(0) = -inf: off
    return scaled.masked_fill(scaled < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what falls outside each row's top-k and top-p. top_k <= 0 means no top-k."""
    sorted_logits, order = logits.sort(-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    k = torch.where(top_k > 0, top_k, logits.shape[-1]).unsqueeze(1)
    drop = rank >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    drop |= (probs.cumsum(-1) - probs) >= top_p.unsqueeze(1)  # keep the smallest set reaching top_p
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def sample(
    logits: torch.Tensor, host: SamplingInputs, dev: dict[str, torch.Tensor], prev: torch.Tensor | None = None
) -> torch.Tensor:
    """Token ids [rows] (int64, on logits' device). `dev` holds the uploaded arrays of `host`; `prev`: the
    previous step's sampled tokens (the processing of a row whose newest token the host has not seen reads it)."""
    if host.processing is not None:
        logits = apply_processing(logits, dev, prev)
    if host.all_greedy:
        return logits.argmax(-1)
    temps = dev["temperatures"]  # float64 as uploaded: the kernel reads any float dtype (one cast fewer)
    if host.needs_top or host.min_p is not None:  # scale first: they apply to the distribution sampled from
        sampled = temps > 0
        logits = logits.float() / torch.where(sampled, temps, 1.0).float().unsqueeze(1)
        if host.min_p is not None:
            logits = apply_min_p(logits, dev["min_p"])
        if host.needs_top:
            logits = apply_top_k_top_p(logits, dev["top_k"], dev["top_p"].float())
        temps = sampled.float()  # already scaled; greedy rows stay 0
    if logits.device.type == "cuda":
        from nanoserve.kernels.sampling import sample as sample_kernel

        return sample_kernel(logits, temps, dev["seeds"])
    from nanoserve.kernels.sampling_ref import sample_ref

    return sample_ref(logits, temps, host.seeds.tolist())


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """float32 [rows, 2 + 2k] on the device: each row's sampled-token logprob, its rank, the top k token ids
    and their logprobs (ids as floats: exact below 2^24). From `logits` as the model gave them."""
    logprobs = logits.float().log_softmax(-1)
    chosen = logprobs.gather(1, tokens.unsqueeze(1))
    rank = (logprobs > chosen).sum(-1, keepdim=True).float() + 1
    top = logprobs.topk(k, -1) if k else None
    parts = [chosen, rank] + ([top.indices.float(), top.values] if top is not None else [])
    return torch.cat(parts, 1)
