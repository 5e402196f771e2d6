"""The compiled CPU XNOR-popcount convolution (``xnor_cpu.c``), built at first use.

The C source is compiled with the machine's C compiler (``cc``, or ``$CC``) at ``-O3
-march=native`` into a cache folder (``$BNNCTL_KERNEL_CACHE``, else ``~/.cache/bnnctl/kernels``),
keyed by the source, the flags and the machine, and loaded with ctypes; with ``-fopenmp`` where the
compiler has it, then output rows are shared among ``torch.get_num_threads()`` threads (the libgomp
that torch loaded serves both). Inputs are validated here, before any launch. Without a compiler,
:func:`available` is False and callers fall back to the float emulation.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .packing import words_for

SOURCE = Path(__file__).with_name("xnor_cpu.c")
#: -ffp-contract=off: no fused multiply-adds where the float emulation rounds twice (bit-exact epilogues)
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c99", "-ffp-contract=off")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _cache_dir() -> Path:
    root = os.environ.get("BNNCTL_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "bnnctl" / "kernels"


def _compile(compiler: str, flags: tuple[str, ...]) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(flags).encode() + platform.machine().encode()
                         + platform.node().encode() + compiler.encode()).hexdigest()[:16]
    target = _cache_dir() / f"xnor_cpu-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE)], check=True, capture_output=True, text=True)
            os.replace(tmp, target)
        except subprocess.CalledProcessError as err:
            Path(tmp).unlink(missing_ok=True)
            raise RuntimeError(f"compiling {SOURCE.name} failed: {err.stderr.strip()[:500]}") from None
    return target


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    try:  # with OpenMP where the compiler has it (torch has loaded its libgomp already: one runtime)
        target = _compile(compiler, FLAGS + ("-fopenmp",))
    except RuntimeError:
        target = _compile(compiler, FLAGS)
    lib = ctypes.CDLL(str(target))
    ptr = ctypes.c_void_p
    lib.bnn_pack_weight.argtypes = [ptr] + [ctypes.c_int64] * 6 + [ptr, ptr]
    lib.bnn_pack_weight.restype = None
    lib.bnn_xnor_conv_nchw.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int, ctypes.c_int]
    lib.bnn_xnor_conv_nchw.restype = ctypes.c_int
    lib.bnn_fused_conv.argtypes = [ptr] * 6 + [ctypes.POINTER(Epilogue), ptr, ctypes.c_int, ctypes.c_int]
    lib.bnn_fused_conv.restype = ctypes.c_int
    lib.bnn_max_pool2d.argtypes = [ptr, ptr] + [ctypes.c_int64] * 8 + [ctypes.c_int]
    lib.bnn_max_pool2d.restype = ctypes.c_int
    lib.bnn_upsample2x_add.argtypes = [ptr, ptr, ptr] + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.bnn_upsample2x_add.restype = None
    for f in (lib.bnn_has_avx512, lib.bnn_has_openmp, lib.bnn_out_block, lib.bnn_pixel_block):
        f.argtypes = []
        f.restype = ctypes.c_int
    if lib.bnn_pixel_block() != PIXEL_BLOCK or lib.bnn_has_avx512() not in (0, 1):
        raise RuntimeError(f"{target.name} does not match cpu.py (pixel block {lib.bnn_pixel_block()})")
    return lib


def library() -> ctypes.CDLL:
    """The compiled kernel library (built on first call). Raises RuntimeError if it cannot be built."""
    global _lib, _error
    with _lock:
        if _lib is None and _error is None:
            try:
                _lib = _build()
            except (RuntimeError, OSError) as err:
                _error = str(err)
        if _lib is None:
            raise RuntimeError(f"the CPU XNOR kernel is unavailable: {_error}")
        return _lib


def available() -> bool:
    try:
        library()
        return True
    except RuntimeError:
        return False


def vector_popcount() -> bool:
    """Whether the compiled kernel uses AVX-512 vector popcounts on this machine."""
    return bool(library().bnn_has_avx512())


def multithreaded() -> bool:
    """Whether the compiled kernel shares its work among torch.get_num_threads() threads (OpenMP)."""
    return bool(library().bnn_has_openmp())


class Epilogue(ctypes.Structure):
    """``epilogue`` in xnor_cpu.c: what is done with each output value (see there)."""

    _fields_ = [("alpha", ctypes.c_void_p), ("slope", ctypes.c_void_p), ("act", ctypes.c_int64),
                ("y", ctypes.c_void_p), ("y_stride", ctypes.c_int64), ("res", ctypes.c_void_p),
                ("gate", ctypes.c_void_p), ("packed", ctypes.c_void_p), ("p_hp", ctypes.c_int64),
                ("p_cw", ctypes.c_int64), ("p_wp", ctypes.c_int64), ("p_pad", ctypes.c_int64),
                ("pthresh", ctypes.c_void_p), ("pflip", ctypes.c_void_p)]


#: MAX_TAPS and PX in xnor_cpu.c.
MAX_TAPS = 64
PIXEL_BLOCK = 8


@dataclass(frozen=True)
class PackedWeight:
    """Weights packed for the CPU kernel: (KH*KW, CW, OP) words, OP = O rounded up to the kernel's
    output block, and the per-tap popcounts used to correct taps that fall in the zero padding."""

    words: Tensor
    popcounts: Tensor
    shape: tuple[int, int, int, int]


def pack_weight(w: Tensor) -> PackedWeight:
    """Pack the signs of an (O, C, KH, KW) weight for :func:`xnor_conv2d` (cache it when reused)."""
    lib = library()
    w = w.detach().to(torch.float32).contiguous().cpu()
    o, c, kh, kw = w.shape
    block = lib.bnn_out_block()
    op = -(-o // block) * block
    words = torch.empty((kh * kw, words_for(c), op), dtype=torch.int64)
    pops = torch.empty((kh * kw, op), dtype=torch.int64)
    lib.bnn_pack_weight(w.data_ptr(), o, c, kh, kw, words_for(c), op, words.data_ptr(), pops.data_ptr())
    return PackedWeight(words, pops, (o, c, kh, kw))


def check_operands(x: Tensor, w_shape: tuple[int, ...], alpha: Tensor | None, stride: int, padding: int) -> tuple[int, int]:
    """Validate before launch; returns the output size (OH, OW)."""
    if x.dim() != 4 or len(w_shape) != 4:
        raise ValueError(f"expected 4-d input and weight, got {tuple(x.shape)} and {tuple(w_shape)}")
    if x.shape[1] != w_shape[1]:
        raise ValueError(f"input has {x.shape[1]} channels but the weight expects {w_shape[1]} (groups=1 only)")
    if stride < 1 or padding < 0:
        raise ValueError(f"stride must be >= 1 and padding >= 0, got {stride}, {padding}")
    if w_shape[2] * w_shape[3] > MAX_TAPS:
        raise ValueError(f"kernels up to {MAX_TAPS} taps (8x8) are supported, got {tuple(w_shape[2:])}")
    if alpha is not None and alpha.numel() != w_shape[0]:
        raise ValueError(f"alpha has {alpha.numel()} values for {w_shape[0]} output channels")
    oh = (x.shape[2] + 2 * padding - w_shape[2]) // stride + 1
    ow = (x.shape[3] + 2 * padding - w_shape[3]) // stride + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"the kernel {tuple(w_shape[2:])} does not fit the padded input {tuple(x.shape[2:])}")
    return oh, ow


def row_words(width: int, padding: int, out_width: int, stride: int, kw: int) -> int:
    """Words per row of the kernel's padded input layout (room for whole pixel vectors)."""
    return max(width + 2 * padding, -(-out_width // PIXEL_BLOCK) * PIXEL_BLOCK * stride + kw + 16)


def xnor_conv2d(x: Tensor, w: Tensor | PackedWeight, alpha: Tensor | None = None, stride: int = 1,
                padding: int = 0, portable: bool = False) -> Tensor:
    """F.conv2d(sign(x), sign(w), stride=stride, padding=padding) * alpha, bit-exact, on the CPU.

    Args:
        x: (N, C, H, W) float32 on the CPU; only its signs are used (x >= 0 is +1).
        w: (O, C, KH, KW) float32 (only its signs are used), or its :func:`pack_weight`.
        alpha: (O,) per-output-channel scale, or None.
        portable: use the scalar kernel even where the vector one exists (tests compare both).
    """
    lib = library()
    packed = w if isinstance(w, PackedWeight) else pack_weight(w)
    oh, ow = check_operands(x, packed.shape, alpha, stride, padding)
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise ValueError("the CPU kernel takes a float32 input on the CPU")
    n, c, h, wd = x.shape
    o, _, kh, kw = packed.shape
    width = row_words(wd, padding, ow, stride, kw)
    a = None if alpha is None else alpha.detach().to(torch.float32).contiguous().cpu()
    x = x.detach().contiguous()
    y = torch.empty((n, o, oh, ow), dtype=torch.float32)
    geometry = array("q", (n, c, h, wd, words_for(c), o, packed.words.shape[2], kh, kw, stride, padding, width, oh, ow))
    status = lib.bnn_xnor_conv_nchw(x.data_ptr(), packed.words.data_ptr(), packed.popcounts.data_ptr(),
                                    None if a is None else a.data_ptr(), y.data_ptr(), geometry.buffer_info()[0],
                                    int(portable), torch.get_num_threads())
    if status != 0:
        raise MemoryError("the CPU XNOR kernel could not allocate its scratch memory")
    return y


# --------------------------------------------------------------------------- fused inference

ACT_NONE, ACT_RELU, ACT_SLOPE = 0, 1, 2


@dataclass(frozen=True)
class Thresholds:
    """Per-channel sign decision of a binary layer's input: bit = x >= value, or x <= value where
    ``flip`` (a BatchNorm with a negative scale); float32 and uint8 tensors of the channel count."""

    value: Tensor
    flip: Tensor


@dataclass(frozen=True)
class PackedInput:
    """A binary convolution's input already packed in the kernel's layout (N, H + 2 pad, CW, WP),
    written by the previous convolution's epilogue; ``shape`` is the (N, C, H, W) it stands for."""

    words: Tensor
    shape: tuple[int, int, int, int]
    padding: int
    row_words: int


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def output_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


class ConvPlan:
    """One binary convolution prepared for repeated fused calls on inputs of one shape: the
    geometry and the per-channel parts (input thresholds, alpha, activation) are fixed here, the
    buffers are given per call (see :meth:`run`). The kernel does everything around the convolution
    in its pass over the output (see ``epilogue`` in xnor_cpu.c); results equal the float
    emulation's, operation by operation.

    Args:
        shape: the input's (N, C, H, W).
        w: the packed weight; stride, padding: as F.conv2d.
        thresholds: the input bit of channel c is ``x >= t[c]`` (``<=`` where flipped); None: x >= 0.
        alpha: (O,) per-output-channel scale or None; act: ACT_NONE, ACT_RELU or ACT_SLOPE with
            ``slope`` (O,): v > 0 ? v : slope[o] * v.
    """

    def __init__(self, shape: tuple[int, int, int, int], w: PackedWeight, stride: int, padding: int, *,
                 thresholds: Thresholds | None = None, alpha: Tensor | None = None, act: int = ACT_NONE,
                 slope: Tensor | None = None) -> None:
        n, c, h, wd = shape
        oh, ow = check_operands(torch.empty((1, c, h, wd), device="meta"), w.shape, alpha, stride, padding)
        o, _, kh, kw = w.shape
        if act == ACT_SLOPE and (slope is None or slope.numel() != o):
            raise ValueError(f"the activation needs {o} slopes")
        self.shape, self.out_shape = tuple(shape), (n, o, oh, ow)
        self.weight, self.stride, self.padding = w, stride, padding
        self.row_words = row_words(wd, padding, ow, stride, kw)
        self.thresholds = thresholds
        self._keep = (alpha, slope)  # the kernel reads them through pointers
        self._geometry = array("q", (n, c, h, wd, words_for(c), o, w.words.shape[2], kh, kw, stride, padding,
                                     self.row_words, oh, ow))
        self._alpha, self._slope, self._act = _ptr(alpha), _ptr(slope), act
        self._thresh = None if thresholds is None else thresholds.value.data_ptr()
        self._flip = None if thresholds is None else thresholds.flip.data_ptr()

    def packed_input(self) -> PackedInput:
        """A zeroed packed input for this convolution, for the previous one's epilogue to fill."""
        n, c, h, _ = self.shape
        words = torch.zeros((n, h + 2 * self.padding, words_for(c), self.row_words), dtype=torch.int64)
        return PackedInput(words, self.shape, self.padding, self.row_words)

    def run(self, x: Tensor | PackedInput, out: Tensor | None = None, res: Tensor | None = None,
            gate: Tensor | None = None, packed_out: PackedInput | None = None,
            out_thresholds: Thresholds | None = None, portable: bool = False) -> None:
        """Convolve ``x`` (float32 NCHW of the planned shape, or the :meth:`packed_input` the previous
        epilogue filled). Each output value is optionally written as the next binary conv's input bit
        into ``packed_out`` (decided by ``out_thresholds``) and optionally stored into ``out`` (a
        float32 (N, O, OH, OW) view with contiguous channels, e.g. channels of a larger tensor) as
        v + res * gate[o], ``res`` laid out as ``out``."""
        if isinstance(x, PackedInput):
            if x.shape != self.shape or x.row_words != self.row_words or x.padding != self.padding:
                raise ValueError("the packed input was laid out for another convolution")
            xp, x_ptr = x.words.data_ptr(), None
        else:
            if tuple(x.shape) != self.shape or x.dtype != torch.float32 or x.device.type != "cpu":
                raise ValueError(f"expected a float32 CPU input of shape {self.shape}, got {x.dtype} {tuple(x.shape)}")
            x = x.contiguous()
            xp, x_ptr = None, x.data_ptr()
        ep = Epilogue(alpha=self._alpha, slope=self._slope, act=self._act, gate=_ptr(gate))
        _, o, oh, ow = self.out_shape
        if out is not None:
            if tuple(out.shape) != self.out_shape or out.stride()[1:] != (oh * ow, ow, 1) or out.dtype != torch.float32:
                raise ValueError(f"out must be a float32 {self.out_shape} view with contiguous channels")
            if res is not None and (res.shape != out.shape or res.stride() != out.stride()):
                raise ValueError("res must have the shape and strides of out")
            ep.y, ep.y_stride, ep.res = out.data_ptr(), out.stride()[0], _ptr(res)
        if packed_out is not None:
            if out_thresholds is None or packed_out.shape != self.out_shape:
                raise ValueError(f"packed_out must stand for {self.out_shape} and needs thresholds")
            ep.packed, ep.p_hp, ep.p_cw, ep.p_wp, ep.p_pad = (packed_out.words.data_ptr(), oh + 2 * packed_out.padding,
                                                              packed_out.words.shape[2], packed_out.row_words,
                                                              packed_out.padding)
            ep.pthresh, ep.pflip = out_thresholds.value.data_ptr(), out_thresholds.flip.data_ptr()
        status = library().bnn_fused_conv(x_ptr, self._thresh, self._flip, xp, self.weight.words.data_ptr(),
                                          self.weight.popcounts.data_ptr(), ctypes.byref(ep),
                                          self._geometry.buffer_info()[0], int(portable), torch.get_num_threads())
        if status != 0:
            raise MemoryError("the CPU XNOR kernel could not allocate its scratch memory")


def max_pool2d(x: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
    """F.max_pool2d(x, kernel, stride, padding) of a float32 NCHW CPU tensor (same values, NaN
    propagated), several times faster than PyTorch 2.13's one-thread kernel."""
    if x.dim() != 4 or x.dtype != torch.float32 or x.device.type != "cpu" or padding * 2 > kernel:
        raise ValueError("max_pool2d takes a float32 NCHW CPU tensor and padding <= kernel / 2")
    n, c, h, w = x.shape
    oh, ow = output_size(h, kernel, stride, padding), output_size(w, kernel, stride, padding)
    if oh < 1 or ow < 1:
        raise ValueError(f"the window {kernel} does not fit the input {(h, w)}")
    x = x.contiguous()
    y = torch.empty((n, c, oh, ow))
    if library().bnn_max_pool2d(x.data_ptr(), y.data_ptr(), n * c, h, w, kernel, stride, padding, oh, ow,
                                torch.get_num_threads()) != 0:
        raise MemoryError("max_pool2d could not allocate its scratch memory")
    return y


def upsample2x_add(x: Tensor, skip: Tensor) -> Tensor:
    """F.interpolate(x, scale_factor=2, mode="nearest") + skip in one pass (the same sums)."""
    n, c, h, w = x.shape
    if tuple(skip.shape) != (n, c, 2 * h, 2 * w) or x.dtype != torch.float32 or skip.dtype != torch.float32 \
            or x.device.type != "cpu" or skip.device.type != "cpu":
        raise ValueError("upsample2x_add takes float32 CPU tensors, skip twice the size of x")
    x, skip = x.contiguous(), skip.contiguous()
    y = torch.empty_like(skip)
    library().bnn_upsample2x_add(x.data_ptr(), skip.data_ptr(), y.data_ptr(), n * c, h, w, torch.get_num_threads())
    return y
