"""Programmatic dependent launch (Hopper and later): a kernel launched with it may start while the kernel
before it is still running, and waits (`gdc_wait`) before it reads anything that kernel writes.

Every Triton kernel of a decode step takes a `PDL` switch and, with it, waits first, then lets the next
kernel launch. In a CUDA graph of ~300 kernels that hides the ~1.3 us gap between nodes, and the GEMMs
pull their weights into L2 while the kernel before them finishes (kernels/gemm.py). A kernel that waits
only for the one before it still sees everything earlier: that one could not finish before its own wait.
"""
import functools

import torch
import triton
import triton.language as tl

ENABLED = True  # benchmarks switch it off to measure what it is worth


@functools.cache
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(t: torch.Tensor) -> bool:
    """Launch the kernels that work on `t` with programmatic dependent launch."""
    return ENABLED and t.is_cuda and _supported(t.device.index if t.device.index is not None else 0)


@triton.jit
def wait_then_release(PDL: tl.constexpr):
    """Start of a kernel: wait for the kernel before it, then let the next one launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
