"""Ablation modes: how an ablation's body in a study spec expands into its table rows.

- ``incremental``: each row adds its overrides (and stages, teacher) to all the previous rows' (IT Table 1);
- ``isolated``: each row applies only its own overrides to the base;
- ``grid``: the cross product of the axes' levels.

Adding a mode = registering its function with :func:`ablation_mode`; it gets the spec parser (for
its checks and messages naming file, line and field), the ablation's body and where it is.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from bnnctl.workers.train import TrainConfig

from .errors import SpecError


class Parser(Protocol):
    """What a mode uses of the spec's parser (``spec.SpecParser``): its checks and messages."""

    def fail(self, path: str, message: str) -> SpecError: ...
    def config(self, base_data: dict, overrides: tuple, path: str) -> TrainConfig: ...
    def label(self, value: Any, path: str, what: str, extra: str = "") -> str: ...
    def mapping(self, value: Any, path: str, allowed: Any = None) -> dict: ...
    def overrides(self, value: Any, path: str) -> tuple: ...
    def references(self, value: Any, path: str) -> tuple: ...
    def row_init(self, init: Any, path: str, stages: str | None) -> str | None: ...
    def row_extras(self, body: dict, path: str, teachers: dict) -> tuple[str | None, str | None]: ...
    def stage_epochs(self, body: dict, path: str, stages: str, cfg: TrainConfig) -> tuple[int, int] | None: ...


@dataclass(frozen=True)
class RowSpec:
    """One row of an ablation table, fully resolved."""

    name: str
    ablation: str
    mode: str  # a name in ABLATION_MODES
    overrides: tuple[tuple[str, Any], ...]  # cumulative for incremental rows
    stages: str = "single"
    teacher: str | None = None
    reference: float | None = None  # the paper's value of the table's metric
    config: TrainConfig = field(default_factory=TrainConfig)
    #: epochs of stage 1 and stage 2 of a two-stage row; None: the row's `epochs` split in half
    #: (stage 1 gets the smaller half), so that it trains as long as a one-stage row
    stage_epochs: tuple[int, int] | None = None
    #: the paper's values of other metrics (e.g. top-5 beside a top-1 table): (metric, value) pairs
    also: tuple[tuple[str, float], ...] = ()
    #: a run under ``pretrained`` whose last checkpoint initializes this row (fine-tuning)
    init: str | None = None

    def split(self) -> tuple[int, int]:
        """Stage 1's and stage 2's epochs of a two-stage row."""
        if self.stage_epochs is not None:
            return self.stage_epochs
        total = self.config.epochs
        return total // 2, total - total // 2


#: Ablation modes by name: each expands an ablation's body into its rows (RowSpec). Adding one =
#: registering its function here.
ABLATION_MODES: dict[str, Callable[..., list[RowSpec]]] = {}


def ablation_mode(name: str):
    def decorator(fn):
        if name in ABLATION_MODES:
            raise ValueError(f"ablation mode {name!r} is registered twice")
        ABLATION_MODES[name] = fn
        return fn

    return decorator


def _listed_rows(p: Parser, body: dict, path: str, name: str, base_data: dict, teachers: dict,
                 cumulative_rows: bool) -> list[RowSpec]:
    """Rows as listed; ``cumulative_rows``: each row adds its overrides (and stages, teacher) to
    the previous rows' (incremental), else each row stands alone on the base (isolated)."""
    mode = "incremental" if cumulative_rows else "isolated"
    raw_rows = body.get("rows")
    if not isinstance(raw_rows, list) or not raw_rows:
        raise p.fail(f"{path}.rows", "required: a list of rows ({name, set, stages, teacher, init, reference})")
    rows: list[RowSpec] = []
    cumulative: tuple = ()
    stages, teacher, init, split = "single", None, None, None
    for j, raw_row in enumerate(raw_rows):
        rpath = f"{path}.rows[{j}]"
        rb = p.mapping(raw_row, rpath, {"name", "set", "stages", "teacher", "init", "reference"})
        rname = p.label(rb.get("name"), f"{rpath}.name", "row")
        own = p.overrides(rb.get("set"), f"{rpath}.set")
        r_stages, r_teacher = p.row_extras(rb, rpath, teachers)
        ref, also = p.references(rb.get("reference"), f"{rpath}.reference")
        if cumulative_rows:
            cumulative = cumulative + own
            if r_stages is not None:
                stages = r_stages
            teacher = r_teacher or teacher
            init = rb.get("init") or init
            overrides, row_stages, row_teacher = cumulative, stages, teacher
        else:
            overrides, row_stages, row_teacher = own, r_stages or "single", r_teacher
            init = rb.get("init")
        row_init = p.row_init(init, rpath, row_stages)
        cfg = p.config(base_data, overrides, f"{rpath}.set")
        if r_stages is not None or not cumulative_rows:
            split = p.stage_epochs(rb, rpath, row_stages, cfg)
        elif row_stages != "single" and split is None and cfg.epochs < 2:
            raise p.fail(f"{rpath}", "a two-stage row needs at least 2 epochs")
        rows.append(RowSpec(rname, name, mode, overrides, row_stages, row_teacher, ref, cfg, split, also, row_init))
    return rows


@ablation_mode("incremental")
def _incremental(p: Parser, body: dict, path: str, name: str, base_data: dict, teachers: dict) -> list[RowSpec]:
    """Each row adds its overrides to all the previous rows' (IT Table 1)."""
    return _listed_rows(p, body, path, name, base_data, teachers, cumulative_rows=True)


@ablation_mode("isolated")
def _isolated(p: Parser, body: dict, path: str, name: str, base_data: dict, teachers: dict) -> list[RowSpec]:
    """Each row applies only its own overrides to the base."""
    return _listed_rows(p, body, path, name, base_data, teachers, cumulative_rows=False)


@ablation_mode("grid")
def _grid(p: Parser, body: dict, path: str, name: str, base_data: dict, teachers: dict) -> list[RowSpec]:
    """The cross product of the axes' levels, one row per combination (named level/level/...)."""
    axes = p.mapping(body.get("axes"), f"{path}.axes")
    if not axes:
        raise p.fail(f"{path}.axes", "a grid needs at least one axis: {axis: {level: {path: value}}}")
    refs = p.mapping(body.get("references"), f"{path}.references")
    levels = []
    for axis, values in axes.items():
        values = p.mapping(values, f"{path}.axes.{axis}")
        if not values:
            raise p.fail(f"{path}.axes.{axis}", "an axis needs at least one level")
        levels.append([(lvl, p.overrides(v, f"{path}.axes.{axis}.{lvl}"), f"{path}.axes.{axis}.{lvl}")
                       for lvl, v in values.items()])
    for axis_levels in levels:  # each level on its own: a wrong level is named once, as itself
        for _, ov, where in axis_levels:
            p.config(base_data, ov, where)
    rows = []
    for combo in itertools.product(*levels):
        row_name = "/".join(str(lvl) for lvl, _, _ in combo)
        overrides: tuple = sum((ov for _, ov, _ in combo), ())
        try:  # each combination validated once (linear in the grid's size)
            cfg = p.config(base_data, overrides, combo[-1][2])
        except SpecError:  # levels wrong only together: name the first level whose addition fails
            for i in range(1, len(combo)):
                p.config(base_data, sum((ov for _, ov, _ in combo[:i]), ()), combo[i - 1][2])
            raise
        ref, also = p.references(refs.get(row_name), f"{path}.references.{row_name}")
        rows.append(RowSpec(row_name, name, "grid", overrides, "single", None, ref, cfg, also=also))
    return rows
