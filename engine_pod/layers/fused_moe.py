"""Mixture-of-experts layer: top-k routing and SwiGLU experts held as stacked tensors.

w13: [E, 2 * I, H] (each expert's gate rows, then its up rows), w2: [E, H, I]. Under tensor parallelism
every rank holds every expert's 1/tp slice of I (vLLM's fused_moe): gate_up is column-sharded, down
row-sharded, and one all-reduce after the block sums the partial outputs.
On CUDA the experts run as one Triton grouped GEMM (kernels/fused_moe.py); elsewhere a loop over experts
(`fused_experts_ref`), which is also the kernel's test oracle.
"""

import torch
from torch import nn

from nanoserve.engine_pod.layers.activation import silu_and_mul
from nanoserve.engine_pod.layers.parallel import all_reduce, divide, tp_rank


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (in float32, as transformers) over the experts, the top k, optionally renormalised to sum 1.
    Returns (weights float32 [M, k], expert ids int64 [M, k])."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_experts_ref(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """sum_k weight_k * down_e(silu(gate_e x) * up_e x) for each token's experts e = topk_ids[:, k]; a loop
    over the experts that got tokens, in transformers' order of operations."""
    out = torch.zeros_like(x)
    for e in topk_ids.unique().tolist():
        token, slot = torch.where(topk_ids == e)
        h = silu_and_mul(x[token] @ w13[e].t()) @ w2[e].t()
        out.index_add_(0, token, (h * topk_weights[token, slot, None]).to(out.dtype))
    return out


class FusedMoE(nn.Module):
    """The experts of one MoE layer: forward(x, router_logits) -> the weighted sum of each token's top-k
    experts, all-reduced over the tensor-parallel ranks."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.intermediate = divide(intermediate_size, "the experts' intermediate size")  # this rank's slice
        self.w13_weight = nn.Parameter(
            torch.empty(num_experts, 2 * self.intermediate, hidden_size), requires_grad=False
        )
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, self.intermediate), requires_grad=False)
        for p in (self.w13_weight, self.w2_weight):
            p.weight_loader = self.weight_loader  # pyright: ignore[reportAttributeAccessIssue]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[int | None, str]) -> None:
        """shard = (expert, "gate" | "up" | "down") for one expert's 2D weight, as published checkpoints
        store them, or (None, "gate_up" | "down") for all experts' stacked 3D tensor
        ([E, 2I, H] gate then up, [E, H, I]: the layout of transformers' fused experts)."""
        expert, which = shard
        size, start = self.intermediate, tp_rank() * self.intermediate
        dst = param.data if expert is None else param.data[expert]
        if which == "down":  # [.., H, I]: this rank's columns of I
            dst.copy_(loaded.narrow(-1, start, size))
        elif which == "gate_up":
            full = loaded.shape[-2] // 2
            dst.narrow(-2, 0, size).copy_(loaded.narrow(-2, start, size))
            dst.narrow(-2, size, size).copy_(loaded.narrow(-2, full + start, size))
        else:  # one expert's gate or up: [I, H], into its half of w13
            dst.narrow(0, 0 if which == "gate" else size, size).copy_(loaded.narrow(0, start, size))

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        if x.is_cuda:
            from nanoserve.kernels.fused_moe import fused_experts

            out = fused_experts(x, self.w13_weight, self.w2_weight, weights, ids)
        else:
            out = fused_experts_ref(x, self.w13_weight, self.w2_weight, weights, ids)
        return all_reduce(out)
