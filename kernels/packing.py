"""Bit packing of ±1 tensors along the channel axis (the layout every kernel uses).

Bit ``c % B`` of word ``c // B`` (B = 32 or 64 bits) is 1 for +1 and 0 for -1, where +1 means
``x >= 0`` (sign(0) = +1, the convention of the binarizers). Bits past the channel count are 0.
Words are stored as int32 / int64 tensors holding the bit pattern.
"""
from __future__ import annotations

import torch
from torch import Tensor

WORD_DTYPES = {32: torch.int32, 64: torch.int64}


def words_for(channels: int, bits: int = 64) -> int:
    return (channels + bits - 1) // bits


def pack_bits(x: Tensor, bits: int = 64, dim: int = 1) -> Tensor:
    """Pack the signs of ``x`` along ``dim`` into words; that axis becomes the last one.

    (N, C, H, W) with dim=1 -> (N, H, W, ceil(C / bits)).
    """
    if bits not in WORD_DTYPES:
        raise ValueError(f"bits must be 32 or 64, got {bits}")
    moved = x.movedim(dim, -1)
    c = moved.shape[-1]
    nwords = words_for(c, bits)
    positive = (moved >= 0).to(torch.int64)
    pad = nwords * bits - c
    if pad:
        positive = torch.nn.functional.pad(positive, (0, pad))
    positive = positive.reshape(*moved.shape[:-1], nwords, bits)
    weights = torch.ones(bits, dtype=torch.int64, device=x.device).bitwise_left_shift(
        torch.arange(bits, dtype=torch.int64, device=x.device))
    # the sum of distinct powers of two is exact in int64 (bit 63 wraps to the sign bit, as intended)
    packed = (positive * weights).sum(dim=-1)
    return packed.to(WORD_DTYPES[bits]) if bits == 32 else packed


def unpack_bits(packed: Tensor, channels: int, bits: int = 64, dim: int = 1) -> Tensor:
    """Inverse of :func:`pack_bits`: ±1 float32 tensor with the channel axis back at ``dim``."""
    shifts = torch.arange(bits, dtype=torch.int64, device=packed.device)
    values = packed.to(torch.int64).unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and(1)
    values = values.reshape(*packed.shape[:-1], -1)[..., :channels]
    return (values.to(torch.float32) * 2 - 1).movedim(-1, dim)
