"""Supported architectures (config.json "architectures") and the decoder switches each one sets."""

from nanoserve.engine_pod.errors import ModelLoadError
from nanoserve.engine_pod.layers.linear import quantize_model
from nanoserve.engine_pod.models.decoder import DecoderForCausalLM
from nanoserve.engine_pod.models.moe import moe_spec


def _switches(arch: str, cfg: dict) -> dict:
    bias = bool(cfg.get("attention_bias", False))
    if arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        return dict(qkv_bias=bias, o_bias=bias, qk_norm=True)
    if arch == "Qwen2ForCausalLM":
        return dict(qkv_bias=True, o_bias=False, qk_norm=False)
    if arch == "Qwen2MoeForCausalLM":  # Qwen2's attention; its config's qkv_bias (default True)
        return dict(qkv_bias=bool(cfg.get("qkv_bias", True)), o_bias=False, qk_norm=False)
    if arch == "Gemma3ForCausalLM":
        return dict(qkv_bias=bias, o_bias=bias, qk_norm=True, gemma=True)
    if arch == "GptOssForCausalLM":
        return dict(qkv_bias=bias, o_bias=bias, qk_norm=False, sinks=True)
    return dict(qkv_bias=bias, o_bias=bias, qk_norm=False)  # Llama, and Mistral and Mixtral (Llama's layers;
    # a sliding window bounds max_model_len instead, rope_params.model_max_len)


SUPPORTED_ARCHITECTURES = (
    "Gemma3ForCausalLM",
    "GptOssForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
)
_BY_MODEL_TYPE = {
    "gemma3_text": "Gemma3ForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def build_model(cfg: dict, max_position: int) -> DecoderForCausalLM:
    model_type = cfg.get("model_type") or ""
    archs = cfg.get("architectures") or [_BY_MODEL_TYPE.get(model_type, model_type)]
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None and "Gemma3ForConditionalGeneration" in archs:
        raise ModelLoadError(
            "Gemma3ForConditionalGeneration (Gemma 3 with its vision tower) is not supported: only the text-only "
            "Gemma3ForCausalLM (model_type gemma3_text, e.g. gemma-3-1b)"
        )
    if arch is None:
        raise ModelLoadError(
            f"unsupported model architecture {archs or cfg.get('model_type')!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    method = (cfg.get("quantization_config") or {}).get("quant_method")
    if method == "mxfp4" and arch != "GptOssForCausalLM":
        raise ModelLoadError(
            f"quantization_config.quant_method='mxfp4' is supported for GptOssForCausalLM's experts only, not {arch}"
        )
    model = DecoderForCausalLM(cfg, max_position, moe=moe_spec(arch, cfg), **_switches(arch, cfg))
    # FP8 checkpoints (layers/linear.py, quantization.py); nothing without a quantization_config
    quantize_model(model, cfg)
    return model
