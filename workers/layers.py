"""Binary layers: BatchNorm -> binarize input -> conv/linear with binarized, scaled weights -> activation.

The same classes build the real-valued network (nothing binarized), the reverse-order stage 1
network (binary activations, real weights) and the fully binary one, so that an ablation switch
changes what is injected, not the model code.

The latent (real-valued) weight comes from a *weight source*: a plain parameter by default, or a
matrix/tensor re-parametrization (see ``reparam.py``). The convolution itself goes through a
*backend* seam: "float" is the emulation with ``F.conv2d``; the kernels package adds XNOR kernels.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .binarize import AlphaScale, BinarizeConfig, Quantizer
from .config import require
from .registry import Registry

# --------------------------------------------------------------------------- activations

#: Default negative slopes: LeakyReLU's value is not given by IT §3.2 (assumed); PReLU starts at
#: PyTorch's usual 0.25 and learns its slope.
DEFAULT_SLOPE = {"leaky_relu": 0.1, "prelu": 0.25}

ACTIVATIONS: Registry[Callable[["ActivationConfig", int], nn.Module]] = Registry("activation")


@dataclass(frozen=True)
class ActivationConfig:
    """The non-linearity after each binary conv (IT §3.2).

    Attributes:
        kind: "none", "relu", "leaky_relu" or "prelu".
        slope: negative slope (LeakyReLU) or its initial value (PReLU); default per kind.
        per_channel: PReLU with one learned slope per channel instead of one for the layer.
    """

    kind: str = "prelu"
    slope: float | None = None
    per_channel: bool = False

    def __post_init__(self) -> None:
        ACTIVATIONS.get(self.kind, "kind")
        require(self.slope is None or math.isfinite(self.slope), "slope", "must be a finite number")

    @property
    def negative_slope(self) -> float:
        return self.slope if self.slope is not None else DEFAULT_SLOPE.get(self.kind, 0.0)


@ACTIVATIONS.register("none")
def _none(cfg: ActivationConfig, channels: int) -> nn.Module:
    return nn.Identity()


@ACTIVATIONS.register("relu")
def _relu(cfg: ActivationConfig, channels: int) -> nn.Module:
    return nn.ReLU(inplace=False)


@ACTIVATIONS.register("leaky_relu")
def _leaky(cfg: ActivationConfig, channels: int) -> nn.Module:
    return nn.LeakyReLU(cfg.negative_slope)


@ACTIVATIONS.register("prelu")
def _prelu(cfg: ActivationConfig, channels: int) -> nn.Module:
    return nn.PReLU(channels if cfg.per_channel else 1, init=cfg.negative_slope)


def make_activation(cfg: ActivationConfig, channels: int) -> nn.Module:
    return ACTIVATIONS.get(cfg.kind)(cfg, channels)


# --------------------------------------------------------------------------- weight sources


class WeightSource(nn.Module):
    """Produces a layer's latent real-valued weight of a fixed ``shape`` when called."""

    shape: tuple[int, ...]

    def forward(self) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class DenseWeight(WeightSource):
    """The weight stored directly as a parameter (no re-parametrization)."""

    def __init__(self, shape: tuple[int, ...], data: Tensor | None = None) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.weight = nn.Parameter(torch.empty(self.shape))
        if data is None:
            # nn.Conv2d / nn.Linear's default initialization.
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        else:
            with torch.no_grad():
                self.weight.copy_(data.reshape(self.shape))

    def forward(self) -> Tensor:
        return self.weight


# --------------------------------------------------------------------------- backends

#: A backend computes the layer's linear operation from the quantized input ``x``, the quantized
#: weight ``w`` (±1 when the weights are binarized) and the per-output-channel ``alpha`` (or None).
#: ``exact`` says both operands are exactly ±1, which is when an XNOR kernel may be used; the
#: result must equal the float emulation ``op(x, w) * alpha``.
ConvBackend = Callable[["BinaryConv2d", Tensor, Tensor, "Tensor | None", bool], Tensor]
CONV_BACKENDS: Registry[ConvBackend] = Registry("conv backend")


def _scale(y: Tensor, alpha: Tensor | None) -> Tensor:
    if alpha is None:
        return y
    return y * alpha.view(1, -1, *([1] * (y.dim() - 2)))


@CONV_BACKENDS.register("float")
def float_conv(layer: "BinaryConv2d", x: Tensor, w: Tensor, alpha: Tensor | None, exact: bool) -> Tensor:
    """The float emulation: F.conv2d(x, w) * alpha. Zero padding contributes 0 to the sum."""
    return _scale(F.conv2d(x, w, None, layer.stride, layer.padding, 1, layer.groups), alpha)


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


def _kept_while_weight_unchanged(layer: "BinaryConv2d", attr: str, extra: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()``, kept on the layer (attribute ``attr``) while its stored dense weight is
    unchanged and no gradients are wanted (inference); computed afresh otherwise."""
    src = layer.weight_source
    if torch.is_grad_enabled() or not isinstance(src, DenseWeight):
        return compute()
    key = (src.weight.data_ptr(), src.weight._version, *extra)
    cached = getattr(layer, attr, None)
    if cached is None or cached[0] != key:
        cached = (key, compute())
        setattr(layer, attr, cached)
    return cached[1]


def _packed_weight(layer: "BinaryConv2d", w: Tensor):
    """Pack the binary weight, reusing the packing while the stored weight is unchanged (inference)."""
    from bnnctl import kernels

    return _kept_while_weight_unchanged(layer, "_xnor_packed", (w.device, layer.weight_quantizer.kind),
                                        lambda: kernels.pack_weight(w))


@CONV_BACKENDS.register("xnor")
def xnor_conv(layer: "BinaryConv2d", x: Tensor, w: Tensor, alpha: Tensor | None, exact: bool) -> Tensor:
    """The XNOR kernel whenever both operands are exactly ±1 (eval, or training with plain sign) and
    groups = 1; the float emulation otherwise. Outputs are bit-identical to the float backend."""
    if not _xnor_possible(layer, x, exact):
        return float_conv(layer, x, w, alpha, exact)
    y = _XnorConvFunction.apply(x, w, layer.stride, layer.padding, _packed_weight(layer, w))
    return _scale(y, alpha)


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


@CONV_BACKENDS.register("auto")
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
            packed = _packed_weight(layer, wd)
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
    if torch.is_grad_enabled() or not layer.exact_binary() or layer.groups != 1 or x.dim() != 4 \
            or x.dtype != torch.float32:
        return None
    if layer.backend == "auto":
        if not _AUTO_CHOICE.get(_auto_key(layer, x)):
            return None
    elif layer.backend != "xnor":
        return None
    from bnnctl import kernels

    if not kernels.available(x.device.type):
        return None
    latent = layer.latent_weight()
    return kernels.xnor_conv2d(x, latent, _inference_alpha(layer, latent), layer.stride, layer.padding,
                               _packed_weight(layer, latent))


def _inference_alpha(layer: "BinaryConv2d", latent: Tensor) -> Tensor | None:
    """alpha for inference; the analytic one (mean |W| per output channel) is kept while the stored
    weight is unchanged, like the packed weight."""
    assert layer.alpha is not None
    if not layer.alpha.kind.analytic:
        return layer.alpha(latent)
    return _kept_while_weight_unchanged(layer, "_xnor_alpha", (latent.device,), lambda: layer.alpha(latent))


# --------------------------------------------------------------------------- layers


class _BinaryLayer(nn.Module):
    """Shared machinery of BinaryConv2d and BinaryLinear."""

    bn: nn.Module
    weight_source: WeightSource

    def _init_binary(self, binarize: BinarizeConfig, activation: ActivationConfig,
                     out_features: int, weight_shape: tuple[int, ...], reparametrizable: bool = True) -> None:
        self.binarize = binarize
        #: on the binary path: MT decompositions re-parametrize it (layers kept real are not)
        self.reparametrizable = reparametrizable
        self.activation_config = activation
        self.input_quantizer = (Quantizer(binarize.quantizer, binarize.lambda_init)
                                if binarize.activations else None)
        self.weight_source = DenseWeight(weight_shape)
        if binarize.weights:
            self.weight_quantizer: Quantizer | None = Quantizer(binarize.weight_quantizer, binarize.lambda_init)
            self.alpha: AlphaScale | None = AlphaScale(binarize.alpha, out_features)
            self.alpha.reset(self.weight_source())
        else:
            self.weight_quantizer = None
            self.alpha = None
        self.act = make_activation(activation, out_features)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.weight_source.shape

    @property
    def binary_weights(self) -> bool:
        return self.weight_quantizer is not None

    @property
    def binary_inputs(self) -> bool:
        return self.input_quantizer is not None

    def latent_weight(self) -> Tensor:
        """The real-valued weight before binarization (reconstructed if re-parametrized)."""
        return self.weight_source()

    def quantized_weight(self) -> tuple[Tensor, Tensor | None]:
        """(weight as used by the operation, alpha): (±1, alpha) when weights are binarized."""
        latent = self.weight_source()
        if self.weight_quantizer is None:
            return latent, None
        assert self.alpha is not None
        return self.weight_quantizer(latent), self.alpha(latent)

    def exact_binary(self) -> bool:
        """Both operands are exactly ±1 in the current mode (an XNOR kernel could run)."""
        return (self.input_quantizer is not None and self.input_quantizer.exact
                and self.weight_quantizer is not None and self.weight_quantizer.exact)

    def set_weight_source(self, source: WeightSource) -> None:
        assert tuple(source.shape) == tuple(self.weight_shape), (source.shape, self.weight_shape)
        self.weight_source = source

    def _operate(self, x: Tensor, w: Tensor, alpha: Tensor | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _from_raw(self, x: Tensor) -> Tensor | None:
        """The layer's product computed straight from the unquantized input, or None (see
        :func:`xnor_from_raw`)."""
        return None

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(x)
        y = self._from_raw(x)
        if y is None:
            if self.input_quantizer is not None:
                x = self.input_quantizer(x)
            w, alpha = self.quantized_weight()
            y = self._operate(x, w, alpha)
        return self.act(y)


class BinaryConv2d(_BinaryLayer):
    """BatchNorm -> binarize input -> conv with alpha * sign(W) -> activation.

    Args:
        in_channels, out_channels, kernel_size, stride, groups: as ``nn.Conv2d``.
        padding: defaults to ``kernel_size // 2`` ("same" for odd kernels at stride 1).
        binarize: what to binarize; ``BinarizeConfig.real()`` gives the real-valued layer.
        activation: the non-linearity after the conv.
        reparametrizable: on the binary path (MT decompositions re-parametrize it); False for
            layers kept real.
        backend: a name in CONV_BACKENDS: "float" (the emulation), "xnor" or "auto" (the XNOR kernels;
            in inference also fused, see fused.py).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, groups: int = 1,
                 binarize: BinarizeConfig = BinarizeConfig(),
                 activation: ActivationConfig = ActivationConfig(), backend: str = "float",
                 reparametrizable: bool = True) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by groups={groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.groups = kernel_size, stride, groups
        self.padding = kernel_size // 2 if padding is None else padding
        self.backend = backend
        self._backend_fn = CONV_BACKENDS.get(backend, "backend")
        self.bn = nn.BatchNorm2d(in_channels)
        self._init_binary(binarize, activation, out_channels,
                          (out_channels, in_channels // groups, kernel_size, kernel_size), reparametrizable)

    def forward(self, x: Tensor) -> Tensor:
        if self.backend != "float" and not torch.is_grad_enabled():
            from . import fused

            y = fused.layer_forward(self, x, lambda: super(BinaryConv2d, self).forward(x))
            if y is not None:
                return y
        return super().forward(x)

    def _operate(self, x: Tensor, w: Tensor, alpha: Tensor | None) -> Tensor:
        return self._backend_fn(self, x, w, alpha, self.exact_binary())

    def _from_raw(self, x: Tensor) -> Tensor | None:
        return xnor_from_raw(self, x) if self.backend != "float" else None

    def extra_repr(self) -> str:
        b = self.binarize
        return (f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}, s={self.stride}, "
                f"p={self.padding}, g={self.groups}, act_bin={b.activations}, w_bin={b.weights}, "
                f"alpha={b.alpha if b.weights else '-'}, backend={self.backend}")


class BinaryLinear(_BinaryLayer):
    """BatchNorm1d -> binarize input -> linear with alpha * sign(W) -> activation (AlexNet's FCs).
    Training and the float backend use F.linear; inference with "xnor"/"auto" runs it in the XNOR
    kernel as a 1x1 convolution (workers/fused.py)."""

    def __init__(self, in_features: int, out_features: int,
                 binarize: BinarizeConfig = BinarizeConfig(),
                 activation: ActivationConfig = ActivationConfig(), backend: str = "float") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.backend = backend
        CONV_BACKENDS.get(backend, "backend")
        self.bn = nn.BatchNorm1d(in_features)
        self._init_binary(binarize, activation, out_features, (out_features, in_features))

    def forward(self, x: Tensor) -> Tensor:
        if self.backend != "float" and not torch.is_grad_enabled():  # inference: a 1x1 XNOR conv, fused
            from . import fused

            y = fused.layer_forward(self, x, lambda: super(BinaryLinear, self).forward(x))
            if y is not None:
                return y
        return super().forward(x)

    def _operate(self, x: Tensor, w: Tensor, alpha: Tensor | None) -> Tensor:
        return _scale(F.linear(x, w), alpha)

    def extra_repr(self) -> str:
        b = self.binarize
        return f"{self.in_features}, {self.out_features}, act_bin={b.activations}, w_bin={b.weights}"


BINARY_LAYERS = (BinaryConv2d, BinaryLinear)


def binary_layers(model: nn.Module) -> list[tuple[str, _BinaryLayer]]:
    """(qualified name, layer) of every binary-capable layer of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BINARY_LAYERS)]


@dataclass(frozen=True)
class ConvFactory:
    """Builds the model's binary-capable conv layers with one binarization and activation setting:
    blocks receive a factory, so an ablation switch changes what is injected (timm-style)."""

    binarize: BinarizeConfig = BinarizeConfig()
    activation: ActivationConfig = ActivationConfig()
    backend: str = "float"
    #: Layers on the binary path are re-parametrized by MT decompositions; layers kept real are not.
    reparametrizable: bool = True

    def __call__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, activation: ActivationConfig | None = None) -> BinaryConv2d:
        return BinaryConv2d(in_channels, out_channels, kernel_size, stride, groups=groups,
                            binarize=self.binarize, activation=activation or self.activation,
                            backend=self.backend, reparametrizable=self.reparametrizable)

    def linear(self, in_features: int, out_features: int) -> "BinaryLinear":
        """A binary-capable fully connected layer with the same settings (AlexNet's FCs)."""
        return BinaryLinear(in_features, out_features, self.binarize, self.activation, self.backend)

    def real(self) -> "ConvFactory":
        """The same factory with nothing binarized (for layers kept real-valued)."""
        return ConvFactory(BinarizeConfig.real(), self.activation, "float", reparametrizable=False)
