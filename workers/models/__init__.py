"""Model families, each built from a typed :class:`ModelConfig` by :func:`build_model`."""
from __future__ import annotations

from torch import nn

from ..layers import binary_layers
from ..reparam import apply_decomposition
from . import alexnet, hourglass, resnet  # noqa: F401  (registers the architectures)
from .config import MODELS, Architecture, ModelConfig

__all__ = ["MODELS", "Architecture", "ModelConfig", "build_model", "layer_group"]


def layer_group(model: nn.Module, name: str) -> str:
    """The lambda-schedule group of a layer: its top module, with the index when the top module is a
    list of repeated units (``stacks.1.hourglass...`` -> ``stacks.1``; ``layers.2.0.conv1`` ->
    ``layers.2``; ``stem.3.conv1`` -> ``stem``)."""
    parts = name.split(".")
    if len(parts) > 1 and isinstance(getattr(model, parts[0], None), nn.ModuleList):
        return ".".join(parts[:2])
    return parts[0]


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the model ``cfg`` describes: architecture, binarization, activations, blocks, gates and
    the MT re-parametrization (initialized from the freshly initialized weights)."""
    model = cfg.architecture.build(cfg)
    apply_decomposition(model, cfg.decomposition)
    for name, layer in binary_layers(model):
        group = layer_group(model, name)
        for q in (layer.input_quantizer, layer.weight_quantizer):
            if q is not None:
                q.group = group
    return model
