"""Rotary position embedding (neox style, as Llama/Qwen), with linear, dynamic NTK, Llama-3, YaRN, LongRoPE and
proportional frequency scaling: one cos/sin table indexed by position, also read by the fused Triton rotary
kernels. Proportional rope (Gemma 4's) rotates only the first partial_rotary_factor of each head's pairs: the
rest get frequency 0 (cos 1, sin 0), so the table stays head_dim wide.

transformers recomputes dynamic NTK's and LongRoPE's frequencies in each forward from the sequence's length;
keys in a paged KV cache stay rotated as they were written, so here, as in vLLM, the frequencies are fixed
for the served length (max_model_len, the table's length): dynamic NTK's base is the one transformers uses
for a sequence of that length (vLLM's DynamicNTKScalingRotaryEmbedding at its default length, which is
max_position_embeddings x factor), and LongRoPE takes its long factors for every position when that length
passes original_max_position_embeddings, its short ones otherwise (vLLM's Phi3LongRoPEScaledRotaryEmbedding).
transformers agrees wherever its sequence-length rule picks the same frequencies: dynamic NTK served at most
max_position_embeddings long (unscaled) or a sequence of exactly max_model_len; LongRoPE served within the
original length (short factors), or a prompt already past it (long factors for the whole sequence)."""

import math

import torch
from torch import nn

from nanoserve.engine_pod.layers.layernorm import RMSNorm


def inverse_frequencies(
    head_dim: int, theta: float, scaling: dict, max_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """The rotary frequencies of each pair of dimensions, and the factor on cos and sin (YaRN's and LongRoPE's
    attention factor; 1 for the others). `scaling` as rope_params.rope_parameters gives it; `max_len`, the
    longest sequence served, fixes dynamic NTK's base and LongRoPE's factor set (module docstring)."""
    kind = scaling.get("rope_type", "default")
    if kind == "dynamic":  # NTK-aware: a larger base for a sequence of max_len (transformers' formula)
        old_len, factor = scaling.get("max_position_embeddings") or max_len or 1, scaling["factor"]
        length = max(max_len or old_len, old_len)
        theta = theta * (factor * length / old_len - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "proportional":
        rotated = int(scaling.get("partial_rotary_factor", 1.0) * head_dim // 2)
        return torch.cat([inv_freq[:rotated], torch.zeros(head_dim // 2 - rotated)]) / scaling.get("factor", 1.0), 1.0
    if kind == "longrope":
        return _longrope(inv_freq, scaling, max_len)
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(
            wavelen > old_len / low, inv_freq / factor, torch.where(wavelen < old_len / high, inv_freq, smoothed)
        )
        return inv_freq, 1.0
    if kind == "yarn":
        return _yarn(inv_freq, head_dim, theta, scaling)
    return inv_freq, 1.0


def _yarn(inv_freq: torch.Tensor, dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): dimensions that turn many times over the pretrained length keep their
    frequency, those that turn less than once are interpolated by `factor`, a linear ramp between; cos and
    sin are scaled by 0.1 ln(factor) + 1 (or by the ratio of two such terms with mscale, mscale_all_dim)."""
    old_len = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or scaling["max_position_embeddings"] / old_len

    def mscale(weight: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * weight * math.log(factor) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = mscale(m) / mscale(m_all) if m and m_all else mscale(1.0)

    def dim_turning(turns: float) -> float:  # the dimension whose pair turns `turns` times over old_len
        return dim * math.log(old_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_turning(scaling.get("beta_fast") or 32), dim_turning(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (the pretrained frequency), 0: interpolate (divided by factor)
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attention)


def _longrope(inv_freq: torch.Tensor, scaling: dict, max_len: int | None) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3, arXiv 2402.13753): each pair's frequency divided by its own factor, the long set when
    sequences may pass the pretrained length; cos and sin scaled by `attention_factor`, by default
    sqrt(1 + ln(s) / ln(pretrained length)) with s = `factor` or max_position_embeddings / pretrained length."""
    old_len = scaling["original_max_position_embeddings"]
    long = max_len is not None and max_len > old_len
    factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
    attention = scaling.get("attention_factor")
    if attention is None:
        s = scaling.get("factor") or scaling["max_position_embeddings"] / old_len
        attention = 1.0 if s <= 1 else math.sqrt(1 + math.log(s) / math.log(old_len))
    return inv_freq / factors, float(attention)


class RotaryEmbedding(nn.Module):
    cos_sin: torch.Tensor  # [max_position, head_dim]: cos then sin (a buffer)

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict):
        super().__init__()
        inv_freq, scale = inverse_frequencies(head_dim, theta, scaling, max_position)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq)
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], -1) * scale, persistent=False)

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
        kv_scales: tuple[float, float] = (1.0, 1.0),
    ) -> torch.Tensor:
        """CUDA: `forward`, with rotated k and v written straight into their paged-cache slots by the same
        kernel (one launch a layer fewer; an fp8 cache gets them divided by `kv_scales`). Returns q."""
        from nanoserve.kernels.elementwise import qk_norm_rotary_store

        args = (positions, q, k, v, self.cos_sin, k_cache, v_cache, slot_mapping)
        if q_norm is None or k_norm is None:
            return qk_norm_rotary_store(*args, kv_scales=kv_scales)
        return qk_norm_rotary_store(*args, q_norm.weight, k_norm.weight, q_norm.eps, kv_scales=kv_scales)


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor):
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, -1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)
