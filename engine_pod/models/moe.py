"""The sparse MoE block of Qwen3-MoE, Qwen2-MoE, Mixtral and gpt-oss, which layers have one, and its
checkpoint names.

All route with a replicated linear `gate` (softmax, top-k); Mixtral always renormalises the top-k
weights, Qwen3-MoE and Qwen2-MoE when `norm_topk_prob`; gpt-oss's router has a bias and takes the softmax of
the top-k logits (the renormalised top-k of the softmax), its experts have biases and a clamped SwiGLU.
Qwen2-MoE adds a shared expert that every token takes: a dense SwiGLU MLP of
`shared_expert_intermediate_size` (the decoder's dense MLP, sharded as one), its output times
sigmoid(shared_expert_gate(x)) (a replicated linear hidden -> 1) added to the experts'; under TP both
partial sums are added first and all-reduced once. Its checkpoint names (mlp.shared_expert.gate_proj/up_proj/
down_proj) load through the decoder's packed_modules_mapping like a dense MLP's, mlp.shared_expert_gate as is.
Qwen3-MoE and Qwen2-MoE make layer i sparse unless it is in `mlp_only_layers` or (i + 1) is not a multiple of
`decoder_sparse_step`; the others keep a dense MLP of `intermediate_size`.
"""

import re
from dataclasses import dataclass

import torch
from torch import nn

from nanoserve.engine_pod.layers.fused_moe import FusedMoE
from nanoserve.engine_pod.layers.linear import LinearBase
from nanoserve.engine_pod.layers.parallel import all_reduce


@dataclass(frozen=True)
class MoeSpec:
    num_experts: int
    top_k: int
    intermediate_size: int  # of each expert
    renormalize: bool
    sparse_layers: frozenset[int]
    bias: bool = False  # on the router and the experts (gpt-oss)
    swiglu: tuple[float, float] | None = None  # gpt-oss's clamped SwiGLU (alpha, limit); None: SiLU(gate) * up
    shared_intermediate_size: int = 0  # Qwen2-MoE's gated shared expert; 0: none


def moe_spec(arch: str, cfg: dict) -> MoeSpec | None:
    """The MoE shape of `arch` from its config.json (transformers' defaults where a key is absent), or None
    for a dense model."""
    layers = range(cfg["num_hidden_layers"])
    if arch == "MixtralForCausalLM":
        experts = cfg.get("num_local_experts", 8)
        return MoeSpec(experts, cfg.get("num_experts_per_tok", 2), cfg["intermediate_size"], True, frozenset(layers))
    if arch == "GptOssForCausalLM":
        experts, top_k = cfg.get("num_local_experts", 128), cfg.get("num_experts_per_tok", 4)
        swiglu = (cfg.get("swiglu_alpha", 1.702), cfg.get("swiglu_limit", 7.0))
        return MoeSpec(experts, top_k, cfg["intermediate_size"], True, frozenset(layers), True, swiglu)
    if arch in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"):
        qwen2 = arch == "Qwen2MoeForCausalLM"  # transformers' defaults differ, and it has a shared expert
        # Published checkpoints say num_experts; transformers 5 saves its alias num_local_experts.
        experts = cfg.get("num_experts") or cfg.get("num_local_experts") or (60 if qwen2 else 128)
        dense, step = set(cfg.get("mlp_only_layers") or []), cfg.get("decoder_sparse_step", 1)
        sparse = frozenset(i for i in layers if i not in dense and experts > 0 and (i + 1) % step == 0)
        return MoeSpec(
            experts,
            cfg.get("num_experts_per_tok", 4 if qwen2 else 8),
            cfg.get("moe_intermediate_size", 1408 if qwen2 else 768),
            bool(cfg.get("norm_topk_prob", False)),
            sparse,
            shared_intermediate_size=cfg.get("shared_expert_intermediate_size", 5632) if qwen2 else 0,
        )
    return None


class SparseMoeBlock(nn.Module):
    """The routed experts, plus `shared_expert` where the architecture has one (Qwen2-MoE: the decoder's
    dense MLP, built not to all-reduce): the block then sums both partial outputs and all-reduces once."""

    def __init__(self, hidden_size: int, spec: MoeSpec, shared_expert: nn.Module | None = None):
        super().__init__()
        self.gate = LinearBase(hidden_size, spec.num_experts, bias=spec.bias)  # the router: the same on every rank
        self.experts = FusedMoE(
            spec.num_experts,
            spec.top_k,
            hidden_size,
            spec.intermediate_size,
            spec.renormalize,
            spec.bias,
            spec.swiglu,
            reduce_results=shared_expert is None,
        )
        self.shared_expert = shared_expert
        # hidden -> 1, replicated like the router: each rank scales its partial sum by the same factor
        self.shared_expert_gate = LinearBase(hidden_size, 1, bias=False) if shared_expert is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_expert is None or self.shared_expert_gate is None:
            return out
        return all_reduce(out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x))


# One expert's weight as published checkpoints name it (Qwen: gate/up/down_proj; Mixtral: w1/w3/w2 under
# block_sparse_moe), or all experts' stacked tensors as transformers' fused experts hold them.
_PER_EXPERT = re.compile(r"(.*)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_STACKED = re.compile(r"(.*)\.experts\.(gate_up_proj|down_proj)$")
_WHICH = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
# gpt-oss: its stacked experts ([E, in, out], gate and up alternating), their biases, their MXFP4 form.
_GPT_OSS = re.compile(r"(.*)\.experts\.(gate_up|down)_proj(|_bias|_blocks|_scales)$")


def moe_weight_target(name: str, spec: MoeSpec) -> tuple[str, object] | None:
    """Our parameter and shard for an MoE checkpoint tensor (experts, or the router), else None."""
    name = name.replace(".block_sparse_moe.", ".mlp.").replace(".mlp.router.", ".mlp.gate.")
    if spec.swiglu is not None and (m := _GPT_OSS.match(name)):
        which, suffix = m[2], m[3]
        param = f"{m[1]}.experts.{'w2' if which == 'down' else 'w13'}_{'bias' if suffix == '_bias' else 'weight'}"
        kind = suffix[1:] or ("interleaved" if which == "gate_up" else "io")
        return param, (None, f"{which}_{kind}")
    if m := _PER_EXPERT.match(name):
        which = _WHICH[m[3]]
        return f"{m[1]}.experts.{'w2' if which == 'down' else 'w13'}_weight", (int(m[2]), which)
    if m := _STACKED.match(name):
        which = "gate_up" if m[2] == "gate_up_proj" else "down"
        return f"{m[1]}.experts.{'w2' if which == 'down' else 'w13'}_weight", (None, which)
    if name.endswith((".mlp.gate.weight", ".mlp.gate.bias")):
        return name, None
    return None
