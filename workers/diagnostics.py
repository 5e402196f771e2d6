"""Per-layer training diagnostics of binary layers: how many binary weights flipped sign between two
evaluations, how many latent weights sit beyond the STE clip (their gradient is zero), and the
current sharpness lambda of each approximating quantizer."""
from __future__ import annotations

from dataclasses import dataclass

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


def lambdas(model: nn.Module) -> dict[str, float]:
    """Per quantizer that approximates sign: its current lambda (keys ``layer.input`` / ``layer.weight``)."""
    out = {}
    for name, layer in binary_layers(model):
        for role, q in (("input", layer.input_quantizer), ("weight", layer.weight_quantizer)):
            if q is not None and q.kind != "sign":
                out[f"{name}.{role}"] = float(q.lam)
    return out


@dataclass(frozen=True)
class LayerDiagnostics:
    name: str
    flip_ratio: float | None
    clip_fraction: float | None
    lambda_input: float | None
    lambda_weight: float | None


def layer_diagnostics(model: nn.Module, flips: dict[str, float] | None = None) -> list[LayerDiagnostics]:
    """One row per binary layer with the three diagnostics (None where they do not apply)."""
    clips = clip_fractions(model)
    lams = lambdas(model)
    flips = flips or {}
    return [LayerDiagnostics(name, flips.get(name), clips.get(name),
                             lams.get(f"{name}.input"), lams.get(f"{name}.weight"))
            for name, _ in binary_layers(model)]
