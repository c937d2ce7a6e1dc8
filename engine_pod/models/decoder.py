"""The decoder-only transformer shared by Llama, Mistral, Qwen2, Qwen3, Gemma 3 and the MoE kin (Mixtral,
Qwen3-MoE, Qwen2-MoE, gpt-oss); they differ only in small switches.

Switches: `qkv_bias` (Qwen2), `qk_norm` (Qwen3, Gemma 3: RMSNorm on each head of q and k before rotary),
`o_bias` (Llama with attention_bias), `sinks` (gpt-oss: a learned sink logit per head in each softmax),
`moe` (which layers have a sparse MoE block instead of the MLP, and its shared expert: a DecoderMLP),
`gemma` (Gemma 3: (1 + w) RMSNorms, four a layer as the attention and MLP outputs are normed too, and
embeddings times sqrt(hidden_size)). From the config: each layer's sliding window
(sliding_window.layer_sliding_windows) and rope (rope_params.rope_parameters: Gemma 3 has one per layer
type), the MLP's activation (Gemma's GeGLU), query_pre_attn_scalar and final_logit_softcapping (Gemma 3;
its attn_logit_softcapping goes unused, as in transformers' Gemma 3).
Weights load from Hugging Face names through `packed_modules_mapping` (q/k/v -> qkv_proj, gate/up ->
gate_up_proj, a shared expert's too) and, for MoE checkpoints, `weight_target` (each expert's tensors -> the
stacked experts).
"""

import torch
from torch import nn

from nanoserve.engine_pod.layers.activation import act_and_mul
from nanoserve.engine_pod.layers.attention import Attention
from nanoserve.engine_pod.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanoserve.engine_pod.layers.layernorm import GemmaRMSNorm, RMSNorm
from nanoserve.engine_pod.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from nanoserve.engine_pod.layers.parallel import tp_rank
from nanoserve.engine_pod.layers.rotary import RotaryEmbedding
from nanoserve.engine_pod.models.moe import MoeSpec, SparseMoeBlock, moe_weight_target
from nanoserve.engine_pod.rope_params import rope_parameters
from nanoserve.engine_pod.sliding_window import layer_sliding_windows


class DecoderAttention(nn.Module):
    def __init__(
        self,
        cfg: dict,
        max_position: int,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
        gemma: bool = False,
        sinks: bool = False,
        sliding_window: int | None = None,
    ):
        super().__init__()
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        self.head_dim = cfg.get("head_dim") or hidden // heads
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, heads, kv_heads, bias=qkv_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(heads * self.head_dim, hidden, bias=o_bias)
        layer_type = "sliding_attention" if sliding_window else "full_attention"
        self.rotary_emb = RotaryEmbedding(self.head_dim, max_position, *rope_parameters(cfg, layer_type))
        scale = (cfg.get("query_pre_attn_scalar") or self.head_dim) ** -0.5
        self.attn = Attention(self.num_heads, self.head_dim, scale, self.num_kv_heads, sliding_window)
        eps, norm = cfg.get("rms_norm_eps", 1e-6), GemmaRMSNorm if gemma else RMSNorm
        self.q_norm = norm(self.head_dim, eps) if qk_norm else None
        self.k_norm = norm(self.head_dim, eps) if qk_norm else None
        self.sinks = nn.Parameter(torch.empty(self.num_heads), requires_grad=False) if sinks else None
        if self.sinks is not None:
            self.sinks.weight_loader = self._load_sinks  # pyright: ignore[reportAttributeAccessIssue]

    def _load_sinks(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        param.data.copy_(loaded.narrow(0, tp_rank() * self.num_heads, self.num_heads))  # this rank's heads

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], -1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = self.attn(positions, q, k, v, self.rotary_emb, self.q_norm, self.k_norm, self.sinks)
        return self.o_proj(out.flatten(1))


class DecoderMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool, act: str = "silu", reduce_results: bool = True):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate] * 2, bias=bias)
        # reduce_results=False: this rank's partial sum (a shared expert, summed with the routed experts')
        self.down_proj = RowParallelLinear(intermediate, hidden, bias=bias, reduce_results=reduce_results)
        self.act_fn = act_and_mul(act)  # silu, or Gemma's gelu_pytorch_tanh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: dict, max_position: int, sparse: MoeSpec | None, sliding_window: int | None = None, **switches
    ):
        super().__init__()
        hidden, eps = cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6)
        self.self_attn = DecoderAttention(cfg, max_position, sliding_window=sliding_window, **switches)
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
        if sparse is None:
            self.mlp = DecoderMLP(hidden, cfg["intermediate_size"], cfg.get("mlp_bias", False), act)
        else:
            size = sparse.shared_intermediate_size
            shared = DecoderMLP(hidden, size, False, act, reduce_results=False) if size else None
            self.mlp = SparseMoeBlock(hidden, sparse, shared)
        gemma = switches.get("gemma", False)
        norm = GemmaRMSNorm if gemma else RMSNorm
        self.input_layernorm = norm(hidden, eps)
        self.post_attention_layernorm = norm(hidden, eps)
        self.pre_feedforward_layernorm = norm(hidden, eps) if gemma else None
        self.post_feedforward_layernorm = norm(hidden, eps) if gemma else None

    def forward(self, positions, x, residual):
        """x: the previous block's output, not yet added to `residual` (None before the first layer)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x)
        pre, post = self.pre_feedforward_layernorm, self.post_feedforward_layernorm
        if pre is None or post is None:  # one norm between attention and MLP
            x, residual = self.post_attention_layernorm(x, residual)
            return self.mlp(x), residual
        # Gemma: the attention output is normed, then added; the MLP's input and output are normed
        x, residual = pre(self.post_attention_layernorm(x), residual)
        return post(self.mlp(x)), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: dict, max_position: int, moe: MoeSpec | None, **switches):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg["vocab_size"], cfg["hidden_size"])
        gemma = switches.get("gemma", False)
        # Gemma: embeddings times sqrt(hidden_size), that factor rounded to the model's dtype (as transformers)
        scale = torch.tensor(cfg["hidden_size"] ** 0.5, dtype=torch.float32).to(self.embed_tokens.weight.dtype)
        self.register_buffer("embed_scale", scale if gemma else None, persistent=False)
        self.layers = nn.ModuleList(
            DecoderLayer(
                cfg, max_position, moe if moe is not None and i in moe.sparse_layers else None, window, **switches
            )
            for i, window in enumerate(layer_sliding_windows(cfg))
        )
        self.norm = (GemmaRMSNorm if gemma else RMSNorm)(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        if self.embed_scale is not None:
            x = x * self.embed_scale
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        x, _ = self.norm(x, residual)
        return x


class DecoderForCausalLM(nn.Module):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self,
        cfg: dict,
        max_position: int,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
        moe: MoeSpec | None = None,
        gemma: bool = False,
        sinks: bool = False,
    ):
        super().__init__()
        self.moe = moe
        switches = dict(qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=qk_norm, gemma=gemma, sinks=sinks)
        self.model = DecoderModel(cfg, max_position, moe, **switches)
        self.final_logit_softcap = cfg.get("final_logit_softcapping")  # Gemma: cap * tanh(logits / cap)
        self.lm_head = ParallelLMHead(cfg["vocab_size"], cfg["hidden_size"])
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def weight_target(self, name: str) -> tuple[str, object] | None:
        """Our parameter and shard for a checkpoint tensor that `packed_modules_mapping` does not cover."""
        return moe_weight_target(name, self.moe) if self.moe is not None else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.lm_head(hidden)
        if logits is not None and self.final_logit_softcap:
            logits = torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap
        return logits
