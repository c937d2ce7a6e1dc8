"""FP8 weight checkpoints (W8A8), as vLLM loads them: config.json's `quantization_config` parsed (torch-free)
into an `Fp8Scheme` per layer; layers/linear.py (`quantize_model`, `LinearBase.use_fp8`) applies it.

Formats:
- `quant_method: "fp8"` (vLLM's and transformers' FP8 checkpoints; DeepSeek / Qwen3-FP8): without
  `weight_block_size` one per-tensor `weight_scale` per projection (and `input_scale` when
  `activation_scheme` is static); with `weight_block_size: [bn, bk]` a `weight_scale_inv` grid of one scale per
  bn x bk block (dynamic activations only, as vLLM). Skipped layers: `ignored_layers` / `modules_to_not_convert`.
- `quant_method: "compressed-tensors"`, `format: "float-quantized"` (llm-compressor): one config group
  targeting Linear whose weights are 8-bit float, symmetric, strategy tensor / channel / block (`weight_scale`
  of shape [1], [N, 1] or the block grid); input activations dynamic (per token or per tensor), static per
  tensor (`input_scale`), or absent (weight-only); skipped layers: `ignore` (names, or "re:" regexes).

Dequantized weight = float(weight) * scale (broadcast per tensor / row / block). On CPU every FP8 layer is
dequantized to the model's dtype at load and runs the plain matmul (activations are not quantized there).
On CUDA per-tensor and per-channel layers keep their float8_e4m3fn weights with one float32 scale per
output row (a per-tensor scale of q, k, v or gate, up fills its sub-matrix's rows: no requantization) and
run `torch._scaled_mm` row-wise on activations quantized per token (dynamic) or with the static input scale
(the max over a merged layer's shards, as vLLM); block-wise and weight-only layers are dequantized to the
model's dtype at load on CUDA too. The KV cache scheme of a checkpoint (`kv_cache_scheme`) is refused.
"""

import re
from dataclasses import dataclass
from typing import TypeGuard

from nanoserve.engine_pod.errors import ModelLoadError

FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


@dataclass(frozen=True)
class Fp8Scheme:
    """How one linear layer's FP8 weights are stored and its activations quantized."""

    weight_strategy: str  # "tensor", "channel" or "block"
    block_size: tuple[int, int] | None  # (rows, columns) of a block; block strategy only
    activations: str | None  # "token" / "tensor" (dynamic), "static" (input_scale), None (weight-only)
    scale_name: str = "weight_scale"  # the checkpoint's name of the weight scales (fp8 block: weight_scale_inv)


@dataclass(frozen=True)
class QuantConfig:
    method: str  # "fp8" or "compressed-tensors"
    scheme: Fp8Scheme
    ignore: tuple[str, ...]  # checkpoint module names (or "re:" regexes) left in the model's dtype

    def ignored(self, module: str) -> bool:
        """Whether the checkpoint module `module` (Hugging Face name, e.g. model.layers.0.mlp.down_proj) is
        not quantized: an exact or suffix match at a module boundary, or a "re:" regex matching from the
        start (compressed-tensors)."""
        for p in self.ignore:
            if p.startswith("re:"):
                if re.match(p[3:], module):
                    return True
            elif module == p or module.endswith("." + p) or module.startswith(p + "."):
                return True
        return False


def _refuse(field: str, value, supported: str) -> ModelLoadError:
    return ModelLoadError(f"unsupported quantization_config.{field}={value!r}: {supported}")


# Methods other parts of the engine handle (the MoE experts' MXFP4 of gpt-oss): not this module's to refuse.
HANDLED_ELSEWHERE = ("mxfp4",)
SUPPORTED = "fp8 (W8A8 FP8) and compressed-tensors float-quantized 8-bit float"


def parse_quantization_config(cfg: dict) -> QuantConfig | None:
    """config.json's quantization_config as a QuantConfig, None for an unquantized model; ModelLoadError
    naming the field for what is not supported."""
    q = cfg.get("quantization_config")
    if not q:
        return None
    if not isinstance(q, dict):
        raise _refuse("", q, "expected an object")
    method = q.get("quant_method")
    if method in HANDLED_ELSEWHERE:
        return None
    if method == "fp8":
        return _parse_fp8(q)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(q)
    raise _refuse("quant_method", method, f"supported: {SUPPORTED}")


def _parse_fp8(q: dict) -> QuantConfig:
    act = str(q.get("activation_scheme", "dynamic")).lower()
    if act not in ("dynamic", "static"):
        raise _refuse("activation_scheme", q.get("activation_scheme"), "dynamic or static")
    if q.get("fmt", "e4m3") != "e4m3":
        raise _refuse("fmt", q.get("fmt"), "only e4m3 (float8_e4m3fn) weights")
    if q.get("scale_fmt", "float") != "float":
        raise _refuse("scale_fmt", q.get("scale_fmt"), "only float (float32) scales")
    if q.get("expert_dtype", "fp8") != "fp8":
        raise _refuse("expert_dtype", q.get("expert_dtype"), "only fp8")
    if q.get("modules_to_convert"):
        raise _refuse("modules_to_convert", q.get("modules_to_convert"), "only linear layers are quantized")
    if q.get("kv_cache_scheme"):
        raise _refuse("kv_cache_scheme", q["kv_cache_scheme"], "FP8 KV cache scales are not loaded yet")
    block = q.get("weight_block_size")
    if block is not None:
        if not _is_block(block):
            raise _refuse("weight_block_size", block, "two positive integers")
        if act != "dynamic":
            raise _refuse("activation_scheme", act, "block-wise weights (weight_block_size) need dynamic")
    ignore = q.get("ignored_layers") or q.get("modules_to_not_convert") or []
    scheme = Fp8Scheme(
        "block" if block is not None else "tensor",
        tuple(block) if block is not None else None,  # pyright: ignore[reportArgumentType]
        "static" if act == "static" else "token",  # vLLM quantizes dynamic activations per token
        "weight_scale_inv" if block is not None else "weight_scale",
    )
    return QuantConfig("fp8", scheme, tuple(ignore))


def _parse_compressed_tensors(q: dict) -> QuantConfig:
    fmt = q.get("format")
    for field in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if q.get(field):
            raise _refuse(field, q[field], "not supported (dense FP8 weights only; no KV cache scheme yet)")
    groups = q.get("config_groups") or {}
    if len(groups) != 1:
        raise _refuse("config_groups", list(groups), "exactly one config group (FP8 weights of every Linear)")
    ((name, group),) = groups.items()
    where = f"config_groups.{name}"
    fmt = group.get("format") or fmt
    if fmt != "float-quantized":
        raise _refuse(f"{where}.format" if group.get("format") else "format", fmt, "float-quantized (FP8)")
    targets = group.get("targets") or []
    if list(targets) != ["Linear"]:
        raise _refuse(f"{where}.targets", targets, '["Linear"]')
    if group.get("output_activations"):
        raise _refuse(f"{where}.output_activations", group["output_activations"], "none")
    w = group.get("weights") or {}
    _check_float8(w, f"{where}.weights")
    strategy = w.get("strategy", "tensor")
    block = None
    if strategy == "block":
        raw = w.get("block_structure")
        if not _is_block(raw):
            raise _refuse(f"{where}.weights.block_structure", raw, "two positive integers")
        block = (raw[0], raw[1])
    elif strategy not in ("tensor", "channel"):
        raise _refuse(f"{where}.weights.strategy", strategy, "tensor, channel or block")
    if w.get("dynamic"):
        raise _refuse(f"{where}.weights.dynamic", w.get("dynamic"), "false (scales in the checkpoint)")
    a = group.get("input_activations")
    if not a:
        activations = None
    else:
        _check_float8(a, f"{where}.input_activations")
        a_strategy = a.get("strategy", "tensor")
        if a.get("dynamic") in (True, "true"):
            if a_strategy not in ("token", "tensor"):
                raise _refuse(f"{where}.input_activations.strategy", a_strategy, "token or tensor when dynamic")
            activations = a_strategy
        else:
            if a_strategy != "tensor":
                raise _refuse(f"{where}.input_activations.strategy", a_strategy, "tensor when static")
            activations = "static"
        if block is not None and activations == "static":
            raise _refuse(f"{where}.input_activations.dynamic", a.get("dynamic"), "dynamic with block weights")
    return QuantConfig("compressed-tensors", Fp8Scheme(strategy, block, activations), tuple(q.get("ignore") or []))


def _is_block(block) -> TypeGuard[list | tuple]:
    return isinstance(block, list | tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)


def _check_float8(args: dict, where: str) -> None:
    if args.get("num_bits") != 8 or args.get("type") != "float":
        raise _refuse(f"{where}.num_bits/type", (args.get("num_bits"), args.get("type")), "8-bit float (FP8) only")
    if args.get("symmetric") is False:
        raise _refuse(f"{where}.symmetric", False, "symmetric only")
    if args.get("group_size") not in (None, 0) and args.get("strategy") not in ("block",):
        raise _refuse(f"{where}.group_size", args.get("group_size"), "no group-wise scales")
