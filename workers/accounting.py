"""Model accounting: parameter counts, binary operations (BOPs), FLOPs and sizes.

Conventions (stated once, here):
- Operations are counted per image (batch 1) for the given input size. A multiply-accumulate of
  two binary operands is one BOP; one of real operands is one FLOP (FLOPs = real MACs, the usual
  convention of the binary-network papers). ``ops = flops + bops / 64`` (Bi-Real Net / XNOR-Net
  convention for a 64-bit popcount word).
- *Trained* counts are what the optimizer holds (re-parametrization factors included).
- *Deployed* counts are those of the model after :func:`~bnnctl.workers.reparam.materialize`:
  each binary weight is 1 bit; everything else (alphas, BatchNorm, PReLU slopes, real layers,
  gates) is a 32-bit float. BatchNorm running statistics are counted in both byte sizes.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from .layers import BINARY_LAYERS, BinaryConv2d, BinaryLinear, binary_layers
from .reparam import materialize

FP32_BYTES = 4
#: bits per popcount word in the ``ops`` convention.
POPCOUNT_WORD = 64


@dataclass(frozen=True)
class LayerAccount:
    name: str
    kind: str  # "binary" (both operands binary), "binary-act", "binary-weight", "real"
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    bops: int
    flops: int


@dataclass(frozen=True)
class ModelAccount:
    binary_params: int
    real_params: int
    trained_params: int
    bops: int
    flops: int
    trained_bytes: int
    deployed_bytes: int
    input_shape: tuple[int, ...]
    layers: tuple[LayerAccount, ...]

    @property
    def params(self) -> int:
        """Deployed parameters: binary weights plus real-valued parameters."""
        return self.binary_params + self.real_params

    @property
    def ops(self) -> float:
        return self.flops + self.bops / POPCOUNT_WORD

    @property
    def compression(self) -> float:
        return self.trained_bytes / self.deployed_bytes


def _kind(layer: nn.Module) -> str:
    if isinstance(layer, BINARY_LAYERS):
        a, w = layer.binary_inputs, layer.binary_weights
        return {(True, True): "binary", (True, False): "binary-act", (False, True): "binary-weight"}.get((a, w), "real")
    return "real"


def _macs(layer: nn.Module, out: torch.Tensor) -> int:
    if isinstance(layer, (nn.Conv2d, BinaryConv2d)):
        if isinstance(layer, nn.Conv2d):
            cin, k, groups = layer.in_channels, layer.kernel_size[0] * layer.kernel_size[1], layer.groups
        else:
            cin, k, groups = layer.in_channels, layer.kernel_size**2, layer.groups
        return out[0].numel() * (cin // groups) * k
    if isinstance(layer, (nn.Linear, BinaryLinear)):
        in_features = layer.in_features
        return out[0].numel() * in_features
    return 0


def _bn_stats(model: nn.Module) -> int:
    return sum(m.running_mean.numel() + m.running_var.numel()
               for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None)


@torch.no_grad()
def account(model: nn.Module, input_size: int | tuple[int, int], in_channels: int = 3) -> ModelAccount:
    """Count parameters, BOPs, FLOPs and sizes of ``model`` for one image of ``input_size``."""
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    device = next(model.parameters()).device
    rows: list[LayerAccount] = []
    hooks = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Module, _inputs, out) -> None:
        macs = _macs(module, out)
        kind = _kind(module)
        shape = tuple(module.weight_shape) if isinstance(module, BINARY_LAYERS) else tuple(module.weight.shape)
        rows.append(LayerAccount(names[module], kind, shape, tuple(out.shape[1:]),
                                 macs if kind == "binary" else 0, 0 if kind == "binary" else macs))

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, *BINARY_LAYERS)):
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, in_channels, *size, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()

    trained = sum(p.numel() for p in model.parameters())
    deployed = materialize(copy.deepcopy(model))
    binary_weights = [layer.weight_source.weight for _, layer in binary_layers(deployed) if layer.binary_weights]
    binary = sum(p.numel() for p in binary_weights)
    binary_ids = {id(p) for p in binary_weights}
    real = sum(p.numel() for p in deployed.parameters() if id(p) not in binary_ids)
    real += sum(layer.alpha.value.numel() for _, layer in binary_layers(deployed)
                if layer.alpha is not None and layer.alpha.kind.stored == "buffer")
    stats = _bn_stats(model)
    deployed_bits = sum(p.numel() for p in binary_weights)
    return ModelAccount(
        binary_params=binary,
        real_params=real,
        trained_params=trained,
        bops=sum(r.bops for r in rows),
        flops=sum(r.flops for r in rows),
        trained_bytes=FP32_BYTES * (trained + stats),
        deployed_bytes=math.ceil(deployed_bits / 8) + FP32_BYTES * (real + stats),
        input_shape=(in_channels, *size),
        layers=tuple(rows),
    )
