"""The tiny study and tuning specs the tests train, built in one place instead of YAML copied from
test to test: an 8-wide, 2-level hourglass on 32x32 synthetic pose images (32 to train, 16 to
validate), 2 epochs of batch 16 with an MSE loss on one thread, no latency measurement unless
asked. Tests state only what their case is about (rows, seeds, a teacher, a schedule)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

#: The real-valued teacher the distillation rows name (``teacher: real``).
REAL_TEACHER = {"real": {"set": {"model.binarize.activations": False, "model.binarize.weights": False}}}


def base(root: Path | str, *, epochs: int = 2, train: int = 32, valid: int = 16, model: dict | None = None,
         **fields: Any) -> dict:
    """The tiny training config; ``model`` adds model fields, ``fields`` any other config field
    (``latency=True``, ``lambda_schedule={...}``)."""
    return {"model": {"width": 8, "depth": 2, **(model or {})},
            "data": {"root": str(root), "synthetic": {"train": train, "valid": valid}, "input_size": 32},
            "epochs": epochs, "batch_size": 16, "loss": "mse", "threads": 1, "latency": False, **fields}


def rows(*items: tuple[str, dict] | dict) -> list[dict]:
    """Rows from ``(name, {path: value})`` pairs, or whole row mappings (stages, teacher, ...)."""
    return [item if isinstance(item, dict) else {"name": item[0], "set": dict(item[1])} for item in items]


def study(name: str, root: Path | str, ablation_rows: list[dict], *, mode: str = "isolated", ablation: str = "t",
          seeds: tuple[int, ...] = (0,), teachers: dict | None = None, base_fields: dict | None = None,
          **top: Any) -> dict:
    """A study spec with one ablation; ``top``: other top-level sections (``execution``,
    ``tracking``, ``storage``, ``statistics``...)."""
    doc: dict[str, Any] = {"name": name, "base": base(root, **(base_fields or {})), "seeds": list(seeds)}
    if teachers:
        doc["teachers"] = teachers
    doc["ablations"] = [{"name": ablation, "mode": mode, "rows": ablation_rows}]
    doc.update(top)
    return doc


def tuning(name: str, root: Path | str, search: dict, *, trials: int, sampler: dict | None = None,
           pruner: dict | None = None, base_fields: dict | None = None, **top: Any) -> dict:
    """A tuning spec (``kind: tuning``) over the tiny config."""
    doc: dict[str, Any] = {"kind": "tuning", "name": name, "base": base(root, **(base_fields or {})),
                           "search": search, "trials": trials}
    if sampler is not None:
        doc["sampler"] = sampler
    if pruner is not None:
        doc["pruner"] = pruner
    doc.update(top)
    return doc


def write(folder: Path, doc: dict, file: str | None = None) -> Path:
    """``doc`` as YAML in ``folder/<name>.yaml`` (or ``file``); returns the path."""
    path = Path(folder) / (file or f"{doc['name']}.yaml")
    path.write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120))
    return path


#: The activation rows several tests train: ReLU, PReLU and LeakyReLU, each alone.
ACTIVATIONS = rows(("relu", {"model.activation.kind": "relu"}), ("prelu", {"model.activation.kind": "prelu"}),
                   ("leaky", {"model.activation.kind": "leaky_relu"}))
