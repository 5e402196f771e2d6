"""Per-layer training diagnostics of binary layers: how many binary weights flipped sign between two
evaluations, how many latent weights sit beyond the STE clip (their gradient is zero), and during
progressive binarization how much of the network the smooth approximation still leaves far from
sign (|lambda * argument| < 1). The current lambdas are reported by the trainer (``lambda``,
``lambda/<group>``)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .binarize import STE_CLIP
from .layers import binary_layers


def _signs(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: (layer.latent_weight().detach() >= 0)
            for name, layer in binary_layers(model) if layer.binary_weights}


class FlipTracker:
    """Call :meth:`update` after each evaluation: it returns, per binary-weight layer, the fraction
    of binary weights whose sign changed since the previous call (or since construction)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        with torch.no_grad():
            self.previous = _signs(model)

    @torch.no_grad()
    def update(self) -> dict[str, float]:
        current = _signs(self.model)
        ratios = {name: float((current[name] != self.previous[name]).float().mean())
                  for name in current if name in self.previous}
        self.previous = current
        return ratios


@torch.no_grad()
def clip_fractions(model: nn.Module) -> dict[str, float]:
    """Per binary-weight layer: the fraction of latent weights with |w| > STE_CLIP."""
    return {name: float((layer.latent_weight().abs() > STE_CLIP).float().mean())
            for name, layer in binary_layers(model) if layer.binary_weights}


@torch.no_grad()
def soft_weight_fraction(model: nn.Module, bound: float = 1.0) -> float | None:
    """The fraction of binary weights whose smooth approximation is still far from sign: |lambda *
    W / mean|W|| < ``bound`` (the quantizer's scale-free argument), over the layers whose weights are
    binarized progressively; None when no layer's are. With tanh, ``bound`` 1 is |tanh| < 0.76 and
    3 is |tanh| < 0.995."""
    soft = total = 0
    for _, layer in binary_layers(model):
        q = layer.weight_quantizer
        if q is None or not q.approximating:
            continue
        u = q.lam * q.argument(layer.latent_weight())
        soft += int(u.abs().lt(bound).sum())
        total += u.numel()
    return soft / total if total else None


@contextmanager
def soft_activation_tally(model: nn.Module) -> Iterator[list[int]]:
    """While active, counts the activation values that the smooth approximation of the layers'
    inputs sees with |lambda * x| < 1: yields ``[soft, seen]``, filled by the forward passes run
    inside (with the quantizers in training mode)."""
    found = [layer.input_quantizer for _, layer in binary_layers(model)
             if layer.input_quantizer is not None and layer.input_quantizer.approximating]
    tally = [0, 0]
    for q in found:
        q.tally = tally
    try:
        yield tally
    finally:
        for q in found:
            q.tally = None
