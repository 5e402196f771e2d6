"""Binary convolution kernels (XNOR + popcount). Imports nothing of the project.

``xnor_conv2d(x, w, alpha, stride, padding)`` equals ``F.conv2d(sign(x), sign(w), stride=stride,
padding=padding) * alpha`` bit for bit (sign(0) = +1, zero padding contributes 0), computed from
bit-packed operands: a compiled popcount kernel on the CPU (``cpu.py``), CuPy raw kernels on CUDA
devices (``gpu.py``: CUDA-core popcount and 1-bit tensor-core methods, unverified on hardware so
far). ``packing.py`` holds the portable bit packing.
"""
from __future__ import annotations

from torch import Tensor

from .packing import pack_bits, unpack_bits, words_for

__all__ = ["available", "pack_bits", "pack_weight", "unpack_bits", "words_for", "xnor_conv2d"]


def available(device_type: str = "cpu") -> bool:
    """Whether an XNOR kernel can run on this kind of device here."""
    if device_type == "cuda":
        from . import gpu

        return gpu.available()
    from . import cpu

    return cpu.available()


def pack_weight(w: Tensor):
    """Pack a weight once for repeated :func:`xnor_conv2d` calls on its device."""
    if w.is_cuda:
        from . import gpu

        return gpu.pack_weight(w)
    from . import cpu

    return cpu.pack_weight(w)


def xnor_conv2d(x: Tensor, w: Tensor, alpha: Tensor | None = None, stride: int = 1, padding: int = 0,
                packed_weight=None) -> Tensor:
    """Binary convolution of the signs of ``x`` (N, C, H, W) and ``w`` (O, C, KH, KW), groups = 1,
    times the per-output-channel ``alpha``; float32 output on the input's device."""
    if x.is_cuda:
        from . import gpu

        return gpu.xnor_conv2d(x, w, alpha, stride, padding, packed_weight)
    from . import cpu

    return cpu.xnor_conv2d(x, w if packed_weight is None else packed_weight, alpha, stride, padding)
