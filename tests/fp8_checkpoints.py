"""FP8 weight checkpoints made here from a model folder, as llm-compressor (compressed-tensors) and
transformers' FineGrainedFP8Config (the fp8 method) write them, with the same weights dequantized beside them
(the oracle). For tests/engine/test_fp8_weights.py (CPU) and test_gpu_fp8_weights.py."""

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize(w: torch.Tensor, strategy: str, block: tuple[int, int] | None = None):
    """(float8 weight, scale as the checkpoint stores it, the dequantized float32 weight)."""
    w = w.float()
    if strategy == "tensor":
        scale = (w.abs().amax() / FP8_MAX).reshape(1)
        full = scale.reshape(1, 1)
    elif strategy == "channel":
        scale = w.abs().amax(1, keepdim=True) / FP8_MAX  # [N, 1]
        full = scale
    else:
        assert block is not None
        bn, bk = block
        n, k = w.shape
        grid = torch.zeros(-(-n // bn), -(-k // bk))
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                grid[i, j] = w[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk].abs().amax() / FP8_MAX
        scale = grid
        full = grid.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    q = (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale, q.float() * full


def ct_config(strategy: str, activations: str | None, ignore: list[str]) -> dict:
    """quantization_config as llm-compressor writes it for an FP8 (W8A8) scheme."""
    weights = dict(
        num_bits=8, type="float", symmetric=True, strategy=strategy, dynamic=False, group_size=None,
        block_structure=None, actorder=None, observer="minmax", observer_kwargs={},
    )  # fmt: skip
    inputs = None
    if activations is not None:
        dynamic = activations != "static"
        inputs = dict(
            num_bits=8, type="float", symmetric=True, strategy="tensor" if activations == "static" else activations,
            dynamic=dynamic, group_size=None, block_structure=None, actorder=None,
            observer=None if dynamic else "minmax", observer_kwargs={},
        )  # fmt: skip
    group = dict(targets=["Linear"], weights=weights, input_activations=inputs, output_activations=None)
    return dict(
        quant_method="compressed-tensors", format="float-quantized", quantization_status="compressed",
        global_compression_ratio=None, config_groups={"group_0": group}, ignore=ignore,
        kv_cache_scheme=None, sparsity_config={}, transform_config={}, version="0.11.0",
    )  # fmt: skip


def fp8_config(block: tuple[int, int], ignore: list[str] | None = None) -> dict:
    """quantization_config of transformers' FineGrainedFP8Config (DeepSeek / Qwen3-FP8 style)."""
    return dict(
        quant_method="fp8", activation_scheme="dynamic", weight_block_size=list(block), fmt="e4m3",
        modules_to_not_convert=ignore, dequantize=False, scale_fmt="float", expert_dtype="fp8",
    )  # fmt: skip


def make_fp8(src: str, dst: str, qcfg: dict, strategy: str, block=None, skip=(), static: bool = False):
    """Quantize the linear layers of the model folder `src` into `dst` (an FP8 checkpoint with `qcfg`), and
    write `dst`-dequant: the same weights dequantized, as a plain float32 checkpoint. Returns both."""
    deq_dir = dst + "-dequant"
    for d in (dst, deq_dir):
        shutil.copytree(src, d)
        os.remove(os.path.join(d, "model.safetensors"))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    fp8, deq = {}, {}
    scale_name = "weight_scale_inv" if qcfg["quant_method"] == "fp8" else "weight_scale"
    gen = torch.Generator().manual_seed(1)
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in PROJ and module not in skip:
            q, scale, d = quantize(t, strategy, block)
            fp8[name], fp8[f"{module}.{scale_name}"], deq[name] = q, scale, d.to(t.dtype)
            if static:  # a calibrated per-tensor activation scale; unused on CPU (dequantized matmul)
                fp8[f"{module}.input_scale"] = (0.01 + 0.02 * torch.rand(1, generator=gen)).reshape(1)
        else:
            fp8[name], deq[name] = t, t
    save_file(fp8, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    save_file(deq, os.path.join(deq_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = qcfg
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst, deq_dir
