"""What a study or a tuning stores about itself for the reading side (tables, dashboard, CLI,
results), as typed objects: :class:`StudyLayout` and :class:`TuningLayout`.

The store keeps them as plain JSON data (``Study.spec``), together with the driver's annotations
(``stopped_reason``, ``mlflow_experiment_id``, ``job``); :func:`parse` turns that data back into the
typed object, and ``to_dict`` gives the stored form. Layouts written by older versions, without
the fields added since, get their defaults; unknown keys are ignored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

#: Significance level of the paired test when a stored layout does not say.
DEFAULT_ALPHA = 0.05

T = TypeVar("T")


def split_name(name: str) -> tuple[str, str]:
    """A stored study's name as (the spec's name, its version): a run with ``--set`` or ``--tag`` is
    stored as ``NAME@VERSION``; ``""`` is the spec as written."""
    spec_name, _, version = name.partition("@")
    return spec_name, version


def versions_of(spec_name: str, names: list[str]) -> list[str]:
    """Those of ``names`` that are versions of the spec ``spec_name`` (not the spec's own)."""
    return [n for n in names if split_name(n)[0] == spec_name and split_name(n)[1]]


def _build(cls: type[T], data: dict) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class RowLayout:
    name: str
    reference: float | None = None  # the paper's value of the table's metric
    also: dict = field(default_factory=dict)  # the paper's values of other metrics (metric -> value)


@dataclass(frozen=True)
class AblationLayout:
    name: str
    mode: str
    baseline: str
    rows: tuple[RowLayout, ...] = ()

    @classmethod
    def from_dict(cls, data: dict) -> AblationLayout:
        return _build(cls, {**data, "rows": tuple(_build(RowLayout, r) for r in data.get("rows", ()))})

    @property
    def row_names(self) -> list[str]:
        return [r.name for r in self.rows]


@dataclass(frozen=True)
class Annotations:
    """What a driver adds to a stored study while it runs."""

    stopped_reason: str | None = None
    mlflow_experiment_id: str | None = None
    job: dict | None = None  # a submitted study's Ray job (id, address)


@dataclass(frozen=True)
class StudyLayout(Annotations):
    """What a study's tables and pages need from its spec."""

    name: str = ""
    description: str = ""
    seeds: tuple[int, ...] = ()
    metric: str = ""
    report: str = "last"  # "last" or "best" epoch
    alpha: float = DEFAULT_ALPHA
    correction: str = "none"  # or "holm"
    ablations: tuple[AblationLayout, ...] = ()
    kind: str = "study"
    #: adaptive seeds (``statistics.adaptive`` as plain data: alpha, power, min_seeds, max_seeds,
    #: batch, margin); None: every row has every seed of ``seeds``
    adaptive: dict | None = None
    #: a version of the study (``NAME@VERSION``): its name and the ``--set`` overrides it applies
    version: str = ""
    overrides: dict = field(default_factory=dict)
    #: the base training config, flattened to dotted paths (the dashboard's config columns)
    base: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> StudyLayout:
        return _build(cls, {**data, "seeds": tuple(data.get("seeds", ())), "alpha": float(data.get("alpha", DEFAULT_ALPHA)),
                            "ablations": tuple(AblationLayout.from_dict(a) for a in data.get("ablations", ()))})

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def ablation(self, name: str) -> AblationLayout | None:
        return next((a for a in self.ablations if a.name == name), None)


@dataclass(frozen=True)
class ArmLayout:
    name: str
    optuna_study: str
    teacher: str | None = None


@dataclass(frozen=True)
class ParamLayout:
    path: str
    type: str
    describe: str = ""
    log: bool = False


@dataclass(frozen=True)
class TuningLayout(Annotations):
    """What ``tune show``, ``tune best`` and the dashboard need from a tuning's spec."""

    name: str = ""
    description: str = ""
    seed: int = 0
    metric: str = ""
    direction: str = "maximize"
    value: str = "best"  # the trial's value: its best epoch's or its last
    trials: int = 0
    sampler: str = ""
    pruner: str = ""
    space_hash: str = ""
    arms: tuple[ArmLayout, ...] = ()
    params: tuple[ParamLayout, ...] = ()
    data: dict = field(default_factory=dict)  # the tuning spec as written (for `tune best --as-spec`)
    kind: str = "tuning"

    @classmethod
    def from_dict(cls, data: dict) -> TuningLayout:
        return _build(cls, {**data, "arms": tuple(_build(ArmLayout, a) for a in data.get("arms", ())),
                            "params": tuple(_build(ParamLayout, p) for p in data.get("params", ()))})

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"

    @property
    def param_paths(self) -> list[str]:
        return [p.path for p in self.params]


def _plain(layout) -> dict[str, Any]:
    """Plain JSON data; the annotations only where set (as the store writes them)."""
    data = dataclasses.asdict(layout)
    for key in (f.name for f in dataclasses.fields(Annotations)):
        if data.get(key) is None:
            data.pop(key, None)
    return _lists(data)


def _lists(value):
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def parse(data: dict | None) -> StudyLayout | TuningLayout:
    """The typed layout of a stored study or tuning (``Study.spec``)."""
    data = data or {}
    return TuningLayout.from_dict(data) if data.get("kind") == "tuning" else StudyLayout.from_dict(data)
