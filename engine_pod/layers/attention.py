"""Paged attention with one small backend seam: "triton" (the GPU default), "flash_attn" (GPU, when
installed and asked for), "torch" (the plain reference: CPU, tests).

Every backend does the same three things per layer: rotate the new tokens' q and k, store their k/v into
the paged cache, then attend each sequence's new queries over its cached context (Triton: the first two
in one kernel). Per layer: a sliding window (Mistral, Gemma 3, gpt-oss), a logit soft-cap (Gemma 2) and
attention sinks (gpt-oss; not in flash_attn, so the model runner refuses that pairing).
"""

import torch
from torch import nn

from nanoserve.engine_pod.context import get_context
from nanoserve.engine_pod.layers.layernorm import RMSNorm
from nanoserve.engine_pod.layers.rotary import RotaryEmbedding
from nanoserve.kernels.attention_ref import paged_attention_ref, store_kvcache_ref


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401  # pyright: ignore[reportMissingImports]  (optional)

        return True
    except ImportError:
        return False


def pick_backend(requested: str | None, device: str, block_size: int, kv_cache_dtype: str = "auto") -> str:
    from nanoserve.engine_pod.errors import ConfigError

    if requested == "flash_attn" and kv_cache_dtype != "auto":
        raise ConfigError(f"attention_backend='flash_attn' has no kv_cache_dtype={kv_cache_dtype!r}: use 'triton'")
    if requested == "flash_attn" and (not flash_attn_available() or block_size % 256):
        raise ConfigError(
            "attention_backend='flash_attn' needs the flash_attn package and kvcache_block_size a multiple of 256"
        )
    if requested in ("triton", "flash_attn") and not device.startswith("cuda"):
        raise ConfigError(f"attention_backend={requested!r} needs a CUDA device")
    if requested:
        return requested
    return "triton" if device.startswith("cuda") else "torch"


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        num_kv_heads: int,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
    ):
        """`sliding_window` W: a query at position p sees keys p-W+1..p (transformers' kv > q - W)."""
        super().__init__()
        self.num_heads, self.head_dim, self.scale, self.num_kv_heads = num_heads, head_dim, scale, num_kv_heads
        self.sliding_window, self.logit_softcap = sliding_window or None, logit_softcap or None
        self.backend = "torch"
        self.k_cache = self.v_cache = torch.tensor([])  # bound to the runner's cache after allocation
        self.k_scale = self.v_scale = 1.0  # an fp8 cache holds k / k_scale and v / v_scale

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rotary: RotaryEmbedding,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [tokens, heads, head_dim], k/v: [tokens, kv_heads, head_dim] -> [tokens, heads, head_dim].
        q and k come before the rotary embedding (and Qwen3's per-head norms): on the Triton backend the
        kernel that applies them also writes k and v into the cache. `sinks`: this rank's heads' sink
        logits [heads]."""
        ctx = get_context()
        if self.backend == "triton":
            from nanoserve.kernels.paged_attention import paged_attention

            q = rotary.rotate_and_store(
                positions, q, k, v, q_norm, k_norm, self.k_cache, self.v_cache, ctx.slot_mapping, self.kv_scales
            )
            return paged_attention(
                q,
                self.k_cache,
                self.v_cache,
                ctx.cu_seqlens_q,
                ctx.context_lens,
                ctx.block_tables,
                self.scale,
                ctx.max_seqlen_q,
                ctx.num_splits,
                sliding_window=self.sliding_window,
                sinks=sinks,
                softcap=self.logit_softcap,
                kv_scales=self.kv_scales,
            )
        q, k = rotary(positions, q, k, q_norm, k_norm)
        if self.backend == "flash_attn":
            return self._flash_attn(q, k, v, ctx, sinks)
        store_kvcache_ref(k, v, self.k_cache, self.v_cache, ctx.slot_mapping, self.kv_scales)
        return paged_attention_ref(
            q,
            self.k_cache,
            self.v_cache,
            ctx.query_lens_list,
            ctx.context_lens_list,
            ctx.block_tables,
            self.scale,
            self.sliding_window,
            sinks,
            self.logit_softcap,
            self.kv_scales,
        )

    @property
    def kv_scales(self) -> tuple[float, float]:
        return self.k_scale, self.v_scale

    def _flash_attn(self, q, k, v, ctx, sinks):
        if sinks is not None:  # raised by the runner's warm-up step, at start
            from nanoserve.engine_pod.errors import ConfigError

            raise ConfigError("attention_backend='flash_attn' has no attention sinks (gpt-oss): use 'triton'")
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache  # pyright: ignore[reportMissingImports]  (optional)

        store_kvcache_ref(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        tables, lens = ctx.block_tables.to(torch.int32), ctx.context_lens.to(torch.int32)
        extra: dict[str, object] = dict(window_size=(self.sliding_window - 1 if self.sliding_window else -1, 0))
        if self.logit_softcap:
            extra["softcap"] = self.logit_softcap
        if ctx.is_decode:
            return flash_attn_with_kvcache(
                q.unsqueeze(1),
                self.k_cache,
                self.v_cache,
                cache_seqlens=lens,
                block_table=tables,
                softmax_scale=self.scale,
                causal=True,
                **extra,
            ).squeeze(1)
        cu_k = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
        return flash_attn_varlen_func(
            q,
            self.k_cache,
            self.v_cache,
            cu_seqlens_q=ctx.cu_seqlens_q.to(torch.int32),
            cu_seqlens_k=cu_k,
            max_seqlen_q=ctx.max_seqlen_q,
            max_seqlen_k=ctx.max_seqlen_k,
            softmax_scale=self.scale,
            causal=True,
            block_table=tables,
            **extra,
        )
