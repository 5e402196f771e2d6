"""Export a trained model for inference with 1 bit per binary weight, and load it back.

The exported file (``torch.save``, readable with ``weights_only=True``) holds the model config, every
binary layer's sign bits packed 8 per byte, and the rest of the materialized state in float32
(alphas, BatchNorm, PReLU slopes, gates, the real first and last layers). Re-parametrization factors
are not exported: :func:`~bnnctl.workers.reparam.materialize` folds them into the binary weights
first, so the loaded model gives exactly the eval-mode outputs of the trained one.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import from_dict, to_dict
from .errors import TrainingError
from .fused import fuse
from .layers import binary_layers
from .models import ModelConfig, build_model
from .reparam import materialize

EXPORT_FORMAT = 1
FP32_BYTES = 4


@dataclass(frozen=True)
class ExportReport:
    path: str
    file_bytes: int
    binary_layers: int
    binary_weight_bits: int
    binary_fp32_bytes: int  # the same weights in float32
    binary_packed_bytes: int  # packed bits plus each layer's alpha

    @property
    def binary_ratio(self) -> float:
        return self.binary_fp32_bytes / self.binary_packed_bytes


def _pack(w: torch.Tensor) -> torch.Tensor:
    bits = (w.detach().cpu().reshape(-1) >= 0).numpy()
    return torch.from_numpy(np.packbits(bits, bitorder="little"))


def _unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    count = int(np.prod(shape))
    bits = np.unpackbits(packed.numpy(), count=count, bitorder="little").astype(np.float32)
    return torch.from_numpy(bits * 2 - 1).reshape(shape)


def export_model(model: nn.Module, cfg: ModelConfig, path: str | Path) -> ExportReport:
    """Write ``model`` (materialized in place) to ``path`` in the packed format."""
    materialize(model)
    state = model.state_dict()
    packed, shapes = {}, {}
    fp32 = packed_bytes = bits = 0
    for name, layer in binary_layers(model):
        if not layer.binary_weights:
            continue
        key = f"{name}.weight_source.weight"
        w = state.pop(key)
        packed[key] = _pack(w)
        shapes[key] = list(w.shape)
        bits += w.numel()
        fp32 += FP32_BYTES * w.numel()
        alpha = layer.alpha.value.numel() if layer.alpha is not None and layer.alpha.kind.stored == "buffer" else 0
        packed_bytes += packed[key].numel() + FP32_BYTES * alpha
    payload = {"format": EXPORT_FORMAT, "model_config": to_dict(cfg), "packed": packed, "shapes": shapes,
               "state": {k: v.detach().cpu() for k, v in state.items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ExportReport(str(path), path.stat().st_size, len(packed), bits, fp32, max(packed_bytes, 1))


def load_exported(path: str | Path, backend: str | None = "auto") -> nn.Module:
    """The model stored by :func:`export_model`, in eval mode and compiled for inference
    (:func:`~bnnctl.workers.fused.fuse`).

    ``backend`` is the binary convolutions' backend for inference: "auto" (default: the XNOR-popcount
    kernel wherever it is measured faster and gives the same bits), "xnor", "float", or None for
    the one the model was trained with. The outputs are the same with each."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise TrainingError("bad_export", f"cannot read exported model {path}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise TrainingError("bad_export", f"{path} is not a bnnctl exported model (format {EXPORT_FORMAT})")
    cfg = from_dict(ModelConfig, data["model_config"], "model")
    if backend is not None:
        cfg = replace(cfg, backend=backend)  # validated: unknown names are refused
    model = materialize(build_model(cfg))
    state = dict(data["state"])
    for key, bits in data["packed"].items():
        state[key] = _unpack(bits, tuple(data["shapes"][key]))
    model.load_state_dict(state)
    return fuse(model.eval(), inplace=True)
