import torch
import torch.nn.functional as F
from torch import nn


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, -1)
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    """silu(gate) * up, for the merged gate_up projection (one Triton kernel on CUDA)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from nanoserve.kernels.elementwise import silu_and_mul as fused

            return fused(x)
        return silu_and_mul(x)
