"""The CuPy XNOR-popcount convolution (``xnor_cuda.cu``), for CUDA tensors.

The CUDA source is compiled lazily by CuPy's RawModule and cached per device; kernels are launched
on PyTorch's current stream, and tensors cross between torch and CuPy through DLPack without
copies. Inputs are validated before launch.

Status: written and compiled by nvcc for sm_80 and sm_90 in the tests (where nvcc exists), but not
yet run on a GPU by this project: treat the GPU path as unverified until its tests have passed on
one. The 1-bit tensor-core (``mma.sync`` b1) path is not written yet.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .cpu import check_operands
from .packing import words_for

SOURCE = Path(__file__).with_name("xnor_cuda.cu")
THREADS = 256
_modules: dict[int, object] = {}


def available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def _module(device: int):
    """The compiled module for ``device`` (compiled once per device)."""
    if device not in _modules:
        import cupy

        with cupy.cuda.Device(device):
            _modules[device] = cupy.RawModule(code=SOURCE.read_text(), options=("-std=c++14",))
    return _modules[device]


def _launch(name: str, total: int, args: tuple, device: int) -> None:
    import cupy

    kernel = _module(device).get_function(name)
    blocks = min(max((total + THREADS - 1) // THREADS, 1), 65535)
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)
    with cupy.cuda.Device(device), stream:
        kernel((blocks,), (THREADS,), args)


def _cp(t: Tensor):
    import cupy

    return cupy.from_dlpack(t)


def pack(x: Tensor) -> Tensor:
    """(N, C, H, W) CUDA tensor -> (N, H, W, CW) int32 words of its signs (32 channels per word)."""
    import numpy as np

    x = x.detach().to(torch.float32).contiguous()
    n, c, h, w = x.shape
    cw = words_for(c, 32)
    out = torch.empty((n, h, w, cw), dtype=torch.int32, device=x.device)
    _launch("bnn_pack_nchw", out.numel(),
            (_cp(x), _cp(out), np.int64(n), np.int64(c), np.int64(h), np.int64(w), np.int64(cw)), x.device.index or 0)
    return out


def xnor_conv2d(x: Tensor, w: Tensor, alpha: Tensor | None = None, stride: int = 1, padding: int = 0,
                packed_weight: Tensor | None = None) -> Tensor:
    """F.conv2d(sign(x), sign(w), stride, padding) * alpha on the GPU (float32 output)."""
    import numpy as np

    oh, ow = check_operands(x, tuple(w.shape), alpha, stride, padding)
    if not x.is_cuda or x.device != w.device:
        raise ValueError("the GPU kernel takes CUDA tensors on one device")
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = pack(x)
    wp = pack(w) if packed_weight is None else packed_weight
    y = torch.empty((n, o, oh, ow), dtype=torch.float32, device=x.device)
    a = (alpha.detach().to(torch.float32).contiguous() if alpha is not None
         else torch.ones(1, dtype=torch.float32, device=x.device))
    i64 = np.int64
    _launch("bnn_xnor_conv", y.numel(),
            (_cp(xp), _cp(wp), _cp(a), _cp(y), i64(n), i64(c), i64(h), i64(wd), i64(words_for(c, 32)), i64(o),
             i64(kh), i64(kw), i64(stride), i64(padding), i64(oh), i64(ow), np.int32(alpha is not None)),
            x.device.index or 0)
    return y
