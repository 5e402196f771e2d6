"""Binarization: sign with the straight-through estimator, smooth approximations of sign whose
sharpness lambda grows during training (IT §3.4), and the per-output-channel weight scale alpha
(XNOR-Net analytic, or learned as in MT §4.3).

Convention: sign(0) = +1, so every binary value is exactly +1 or -1 (a bit: 1 for +1, 0 for -1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .config import require
from .registry import Registry

#: The STE passes the gradient where |x| <= STE_CLIP and zeroes it elsewhere (IT §3.1).
STE_CLIP = 1.0


def hard_sign(x: Tensor) -> Tensor:
    """Exact sign with sign(0) = +1; values are exactly +1.0 or -1.0 in ``x``'s dtype."""
    # 2 * [x >= 0] - 1: about 3x faster on the CPU than torch.where with scalar tensors.
    return x.ge(0).to(x.dtype).mul_(2).sub_(1)


_CLIP_BOUND: dict[torch.dtype, float] = {}


def _clip_bound(dtype: torch.dtype) -> float:
    """The smallest value above STE_CLIP in ``dtype``: hardtanh_backward keeps the gradient where
    -bound < x < bound, which in that dtype is exactly |x| <= STE_CLIP."""
    if dtype not in _CLIP_BOUND:
        one = torch.tensor(STE_CLIP, dtype=dtype)
        _CLIP_BOUND[dtype] = float(torch.nextafter(one, torch.tensor(2 * STE_CLIP, dtype=dtype)))
    return _CLIP_BOUND[dtype]


class SignSTE(torch.autograd.Function):
    """sign(x) forward; straight-through estimator backward: grad * 1[|x| <= 1]."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return hard_sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        bound = _clip_bound(x.dtype)
        # one fused kernel: grad where |x| <= STE_CLIP, else 0 (8x faster than mask-and-multiply)
        return torch.ops.aten.hardtanh_backward(grad, x, -bound, bound)


def sign_ste(x: Tensor) -> Tensor:
    """Binarize ``x`` to ±1 with the straight-through gradient."""
    return SignSTE.apply(x)


#: A custom straight-through backward: ``(grad, x, lam) -> gradient of x`` for the exact sign's
#: forward (``x`` is the quantizer's argument, ``lam`` its sharpness).
Backward = Callable[[Tensor, Tensor, Tensor], Tensor]


class _SignCustomBackward(torch.autograd.Function):
    """sign(x) forward (exactly ±1); the kind's own backward."""

    @staticmethod
    def forward(ctx, x: Tensor, lam: Tensor, backward: Backward) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, lam)
        ctx.rule = backward
        return hard_sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, lam = ctx.saved_tensors
        return ctx.rule(grad, x, lam), None, None


@dataclass(frozen=True)
class QuantizerKind:
    """A registered way to map real values to ±1 in training, as a forward and a backward.

    Attributes:
        forward: the smooth approximation ``(x, lam) -> (-1, 1)`` used as the training forward (its
            gradient is its true derivative), or None for the exact sign (±1, what an XNOR kernel
            takes).
        backward: with the exact sign's forward, the gradient rule ``(grad, x, lam) -> dx``; None
            is the straight-through estimator ``grad * 1[|x| <= 1]`` (IT §3.1). An exact forward with
            a custom backward (ApproxSign, Bi-Real Net's piecewise-polynomial STE) is exact: the
            kernel runs in training too.
        reads_lambda: the forward or backward depends on the sharpness ``lam``, so lambda schedules
            drive it (default: exactly when there is a smooth forward).
    """

    forward: Callable[[Tensor, Tensor], Tensor] | None = None
    backward: Backward | None = None
    reads_lambda: bool | None = None

    def __post_init__(self) -> None:
        if self.forward is not None and self.backward is not None:
            raise ValueError("a smooth forward's backward is its derivative: give forward or backward, not both")
        if self.reads_lambda is None:
            object.__setattr__(self, "reads_lambda", self.forward is not None)

    @property
    def exact(self) -> bool:
        """Whether its training output is exactly ±1 (what an XNOR kernel needs)."""
        return self.forward is None


#: Quantizers by name. Adding one = registering it here (``approximation("name")`` for a smooth
#: forward, ``QuantizerKind(backward=...)`` for an exact forward with its own gradient).
QUANTIZERS: Registry[QuantizerKind] = Registry("quantizer")
QUANTIZERS.register("sign")(QuantizerKind())


def approximation(name: str) -> Callable[[Callable[[Tensor, Tensor], Tensor]], Callable[[Tensor, Tensor], Tensor]]:
    """Register a smooth approximation of sign as the quantizer ``name``."""

    def decorator(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        QUANTIZERS.register(name)(QuantizerKind(forward=fn))
        return fn

    return decorator


# Smooth approximations of sign, parametrized by the sharpness lambda (IT §3.4, Fig. 6). Each maps
# to (-1, 1) and tends to sign(x) for x != 0 as lambda -> inf; gradients are the true derivatives.


@approximation("tanh")
def tanh_approx(x: Tensor, lam: Tensor) -> Tensor:
    return torch.tanh(lam * x)


@approximation("sigmoid")
def sigmoid_approx(x: Tensor, lam: Tensor) -> Tensor:
    return 2.0 * torch.sigmoid(lam * x) - 1.0


@approximation("softsign")
def softsign_approx(x: Tensor, lam: Tensor) -> Tensor:
    z = lam * x
    return z / (1.0 + z.abs())


#: Below this, a weight channel's mean |W| counts as zero (its scale-free argument is then W itself).
SCALE_EPS = 1e-12


def channel_scale(w: Tensor) -> Tensor:
    """mean |W| over each output channel (dim 0), shaped to broadcast against ``w``: the analytic
    alpha of XNOR-Net, and the unit of a weight quantizer's scale-free argument."""
    return w.abs().flatten(1).mean(dim=1).clamp_min(SCALE_EPS).view(-1, *([1] * (w.dim() - 1)))


class Quantizer(nn.Module):
    """Maps real values to ±1.

    In training, an exact kind ("sign") is sign with the STE and any other kind is its smooth
    approximation at the current sharpness ``lam`` (a buffer, so it is checkpointed and moved with
    the module). In evaluation it is always the exact sign: validation measures the binary network.

    A weight quantizer (``scale_free``) approximates sign(W) as f(lam * W / mean|W|), the mean taken
    per output channel. IT §3.4 grows lambda "so that the selection of the weights to be binarized
    occurs implicitly", and its Fig. 5 reads the lambda at which the approximation is close to sign
    off the distribution of BatchNorm-normalised *features*: "Most values are in a range where the
    approximation function outputs values close to [±1] allowing the approximator to reach good
    estimates for relatively low values of [lambda]". Features after BatchNorm have unit scale;
    latent weights do not (|W| ~ 0.05 in a 3x3x128 conv), so tanh(lam * W) at lam = 20 would leave
    most weights far from ±1 and the trained network far from the binary one that is evaluated.
    Dividing by the channel's mean |W| gives the weights the features' unit scale, so one lambda
    means the same sharpness for both, whatever the weights' scale. sign(W / mean|W|) = sign(W),
    so the exact forward (evaluation, export) is unchanged; the gradient flows through the
    normaliser as it does through the analytic alpha.

    Args:
        kind: a name in QUANTIZERS: "sign", "tanh", "sigmoid" or "softsign".
        lambda_init: initial sharpness (ignored for "sign").
        group: name of the layer group, so lambda schedules can address parts of the network.
        scale_free: the argument of the approximation is ``x / mean|x|`` per output channel
            (weights); False: ``x`` itself (BatchNorm-normalised activations).
    """

    def __init__(self, kind: str = "sign", lambda_init: float = 1.0, group: str = "",
                 scale_free: bool = False) -> None:
        super().__init__()
        self.kind = kind
        self.group = group
        self.scale_free = scale_free
        self.register_buffer("lam", torch.tensor(float(lambda_init)))
        #: (values with |lam * argument| < 1, values seen) while a diagnostic counts them, else None
        self.tally: list[int] | None = None

    @property
    def kind(self) -> str:
        return self._kind

    @kind.setter
    def kind(self, name: str) -> None:
        self.spec = QUANTIZERS.get(name)  # unknown names fail here, listing the valid ones
        self._kind = name

    @property
    def approximating(self) -> bool:
        """Whether training uses a smooth approximation (a forward that is not exactly ±1)."""
        return not self.spec.exact

    @property
    def reads_lambda(self) -> bool:
        """Whether the kind reads its sharpness in training (a smooth forward, or an exact forward
        whose backward depends on lambda): what lambda schedules drive."""
        return bool(self.spec.reads_lambda)

    @property
    def exact(self) -> bool:
        """True when the output is exactly ±1 (an exact kind, or any kind in eval mode)."""
        return self.spec.exact or not self.training

    def argument(self, x: Tensor) -> Tensor:
        """What lambda multiplies: ``x``, or ``x / mean|x|`` per output channel when scale-free."""
        return x / channel_scale(x) if self.scale_free else x

    def forward(self, x: Tensor) -> Tensor:
        if self.exact:
            if self.spec.backward is None or not self.training:
                return sign_ste(x)
            return _SignCustomBackward.apply(self.argument(x), self.lam.to(x.dtype), self.spec.backward)
        assert self.spec.forward is not None
        lam, u = self.lam.to(x.dtype), self.argument(x)
        if self.tally is not None:
            self.tally[0] += int((lam * u.detach()).abs().lt(1).sum())
            self.tally[1] += u.numel()
        return self.spec.forward(u, lam)

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, lam={float(self.lam):g}" + (", scale_free" if self.scale_free else "")
                + (f", group={self.group}" if self.group else ""))


@dataclass(frozen=True)
class AlphaKind:
    """A registered kind of per-output-channel weight scale.

    Attributes:
        stored: "parameter" (learned), "buffer" (frozen) or None (nothing stored).
        analytic: computed from the latent weights at every call (mean |W| per output channel).
        configurable: a spec may ask for it (False: only what materialization leaves behind).
    """

    stored: str | None = None
    analytic: bool = False
    configurable: bool = True

    @property
    def scales(self) -> bool:
        return self.analytic or self.stored is not None


#: Alpha kinds by name. Adding one = registering it here.
ALPHAS: Registry[AlphaKind] = Registry("alpha")
ALPHAS.register("none")(AlphaKind())
ALPHAS.register("analytic")(AlphaKind(analytic=True))  # XNOR-Net
ALPHAS.register("learned")(AlphaKind(stored="parameter"))  # MT §4.3
ALPHAS.register("fixed")(AlphaKind(stored="buffer", configurable=False))  # after materialize


class AlphaScale(nn.Module):
    """The per-output-channel scale of binary weights.

    - "none": no scale (alpha = 1).
    - "analytic": alpha = mean |W| over each output channel's weights (XNOR-Net), recomputed from the
      latent weights at every forward pass; gradients flow through it.
    - "learned": a free parameter, initialized from the analytic value, that back-propagation may
      make larger, smaller or negative (MT §4.3).
    - "fixed": a stored buffer; what :func:`bnnctl.workers.reparam.materialize` leaves behind.
    """

    def __init__(self, mode: str, out_channels: int) -> None:
        super().__init__()
        self.mode = mode
        self.kind = ALPHAS.get(mode, "alpha")
        if self.kind.stored == "parameter":
            self.value = nn.Parameter(torch.ones(out_channels))
        elif self.kind.stored == "buffer":
            self.register_buffer("value", torch.ones(out_channels))

    @staticmethod
    def analytic(latent: Tensor) -> Tensor:
        return latent.abs().flatten(1).mean(dim=1)  # unclamped: a zero channel scales by 0

    @torch.no_grad()
    def reset(self, latent: Tensor) -> None:
        """Re-initialize a stored (learned or fixed) alpha from the analytic value of ``latent``."""
        if self.kind.stored is not None:
            self.value.copy_(self.analytic(latent))

    def forward(self, latent: Tensor) -> Tensor | None:
        if self.kind.analytic:
            return self.analytic(latent)
        return self.value if self.kind.stored is not None else None

    def extra_repr(self) -> str:
        return f"mode={self.mode}"


@dataclass(frozen=True)
class BinarizeConfig:
    """What a layer binarizes and how.

    Attributes:
        activations: binarize the layer's input (features).
        weights: binarize the layer's weights.
        quantizer: the function used for activations in training: "sign" (STE) or a smooth
            approximation ("tanh", "sigmoid", "softsign") for progressive binarization.
        weight_quantizer: the same for weights ("sign" by default, as in the papers); a smooth one
            approximates sign on the scale-free argument W / mean|W| per output channel (Quantizer).
        alpha: weight scale: "none", "analytic" (mean |W|) or "learned".
        lambda_init: the approximation's sharpness before any schedule sets it.

    ``activations=False, weights=False`` is the real-valued network with the same architecture;
    ``activations=True, weights=False`` is stage 1 of reverse-order initialization (IT §3.3).
    """

    activations: bool = True
    weights: bool = True
    quantizer: str = "sign"
    weight_quantizer: str = "sign"
    alpha: str = "analytic"
    lambda_init: float = 1.0

    def __post_init__(self) -> None:
        QUANTIZERS.get(self.quantizer, "quantizer")
        QUANTIZERS.get(self.weight_quantizer, "weight_quantizer")
        valid = [n for n in ALPHAS.names() if ALPHAS.get(n).configurable]
        require(self.alpha in valid, "alpha", f"unknown alpha {self.alpha!r}; valid names: {', '.join(valid)}")
        require(math.isfinite(self.lambda_init) and self.lambda_init > 0, "lambda_init",
                f"must be a positive number, got {self.lambda_init}")

    @property
    def any(self) -> bool:
        return self.activations or self.weights

    @classmethod
    def real(cls) -> "BinarizeConfig":
        """The real-valued setting: nothing binarized."""
        return cls(activations=False, weights=False)
