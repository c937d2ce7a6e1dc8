import torch
from torch import nn


def _normalize(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Scaled in the weight's dtype, then cast: Llama's x.to(dtype) * w, or with a float32 weight Gemma's
    (x * w).to(dtype)."""
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (x.to(weight.dtype) * weight).to(dtype)


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


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm, x * (1 + w) in float32 and then cast (transformers' Gemma3RMSNorm): the checkpoint's
    w is loaded as the float32 weight 1 + w, so the plain norm and its kernels compute it unchanged."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps)
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=torch.float32), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # pyright: ignore[reportAttributeAccessIssue]

    @staticmethod
    def weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
        param.data.copy_(1.0 + loaded.float())
