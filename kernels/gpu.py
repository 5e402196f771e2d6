"""The CuPy XNOR-popcount convolution (``xnor_cuda.cu``), for CUDA tensors.

The CUDA source is compiled lazily by CuPy's RawModule and cached per device; kernels are launched
on PyTorch's current stream, and tensors cross between torch and CuPy through DLPack without
copies. Inputs are validated before launch.

Two methods give the same bits: ``"popc"`` (CUDA cores: XOR + popcount) and ``"mma"`` (1-bit tensor
cores, compute capability 8.0 and later: ``mma.sync`` m8n8k128 on b1 with AND + popcount and the
popcount correction, since XOR on b1 is gone from sm_90).

Status: both are compiled by nvcc for sm_80 and sm_90 in the tests (where nvcc exists), but have
not yet run on a GPU in this project: treat the GPU path as unverified until
``pytest tests/test_kernels.py -k gpu`` has passed on one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .cpu import check_operands

SOURCE = Path(__file__).with_name("xnor_cuda.cu")
THREADS = 256
METHODS = ("popc", "mma")
_modules: dict[int, object] = {}


def available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def tensor_cores(device: torch.device | int | None = None) -> bool:
    """Whether ``device`` has 1-bit tensor cores with AND (compute capability 8.0 or later)."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _module(device: int):
    """The compiled module for ``device`` (compiled once per device)."""
    if device not in _modules:
        import cupy

        with cupy.cuda.Device(device):
            _modules[device] = cupy.RawModule(code=SOURCE.read_text(), options=("-std=c++14",))
    return _modules[device]


def _launch(name: str, grid: tuple[int, ...], block: int, args: tuple, device: int) -> None:
    """Run kernel ``name`` on PyTorch's current stream; tensors in ``args`` go over as CuPy arrays
    (DLPack, no copy), numpy scalars as they are. (The tests replace this with a host emulation.)"""
    import cupy

    kernel = _module(device).get_function(name)
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)
    with cupy.cuda.Device(device), stream:
        kernel(grid, (block,), tuple(cupy.from_dlpack(a) if isinstance(a, Tensor) else a for a in args))


def _grid_1d(total: int) -> tuple[int]:
    return (min(max((total + THREADS - 1) // THREADS, 1), 65535),)


def _check_device(x: Tensor, w: Tensor) -> None:
    if not x.is_cuda or x.device != w.device:
        raise ValueError("the GPU kernel takes CUDA tensors on one device")


def _words(c: int, method: str) -> int:
    """32-bit words per pixel: C rounded up to 32 bits, or to 128 bits (one mma step) for "mma"."""
    return 4 * -(-c // 128) if method == "mma" else -(-c // 32)


@dataclass(frozen=True)
class PackedWeight:
    """Weights packed for one method: (OP, KH*KW, CWP) words, OP = O rounded up to 32, and the
    per-tap popcounts (KH*KW, OP)."""

    words: Tensor
    popcounts: Tensor
    shape: tuple[int, int, int, int]
    method: str


def pack_weight(w: Tensor, method: str = "popc") -> PackedWeight:
    """Pack the signs of an (O, C, KH, KW) CUDA weight for :func:`xnor_conv2d` (cache it when reused)."""
    import numpy as np

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    w = w.detach().to(torch.float32).contiguous()
    o, c, kh, kw = w.shape
    op, cwp, taps = -(-o // 32) * 32, _words(c, method), kh * kw
    words = torch.empty((op, taps, cwp), dtype=torch.int32, device=w.device)
    pops = torch.empty((taps, op), dtype=torch.int32, device=w.device)
    i64 = np.int64
    _launch("bnn_pack_weight", _grid_1d(op * taps), THREADS,
            (w, words, pops, i64(o), i64(op), i64(c), i64(taps), i64(cwp)), w.device.index or 0)
    return PackedWeight(words, pops, (o, c, kh, kw), method)


def pack(x: Tensor, padding: int, method: str = "popc", with_popcounts: bool = False):
    """(N, C, H, W) CUDA tensor -> (N, H+2p, W+2p, CWP) int32 words of its signs with a zero border,
    and (N, H+2p, W+2p) popcounts per pixel (or None)."""
    import numpy as np

    x = x.detach().to(torch.float32).contiguous()
    n, c, h, w = x.shape
    hp, wp, cwp = h + 2 * padding, w + 2 * padding, _words(c, method)
    out = torch.empty((n, hp, wp, cwp), dtype=torch.int32, device=x.device)
    pops = torch.empty((n, hp, wp) if with_popcounts else (1,), dtype=torch.int32, device=x.device)
    i64 = np.int64
    _launch("bnn_pack_padded", _grid_1d(n * hp * wp), THREADS,
            (x, out, pops, i64(n), i64(c), i64(h), i64(w), i64(padding), i64(cwp),
             np.int32(with_popcounts)), x.device.index or 0)
    return out, pops if with_popcounts else None


def xnor_conv2d(x: Tensor, w: Tensor, alpha: Tensor | None = None, stride: int = 1, padding: int = 0,
                packed_weight: PackedWeight | None = None, method: str | None = None) -> Tensor:
    """F.conv2d(sign(x), sign(w), stride, padding) * alpha on the GPU (float32 output).

    ``method``: "popc" (CUDA cores, the default) or "mma" (1-bit tensor cores, sm_80+); with a
    ``packed_weight`` its method is used."""
    import numpy as np

    if method is None:
        method = packed_weight.method if packed_weight is not None else "popc"
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    oh, ow = check_operands(x, tuple(w.shape), alpha, stride, padding)
    _check_device(x, w)
    if method == "mma" and not tensor_cores(x.device):
        raise ValueError("method 'mma' needs 1-bit tensor cores with AND (compute capability 8.0 or later)")
    if packed_weight is None or packed_weight.method != method:
        packed_weight = pack_weight(w, method)
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    op = packed_weight.words.shape[0]
    xq, xpop = pack(x, padding, method, with_popcounts=method == "mma")
    y = torch.empty((n, o, oh, ow), dtype=torch.float32, device=x.device)
    a = (alpha.detach().to(torch.float32).contiguous() if alpha is not None
         else torch.ones(1, dtype=torch.float32, device=x.device))
    i64 = np.int64
    dims = (i64(n), i64(c), i64(h), i64(wd), i64(xq.shape[3]), i64(o), i64(op), i64(kh), i64(kw), i64(stride),
            i64(padding), i64(oh), i64(ow), np.int32(alpha is not None))
    pixels = n * oh * ow
    device = x.device.index or 0
    if method == "popc":
        _launch("bnn_xnor_conv_popc", (-(-pixels // 32), -(-o // 64)), THREADS,
                (xq, packed_weight.words, packed_weight.popcounts, a, y, *dims), device)
    else:
        _launch("bnn_xnor_conv_mma", (-(-pixels // 64), -(-o // 64)), 128,
                (xq, xpop, packed_weight.words, packed_weight.popcounts,
                 a, y, *dims), device)
    return y
