"""Token sampling for a batch of sequences with per-request parameters.

Sampling draws with the exponential race (argmax of p / E, E ~ Exp(1)), which needs no sort and lets a
seeded request draw its noise from its own generator, so its tokens do not depend on the batch around it.
"""
import torch

from nanoserve.engine_pod.sampling_params import SamplingParams


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what falls outside each row's top-k and top-p. top_k <= 0 means no top-k."""
    sorted_logits, order = logits.sort(-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    k = torch.where(top_k > 0, top_k, logits.shape[-1]).unsqueeze(1)
    drop = rank >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    drop |= (probs.cumsum(-1) - probs) >= top_p.unsqueeze(1)  # keep the smallest set reaching top_p
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


class Sampler:

    def __init__(self, device: torch.device):
        self.device = device
        self.generators: dict[int, torch.Generator] = {}  # seq_id -> its seeded generator

    def forget(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], seq_ids: list[int]) -> list[int]:
        logits = logits.float()
        if all(p.greedy for p in params):  # decided on the host: no device sync before the sampling kernels
            return logits.argmax(-1).tolist()
        greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=logits.device)
        logits = logits / temps.unsqueeze(1)  # greedy rows keep their argmax: they are divided by 1
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            top_k = torch.tensor([p.top_k for p in params], device=logits.device)
            top_p = torch.tensor([p.top_p for p in params], device=logits.device)
            logits = apply_top_k_top_p(logits, top_k, top_p)
        noise = torch.empty_like(logits).exponential_()
        for row, (p, seq_id) in enumerate(zip(params, seq_ids)):
            if p.seed is not None and not p.greedy:
                gen = self.generators.get(seq_id)
                if gen is None:
                    gen = self.generators[seq_id] = torch.Generator(logits.device).manual_seed(p.seed)
                noise[row].exponential_(generator=gen)
        return exponential_race(logits, noise, greedy).tolist()


def exponential_race(logits: torch.Tensor, noise: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
    """argmax(softmax(logits) / noise) per row (a draw from the softmax), or plain argmax for greedy rows."""
    sampled = (logits.softmax(-1) / noise.clamp_min(1e-10)).argmax(-1)
    return torch.where(greedy, logits.argmax(-1), sampled)
