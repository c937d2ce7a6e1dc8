"""MXFP4 weights (OCP microscaling FP4), as gpt-oss publishes its experts: dequantized at load.

A checkpoint tensor `X` is stored as `X_blocks` (uint8 [..., rows, groups, 16]: 32 FP4 e2m1 codes of one row
per group, two per byte, the low nibble first) and `X_scales` (uint8 [..., rows, groups]: one power-of-two
scale per group, e8m0, biased by 127). Value = FP4_VALUES[code] * 2 ** (scale - 127).
"""

import torch

# e2m1: sign, two exponent bits, one mantissa bit.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., rows, groups, 16] codes and [..., rows, groups] scales -> [..., rows, groups * 32] of `dtype`.
    One leading index at a time, so that the int64 code indices never span a whole layer."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} and scales {tuple(scales.shape)} {scales.dtype} "
            "do not go together (uint8 [..., rows, groups, 16] and [..., rows, groups])"
        )
    if blocks.dim() > 3:
        return torch.stack([dequantize_mxfp4(b, s, dtype) for b, s in zip(blocks, scales)])
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).long()  # [rows, groups, 16, 2]: low nibble first
    values = lut[codes].flatten(-3)  # [rows, groups * 32]: exact in float32
    exponent = (scales.int() - 127).repeat_interleave(32, dim=-1)
    return torch.ldexp(values, exponent.float()).to(dtype)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, for tests and benchmarks that need a checkpoint in the published format: [..., rows, K]
    (K a multiple of 32) -> (blocks, scales), each group scaled so that its largest value fits 6 and every value
    rounded to the nearest code."""
    *lead, rows, k = w.shape
    groups = w.float().reshape(*lead, rows, k // 32, 32)
    amax = groups.abs().amax(-1).clamp(min=2.0**-126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = groups / torch.ldexp(torch.ones_like(amax), exponent.int())[..., None]
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = (scaled[..., None] - lut).abs().argmin(-1).to(torch.uint8)  # [..., groups, 32]
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, (exponent + 127).to(torch.uint8)
