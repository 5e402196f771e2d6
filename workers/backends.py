"""Conv backends of the binary layers: how ``BinaryConv2d`` computes its linear operation.

- "float": the emulation, ``F.conv2d`` of the quantized operands times alpha.
- "xnor": the XNOR-popcount kernel (``kernels/``) wherever both operands are exactly ±1 and groups = 1
  (bit-identical to the emulation; the straight-through backward in float); the emulation elsewhere.
- "auto": the kernel where it is measured faster for the layer's shape and gave the same bits.

A backend is a :class:`ConvBackend` object registered in CONV_BACKENDS; the layers, :func:`fuse
<bnnctl.workers.fused.fuse>` and the glue read its properties (``kernel``, ``fuses``, ``exact``,
``verifies``), never its name. Adding a backend = registering one object here (or from any module:
``CONV_BACKENDS.register("name")(ConvBackend(...))``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Registry

if TYPE_CHECKING:
    from .layers import BinaryConv2d


#: A backend's operation computes the layer's linear operation from the quantized input ``x``, the
#: quantized weight ``w`` (±1 when the weights are binarized) and the per-output-channel ``alpha``
#: (or None). ``exact`` says both operands are exactly ±1, which is when an XNOR kernel may be used.
ConvOp = Callable[["BinaryConv2d", Tensor, Tensor, "Tensor | None", bool], Tensor]


def _always(layer: "BinaryConv2d", x: Tensor) -> bool:
    return True


@dataclass(frozen=True)
class ConvBackend:
    """How binary layers compute their convolution, as a registered object.

    Attributes:
        name: its name in specs (``model.backend``).
        op: the operation used in training and wherever nothing faster applies (see ConvOp).
        kernel: runs the XNOR-popcount kernel where both operands are exactly ±1 (groups = 1,
            float32, a kernel compiled for the device); in inference straight from the raw input's
            signs (:func:`xnor_from_raw`).
        fuses: :func:`~bnnctl.workers.fused.fuse` compiles its inference into whole-layer and
            whole-block kernel calls and faster exact pooling/upsampling.
        exact: its outputs are bit-identical to the float emulation ``F.conv2d(x, w) * alpha``
            (the property test_fused and test_kernels hold every exact backend to).
        verifies: compares each kernel path with the emulation once per shape (and after the
            parameters change) and keeps the emulation, with a warning, where they differ.
        chooses: ``(layer, raw input) -> bool``: whether the kernel is used for this layer and shape
            in inference (auto: where it was measured faster).
    """

    name: str
    op: ConvOp
    kernel: bool = False
    fuses: bool = False
    exact: bool = True
    verifies: bool = False
    chooses: Callable[["BinaryConv2d", Tensor], bool] = _always


CONV_BACKENDS: Registry[ConvBackend] = Registry("conv backend")


def scale_output(y: Tensor, alpha: Tensor | None) -> Tensor:
    if alpha is None:
        return y
    return y * alpha.view(1, -1, *([1] * (y.dim() - 2)))


def float_conv(layer: "BinaryConv2d", x: Tensor, w: Tensor, alpha: Tensor | None, exact: bool) -> Tensor:
    """The float emulation: F.conv2d(x, w) * alpha. Zero padding contributes 0 to the sum."""
    return scale_output(F.conv2d(x, w, None, layer.stride, layer.padding, 1, layer.groups), alpha)


class _XnorConvFunction(torch.autograd.Function):
    """Forward: the XNOR-popcount kernel on exactly binary operands (bit-identical to F.conv2d of
    them). Backward: F.conv2d's gradients in float, i.e. the straight-through estimator continues
    upstream exactly as with the float backend."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, stride: int, padding: int, packed) -> Tensor:  # type: ignore[override]
        from bnnctl import kernels

        ctx.save_for_backward(x, w)
        ctx.stride, ctx.padding = stride, padding
        return kernels.xnor_conv2d(x, w, None, stride, padding, packed).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch.nn.grad.conv2d_input(x.shape, w, grad, ctx.stride, ctx.padding)
        if ctx.needs_input_grad[1]:
            gw = torch.nn.grad.conv2d_weight(x, w.shape, grad, ctx.stride, ctx.padding)
        return gx, gw, None, None, None


def _xnor_possible(layer: "BinaryConv2d", x: Tensor, exact: bool) -> bool:
    if not exact or layer.groups != 1 or x.dim() != 4 or x.dtype != torch.float32:
        return False
    from bnnctl import kernels

    return kernels.available(x.device.type)


def kept(owner: object, attr: str, key: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()``, kept on ``owner`` (attribute ``attr``, beside its key) and reused while the
    key is unchanged: what inference derives from a module's parameters (packed weights, alphas,
    thresholds, plans), keyed by :func:`version_key` of the tensors it was derived from."""
    cached = getattr(owner, attr, None)
    if cached is None or cached[0] != key:
        cached = (key, compute())
        object.__setattr__(owner, attr, cached)  # a plain attribute, even on an nn.Module
    return cached[1]


def version_key(*tensors: Tensor | None) -> tuple:
    """Changes whenever one of ``tensors`` is replaced or written in place (PyTorch's version
    counter counts in-place writes, ``load_state_dict`` and optimizer steps included)."""
    return tuple((None, None) if t is None else (t.data_ptr(), t._version) for t in tensors)


def _kept_while_weight_unchanged(layer: "BinaryConv2d", attr: str, extra: tuple, compute: Callable[[], Any]) -> Any:
    """:func:`kept` while the layer's stored dense weight is unchanged and no gradients are wanted
    (inference); computed afresh otherwise."""
    stored = layer.stored_weight()
    if torch.is_grad_enabled() or stored is None:
        return compute()
    return kept(layer, attr, version_key(stored) + extra, compute)


def packed_weight(layer: "BinaryConv2d", w: Tensor):
    """Pack the binary weight, reusing the packing while the stored weight is unchanged (inference)."""
    from bnnctl import kernels

    return _kept_while_weight_unchanged(layer, "_xnor_packed", (w.device, layer.weight_quantizer.kind),
                                        lambda: kernels.pack_weight(w))


def xnor_conv(layer: "BinaryConv2d", x: Tensor, w: Tensor, alpha: Tensor | None, exact: bool) -> Tensor:
    """The XNOR kernel whenever both operands are exactly ±1 (eval, or training with plain sign) and
    groups = 1; the float emulation otherwise. Outputs are bit-identical to the float backend."""
    if not _xnor_possible(layer, x, exact):
        return float_conv(layer, x, w, alpha, exact)
    y = _XnorConvFunction.apply(x, w, layer.stride, layer.padding, packed_weight(layer, w))
    return scale_output(y, alpha)


#: (device type, input shape, weight shape, stride, padding) -> whether XNOR was faster.
_AUTO_CHOICE: dict[tuple, bool] = {}
AUTO_REPEATS = 3


def _time(fn: Callable[[], Tensor], sync: Callable[[], None]) -> float:
    import time

    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(AUTO_REPEATS):
        fn()
    sync()
    return time.perf_counter() - t0


def _auto_key(layer: "BinaryConv2d", x: Tensor) -> tuple:
    return (x.device.type, tuple(x.shape), tuple(layer.weight_shape), layer.stride, layer.padding)


def auto_conv(layer: "BinaryConv2d", x: Tensor, w: Tensor, alpha: Tensor | None, exact: bool) -> Tensor:
    """XNOR where it is measured faster than the float emulation for this layer shape (timed once
    per shape and device) and gave the same bits on that measurement's input; the float emulation
    elsewhere. The outputs are identical either way."""
    if not _xnor_possible(layer, x, exact):
        return float_conv(layer, x, w, alpha, exact)
    key = _auto_key(layer, x)
    if key not in _AUTO_CHOICE:
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        with torch.no_grad():
            xd, wd = x.detach(), w.detach()
            t_float = _time(lambda: F.conv2d(xd, wd, None, layer.stride, layer.padding), sync)
            packed = packed_weight(layer, wd)
            from bnnctl import kernels

            t_xnor = _time(lambda: kernels.xnor_conv2d(xd, wd, None, layer.stride, layer.padding, packed), sync)
            same = torch.equal(kernels.xnor_conv2d(xd, wd, None, layer.stride, layer.padding, packed),
                               F.conv2d(xd, wd, None, layer.stride, layer.padding))
        if not same:
            warnings.warn(f"the XNOR kernel on {x.device.type} disagreed with the float emulation for input "
                          f"{tuple(x.shape)} and weight {tuple(w.shape)}; backend 'auto' uses the float "
                          f"emulation there", RuntimeWarning, stacklevel=2)
        _AUTO_CHOICE[key] = same and t_xnor < t_float
    if _AUTO_CHOICE[key]:
        return xnor_conv(layer, x, w, alpha, exact)
    return float_conv(layer, x, w, alpha, exact)


def xnor_from_raw(layer: "BinaryConv2d", x: Tensor) -> Tensor | None:
    """Inference fast path of the "xnor" and "auto" backends: the kernel takes the signs of the raw
    input and the latent weight itself (x >= 0 is +1, exactly as the sign quantizer) and applies
    alpha, so evaluation skips materializing sign(x), sign(W) and the scaled product. Same bits as
    the float emulation. None where it does not apply (gradients wanted, operands not exactly binary,
    groups > 1, no kernel, or auto has not chosen the kernel for this shape)."""
    backend = layer.conv_backend
    if not backend.kernel or torch.is_grad_enabled() or not layer.exact_binary() or layer.groups != 1 \
            or x.dim() != 4 or x.dtype != torch.float32 or not backend.chooses(layer, x):
        return None
    from bnnctl import kernels

    if not kernels.available(x.device.type):
        return None
    latent = layer.latent_weight()
    return kernels.xnor_conv2d(x, latent, inference_alpha(layer, latent), layer.stride, layer.padding,
                               packed_weight(layer, latent))


def inference_alpha(layer: "BinaryConv2d", latent: Tensor) -> Tensor | None:
    """alpha for inference; the analytic one (mean |W| per output channel) is kept while the stored
    weight is unchanged, like the packed weight."""
    assert layer.alpha is not None
    if not layer.alpha.kind.analytic:
        return layer.alpha(latent)
    return _kept_while_weight_unchanged(layer, "_xnor_alpha", (latent.device,), lambda: layer.alpha(latent))


def _auto_chose_kernel(layer: "BinaryConv2d", x: Tensor) -> bool:
    return bool(_AUTO_CHOICE.get(_auto_key(layer, x)))


CONV_BACKENDS.register("float")(ConvBackend("float", float_conv))
CONV_BACKENDS.register("xnor")(ConvBackend("xnor", xnor_conv, kernel=True, fuses=True))
CONV_BACKENDS.register("auto")(ConvBackend("auto", auto_conv, kernel=True, fuses=True, verifies=True,
                                           chooses=_auto_chose_kernel))
