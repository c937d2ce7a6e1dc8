"""Plain-PyTorch reference of the sampling kernel (kernels/sampling.py), also the CPU path.

Gumbel-max: argmax(logits / T + G) with G = -log(-log(U)) draws from softmax(logits / T), with no
softmax and no sort. Each row's uniforms come from its own seed, so a seeded request's draw does not
depend on the batch around it.
"""
import torch


def sample_ref(logits: torch.Tensor, temperatures: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """logits [rows, vocab]; temperatures [rows] (0: greedy); seeds: one per row. -> int64 [rows]."""
    out = logits.float().argmax(-1)
    for row, (t, seed) in enumerate(zip(temperatures.tolist(), seeds)):
        if t > 0:
            gen = torch.Generator(logits.device).manual_seed(seed)
            u = torch.rand(logits.shape[1], generator=gen, device=logits.device).clamp_min(1e-20)
            out[row] = (logits[row].float() / t - torch.log(-torch.log(u))).argmax()
    return out
