"""Plain-PyTorch reference of the sampling kernel (kernels/sampling.py), also the CPU path.

Inverse CDF: one uniform u per row, scaled by the total of exp((logits - max) / T), picks the first token
where the running sum passes it, which draws from softmax(logits / T). Each row's uniform comes from its
own seed, so a seeded request's draw does not depend on the batch around it.
"""

import torch


def sample_ref(logits: torch.Tensor, temperatures: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """logits [rows, vocab]; temperatures [rows] (0: greedy); seeds: one per row. -> int64 [rows]."""
    out = logits.float().argmax(-1)
    for row, (t, seed) in enumerate(zip(temperatures.tolist(), seeds)):
        if t > 0:
            x = logits[row].double() / t
            mass = (x - x.max()).exp().cumsum(0)
            u = torch.rand((), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            pick = torch.searchsorted(mass, u * mass[-1], right=True)  # first running sum above u * total
            out[row] = min(int(pick), int((mass < mass[-1]).sum()))  # never past the last token with mass
    return out
