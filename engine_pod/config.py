import json
import os
from dataclasses import dataclass, field

import torch

from nanoserve.engine_pod.errors import ConfigError, ModelLoadError


# The default model (135M) prefills 256 tokens in ~0.5 s on two cores: steps stay around a second.
CPU_BATCHED_TOKENS = 256


@dataclass
class Config:
    """Every engine knob in one place. `model` is a Hugging Face folder (or "smollm2-135m")."""
    model: str
    tensor_parallel_size: int = 1
    max_model_len: int = 4096
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # tokens per step, prefill chunks and decodes together; None: 8192
                                           # on GPU, 256 on CPU (a long prompt must not stall others for seconds)
    kvcache_block_size: int = 16
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    device: str | None = None              # None: cuda when available, else cpu
    dtype: str | None = None               # None or "auto": bfloat16 on GPU, float32 on CPU
    seed: int | None = None                # seeds the sampling of requests without a seed (vLLM's --seed)
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"        # "fcfs" or "priority"
    num_kvcache_blocks: int = -1           # -1: size the cache from free memory
    cpu_kvcache_gib: float = 1.0           # KV-cache budget on CPU, where free memory is not measured
    attention_backend: str | None = None   # None: auto ("triton" on CUDA, "torch" on CPU)
    async_scheduling: bool | None = None   # schedule step N+1 while step N runs; None: on with CUDA
    hf_config: dict = field(default_factory=dict, repr=False)
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        from nanoserve.engine_pod.default_model import resolve_model
        self.model = resolve_model(self.model)
        path = os.path.join(self.model, "config.json")
        if not os.path.isfile(path):
            raise ModelLoadError(f"no config.json in model folder {self.model!r}")
        self.hf_config = _read_json(self.model, "config.json")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype in (None, "auto"):
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = 8192 if self.device.startswith("cuda") else CPU_BATCHED_TOKENS
        if self.async_scheduling is None:
            self.async_scheduling = self.device.startswith("cuda")
        if self.kvcache_block_size < 1:
            raise ConfigError(f"kvcache_block_size must be >= 1, got {self.kvcache_block_size}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ConfigError(f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}")
        if not 1 <= self.tensor_parallel_size <= 8:
            raise ConfigError(f"tensor_parallel_size must be in 1..8, got {self.tensor_parallel_size}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_seqs and max_num_batched_tokens must be >= 1")
        tp, hf = self.tensor_parallel_size, self.hf_config
        for key in ("num_attention_heads", "num_key_value_heads"):
            if hf.get(key) and hf[key] % tp:
                raise ConfigError(f"tensor_parallel_size={tp} does not divide {key}={hf[key]}")
        hf_max = self.hf_config.get("max_position_embeddings")
        if hf_max:
            self.max_model_len = min(self.max_model_len, hf_max)
        self.eos_token_ids = sorted(_eos_ids(self.hf_config) | _eos_ids(_read_json(self.model, "generation_config.json")))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def _read_json(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _eos_ids(cfg: dict) -> set[int]:
    eos = cfg.get("eos_token_id")
    return {e for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
