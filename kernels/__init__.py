"""Kernels for the paged KV cache: Triton on GPU, plain-PyTorch references everywhere."""
