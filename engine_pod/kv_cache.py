"""The paged KV cache's size and its one tensor, shared out to the attention layers."""

import torch
import torch.distributed as dist

from nanoserve.engine_pod.config import Config
from nanoserve.engine_pod.errors import ConfigError
from nanoserve.engine_pod.layers.attention import Attention
from nanoserve.kernels.attention_ref import keys_last


def block_bytes(config: Config, layers: list[Attention]) -> int:
    a, dtype_size = layers[0], torch.empty((), dtype=config.kv_torch_dtype).element_size()
    return 2 * len(layers) * config.kvcache_block_size * a.num_kv_heads * a.head_dim * dtype_size


def activation_estimate(config: Config, world: int) -> int:
    """Bytes a full step's activations may take: a generous multiple of the widest hidden state."""
    hf = config.hf_config
    width = max(hf["hidden_size"] * 4, hf["intermediate_size"] * 2 // world)
    if top_k := hf.get("num_experts_per_tok"):  # MoE: each token's k expert rows (gate_up, SiLU*up, down)
        inter = hf.get("moe_intermediate_size") or hf["intermediate_size"]
        width = max(width, top_k * (3 * inter // world + hf["hidden_size"]))
    dtype_size = torch.empty((), dtype=config.torch_dtype).element_size()
    return config.max_num_batched_tokens * width * dtype_size * 4


def num_blocks_that_fit(config: Config, layers: list[Attention], device: torch.device, world: int) -> int:
    """config.num_kvcache_blocks, or what the memory left after the weights holds (on GPU: under
    gpu_memory_utilization, after the activations of a full step); every rank agrees on the fewest."""
    if config.num_kvcache_blocks > 0:
        num_blocks = config.num_kvcache_blocks
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        stats = torch.cuda.memory_stats(device)
        peak, current = stats["allocated_bytes.all.peak"], stats["allocated_bytes.all.current"]
        budget = total * config.gpu_memory_utilization - (total - free) - activation_estimate(config, world)
        num_blocks = int(budget - (peak - current)) // block_bytes(config, layers)
    else:
        num_blocks = int(config.cpu_kvcache_gib * 2**30) // block_bytes(config, layers)
    if world > 1:
        t = torch.tensor([num_blocks], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        num_blocks = int(t.item())
    if num_blocks < 1:
        raise ConfigError("no memory left for the KV cache: raise gpu_memory_utilization or lower max_model_len")
    return num_blocks


def allocate_kv_cache(config: Config, layers: list[Attention], num_blocks: int, device: torch.device) -> torch.Tensor:
    """[k/v, layer, block, slot, kv head, head dim]; each layer gets views of its k and v. An fp8 cache's v is
    stored keys-last (each block [kv head, head dim, slot], seen through the same indexing), as its attention
    kernel reads it; it starts zeroed, so that a block's unused slots hold finite values."""
    a = layers[0]
    shape = (2, len(layers), num_blocks, config.kvcache_block_size, a.num_kv_heads, a.head_dim)
    fp8 = config.kv_torch_dtype == torch.float8_e4m3fn
    kv_cache = (torch.zeros if fp8 else torch.empty)(shape, dtype=config.kv_torch_dtype, device=device)
    for i, layer in enumerate(layers):
        layer.k_cache, layer.v_cache = kv_cache[0, i], keys_last(kv_cache[1, i]) if fp8 else kv_cache[1, i]
    return kv_cache
