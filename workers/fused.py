"""Fused binary inference on the CPU: ``fuse(model)`` compiles whole binary layers and residual
blocks into XNOR kernel calls.

``fuse`` is an explicit inference-compilation step, like ``torch.ao``'s convert or timm's
re-parametrisation: it returns a model whose binary layers, declared blocks (``fusion_plan()``),
pooling and upsampling are replaced by compiled modules *sharing the original's parameters and
buffers under the same names* (``state_dict`` keys unchanged). Models, blocks and layers carry no
inference branch of their own. Where the backend fuses (``ConvBackend.fuses``: "xnor", "auto"), in
evaluation (no gradients, eval mode) a binary layer's BatchNorm -> sign -> binary conv -> alpha ->
activation runs as one kernel call, and a residual block as one call per convolution:

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
  BatchNorm and ReLU) fold into those layers' thresholds too (:class:`FusedSequential`); binary linear
  layers run as 1x1 convolutions; max-pooling and nearest upsampling + sum take compiled exact forms
  (:class:`FusedMaxPool2d`, :class:`FusedUpsampleAdd`).

Every step is the float emulation's operation in its order and precision (alpha product, then the
activation, then the gated sum), so outputs are identical to ``backend: float`` (tests/workers/test_fused.py
holds every model family, and every registered block with every conv backend, to that). Anything
else -- training, gradients, inexact quantizers, grouped convolutions, CUDA tensors, no compiled
kernel, a block that declares no plan -- takes the layer-by-layer path of the original modules.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .backends import ConvBackend, inference_alpha, kept, packed_weight, version_key
from .blocks import FusionPlan
from .layers import BinaryConv2d, BinaryLinear, UpsampleAdd

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
    if not layer.conv_backend.fuses or not layer.exact_binary():
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


def _checked(module: nn.Module, backend: ConvBackend, x: Tensor, out: Tensor, reference: Callable[[], Tensor]) -> bool:
    """A backend that ``verifies`` ("auto") compares the fused result with the layer-by-layer one
    once per module and input shape (and again after its parameters change) and keeps the
    layer-by-layer path, with a warning, where they differ; others ("xnor") trust the kernel."""
    if not backend.verifies:
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
    return out if _checked(layer, layer.conv_backend, x, out, reference) else None


# --------------------------------------------------------------------------- residual blocks


def _gate(gate: nn.Module, channels: int) -> Tensor | None:
    g = gate.gate
    if g is None:
        return None
    g = g.detach().to(torch.float32)
    return kept(gate, "_bnnctl_gate", version_key(gate.gate),
                lambda: g.reshape(-1).expand(channels).contiguous() if g.numel() == 1 else g.reshape(-1).contiguous())


def block_forward(block: nn.Module, fusion: FusionPlan, x: Tensor, reference: Callable[[], Tensor],
                  prefix: tuple[nn.Module, ...] = ()) -> Tensor | None:
    """The residual block ``block`` as its :class:`~bnnctl.workers.blocks.FusionPlan` declares it
    (``residual(x) + gate(skip(x))``, the residual chaining ``plan.convs``), fused. None where it
    does not apply. ``reference`` computes the layer-by-layer result (see :func:`_checked`).

    ``prefix``: per-channel monotone modules (BatchNorm, ReLU) still to be applied to ``x``, folded
    into the thresholds of the first conv and of the skip's projection, which are the only readers
    of the block's input then (no float copy of it is ever made); a block with an identity skip
    needs that input as floats and returns None."""
    convs, concat, proj = fusion.convs, fusion.concat, fusion.proj
    if not all(fusable(c, x) for c in convs):
        return None
    if prefix and (proj is None or not fusable(proj, x)):
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
        assert proj is not None
        proj_plan = _prefixed_plan(proj, tuple(x.shape), prefix)
        if proj_plan is None:
            return None
        skip = torch.empty(proj_plan.out_shape)
        proj_plan.run(x, out=skip)
    else:
        skip = x if proj is None else _layer(proj, x)
    if tuple(skip.shape) != (n, channels, oh, ow) or skip.dtype != torch.float32:
        return None
    skip = skip.contiguous()
    gate = _gate(fusion.gate, channels)
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
    return out if _checked(block, convs[0].conv_backend, x, out, reference) else None


def _layer(layer: BinaryConv2d | BinaryLinear, x: Tensor) -> Tensor:
    """The layer fused where that applies, else its own forward."""
    y = layer_forward(layer, x, lambda: layer(x))
    return layer(x) if y is None else y


# --------------------------------------------------------------------------- pooling and upsampling


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


# --------------------------------------------------------------------------- fuse()


def _inference(x: Tensor) -> bool:
    return not torch.is_grad_enabled() and x.device.type == "cpu" and x.dim() == 4


class Compiled(nn.Module):
    """A compiled stand-in for ``original``: it holds the original's children, parameters and
    buffers as its own (the same objects under the same names, so ``state_dict`` and
    ``load_state_dict`` are unchanged) and runs ``original``'s own forward wherever its compiled
    path does not apply."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        for name in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            self.__dict__[name] = original.__dict__[name]
        self.__dict__["original"] = original  # a plain attribute: its state is already ours
        self.training = original.training

    def train(self, mode: bool = True) -> "Compiled":
        super().train(mode)
        self.original.training = mode
        return self

    def extra_repr(self) -> str:
        return f"compiled {type(self.original).__name__}"


class FusedLayer(Compiled):
    """A binary layer (conv or linear) as one kernel call in inference (:func:`layer_forward`)."""

    def forward(self, x: Tensor) -> Tensor:
        return _layer(self.original, x)


class FusedBlock(Compiled):
    """A residual block compiled from its :class:`~bnnctl.workers.blocks.FusionPlan`: one kernel
    call per conv in inference (:func:`block_forward`); ``prefixed`` also folds per-channel modules
    before it into its input thresholds."""

    def __init__(self, original: nn.Module, plan: FusionPlan) -> None:
        super().__init__(original)
        self.__dict__["plan"] = plan

    def forward(self, x: Tensor) -> Tensor:
        block = self.original
        y = block_forward(block, self.plan, x, lambda: block(x)) if not self.training else None
        return block(x) if y is None else y

    def prefixed(self, x: Tensor, prefix: tuple[nn.Module, ...]) -> Tensor | None:
        """``self(prefix(x))`` with ``prefix`` folded into the thresholds of the block's first conv
        and projection, or None where that does not apply."""
        if self.training:
            return None

        def reference() -> Tensor:
            y = x
            for m in prefix:
                y = m(y.clone())
            return self.original(y)

        return block_forward(self.original, self.plan, x, reference, prefix)


#: Per-channel monotone modules that may fold into the next binary layers' sign thresholds.
_FOLDABLE = (nn.BatchNorm2d, nn.ReLU)


class FusedSequential(Compiled, nn.Sequential):
    """An ``nn.Sequential`` in which BatchNorm and ReLU directly before a fused block with a
    projection fold into that block's input thresholds (the hourglass stem: no float map between
    them)."""

    def __init__(self, original: nn.Sequential, folds: dict[int, int]) -> None:
        super().__init__(original)
        self.__dict__["folds"] = folds  # index of the first folded module -> index of the block

    def forward(self, x: Tensor) -> Tensor:
        modules = list(self._modules.values())
        i = 0
        while i < len(modules):
            end = self.folds.get(i)
            if end is not None and not self.training and _inference(x):
                y = modules[end].prefixed(x, tuple(modules[i:end]))
                if y is not None:
                    x, i = y, end + 1
                    continue
            x = modules[i](x)
            i += 1
        return x


class FusedMaxPool2d(Compiled):
    """nn.MaxPool2d through :func:`max_pool2d` in inference (the same values, several times faster)."""

    def forward(self, x: Tensor) -> Tensor:
        pool = self.original
        if _inference(x) and not pool.ceil_mode and pool.dilation == 1:
            k, s, p = (v if isinstance(v, int) else v[0] for v in (pool.kernel_size, pool.stride, pool.padding))
            return max_pool2d(x, k, s, p)
        return pool(x)


class FusedUpsampleAdd(Compiled):
    """:class:`~bnnctl.workers.layers.UpsampleAdd` through :func:`upsample_add` in inference."""

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return upsample_add(x, skip) if _inference(x) else self.original(x, skip)


def _fuses(model: nn.Module) -> bool:
    return any(isinstance(m, (BinaryConv2d, BinaryLinear)) and m.conv_backend.fuses for m in model.modules())


def _copy_structure(module: nn.Module) -> nn.Module:
    """A copy of the module tree sharing every parameter and buffer tensor (containers and hooks
    copied, so replacing modules in the copy leaves the original as it was)."""
    clone = copy.copy(module)
    for name, value in list(clone.__dict__.items()):
        if isinstance(value, (dict, set)):
            clone.__dict__[name] = copy.copy(value)
    clone.__dict__["_modules"] = {n: None if c is None else _copy_structure(c) for n, c in module._modules.items()}
    return clone


def _compiled(module: nn.Module, glue: bool) -> nn.Module:
    if isinstance(module, (BinaryConv2d, BinaryLinear)):
        return FusedLayer(module) if module.conv_backend.fuses else module
    plan_of = getattr(module, "fusion_plan", None)
    plan = plan_of() if callable(plan_of) else None
    if isinstance(plan, FusionPlan) and plan.convs and plan.convs[0].conv_backend.fuses:
        return FusedBlock(module, plan)
    if glue and type(module) is nn.MaxPool2d:
        return FusedMaxPool2d(module)
    if glue and type(module) is UpsampleAdd:
        return FusedUpsampleAdd(module)
    return module


def _fold_sites(seq: nn.Sequential) -> dict[int, int]:
    modules = list(seq._modules.values())
    folds = {}
    for i in range(len(modules) - 2):
        if isinstance(modules[i], nn.BatchNorm2d) and isinstance(modules[i + 1], _FOLDABLE) \
                and isinstance(modules[i + 2], FusedBlock) and modules[i + 2].plan.proj is not None:
            folds[i] = i + 2
    return folds


def _fuse_children(module: nn.Module, glue: bool) -> None:
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        compiled = _compiled(child, glue)
        _fuse_children(compiled, glue)  # a compiled module's children are the original's: fused too
        if glue and type(compiled) is nn.Sequential:
            folds = _fold_sites(compiled)
            if folds:
                compiled = FusedSequential(compiled, folds)
        module._modules[name] = compiled


def fuse(model: nn.Module, *, inplace: bool = False, glue: bool = True) -> nn.Module:
    """The model compiled for inference: binary layers and blocks that declare a
    :class:`~bnnctl.workers.blocks.FusionPlan` run as XNOR kernel calls where their backend
    ``fuses`` (the outputs are bit-identical to the layer-by-layer forward); ``glue`` also gives
    max-pooling and the hourglass's upsample + sum their faster exact forms and folds BatchNorm +
    ReLU before a block into its thresholds (:class:`FusedSequential`).

    Returns a copy that shares every parameter and buffer with ``model`` under the same names
    (``inplace``: ``model`` itself, changed), or ``model`` unchanged where no layer's backend fuses.
    The compiled modules fall back to the original forward in training or with gradients, so the
    result is correct in every mode; it is meant for evaluation, latency and deployment."""
    if not _fuses(model):
        return model
    root = model if inplace else _copy_structure(model)
    holder = nn.Module()
    holder._modules["root"] = root
    _fuse_children(holder, glue)
    return holder._modules["root"]
