"""The planner: a study spec becomes variants (rows x seeds, plus their prerequisites) in a DAG.

- A row with ``stages: reverse_order`` runs as stage 1 (binary activations, real weights) and stage 2
  (everything binary, ``init_from`` stage 1's checkpoint); stage 2 depends on stage 1. With
  ``stages: standard``, stage 1 is the real-valued network. The two stages share the row's epoch
  budget (half each by default), and the lambda schedules run over that whole budget: stage 2
  continues where stage 1 ended and its last epoch runs at ``lambda_end``.
- A row with a teacher depends on the teacher's variant (trained once, with the study's first
  seed, and shared by every student that names it); a row with ``init: NAME`` is fine-tuned from
  the last checkpoint of the ``pretrained`` run NAME, trained once and shared alike.

A variant's identity is a hash of its resolved config (without the checkpoint paths, which are
filled in at execution) and of its dependencies' identities: two variants with the same identity
are the same training run, within a study and across studies.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bnnctl.workers.config import to_dict, with_overrides
from bnnctl.workers.train import TrainConfig
from bnnctl.workers.train.config import comparable

from .spec import Resources, RowSpec, StudySpec, TeacherSpec

Kind = Literal["row", "stage1", "teacher", "pretrain"]


@dataclass(frozen=True)
class Variant:
    """One training run of the plan.

    Attributes:
        key: the identity hash (also the checkpoint folder name).
        label: human-readable name ("IT Table 1 / + PReLU / seed 0", "teacher real / seed 0").
        config: the training config; ``init_from`` and ``distill.teacher`` are filled at execution
            from the dependencies' checkpoints.
        init_dep, teacher_dep: identity of the variant it is initialized from (its stage 1, or the
            pretrained run it is fine-tuned from) and of its teacher, when any.
        ablation, row, seed: where the variant's result goes in the tables (rows), or the row it is
            the first stage of (stage 1: its MLflow run's tags; a stage 1 two rows share names the
            first).
    """

    key: str
    label: str
    kind: Kind
    config: TrainConfig
    resources: Resources
    seed: int
    ablation: str | None = None
    row: str | None = None
    init_dep: str | None = None
    teacher_dep: str | None = None

    @property
    def deps(self) -> tuple[str, ...]:
        return tuple(d for d in (self.init_dep, self.teacher_dep) if d)


#: bumped when the trainer's meaning of a lambda schedule changed (2: the last epoch runs at
#: lambda_end); part of the identity of variants with a non-constant schedule only, so that results
#: trained under the old meaning are never reused as new ones, and every other variant keeps its identity
LAMBDA_RULE = 2
#: progressive binarization as IT defines it (1: smooth weight quantizers on the scale-free argument
#: W / mean|W|, BatchNorm statistics re-estimated with the exact sign before each evaluation); part of
#: the identity of variants whose training forward is smooth
PROGRESSIVE_RULE = 1
#: learning-rate steps count epochs of the whole budget (1: stage 2 continues stage 1's schedule);
#: part of the identity of the stage-2 variants whose learning rate this changes
LR_RULE = 1
#: MT's holistic Tucker groups of ResNet-18 (1: three 5th-order groups, see models/resnet.py)
HOLISTIC_RESNET_RULE = 1
#: feature matching's scale (1: squared distance of unit attention maps summed over positions, not
#: averaged: the same weight means the same at every resolution)
FEATURE_MATCHING_RULE = 1


def meaning_rules(config: TrainConfig) -> dict[str, int]:
    """The rules of the trainer's meaning that changed after results were stored under an older one,
    for the variants whose results they change (and only those): a result trained under an old
    meaning is never reused as a new one, and every other variant keeps its identity and result."""
    rules = {}
    if any(s.kind != "constant" for s in (config.lambda_schedule, *config.lambda_groups)):
        rules["lambda_rule"] = LAMBDA_RULE
    if config.smooth:
        rules["progressive_rule"] = PROGRESSIVE_RULE
    o, offset = config.optim, config.schedule_offset
    if offset and any(o.lr_at(e) != o.lr_at(offset + e) for e in range(config.epochs)):
        rules["lr_rule"] = LR_RULE
    if config.model.arch == "resnet18" and config.model.decomposition.kind == "holistic_tucker":
        rules["holistic_rule"] = HOLISTIC_RESNET_RULE
    if config.distill.feature_weight > 0:
        rules["feature_matching_rule"] = FEATURE_MATCHING_RULE
    return rules


def portable(config_data: dict, project: Path | None = None) -> dict:
    """The config with a data root inside the project folder (the working directory) written relative
    to it: a copied or moved project keeps its variants' identities (and reuses their results)."""
    root = (config_data.get("data") or {}).get("root")
    if not root or "://" in root or not os.path.isabs(root):
        return config_data
    rel = _inside(root, str(project) if project is not None else os.getcwd())
    if rel is None:  # outside the project: an absolute location of this machine
        return config_data
    return {**config_data, "data": {**config_data["data"], "root": rel}}


@functools.lru_cache(maxsize=256)  # one answer per (root, folder): a plan asks it for every variant
def _inside(root: str, project: str) -> str | None:
    """``root`` as ``./relative`` path inside the folder ``project``, None when it is outside."""
    try:
        return f"./{Path(root).relative_to(Path(project).resolve()).as_posix()}"
    except ValueError:
        return None


def identity(config: TrainConfig, deps: tuple[str, ...]) -> str:
    data = portable(comparable(to_dict(dataclasses.replace(config, init_from=None,
                                                           distill=dataclasses.replace(config.distill, teacher=None)))))
    body: dict = {"config": data, "deps": sorted(deps), **meaning_rules(config)}
    payload = json.dumps(body, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Plan:
    variants: dict[str, Variant]  # by key, in topological order
    rows: dict[tuple[str, str, int], str]  # (ablation, row, seed) -> variant key

    def order(self) -> list[Variant]:
        return list(self.variants.values())


def _with_seed(cfg: TrainConfig, seed: int) -> TrainConfig:
    return dataclasses.replace(cfg, seed=seed)


def add_teacher(teachers: dict[str, TeacherSpec], name: str, seed: int, resources: Resources,
                variants: dict[str, Variant]) -> str:
    """Add teacher ``name`` (and its own teachers, first) to ``variants``; returns its key. A teacher
    is trained once, with ``seed``, and shared by every variant that names it."""
    t = teachers[name]
    parent = add_teacher(teachers, t.teacher, seed, resources, variants) if t.teacher else None
    cfg = _with_seed(t.config, seed)
    key = identity(cfg, (parent,) if parent else ())
    variants.setdefault(key, Variant(key, f"teacher {name} / seed {seed}", "teacher", cfg, resources, seed,
                                     teacher_dep=parent))
    return key


def add_pretrained(spec: StudySpec, name: str, seed: int, variants: dict[str, Variant]) -> str:
    """Add the pretrained run ``name`` (and its teacher, first) to ``variants``; returns its key.
    Like a teacher it is trained once, with ``seed``, and shared by every row fine-tuned from it."""
    p = spec.pretrained[name]
    parent = add_teacher(spec.teachers, p.teacher, seed, spec.resources, variants) if p.teacher else None
    cfg = _with_seed(p.config, seed)
    key = identity(cfg, (parent,) if parent else ())
    variants.setdefault(key, Variant(key, f"pretrained {name} / seed {seed}", "pretrain", cfg, spec.resources, seed,
                                     teacher_dep=parent))
    return key


def row_seeds(spec: StudySpec, allotted: dict[tuple[str, str], int] | None = None) -> dict[tuple[str, str], list[int]]:
    """The seeds of every row: the spec's; with adaptive seeds, the first ``allotted[(ablation, row)]``
    of the study's seed order (``min_seeds`` for a row not given: the first look)."""
    a = spec.statistics.adaptive
    if a is None:
        return {(r.ablation, r.name): list(spec.seeds) for r in spec.rows}
    order = spec.seed_order
    return {(r.ablation, r.name): order[:(allotted or {}).get((r.ablation, r.name), a.min_seeds)] for r in spec.rows}


def build_plan(spec: StudySpec, allotted: dict[tuple[str, str], int] | None = None) -> Plan:
    """Expand ``spec`` into its variants and their dependencies (deduplicated by identity);
    ``allotted``: adaptive seeds per row (see :func:`row_seeds`)."""
    variants: dict[str, Variant] = {}
    rows: dict[tuple[str, str, int], str] = {}

    def add(v: Variant) -> str:
        variants.setdefault(v.key, v)
        return v.key

    def teacher(name: str) -> str:
        return add_teacher(spec.teachers, name, spec.seeds[0], spec.resources, variants)

    def row_variant(row: RowSpec, seed: int) -> str:
        cfg = _with_seed(row.config, seed)
        t_key = teacher(row.teacher) if row.teacher else None
        init_key = add_pretrained(spec, row.init, spec.seeds[0], variants) if row.init else None
        if row.stages in ("reverse_order", "standard"):
            e1, e2 = row.split()
            stage1 = {"model.binarize.weights": False, "epochs": e1, "schedule_offset": 0, "schedule_epochs": e1 + e2}
            if row.stages == "standard":
                stage1["model.binarize.activations"] = False
            s1 = with_overrides(cfg, stage1)
            cfg = with_overrides(cfg, {"epochs": e2, "schedule_offset": e1, "schedule_epochs": e1 + e2})
            s1_deps = (t_key,) if t_key else ()
            init_key = add(Variant(identity(s1, s1_deps), f"{row.ablation} / {row.name} / stage 1 / seed {seed}",
                                   "stage1", s1, spec.resources, seed, row.ablation, row.name, teacher_dep=t_key))
        deps = tuple(d for d in (init_key, t_key) if d)
        key = identity(cfg, deps)
        return add(Variant(key, f"{row.ablation} / {row.name} / seed {seed}", "row", cfg, spec.resources, seed,
                           row.ablation, row.name, init_key, t_key))

    seeds = row_seeds(spec, allotted)
    for ab in spec.ablations:
        for row in ab.rows:
            for seed in seeds[(ab.name, row.name)]:
                rows[(ab.name, row.name, seed)] = row_variant(row, seed)
    return Plan(variants, rows)
