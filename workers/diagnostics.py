"""Per-layer training diagnostics of binary layers: how many binary weights flipped sign between two
evaluations, and how many latent weights sit beyond the STE clip (their gradient is zero). The
current lambdas are reported by the trainer (``lambda``, ``lambda/<group>``)."""
from __future__ import annotations

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
