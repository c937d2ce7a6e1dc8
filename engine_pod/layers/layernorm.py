import torch
from torch import nn


def _normalize(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x.to(dtype) * weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _normalize(x.float(), weight, eps, x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(norm(x + residual), x + residual): the residual add fused into the norm."""
    total = x.float() + residual.float()
    return _normalize(total, weight, eps, x.dtype), total.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm in float32; with `residual`, adds it first and returns the new residual too.
    One Triton kernel on CUDA (kernels/elementwise.py), these plain functions elsewhere."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda:
            from nanoserve.kernels.elementwise import rms_norm as fused

            return fused(x, self.weight, self.eps, residual)
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)
