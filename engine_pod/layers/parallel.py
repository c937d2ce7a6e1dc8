"""Tensor-parallel state of this process: rank, world size, and the collectives the layers need.

With one rank nothing here touches torch.distributed, so TP=1 engines need no process group.
"""

import torch
import torch.distributed as dist

_rank, _size = 0, 1


def set_tensor_parallel(rank: int, size: int) -> None:
    global _rank, _size
    _rank, _size = rank, size


def tp_rank() -> int:
    return _rank


def tp_size() -> int:
    return _size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _size > 1:
        dist.all_reduce(x)
    return x


def gather_to_rank0(x: torch.Tensor) -> torch.Tensor | None:
    """Concatenate every rank's `x` along the last dim on rank 0 (others get None).

    An all-gather rather than `dist.gather`: NCCL runs gather as point-to-point sends, a transport of its
    own, while all-gather uses the rings that the all-reduces already use (the extra copies are small:
    one row of logits per sampling sequence)."""
    if _size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, -1) if _rank == 0 else None


def divide(n: int, what: str) -> int:
    from nanoserve.engine_pod.errors import ConfigError

    if n % _size:
        raise ConfigError(f"tensor_parallel_size={_size} does not divide {what}={n}")
    return n // _size
