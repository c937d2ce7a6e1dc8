"""Load Hugging Face safetensors into a (possibly tensor-parallel) model; each parameter loads its shard.

Streaming: one checkpoint file mapped at a time, one tensor read at a time, so host memory stays near one
tensor (and an MXFP4 pair) whatever the model's size. Rank 0 shows vLLM's progress bar over the files.
"""

import glob
import os

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from nanoserve.engine_pod.errors import ModelLoadError
from nanoserve.engine_pod.layers.parallel import tp_rank

FP8_DTYPES = {torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz}


def load_model(model: nn.Module, path: str) -> None:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in model folder {path!r}")
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules_mapping", {})
    special = getattr(model, "weight_target", lambda name: None)  # e.g. MoE experts: checked first
    loaded: set[str] = set()
    bar = tqdm(files, desc="Loading safetensors checkpoint shards", unit="shard", disable=tp_rank() != 0)
    for file in bar:
        with safe_open(file, "pt", "cpu") as f:
            for name in f.keys():
                target, shard = special(name) or _target(name, packed)
                if target not in params:
                    continue  # e.g. rotary inv_freq buffers, or lm_head.weight of a tied model
                param = params[target]
                loader = getattr(param, "weight_loader", None)
                tensor = f.get_tensor(name)
                if tensor.dtype != param.dtype and FP8_DTYPES & {tensor.dtype, param.dtype}:
                    raise ModelLoadError(
                        f"checkpoint tensor {name!r} is {tensor.dtype} where the model holds {param.dtype}: "
                        "config.json's quantization_config (its ignore list) does not describe this checkpoint"
                    )
                if loader is None:
                    param.data.copy_(tensor)
                elif shard is None:
                    loader(param, tensor)
                else:
                    loader(param, tensor, shard)
                loaded.add(target)
    if getattr(model, "tie_word_embeddings", False):
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise ModelLoadError(
            f"weights missing from {path!r}: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
        )
    for module in model.modules():  # e.g. FP8 linear layers: dequantize, or lay out their scales
        process = getattr(module, "process_weights_after_loading", None)
        if callable(process):
            process()


def _target(name: str, packed: dict) -> tuple[str, object]:
    for hf_name, (ours, shard) in packed.items():
        if f".{hf_name}." in name:
            return name.replace(f".{hf_name}.", f".{ours}."), shard
    return name, None
