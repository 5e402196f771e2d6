"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint holds the model state, the optimizer state, the epoch, the best metric, torch's RNG
state and the run's configuration as plain data, so a model can be rebuilt from the file alone
(teachers, stage 2 of reverse-order initialization, export).
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import from_dict
from ..errors import TrainingError
from ..layers import binary_layers
from ..models import ModelConfig, build_model

CHECKPOINT_FORMAT = 1
#: State a stage-2 model has and a stage-1 checkpoint lacks: learned alphas and the weights' lambda
#: (reverse order: real weights), the activations' lambda too (standard order: a real network).
STAGE_ONLY_KEYS = ("alpha.value", "weight_quantizer.lam", "input_quantizer.lam")


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (a crash leaves the previous file intact)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
    os.close(fd)
    try:
        torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp)
        os.replace(tmp, path)
    except RuntimeError as err:
        Path(tmp).unlink(missing_ok=True)
        # torch's zip writer reports a full disk as "unexpected pos ..." / "file write failed"
        if _disk_full(path.parent):
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def share_checkpoint(src: Path, dst: Path, payload: dict[str, Any]) -> None:
    """``dst`` holding what ``src`` holds (just written from ``payload``): the same file under a
    second name (a hard link, placed atomically), so the best checkpoint costs no space while it is
    the last one; a file system without hard links gets a copy written from ``payload``. Safe because
    a checkpoint is never written in place: ``save_checkpoint`` replaces the name, and the other
    name keeps the old file."""
    fd, tmp = tempfile.mkstemp(prefix=dst.name, dir=dst.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        save_checkpoint(dst, payload)


def _disk_full(folder: Path, reserve: int = 1 << 20) -> bool:
    """Whether ``folder``'s file system has (almost) no space left."""
    try:
        return shutil.disk_usage(folder).free < reserve
    except OSError:
        return False


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TrainingError("missing_checkpoint", f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise TrainingError("bad_checkpoint", f"cannot read checkpoint {path}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT or "model" not in data:
        raise TrainingError("bad_checkpoint", f"{path} is not a bnnctl checkpoint (format {CHECKPOINT_FORMAT})")
    return data


def model_from_checkpoint(path: str | Path) -> tuple[nn.Module, ModelConfig, dict[str, Any]]:
    """Rebuild the model stored in a checkpoint: (model in eval mode, its config, the checkpoint)."""
    data = load_checkpoint(path)
    cfg = from_dict(ModelConfig, data["model_config"], "model")
    model = build_model(cfg)
    model.load_state_dict(data["model"])
    return model.eval(), cfg, data


def init_from_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Initialize ``model`` from another run's weights (reverse-order initialization: stage 2 from
    stage 1). Only the state that the later stage adds may be missing (learned alphas, weight lambda);
    learned alphas are then re-initialized from the loaded weights."""
    data = load_checkpoint(path)
    result = model.load_state_dict(data["model"], strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(STAGE_ONLY_KEYS)]
    if missing or result.unexpected_keys:
        raise TrainingError(
            "incompatible_checkpoint",
            f"{path} does not fit this model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]} "
            "(initialization needs the same architecture)")
    with torch.no_grad():
        for _, layer in binary_layers(model):
            if layer.alpha is not None:
                layer.alpha.reset(layer.latent_weight())
