from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from nanoserve.common.flags import setting, settings_argv
from nanoserve.engine_pod.default_model import DEFAULT_MODEL
from nanoserve.engine_pod.errors import ConfigError, ModelLoadError
from nanoserve.engine_pod.rope_params import model_max_len
from nanoserve.engine_pod.spec_config import SpeculativeConfig, parse_speculative_config

if TYPE_CHECKING:  # torch is imported when a Config is made: the CLI and the operator import this without it
    import torch


# The default model (135M) prefills 256 tokens in ~0.5 s on two cores: steps stay around a second.
CPU_BATCHED_TOKENS, GPU_BATCHED_TOKENS = 256, 8192


FALLBACK_MAX_MODEL_LEN = 4096  # a model config without max_position_embeddings


@dataclass
class Config:
    """Every engine knob in one place, each with its help: `nanoserve serve`'s flags, the engine command lines
    of `nanoserve up` and of the operator's pods all come from these fields (common/flags.py)."""

    model: str = setting(DEFAULT_MODEL, "a Hugging Face model folder, or smollm2-135m (the built-in model)")
    tensor_parallel_size: int = setting(
        1, "GPUs that split the model (tensor parallelism; 1..8)", flags=("--tensor-parallel-size", "-tp")
    )
    max_model_len: int = setting(  # None: resolved in __post_init__, as the others below
        None,
        "most tokens in a sequence, prompt and output together (at most the model's length)",
        unset="the model's length: max_position_embeddings or YaRN's / dynamic NTK's extended length "
        f"({FALLBACK_MAX_MODEL_LEN} if it has none), as vLLM",
    )
    max_num_seqs: int = setting(256, "most sequences running at once")
    max_num_batched_tokens: int = setting(
        None,
        "most tokens in one step, prefill chunks and decodes together",
        unset=f"{GPU_BATCHED_TOKENS} on GPU, {CPU_BATCHED_TOKENS} on CPU, so that a long prompt cannot stall others",
    )
    kvcache_block_size: int = setting(16, "tokens per KV-cache block", flags=("--kvcache-block-size", "--block-size"))
    gpu_memory_utilization: float = setting(0.9, "fraction of the GPU's memory the engine may fill, KV cache included")
    enforce_eager: bool = setting(False, "no CUDA graphs: every decode step runs eagerly")
    device: str = setting(None, "cuda or cpu", unset="cuda when available")
    dtype: str = setting(
        "auto",
        "the weights' and activations' dtype; auto: bfloat16 on GPU, float32 on CPU",
        choices=("auto", "bfloat16", "float16", "float32"),
    )
    kv_cache_dtype: str = setting(
        "auto",
        "the KV cache's dtype: auto (the model's), or fp8 / fp8_e4m3 (float8 e4m3, as vLLM: k and v divided by "
        "per-layer scales, the checkpoint's k_scale/v_scale or 1.0; twice the blocks in the same memory)",
        choices=("auto", "fp8", "fp8_e4m3"),
    )
    seed: int | None = setting(
        None,
        "seeds the sampling of requests that bring no seed, as vLLM's --seed",
        unset="none: each such request draws a fresh one",
    )
    enable_prefix_caching: bool = setting(
        True,
        "reuse the KV blocks of prompt prefixes already computed",
        flags=("--enable-prefix-caching", "--prefix-caching"),
    )
    scheduling_policy: str = setting(
        "fcfs",
        "which waiting request runs first: fcfs (arrival) or priority (the request's priority, then arrival)",
        choices=("fcfs", "priority"),
    )
    num_kvcache_blocks: int = setting(-1, "KV-cache blocks; -1: as many as free memory holds")
    cpu_kvcache_gib: float = setting(1.0, "the KV cache's size on CPU (GiB), where free memory is not measured")
    attention_backend: str | None = setting(
        None, "attention kernels", unset="triton on CUDA, torch on CPU", choices=("torch", "flash_attn", "triton")
    )
    async_scheduling: bool = setting(None, "schedule step N+1 while step N runs", unset="on with CUDA")
    grammar_process: bool = setting(
        None,
        "structured output's grammars step in a process of their own, beside the engine's step loop (needs "
        "async scheduling): their masks are made while the next step is scheduled, not after it",
        unset="on with async scheduling on CUDA",
    )
    generation_config: str = setting(
        "auto",
        "auto: a request's sampling defaults (temperature, top_p, top_k, min_p, repetition_penalty, and "
        "max_new_tokens as max_tokens) come from the model's generation_config.json, as in vLLM; vllm: "
        "vLLM's own defaults",
        choices=("auto", "vllm"),
    )
    speculative_config: str | None = setting(
        None,
        'speculative decoding as vLLM\'s JSON: {"method": "ngram", "num_speculative_tokens": K, '
        '"prompt_lookup_max": N, "prompt_lookup_min": M} proposes up to K tokens from the longest earlier '
        "match of the last N..M tokens and verifies them in one step (steps that look for drafts are not "
        'overlapped); "disable_by_batch_size": B drafts only in steps of at most B running sequences (big '
        "batches decode faster without)",
        unset="off",
        metavar="JSON",
    )
    hf_config: dict = field(default_factory=dict, repr=False, init=False)  # read from the model folder
    speculative: SpeculativeConfig | None = field(default=None, init=False)  # speculative_config, parsed
    sampling_defaults: dict = field(default_factory=dict, init=False)  # generation_config "auto"
    eos_token_ids: list[int] = field(default_factory=list, init=False)

    def __post_init__(self):
        for f in fields(self):  # argparse checks a flag's choices; LLM(...) and the engine come here
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}")
        from nanoserve.engine_pod.default_model import resolve_model

        self.model = resolve_model(self.model)
        path = os.path.join(self.model, "config.json")
        if not os.path.isfile(path):
            raise ModelLoadError(f"no config.json in model folder {self.model!r}")
        self.hf_config = _read_json(self.model, "config.json")
        import torch

        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype in (None, "auto"):
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = GPU_BATCHED_TOKENS if self.device.startswith("cuda") else CPU_BATCHED_TOKENS
        if isinstance(self.speculative_config, dict):  # LLM(..., speculative_config={...}), as vLLM takes it
            self.speculative_config = json.dumps(self.speculative_config)
        self.speculative = parse_speculative_config(self.speculative_config)
        if self.async_scheduling is None:
            self.async_scheduling = self.device.startswith("cuda")
        if self.grammar_process is None:
            self.grammar_process = self.async_scheduling and self.device.startswith("cuda")
        elif self.grammar_process and not self.async_scheduling:
            raise ConfigError("grammar_process needs async scheduling (its masks are made while a step runs)")
        if self.kvcache_block_size < 1:
            raise ConfigError(f"kvcache_block_size must be >= 1, got {self.kvcache_block_size}")
        if not 1 <= self.tensor_parallel_size <= 8:
            raise ConfigError(f"tensor_parallel_size must be in 1..8, got {self.tensor_parallel_size}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_seqs and max_num_batched_tokens must be >= 1")
        tp, hf = self.tensor_parallel_size, self.hf_config
        for key in ("num_attention_heads", "num_key_value_heads"):
            if hf.get(key) and hf[key] % tp:
                raise ConfigError(f"tensor_parallel_size={tp} does not divide {key}={hf[key]}")
        hf_max = model_max_len(self.hf_config)
        if self.max_model_len is None:
            self.max_model_len = hf_max or FALLBACK_MAX_MODEL_LEN
        elif hf_max and self.max_model_len > hf_max:
            logging.getLogger("nanoserve.config").warning(
                "max_model_len %d is beyond the model's length %d (max_position_embeddings, or YaRN's / dynamic "
                "NTK's extended length): using %d",
                self.max_model_len,
                hf_max,
                hf_max,
            )
            self.max_model_len = hf_max
        generation = _read_json(self.model, "generation_config.json")
        self.eos_token_ids = sorted(_eos_ids(self.hf_config) | _eos_ids(generation))
        if self.generation_config == "auto":
            self.sampling_defaults = sampling_defaults(generation)

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    @property
    def kv_torch_dtype(self) -> torch.dtype:
        import torch

        return self.torch_dtype if self.kv_cache_dtype == "auto" else torch.float8_e4m3fn


def engine_argv(settings: dict) -> list[str]:
    """Config settings (field name -> value, as `cli.engine_kwargs` gives them) as `nanoserve serve` flags."""
    return settings_argv(Config, settings)


_SAMPLING_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def sampling_defaults(generation: dict) -> dict:
    """A generation_config.json's sampling settings as SamplingParams fields (vLLM's `get_diff_sampling_param`:
    the values it sets, whatever its do_sample says)."""
    return {ours: generation[theirs] for theirs, ours in _SAMPLING_KEYS.items() if generation.get(theirs) is not None}


def _read_json(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _eos_ids(cfg: dict) -> set[int]:
    eos = cfg.get("eos_token_id")
    return {e for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
