import torch
import torch.nn.functional as F
from torch import nn

from nanoserve.engine_pod.errors import ModelLoadError


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, -1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, -1)
    return F.gelu(gate, approximate="tanh") * up


class SiluAndMul(nn.Module):
    """silu(gate) * up, for the merged gate_up projection (one Triton kernel on CUDA)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from nanoserve.kernels.elementwise import silu_and_mul as fused

            return fused(x)
        return silu_and_mul(x)


class GeluAndMul(nn.Module):
    """gelu(gate) * up with gelu's tanh approximation (Gemma's GeGLU, transformers' gelu_pytorch_tanh)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from nanoserve.kernels.elementwise import gelu_tanh_and_mul as fused

            return fused(x)
        return gelu_tanh_and_mul(x)


_GATED = {"silu": SiluAndMul, "gelu_pytorch_tanh": GeluAndMul}


def act_and_mul(name: str) -> nn.Module:
    """The gated activation of a config's hidden_act / hidden_activation."""
    if name not in _GATED:
        raise ModelLoadError(f"activation {name!r} is not supported (supported: {', '.join(_GATED)})")
    return _GATED[name]()
