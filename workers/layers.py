"""Binary layers: BatchNorm -> binarize input -> conv/linear with binarized, scaled weights -> activation.

The same classes build the real-valued network (nothing binarized), the reverse-order stage 1
network (binary activations, real weights) and the fully binary one, so that an ablation switch
changes what is injected, not the model code.

The latent (real-valued) weight comes from a *weight source*: a plain parameter by default, or a
matrix/tensor re-parametrization (see ``reparam.py``). The convolution itself goes through a
*backend* seam (``backends.py``): "float" is the emulation with ``F.conv2d``, "xnor" and "auto" the
XNOR kernels. Fused inference is a separate, explicit step (``fused.fuse(model)``): nothing here
branches on it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .binarize import AlphaScale, BinarizeConfig, Quantizer
from .config import require
from .backends import CONV_BACKENDS, ConvBackend, scale_output, xnor_from_raw
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
            self.weight_quantizer: Quantizer | None = Quantizer(binarize.weight_quantizer, binarize.lambda_init,
                                                                scale_free=True)
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

    def stored_weight(self) -> Tensor | None:
        """The stored dense weight parameter, or None when the weight is re-parametrized (what
        inference may key derived values on: packed bits, alphas)."""
        src = self.weight_source
        return src.weight if isinstance(src, DenseWeight) else None

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
        backend: a name in CONV_BACKENDS: "float" (the emulation), "xnor" or "auto" (the XNOR
            kernels); its :class:`~bnnctl.workers.backends.ConvBackend` is ``conv_backend``.
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
        self.conv_backend: ConvBackend = CONV_BACKENDS.get(backend, "backend")
        self.bn = nn.BatchNorm2d(in_channels)
        self._init_binary(binarize, activation, out_channels,
                          (out_channels, in_channels // groups, kernel_size, kernel_size), reparametrizable)

    def _operate(self, x: Tensor, w: Tensor, alpha: Tensor | None) -> Tensor:
        return self.conv_backend.op(self, x, w, alpha, self.exact_binary())

    def _from_raw(self, x: Tensor) -> Tensor | None:
        return xnor_from_raw(self, x) if self.conv_backend.kernel else None

    def extra_repr(self) -> str:
        b = self.binarize
        return (f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}, s={self.stride}, "
                f"p={self.padding}, g={self.groups}, act_bin={b.activations}, w_bin={b.weights}, "
                f"alpha={b.alpha if b.weights else '-'}, backend={self.backend}")


class BinaryLinear(_BinaryLayer):
    """BatchNorm1d -> binarize input -> linear with alpha * sign(W) -> activation (AlexNet's FCs).
    It computes F.linear; a fused model (``fused.fuse``) with a fusing backend runs it in the XNOR
    kernel as a 1x1 convolution."""

    def __init__(self, in_features: int, out_features: int,
                 binarize: BinarizeConfig = BinarizeConfig(),
                 activation: ActivationConfig = ActivationConfig(), backend: str = "float") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.backend = backend
        self.conv_backend: ConvBackend = CONV_BACKENDS.get(backend, "backend")
        self.bn = nn.BatchNorm1d(in_features)
        self._init_binary(binarize, activation, out_features, (out_features, in_features))

    def _operate(self, x: Tensor, w: Tensor, alpha: Tensor | None) -> Tensor:
        return scale_output(F.linear(x, w), alpha)

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


class UpsampleAdd(nn.Module):
    """``F.interpolate(x, size=skip's, mode="nearest") + skip``: the hourglass's merge of a level's
    upsampled features with its skip (a module, so :func:`~bnnctl.workers.fused.fuse` can give it
    its faster exact form)."""

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return F.interpolate(x, size=skip.shape[-2:], mode="nearest") + skip
