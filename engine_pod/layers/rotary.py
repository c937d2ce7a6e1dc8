"""Rotary position embedding (neox style, as Llama/Qwen), with Llama-3 and linear frequency scaling."""

import math

import torch
from torch import nn

from nanoserve.engine_pod.layers.layernorm import RMSNorm


def rope_parameters(hf_config: dict) -> tuple[float, dict]:
    """(theta, scaling) from a config.json, in either the transformers 4 or 5 spelling."""
    params = hf_config.get("rope_parameters") or {}
    theta = hf_config.get("rope_theta") or params.get("rope_theta") or 10000.0
    scaling = hf_config.get("rope_scaling") or params
    return float(theta), dict(scaling or {})


def inverse_frequencies(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(
            wavelen > old_len / low, inv_freq / factor, torch.where(wavelen < old_len / high, inv_freq, smoothed)
        )
    elif kind != "default":
        raise NotImplementedError(f"rope scaling type {kind!r} is not supported (default, linear, llama3 are)")
    return inv_freq


class RotaryEmbedding(nn.Module):
    cos_sin: torch.Tensor  # [max_position, head_dim]: cos then sin (a buffer)

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict):
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq)
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], -1), persistent=False)

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim]. `q_norm`/`k_norm` (RMSNorm
        modules, Qwen3) normalize each head first; on CUDA one kernel does norms and rotation."""
        if q.is_cuda:
            from nanoserve.kernels.elementwise import qk_norm_rotary

            if q_norm is None or k_norm is None:
                return qk_norm_rotary(positions, q, k, self.cos_sin)
            return qk_norm_rotary(positions, q, k, self.cos_sin, q_norm.weight, k_norm.weight, q_norm.eps)
        if q_norm is not None and k_norm is not None:
            q, k = q_norm(q), k_norm(k)
        return apply_rotary(positions, q, k, self.cos_sin)

    def rotate_and_store(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_norm: RMSNorm | None,
        k_norm: RMSNorm | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        """CUDA: `forward`, with rotated k and v written straight into their paged-cache slots by the same
        kernel (one launch a layer fewer). Returns q."""
        from nanoserve.kernels.elementwise import qk_norm_rotary_store

        args = (positions, q, k, v, self.cos_sin, k_cache, v_cache, slot_mapping)
        if q_norm is None or k_norm is None:
            return qk_norm_rotary_store(*args)
        return qk_norm_rotary_store(*args, q_norm.weight, k_norm.weight, q_norm.eps)


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor):
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, -1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)
