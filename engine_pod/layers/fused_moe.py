"""Mixture-of-experts layer: top-k routing and SwiGLU experts held as stacked tensors.

w13: [E, 2 * I, H] (each expert's gate rows, then its up rows), w2: [E, H, I]; gpt-oss adds biases (w13_bias
[E, 2 * I], w2_bias [E, H]) and clamps its SwiGLU (`clamped_swiglu`). Under tensor parallelism
every rank holds every expert's 1/tp slice of I (vLLM's fused_moe): gate_up is column-sharded, down
row-sharded, and one all-reduce after the block sums the partial outputs (`reduce_results=False`: the caller's,
as Qwen2-MoE's block sums its shared expert's partial output in first).
On CUDA the experts run as one Triton grouped GEMM (kernels/fused_moe.py); elsewhere a loop over experts
(`fused_experts_ref`), which is also the kernel's test oracle.
"""

import torch
from torch import nn

from nanoserve.engine_pod.errors import ModelLoadError
from nanoserve.engine_pod.layers.activation import silu_and_mul
from nanoserve.engine_pod.layers.parallel import all_reduce, divide, tp_rank
from nanoserve.engine_pod.mxfp4 import dequantize_mxfp4

Swiglu = tuple[float, float]  # gpt-oss's clamped SwiGLU: (alpha, limit)


def clamped_swiglu(x: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's activation on [.., gate | up]: (up + 1) * g * sigmoid(alpha * g), g = gate clamped above at
    `limit`, up clamped to +-limit."""
    gate, up = x.chunk(2, -1)
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


def act_and_mul(x: torch.Tensor, swiglu: Swiglu | None) -> torch.Tensor:
    return silu_and_mul(x) if swiglu is None else clamped_swiglu(x, *swiglu)


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (in float32, as transformers) over the experts, the top k, optionally renormalised to sum 1.
    Returns (weights float32 [M, k], expert ids int64 [M, k])."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_experts_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    swiglu: Swiglu | None = None,
) -> torch.Tensor:
    """sum_k weight_k * down_e(act(gate_e x, up_e x)) for each token's experts e = topk_ids[:, k] (act: SiLU(gate)
    * up, or the clamped SwiGLU; biases added after each product); a loop over the experts that got tokens, in
    transformers' order of operations."""
    out = torch.zeros_like(x)
    for e in topk_ids.unique().tolist():
        token, slot = torch.where(topk_ids == e)
        h = x[token] @ w13[e].t()
        if w13_bias is not None:
            h = h + w13_bias[e]
        h = act_and_mul(h, swiglu) @ w2[e].t()
        if w2_bias is not None:
            h = h + w2_bias[e]
        out.index_add_(0, token, (h * topk_weights[token, slot, None]).to(out.dtype))
    return out


def _gate_then_up(t: torch.Tensor, axis: int) -> torch.Tensor:
    """gpt-oss alternates gate and up along `axis` (g0 u0 g1 u1 ...): all gates, then all ups."""
    n = t.shape[axis]
    even, odd = torch.arange(0, n, 2, device=t.device), torch.arange(1, n, 2, device=t.device)
    gate, up = t.index_select(axis, even), t.index_select(axis, odd)
    return torch.cat([gate, up], axis)


class FusedMoE(nn.Module):
    """The experts of one MoE layer: forward(x, router_logits) -> the weighted sum of each token's top-k
    experts, all-reduced over the tensor-parallel ranks (or this rank's partial sum: `reduce_results=False`)."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool,
        bias: bool = False,
        swiglu: Swiglu | None = None,
        reduce_results: bool = True,
    ):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize, self.swiglu = num_experts, top_k, renormalize, swiglu
        self.reduce_results = reduce_results
        self.intermediate = divide(intermediate_size, "the experts' intermediate size")  # this rank's slice
        self.w13_weight = self._param(num_experts, 2 * self.intermediate, hidden_size)
        self.w2_weight = self._param(num_experts, hidden_size, self.intermediate)
        self.w13_bias = self._param(num_experts, 2 * self.intermediate) if bias else None
        self.w2_bias = self._param(num_experts, hidden_size) if bias else None
        self._mxfp4: dict[tuple[str, str], torch.Tensor] = {}  # an MXFP4 tensor's blocks or scales, until both came

    def _param(self, *shape: int) -> nn.Parameter:
        p = nn.Parameter(torch.empty(*shape), requires_grad=False)
        p.weight_loader = self.weight_loader  # pyright: ignore[reportAttributeAccessIssue]
        return p

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[int | None, str]) -> None:
        """shard = (expert, "gate" | "up" | "down") for one expert's 2D weight, as published checkpoints
        store them; (None, "gate_up" | "down") for all experts' stacked 3D tensor ([E, 2I, H] gate then up,
        [E, H, I]: transformers' fused experts). gpt-oss's: (None, "gate_up_interleaved" | "down_io") for its
        stacked [E, H, 2I] (gate and up columns alternating) and [E, I, H]; its biases (None, "gate_up_bias" |
        "down_bias"); its MXFP4 tensors (None, "gate_up_blocks" | "gate_up_scales" | "down_blocks" |
        "down_scales")."""
        expert, which = shard
        if which.endswith(("_blocks", "_scales")):
            return self._load_mxfp4(param, loaded, which)
        if which == "gate_up_interleaved":
            which, loaded = "gate_up", _gate_then_up(loaded.transpose(-1, -2), -2)
        elif which == "down_io":
            which, loaded = "down", loaded.transpose(-1, -2)
        elif which == "gate_up_bias":
            loaded = _gate_then_up(loaded, -1)
        size, start = self.intermediate, tp_rank() * self.intermediate
        dst = param.data if expert is None else param.data[expert]
        if which == "down_bias":  # [E, H]: whole on every rank (rank 0 adds it)
            dst.copy_(loaded)
        elif which == "down":  # [.., H, I]: this rank's columns of I
            dst.copy_(loaded.narrow(-1, start, size))
        elif which in ("gate_up", "gate_up_bias"):  # [E, 2I, H] or [E, 2I]: this rank's gate rows and up rows
            axis = -1 if which == "gate_up_bias" else -2
            full = loaded.shape[axis] // 2
            dst.narrow(axis, 0, size).copy_(loaded.narrow(axis, start, size))
            dst.narrow(axis, size, size).copy_(loaded.narrow(axis, full + start, size))
        else:  # one expert's gate or up: [I, H], into its half of w13
            dst.narrow(0, 0 if which == "gate" else size, size).copy_(loaded.narrow(0, start, size))

    def _load_mxfp4(self, param: nn.Parameter, loaded: torch.Tensor, which: str) -> None:
        """Blocks and scales come as two checkpoint tensors, in either order: held until both did, then
        dequantized ([E, out, in]; gate_up's rows alternate gate and up) and loaded."""
        kind, part = which.rsplit("_", 1)
        self._mxfp4[kind, part] = loaded
        blocks, scales = self._mxfp4.get((kind, "blocks")), self._mxfp4.get((kind, "scales"))
        if blocks is None or scales is None:
            return
        del self._mxfp4[kind, "blocks"], self._mxfp4[kind, "scales"]
        dense = dequantize_mxfp4(blocks, scales, param.dtype)
        if kind == "gate_up":
            self.weight_loader(param, _gate_then_up(dense, -2), (None, "gate_up"))
        else:
            self.weight_loader(param, dense, (None, "down"))

    def process_weights_after_loading(self) -> None:
        if self._mxfp4:
            (kind, part), *_ = self._mxfp4
            missing = "scales" if part == "blocks" else "blocks"
            raise ModelLoadError(f"MXFP4 experts: {kind}_proj_{part} came without {kind}_proj_{missing}")

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        # Under TP the down bias is rank 0's to add: the all-reduce sums the ranks' partial outputs.
        w2_bias = self.w2_bias if tp_rank() == 0 else None
        args = (x, self.w13_weight, self.w2_weight, weights, ids, self.w13_bias, w2_bias, self.swiglu)
        if x.is_cuda:
            from nanoserve.kernels.fused_moe import fused_experts

            out = fused_experts(*args)
        else:
            out = fused_experts_ref(*args)
        return all_reduce(out) if self.reduce_results else out
