"""Fused binary inference on the CPU: whole binary layers and residual blocks in the XNOR kernel.

In evaluation (no gradients, eval mode) with backend "xnor" or "auto", a binary layer's
BatchNorm -> sign -> binary conv -> alpha -> activation runs as one kernel call, and a residual block
as one call per convolution:

- BatchNorm followed by sign is a per-channel comparison ``x >= t`` (``x <= t`` where the BatchNorm
  scale is negative, a constant where it is zero), done while the kernel packs its input. The
  threshold ``t`` is found by bisection over the float32 values *through the BatchNorm module
  itself* (:func:`sign_thresholds`), so it reproduces PyTorch's rounding bit for bit instead of
  trusting ``-beta / gamma`` algebra.
- Inside a block, a convolution whose output only feeds the next convolution writes that
  convolution's *packed* input directly (its BatchNorm + sign folded into thresholds on the output
  values): no float map between them (basic, bottleneck). The HPM block's three outputs also feed
  the concatenation, so each convolution writes its float channels straight into its slice of the
  block's output and the next convolution's packed bits in the same pass: no ``torch.cat``.
- The residual sum ``out + skip * gate`` is applied once, where the output value is written.
- Per-channel modules before a block whose input only binary layers read (the hourglass stem's
  BatchNorm and ReLU) fold into those layers' thresholds too (:func:`prefixed_block`); binary linear
  layers run as 1x1 convolutions; max-pooling and nearest upsampling + sum take compiled exact forms
  (:class:`MaxPool2d`, :func:`upsample_add`).

Every step is the float emulation's operation in its order and precision (alpha product, then the
activation, then the gated sum), so outputs are identical to ``backend: float`` (tests/workers/test_fused.py
holds every model family to that). Anything else -- training, gradients, inexact quantizers,
grouped convolutions, CUDA tensors, no compiled kernel -- takes the layer-by-layer path.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .backends import inference_alpha, kept, packed_weight, version_key
from .layers import BinaryConv2d, BinaryLinear

#: kernels.cpu activation codes by activation module type.
_NONE, _RELU, _SLOPE = 0, 1, 2
FLOAT_MAX = torch.finfo(torch.float32).max
#: The image size of the calibration tensor: long enough for the vectorized BatchNorm path.
_CALIBRATION_WIDTH = 16


def _state(module: nn.Module, out: list | None = None) -> list:
    """Every parameter and buffer of ``module`` and its children (what ``parameters()`` and
    ``buffers()`` give, a third of the time: this runs for every layer of every fused forward)."""
    out = [] if out is None else out
    out.extend(module._parameters.values())
    out.extend(module._buffers.values())
    for child in module._modules.values():
        if child is not None:
            _state(child, out)
    return out


# --------------------------------------------------------------------------- BatchNorm + sign


def _ordered(values: Tensor) -> Tensor:
    """float32 -> int64 keys in the order of the values (-0.0 and +0.0 share 0)."""
    bits = values.view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def _from_ordered(keys: Tensor) -> Tensor:
    bits = torch.where(keys >= 0, keys, (-keys) | 0x80000000)
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def _decides(chain: tuple[nn.Module, ...], values: Tensor, width: int = _CALIBRATION_WIDTH) -> Tensor:
    """chain(x) >= 0 for x = values[c] in channel c, computed by the modules themselves (eval mode;
    per-channel operations: BatchNorm, ReLU), at ``width`` positions per channel (BatchNorm1d: a batch
    of ``width`` rows)."""
    c = values.numel()
    one_d = isinstance(chain[-1], nn.BatchNorm1d)
    y = values.view(1, c).expand(width, c) if one_d else values.view(1, c, 1, 1).expand(1, c, width, 1)
    y = y.contiguous()
    for module in chain:
        y = module(y)
    y = (y >= 0).t().reshape(1, c, width) if one_d else (y >= 0).view(1, c, width)
    if not bool((y == y[:, :, :1]).all()):  # pragma: no cover - BatchNorm rounding differently per position
        raise ArithmeticError("BatchNorm gave different signs for one value at different positions")
    return y[0, :, 0]


def _calibrate(chain: tuple[nn.Module, ...]):
    from bnnctl.kernels.cpu import Thresholds

    c = chain[-1].num_features
    lo_val, hi_val = torch.full((c,), -FLOAT_MAX), torch.full((c,), FLOAT_MAX)
    at_lo, at_hi = _decides(chain, lo_val), _decides(chain, hi_val)
    increasing = ~at_lo & at_hi  # else decreasing (at_lo & ~at_hi) or constant (at_lo == at_hi)
    lo, hi = _ordered(lo_val), _ordered(hi_val)
    # invariant: the decision differs between lo and hi (for non-constant channels)
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        decided = _decides(chain, _from_ordered(mid))
        go_down = decided == increasing  # increasing: true at mid -> the boundary is below
        hi = torch.where(go_down, mid, hi)
        lo = torch.where(go_down, lo, mid)
    # increasing: the smallest true value is hi; decreasing: the largest true value is lo
    value = torch.where(increasing, _from_ordered(hi), _from_ordered(lo))
    flip = ~increasing
    constant = at_lo == at_hi
    value = torch.where(constant, torch.tensor(-float("inf")), value)
    flip = torch.where(constant, ~at_lo, flip)  # always true: x >= -inf; never: x <= -inf
    thresholds = Thresholds(value.contiguous(), flip.to(torch.uint8).contiguous())
    # the decision at the threshold and just beyond it, in the scalar BatchNorm path too
    for width in (1, _CALIBRATION_WIDTH):
        check = _decides(chain, value, width)
        beyond = _decides(chain, torch.nextafter(value, torch.where(flip.bool(), hi_val, lo_val)), width)
        if not bool((check | constant).all()) or bool((beyond & ~constant).any()):  # pragma: no cover
            raise ArithmeticError("BatchNorm's sign is not monotone in its input")
    return thresholds


def sign_thresholds(bn: nn.Module, prefix: tuple[nn.Module, ...] = ()):
    """The per-channel :class:`~bnnctl.kernels.cpu.Thresholds` with ``x >= t`` (or ``x <= t``)
    exactly where ``bn(x) >= 0`` (eval mode), or ``bn(prefix(x)) >= 0`` with monotone per-channel
    ``prefix`` modules before it (a BatchNorm and ReLU folded in too); kept while the modules'
    parameters and statistics are unchanged."""
    chain = (*prefix, bn)
    key = tuple(id(m) for m in chain) + version_key(*(t for m in chain for t in (*m.parameters(), *m.buffers())))
    attr = "_bnnctl_thresholds_prefixed" if prefix else "_bnnctl_thresholds"
    return kept(bn, attr, key, lambda: _calibrate(chain))


# --------------------------------------------------------------------------- one layer


def _activation(layer: BinaryConv2d | BinaryLinear) -> tuple[int, Tensor | None] | None:
    act = layer.act
    if isinstance(act, nn.Identity):
        return _NONE, None
    if isinstance(act, nn.ReLU):
        return _RELU, None
    c = layer.weight_shape[0]
    if isinstance(act, nn.LeakyReLU):
        return _SLOPE, torch.full((c,), float(act.negative_slope))
    if isinstance(act, nn.PReLU):
        w = act.weight.detach().to(torch.float32)
        return _SLOPE, kept(act, "_bnnctl_slopes", version_key(act.weight),
                               lambda: w.reshape(-1).expand(c).contiguous() if w.numel() == 1 else w.contiguous())
    return None


_kernel: list[bool] = []


def _kernel_available() -> bool:
    if not _kernel:
        from bnnctl import kernels

        _kernel.append(kernels.available("cpu"))
    return _kernel[0]


def fusable(layer: nn.Module, x: Tensor) -> bool:
    """Whether ``layer`` applied to ``x`` can run fused (see the module docstring)."""
    if not isinstance(layer, (BinaryConv2d, BinaryLinear)) or torch.is_grad_enabled() or layer.training \
            or layer.bn.training or layer.bn.running_mean is None:
        return False
    if layer.backend not in ("xnor", "auto") or not layer.exact_binary():
        return False
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return False
    if isinstance(layer, BinaryLinear):
        shape_ok = x.dim() == 2
    else:
        shape_ok = x.dim() == 4 and layer.groups == 1 and layer.kernel_size ** 2 <= 64
    return shape_ok and _activation(layer) is not None and _kernel_available()


def _plan(layer: BinaryConv2d | BinaryLinear, shape: tuple[int, int, int, int]):
    """The layer's :class:`~bnnctl.kernels.cpu.ConvPlan` for inputs of ``shape`` (N, C, H, W; a
    linear layer's (N, F) as (N, F, 1, 1)), kept while none of its parameters and buffers (weight,
    alpha, BatchNorm, activation) changes."""
    key = (shape,) + version_key(*_state(layer))
    return kept(layer, "_bnnctl_plan", key, lambda: _guarded_plan(layer, shape))


def _guarded_plan(layer, shape, prefix: tuple[nn.Module, ...] = ()):
    """The plan, or None where the layer's BatchNorm cannot be folded (statistics that make its
    sign non-monotone: NaN or negative variances): the layer then runs layer by layer."""
    try:
        return _make_plan(layer, shape, prefix)
    except ArithmeticError:
        return None


def _prefixed_plan(layer: BinaryConv2d, shape: tuple[int, int, int, int], prefix: tuple[nn.Module, ...]):
    """The layer's plan for an input that ``prefix`` (per-channel modules) has not been applied to yet."""
    tensors = _state(layer)
    for m in prefix:
        _state(m, tensors)
    key = (shape,) + tuple(id(m) for m in prefix) + version_key(*tensors)
    return kept(layer, "_bnnctl_plan_prefixed", key, lambda: _guarded_plan(layer, shape, prefix))


def _make_plan(layer: BinaryConv2d | BinaryLinear, shape: tuple[int, int, int, int], prefix: tuple[nn.Module, ...] = ()):
    from bnnctl.kernels import cpu

    latent = layer.latent_weight().detach()
    alpha = inference_alpha(layer, latent) if isinstance(layer, BinaryConv2d) else layer.alpha(latent)
    act, slope = _activation(layer)  # type: ignore[misc]
    if isinstance(layer, BinaryConv2d):
        packed, stride, padding = packed_weight(layer, latent), layer.stride, layer.padding
    else:  # a linear layer is a 1x1 convolution of a 1x1 map
        packed, stride, padding = cpu.pack_weight(latent.reshape(*latent.shape, 1, 1)), 1, 0
    return cpu.ConvPlan(shape, packed, stride, padding, thresholds=sign_thresholds(layer.bn, prefix),
                        alpha=None if alpha is None else alpha.detach().to(torch.float32).contiguous(),
                        act=act, slope=slope)


def _checked(module: nn.Module, backend: str, x: Tensor, out: Tensor, reference: Callable[[], Tensor]) -> bool:
    """Backend "auto" compares the fused result with the layer-by-layer one once per module and
    input shape (and again after its parameters change) and keeps the layer-by-layer path, with a
    warning, where they differ; "xnor" trusts the kernel."""
    if backend != "auto":
        return True
    key = (tuple(x.shape),) + version_key(*_state(module))

    def compare() -> bool:
        same = torch.equal(out, reference())
        if not same:
            warnings.warn(f"fused inference disagreed with the layer-by-layer result in {type(module).__name__} "
                          f"for input {tuple(x.shape)}; backend 'auto' keeps the layer-by-layer path there",
                          RuntimeWarning, stacklevel=4)
        return same

    return kept(module, "_bnnctl_fused_checked", key, compare)


def layer_forward(layer: BinaryConv2d | BinaryLinear, x: Tensor, reference: Callable[[], Tensor]) -> Tensor | None:
    """The whole layer (BatchNorm, sign, conv or linear, alpha, activation) in one kernel call, or
    None where it does not apply. ``reference`` computes the layer-by-layer result (see :func:`_checked`)."""
    if not fusable(layer, x):
        return None
    linear = x.dim() == 2
    if linear:
        x = x.reshape(*x.shape, 1, 1)
    plan = _plan(layer, tuple(x.shape))
    if plan is None:
        return None
    out = torch.empty(plan.out_shape)
    plan.run(x, out=out)
    if linear:
        out, x = out.view(out.shape[:2]), x.view(x.shape[:2])
    return out if _checked(layer, layer.backend, x, out, reference) else None


# --------------------------------------------------------------------------- residual blocks


def _gate(block: nn.Module, channels: int) -> Tensor | None:
    g = block.gate.gate
    if g is None:
        return None
    g = g.detach().to(torch.float32)
    return kept(block.gate, "_bnnctl_gate", version_key(block.gate.gate),
                   lambda: g.reshape(-1).expand(channels).contiguous() if g.numel() == 1 else g.reshape(-1).contiguous())


def block_forward(block: nn.Module, convs: list[BinaryConv2d], x: Tensor, concat: bool,
                  reference: Callable[[], Tensor], prefix: tuple[nn.Module, ...] = ()) -> Tensor | None:
    """A residual block ``residual(x) + gate(skip(x))`` whose residual chains ``convs`` (each
    conv's output the next one's input), fused; ``concat``: the residual is the concatenation of
    every conv's output (HPM), else the last conv's output. None where it does not apply.
    ``reference`` computes the layer-by-layer result (see :func:`_checked`).

    ``prefix``: per-channel monotone modules (BatchNorm, ReLU) still to be applied to ``x``, folded
    into the thresholds of the first conv and of the skip's projection, which are the only readers
    of the block's input then (no float copy of it is ever made); a block with an identity skip
    needs that input as floats and returns None."""
    if not all(fusable(c, x) for c in convs):
        return None
    if prefix and (block.proj is None or not fusable(block.proj, x)):
        return None
    plans, shape = [], tuple(x.shape)
    for layer in convs:
        plan = _prefixed_plan(layer, shape, prefix) if prefix and not plans else _plan(layer, shape)
        if plan is None:
            return None
        plans.append(plan)
        shape = plan.out_shape
    n, _, oh, ow = shape
    channels = sum(p.out_shape[1] for p in plans) if concat else shape[1]
    if prefix:
        proj = _prefixed_plan(block.proj, tuple(x.shape), prefix)
        if proj is None:
            return None
        skip = torch.empty(proj.out_shape)
        proj.run(x, out=skip)
    else:
        skip = x if block.proj is None else block.proj(x)
    if tuple(skip.shape) != (n, channels, oh, ow) or skip.dtype != torch.float32:
        return None
    skip = skip.contiguous()
    gate = _gate(block, channels)
    out = torch.empty((n, channels, oh, ow))
    source: Any = x
    first = 0
    for i, plan in enumerate(plans):
        packed_out = out_thresholds = None
        if i + 1 < len(plans):
            packed_out, out_thresholds = plans[i + 1].packed_input(), plans[i + 1].thresholds
        if concat or packed_out is None:
            lo, hi = (first, first + plan.out_shape[1]) if concat else (0, channels)
            first = hi
            plan.run(source, out=out[:, lo:hi], res=skip[:, lo:hi], gate=None if gate is None else gate[lo:hi],
                     packed_out=packed_out, out_thresholds=out_thresholds)
        else:
            plan.run(source, packed_out=packed_out, out_thresholds=out_thresholds)
        source = packed_out
    return out if _checked(block, convs[0].backend, x, out, reference) else None


def prefixed_block(block: nn.Module, x: Tensor, prefix: tuple[nn.Module, ...]) -> Tensor | None:
    """``block(prefix(x))`` fused with ``prefix`` folded into the block's input thresholds (see
    :func:`block_forward`), or None where that does not apply."""
    def reference() -> Tensor:
        y = x
        for m in prefix:
            y = m(y.clone())
        return block(y)

    return block_forward(block, [getattr(block, n) for n in block.CONVS], x, block.CONCAT, reference, prefix)


# --------------------------------------------------------------------------- pooling and upsampling


def fast_glue(backend: str, x: Tensor) -> bool:
    """Whether the float operations between binary layers take the faster exact forms below:
    inference with an XNOR backend on the CPU (the float backend keeps PyTorch's own operations)."""
    return backend != "float" and not torch.is_grad_enabled() and x.device.type == "cpu" and x.dim() == 4


def max_pool2d(x: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
    """F.max_pool2d(x, kernel, stride, padding), the same values (a maximum is exact): the compiled
    kernel's pooling, else the maximum of kernel^2 strided views (both several times faster than
    PyTorch 2.13's one-thread CPU kernel)."""
    if _kernel_available() and x.dtype == torch.float32 and 2 * padding <= kernel:
        from bnnctl.kernels import cpu

        return cpu.max_pool2d(x, kernel, stride, padding)
    n, c, h, w = x.shape
    oh, ow = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
    if padding:
        x = torch.nn.functional.pad(x, (padding,) * 4, value=-float("inf"))
    out = None
    for a in range(kernel):
        rows = x[:, :, a:a + stride * (oh - 1) + 1:stride]
        for b in range(kernel):
            view = rows[..., b:b + stride * (ow - 1) + 1:stride]
            out = view.clone() if out is None else torch.maximum(out, view, out=out)
    assert out is not None
    return out


def upsample_add(x: Tensor, skip: Tensor) -> Tensor:
    """F.interpolate(x, size=skip's, mode="nearest") + skip in one pass where ``skip`` is exactly
    twice ``x``'s size (the same additions, no upsampled copy); the two steps otherwise."""
    n, c, h, w = x.shape
    if tuple(skip.shape) == (n, c, 2 * h, 2 * w):
        if _kernel_available() and x.dtype == skip.dtype == torch.float32:
            from bnnctl.kernels import cpu

            return cpu.upsample2x_add(x, skip)
        return (x.view(n, c, h, 1, w, 1) + skip.view(n, c, h, 2, w, 2)).view(n, c, 2 * h, 2 * w)
    return torch.nn.functional.interpolate(x, size=skip.shape[-2:], mode="nearest") + skip


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d that takes :func:`max_pool2d` in inference with an XNOR backend (same values)."""

    def __init__(self, kernel_size: int, stride: int | None = None, padding: int = 0, backend: str = "float") -> None:
        super().__init__(kernel_size, stride, padding)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        if fast_glue(self.backend, x) and not self.ceil_mode and self.dilation == 1:
            return max_pool2d(x, self.kernel_size, self.stride, self.padding)  # type: ignore[arg-type]
        return super().forward(x)
