"""Study specs: one YAML file parsed once into frozen, typed objects.

A spec names a baseline training config (``base``: any field of the workers' ``TrainConfig``) and
ablations whose rows override dotted config paths:

- ``mode: incremental`` -- each row adds its overrides to all the previous rows' (IT Table 1);
- ``mode: isolated`` -- each row alone on the baseline (IT Table 3);
- ``mode: grid`` -- the product of named axes (MT Table 1).

Rows may also run as two stages (``stages: reverse_order``: binary activations with real weights
first, then everything binary, initialized from stage 1; IT §3.3) and distil from a named teacher
(``teacher: NAME``, defined under ``teachers``). Every override is validated by building the row's
full ``TrainConfig`` here, so a bad spec fails before anything is started or written; errors name
the YAML path and line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bnnctl.workers.config import from_dict, with_overrides
from bnnctl.workers.errors import ConfigError, UnknownNameError
from bnnctl.workers.train import TrainConfig

from . import ablations as ablation_modes
from .ablations import RowSpec
from .errors import SpecError
from .layouts import split_name
from .sequential import Adaptive, seed_sequence
from .yamlio import read_yaml

Mode = str  # a name in ablations.ABLATION_MODES: "incremental", "isolated" or "grid"

#: study and tuning names: they appear in URLs, file names, MLflow experiments, Optuna studies, job ids
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NAME_RULE = ("1 to 64 characters: letters, digits, '.', '_' and '-', starting with a letter or digit "
             "(it appears in URLs, file names and MLflow)")
#: a version of a study (``--tag NAME``, or its ``--set`` overrides written out): the study is stored,
#: listed, tracked and tabled as ``NAME@VERSION``, beside (never mixed with) the spec's own
VERSION_RE = re.compile(r"^[A-Za-z0-9._=,:+-]{1,64}$")
TAG_RULE = "1 to 64 characters: letters, digits, '.', '_' and '-', starting with a letter or digit"
#: ablation, row, teacher and arm names: labels in tables (paper wording such as "1 stack ours w/o distil.")
LABEL_MAX = 80
LABEL_RULE = (f"1 to {LABEL_MAX} printable characters, no tabs, newlines or other control characters, "
              "no leading or trailing spaces")
MAX_SEEDS = 100
MAX_SEED = 2**32 - 1
MAX_WORKERS = 256  # data-parallel workers per variant
#: single: one run. reverse_order (IT §3.3): binary activations with real weights, then everything
#: binary from there. standard: the real-valued network, then everything binary from there.
STAGE_KINDS = ("single", "reverse_order", "standard")
TOP_KEYS = {"name", "description", "task", "base", "seeds", "resources", "teachers", "pretrained", "ablations",
            "tracking", "execution", "metric", "storage", "report", "statistics"}
DEFAULT_METRIC = {"pose": "pckh", "classification": "top1"}
#: which epoch a variant reports: its last, or its best on the reported metric (tables, tunings, exports)
REPORT_RULES = ("last", "best")
CORRECTIONS = ("none", "holm")


# --------------------------------------------------------------------------- YAML with line numbers

def load_yaml(path: Path, what: str = "study spec") -> tuple[Any, dict[str, int]]:
    """A spec file's data and the line of every path (the one reader: :mod:`.yamlio`)."""
    data, lines = read_yaml(path, what)
    if data is None:
        raise SpecError(str(path), "", f"the file is empty; a {what} is a YAML mapping (see studies/quickstart.yaml)")
    return data, lines


# --------------------------------------------------------------------------- spec objects

@dataclass(frozen=True)
class Resources:
    """Ray resources of one variant: ``workers`` data-parallel workers (Ray Train), each holding
    ``cpus`` CPUs and ``gpus`` GPUs (fractional GPUs allowed: several small variants share one)."""

    cpus: float = 1.0
    gpus: float = 0.0
    workers: int = 1


@dataclass(frozen=True)
class Execution:
    max_parallel: int = 2
    retries: int = 2
    #: seconds a variant may wait for a worker with its resources before the progress display says
    #: so (an autoscaling cluster may take minutes to add a node)
    wait_warning_s: float = 60.0
    #: what runs the variants: a registered backend's name (None: --backend, $BNNCTL_BACKEND, "ray")
    backend: str | None = None


@dataclass(frozen=True)
class Tracking:
    experiment: str | None = None  # default: the study name


@dataclass(frozen=True)
class Checkpoint:
    """A path a config reads (a checkpoint it starts from: ``init_from``, ``distill.teacher``; a data
    root), as the spec gives it: ``field`` (its YAML path, or ``--set FIELD``) and ``line`` name where."""

    file: str
    field: str
    path: str  # absolute, or a URL
    line: int | None = None


@dataclass(frozen=True)
class TeacherSpec:
    """A named training config: a study's teacher or pretrained run, a tuning's arm (``Arm``): the
    base with its ``overrides``, and the teacher it distils from."""

    name: str
    overrides: tuple[tuple[str, Any], ...]
    teacher: str | None
    config: TrainConfig


@dataclass(frozen=True)
class Ablation:
    name: str
    mode: Mode
    baseline: str
    rows: tuple[RowSpec, ...]


@dataclass(frozen=True)
class Statistics:
    """How a table tests each row against its ablation's baseline: a two-sided paired t-test over
    the seeds both finished, at ``alpha``; ``correction: holm`` adjusts the p-values of a table's
    rows for their number (Holm-Bonferroni). ``adaptive``: seeds are added where a comparison is
    still open, with anytime-valid tests (see :mod:`.sequential`)."""

    alpha: float = 0.05
    correction: str = "none"
    adaptive: Adaptive | None = None

    @property
    def adaptive_alpha(self) -> float:
        assert self.adaptive is not None
        return self.adaptive.alpha if self.adaptive.alpha is not None else self.alpha


@dataclass(frozen=True)
class StudySpec:
    name: str
    description: str
    file: str
    spec_hash: str
    base: TrainConfig
    seeds: tuple[int, ...]
    resources: Resources
    teachers: dict[str, TeacherSpec]
    ablations: tuple[Ablation, ...]
    tracking: Tracking
    execution: Execution
    metric: str | None
    storage: str | None = None  # run storage root (absolute path or URL); None: --storage / env / default
    report: str = "last"  # REPORT_RULES
    statistics: Statistics = field(default_factory=lambda: Statistics())
    #: named runs that rows are fine-tuned from (``init: NAME``), trained once like teachers
    pretrained: dict[str, TeacherSpec] = field(default_factory=dict)
    checkpoints: tuple[Checkpoint, ...] = ()
    data_roots: tuple[Checkpoint, ...] = ()  # each data root and where the spec sets it

    @property
    def rows(self) -> list[RowSpec]:
        return [r for a in self.ablations for r in a.rows]

    @property
    def seed_order(self) -> list[int]:
        """Every seed a row may get, in order: the spec's seeds, then (adaptive) the smallest unused
        integers up to ``max_seeds``."""
        a = self.statistics.adaptive
        return seed_sequence(self.seeds, a.max_seeds) if a is not None else list(self.seeds)

    @property
    def table_metric(self) -> str:
        """The metric of the study's tables: ``metric``, else the task's (PCK@0.2 on LSP)."""
        return self.metric or table_metric(self.base)

    #: ``""`` for the spec as written; else the version its ``--set`` overrides or ``--tag`` make
    #: (then ``name`` is ``SPEC_NAME@VERSION``)
    version: str = ""
    overrides: tuple[tuple[str, Any], ...] = ()  # the ``--set`` overrides of this version

    @property
    def spec_name(self) -> str:
        """The name the spec file gives (``name`` without its version)."""
        return split_name(self.name)[0]

    @property
    def experiment(self) -> str:  # the versions of a study share its MLflow experiment
        return self.tracking.experiment or self.spec_name


def version_name(overrides: tuple[tuple[str, Any], ...], tag: str | None = None) -> str:
    """The version of a run with ``--set`` ``overrides`` and ``--tag`` ``tag``: the tag; else the
    overrides written out, sorted by path (``epochs=2,optim.lr=0.01``), or, when that is longer than
    64 characters or has characters a name cannot (URLs, MLflow), ``set-`` and their hash."""
    import json

    if tag is not None:
        if not NAME_RE.match(tag):
            shown = tag if len(tag) <= 40 else tag[:40] + "..."
            raise ConfigError("--tag", f"{shown!r} is not allowed as a version name: {TAG_RULE}")
        return tag
    if not overrides:
        return ""
    text = ",".join(f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}"
                    for k, v in sorted(overrides, key=lambda kv: kv[0]))
    if VERSION_RE.match(text):
        return text
    return "set-" + spec_hash(sorted([list(o) for o in overrides]))[:10]


def table_metric(base: TrainConfig) -> str:
    """The tables' metric of a study on ``base`` that does not name one."""
    return "pck" if base.data.dataset == "lsp" else DEFAULT_METRIC[base.task]


# --------------------------------------------------------------------------- parsing

def _script(c: str) -> str:
    """The script of a letter, from its Unicode name (LATIN, CYRILLIC, GREEK, CJK...)."""
    return unicodedata.name(c, "UNKNOWN").split(" ")[0]


def lookalike(name: str) -> str:
    """'' unless a word of ``name`` mixes scripts (Unicode TR 39's mixed-script confusables, per
    word: "λ schedule" is fine, "RеLU" with a Cyrillic е is not); then which letters, as code points."""
    import re

    for word in re.findall(r"[^\W\d_]+", name):
        scripts = [_script(c) for c in word]
        if len(set(scripts)) > 1:
            main = max(set(scripts), key=scripts.count)
            odd = ", ".join(f"U+{ord(c):04X} {unicodedata.name(c, '?')}" for c, sc in zip(word, scripts) if sc != main)
            return (f"the word {word!r} mixes scripts ({odd} among {main.title()} letters), so it looks like "
                    "another name; write it in one script")
    return ""


def same_names(names: list[str]) -> list[str]:
    """Names that are one name once case-folded ("ReLU" and "relu"): a table could not tell them apart."""
    from collections import Counter

    folded = [unicodedata.normalize("NFKC", n).casefold() for n in names]
    counts = Counter(folded)
    return sorted({n for n, f in zip(names, folded) if counts[f] > 1})


class SpecParser:
    def __init__(self, file: Path, data: Any, lines: dict[str, int],
                 cli_overrides: tuple[tuple[str, Any], ...] = (), tag: str | None = None) -> None:
        self.file, self.data, self.lines = str(file), data, lines
        self.version = version_name(cli_overrides, tag)
        self.cli_overrides = cli_overrides  # `--set PATH=VALUE`: applied last, to every config
        #: the checkpoints configs start from (init_from, distill.teacher), where the spec sets them:
        #: checked before a run starts anything (see preflight.py)
        self.checkpoints: dict[tuple[str, str], Checkpoint] = {}
        self.data_roots: dict[str, Checkpoint] = {}  # data root -> where the spec sets it
        self._bases: dict[int, tuple[dict, TrainConfig]] = {}  # id(base data) -> (it, its parsed config)

    def fail(self, path: str, message: str) -> SpecError:
        line = self.lines.get(path)
        probe = path
        while probe and line is None:
            line = self.lines.get(probe)
            probe = probe.rsplit(".", 1)[0] if "." in probe else ""
        return SpecError(self.file, path, message, line)

    def name(self, value: Any, path: str, what: str) -> str:
        """A study or tuning name (see NAME_RULE)."""
        if not isinstance(value, str) or not value:
            raise self.fail(path, f"required: the {what}'s name ({NAME_RULE})")
        if not NAME_RE.match(value):
            shown = value if len(value) <= 40 else value[:40] + "..."
            raise self.fail(path, f"{shown!r} is not allowed as a {what} name: {NAME_RULE}")
        return value

    def label(self, value: Any, path: str, what: str, extra: str = "") -> str:
        """An ablation, row, teacher or arm name (see LABEL_RULE), NFKC-normalised (a composed and a
        decomposed "Café" are one name); ``extra``: characters also refused. A word mixing scripts
        (a Cyrillic "е" in "ReLU") is refused with its code points: it would look like another row."""
        if not isinstance(value, str) or not value:
            raise self.fail(path, f"required: the {what}'s name ({LABEL_RULE})")
        value = unicodedata.normalize("NFKC", value)
        mixed = lookalike(value)
        if mixed:
            raise self.fail(path, f"{value!r} is not allowed as a {what} name: {mixed}")
        bad = (len(value) > LABEL_MAX or value != value.strip()
               or any(unicodedata.category(c).startswith("C") for c in value) or any(c in extra for c in value))
        if bad:
            shown = value if len(value) <= 40 else value[:40] + "..."
            rule = LABEL_RULE + (f", and no {' '.join(repr(c) for c in extra)}" if extra else "")
            raise self.fail(path, f"{shown!r} is not allowed as a {what} name: {rule}")
        return value

    def mapping(self, value: Any, path: str, allowed: set[str] | None = None) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            if not path:
                raise self.fail(path, f"expected a mapping of settings ({', '.join(sorted(allowed or ()))}) at the "
                                f"top of the file, got a {type(value).__name__}")
            raise self.fail(path, f"expected a mapping, got {type(value).__name__}")
        if allowed is not None:
            for key in value:
                if key not in allowed:
                    raise self.fail(f"{path}.{key}" if path else str(key),
                                    f"unknown key {key!r}; allowed here: {', '.join(sorted(allowed))}")
        return value

    def typed(self, cls, value: Any, path: str):
        try:
            return from_dict(cls, self.mapping(value, path), "")
        except ConfigError as err:
            sub = f"{path}.{err.path}" if err.path else path
            raise self.fail(sub, err.message) from None

    def overrides(self, value: Any, path: str) -> tuple[tuple[str, Any], ...]:
        sets = self.mapping(value, path)
        for key in sets:
            if not isinstance(key, str) or not key:
                raise self.fail(path, f"override keys are dotted config paths such as model.activation.kind, got {key!r}")
        return tuple(sets.items())

    def workers(self) -> int:
        """The spec's ``resources.workers`` (checked in full by :meth:`run_sections`)."""
        raw = self.data.get("resources") if isinstance(self.data, dict) else None
        value = raw.get("workers", 1) if isinstance(raw, dict) else 1
        return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS else 1

    def config(self, base_data: dict, overrides: tuple[tuple[str, Any], ...], path: str) -> TrainConfig:
        """The TrainConfig of base + overrides; errors point at the override that caused them. Its
        ``ranks`` are the spec's ``resources.workers`` (never written in a config)."""
        base = self._bases.get(id(base_data))
        if base is None or base[0] is not base_data:  # the same base is parsed once (a grid's rows share it)
            try:
                base = (base_data, from_dict(TrainConfig, base_data, ""))
            except ConfigError as err:
                raise self.fail(f"base.{err.path}" if err.path else "base", err.message) from None
            self._bases[id(base_data)] = base
        cfg = self._overridden(base[1], overrides, path)
        try:  # every --set at once; when that fails, one by one to name the wrong one
            cfg = with_overrides(cfg, dict(self.cli_overrides)) if self.cli_overrides else cfg
        except ConfigError:
            for key, value in self.cli_overrides:
                try:
                    cfg = with_overrides(cfg, {key: value})
                except ConfigError as err:
                    raise ConfigError(f"--set {key}", err.message if err.path == key else f"{err.path}: {err.message}") from None
        if cfg.ranks != 1:
            raise self.fail(f"{path}.ranks", "is set from resources.workers (data-parallel workers per variant); "
                            "write `resources: {workers: N}` instead")
        cfg = dataclasses.replace(cfg, ranks=self.workers())
        try:  # the model is built now (once per distinct model), not first by a worker
            check_model(cfg)
        except ConfigError as err:  # a model no override of this row changes is the base's
            own = path == "base" or err.path != "model" or any(k.startswith("model.") for k, _ in overrides)
            raise self.fail(f"{path if own else 'base'}.{err.path}", err.message) from None
        cfg = resolve_paths(cfg)
        if cfg.data.root is not None:  # where each data root is set, for the driver's check of it
            where = self.set_where("data", overrides, path)
            self.data_roots.setdefault(cfg.data.root, Checkpoint(self.file, where, cfg.data.root, self.lines.get(where)))
        for field_ in ("init_from", "distill.teacher"):
            value = cfg.init_from if field_ == "init_from" else cfg.distill.teacher
            if value is not None:
                where = self.set_where(field_, overrides, path)
                self.checkpoints.setdefault((where, value), Checkpoint(self.file, where, value, self.lines.get(where)))
        return cfg

    def _overridden(self, cfg: TrainConfig, overrides: tuple[tuple[str, Any], ...], path: str) -> TrainConfig:
        """``cfg`` with the overrides applied, validated once as a whole (a grid plans in linear
        time); when that fails, applied one by one, and the first that fails is named."""
        if not overrides:
            return cfg
        last: dict[str, Any] = {}
        for key, value in overrides:  # a key set again is applied where it was last set (as in order)
            last.pop(key, None)
            last[key] = value
        try:
            return with_overrides(cfg, last)
        except ConfigError:
            pass
        for key, value in overrides:
            try:
                cfg = with_overrides(cfg, {key: value})
            except ConfigError as err:
                if err.path == key or err.path.startswith(key + "."):  # the override itself is wrong
                    raise self.fail(f"{path}.{err.path}", err.message) from None
                raise self.fail(f"{path}.{key}", f"{err.path}: {err.message}") from None
        return cfg  # valid in order only (a setting under a section that an earlier override wrote whole)

    def set_where(self, field_: str, overrides: tuple[tuple[str, Any], ...], path: str) -> str:
        """Where the value of ``field_`` (or a setting under it) comes from: the last ``--set``,
        override or base that sets it."""
        def sets(key: str) -> bool:
            return key == field_ or key.startswith(field_ + ".")

        hit = [k for k, _ in self.cli_overrides if sets(k)]
        if hit:
            return f"--set {hit[-1]}"
        hit = [k for k, _ in overrides if sets(k)]
        if hit:
            return f"{path}.{hit[-1]}"
        return f"base.{field_}"

    def parse(self) -> StudySpec:
        if isinstance(self.data, dict) and self.data.get("kind") == "tuning":
            raise self.fail("kind", "this is a tuning spec; run it with `bnnctl tune run`")
        top = self.mapping(self.data, "", TOP_KEYS)
        name = self.name(top.get("name"), "name", "study")
        base_data = self.mapping(top.get("base"), "base")
        base = self.config(base_data, (), "base")
        task = top.get("task", base.task)
        if task not in ("pose", "classification"):
            raise self.fail("task", f"unknown task {task!r}; allowed: pose, classification")
        if task != base.task:
            raise self.fail("task", f"the study is declared {task!r} but base.data.dataset "
                            f"{base.data.dataset!r} is a {base.task} dataset")
        seeds = top.get("seeds", [0])
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise self.fail("seeds", "expected a non-empty list of integers")
        if len(seeds) > MAX_SEEDS or not all(0 <= s <= MAX_SEED for s in seeds):
            raise self.fail("seeds", f"at most {MAX_SEEDS} seeds, each from 0 to {MAX_SEED}")
        if len(set(seeds)) != len(seeds):
            raise self.fail("seeds", "seeds must be distinct")
        resources, execution, tracking = self.run_sections(top, base)
        metric = top.get("metric")
        from bnnctl.workers.metrics import ALL_TABLE_METRICS, TABLE_METRICS

        if metric is not None and metric not in ALL_TABLE_METRICS:
            raise self.fail("metric", f"unknown metric {metric!r}; allowed: {', '.join(ALL_TABLE_METRICS)}")
        self.metric, self.task_metrics = metric or table_metric(base), TABLE_METRICS[base.task]
        teachers = self.parse_teachers(top.get("teachers"), base_data)
        self.pretrained = self.parse_teachers(top.get("pretrained"), base_data, "pretrained")
        for name, run in self.pretrained.items():
            if run.teacher is not None and run.teacher not in teachers:
                raise self.fail(f"pretrained.{name}.teacher", f"unknown teacher {run.teacher!r}; defined under "
                                f"teachers: {', '.join(sorted(teachers)) or 'none'}")
        ablations_raw = top.get("ablations")
        if not isinstance(ablations_raw, list) or not ablations_raw:
            raise self.fail("ablations", "required: a list of ablations (incremental, isolated or grid)")
        ablations = tuple(self.parse_ablation(a, f"ablations[{i}]", base_data, teachers)
                          for i, a in enumerate(ablations_raw))
        for i, ab in enumerate(ablations):  # names compared case-folded: "ReLU" and "relu" are one row
            twice = same_names([row.name for row in ab.rows])
            if twice:
                raise self.fail(f"ablations[{i}]", f"duplicate row name {twice[0]!r} in ablation {ab.name!r} (names "
                                f"are compared ignoring case: {', '.join(repr(n) for n in twice)})")
        twice = same_names([a.name for a in ablations])
        if twice:
            raise self.fail("ablations", f"duplicate ablation names (compared ignoring case): {', '.join(map(repr, twice))}")
        for section, named in (("teachers", teachers), ("pretrained", self.pretrained)):
            twice = same_names(list(named))
            if twice:
                raise self.fail(section, f"duplicate names (compared ignoring case): {', '.join(map(repr, twice))}")
        description = top.get("description", "")
        return StudySpec(
            name=f"{name}@{self.version}" if self.version else name, version=self.version,
            overrides=self.cli_overrides, description=str(description), file=self.file,
            spec_hash=spec_hash([self.data, [list(o) for o in self.cli_overrides]] if self.cli_overrides else self.data),
            base=base, seeds=tuple(seeds), resources=resources, teachers=teachers, ablations=ablations,
            tracking=tracking, execution=execution, metric=metric, storage=self.storage(top),
            report=self.report(top.get("report")), statistics=self.statistics(top.get("statistics")),
            pretrained=self.pretrained, checkpoints=tuple(self.checkpoints.values()),
            data_roots=tuple(self.data_roots.values()))

    def report(self, value: Any) -> str:
        if value is None:
            return "last"
        if value not in REPORT_RULES:
            raise self.fail("report", f"unknown rule {value!r}; allowed: last (the last epoch's value), best (the "
                            "best value over the epochs, on the validation set)")
        return value

    def statistics(self, raw: Any) -> Statistics:
        stats = self.typed(Statistics, raw, "statistics")
        if not 0 < stats.alpha < 1:
            raise self.fail("statistics.alpha", f"must be in (0, 1), got {stats.alpha}")
        if stats.correction not in CORRECTIONS:
            raise self.fail("statistics.correction", f"unknown correction {stats.correction!r}; allowed: "
                            f"{', '.join(CORRECTIONS)}")
        a = stats.adaptive
        if a is not None:
            checks = (("alpha", a.alpha is None or 0 < a.alpha < 1, "in (0, 1)"),
                      ("power", 0 < a.power < 1, "in (0, 1)"),
                      ("min_seeds", 2 <= a.min_seeds <= MAX_SEEDS, f"in [2, {MAX_SEEDS}] (a paired test needs 2)"),
                      ("max_seeds", a.min_seeds <= a.max_seeds <= MAX_SEEDS, f"in [min_seeds, {MAX_SEEDS}]"),
                      ("batch", 1 <= a.batch <= MAX_SEEDS, f"in [1, {MAX_SEEDS}]"),
                      ("margin", a.margin > 0, "a positive number (in the table metric's units)"))
            for name, ok, rule in checks:
                if not ok:
                    raise self.fail(f"statistics.adaptive.{name}", f"must be {rule}, got {getattr(a, name)}")
        return stats

    def run_sections(self, top: dict, base: TrainConfig) -> tuple[Resources, Execution, Tracking]:
        """The ``resources``, ``execution`` and ``tracking`` sections (studies and tunings alike)."""
        resources = self.typed(Resources, top.get("resources"), "resources")
        if not (0 < resources.cpus <= 1024 and 0 <= resources.gpus <= 64):
            raise self.fail("resources", "cpus must be in (0, 1024] and gpus in [0, 64] per variant (fractions "
                            f"allowed, e.g. gpus: 0.5); got cpus {resources.cpus:g}, gpus {resources.gpus:g}")
        if not 1 <= resources.workers <= MAX_WORKERS:
            raise self.fail("resources.workers", f"must be in [1, {MAX_WORKERS}] (data-parallel workers per variant), "
                            f"got {resources.workers}")
        if resources.gpus > 0 and base.device == "cpu":
            raise self.fail("resources.gpus", f"{resources.gpus:g} GPUs requested but base.device is cpu; "
                            "set device: cuda (or auto), or gpus: 0")
        execution = self.typed(Execution, top.get("execution"), "execution")
        if not (1 <= execution.max_parallel <= 1024 and 0 <= execution.retries <= 100
                and 0 < execution.wait_warning_s <= 86400):
            raise self.fail("execution", "max_parallel (variants at once) must be in [1, 1024], retries in [0, 100] "
                            "and wait_warning_s in (0, 86400]")
        if execution.backend is not None:
            from .backends import backend_class, backend_names

            try:
                backend_class(execution.backend)
            except (UnknownNameError, TypeError, ImportError) as err:
                detail = (f"unknown backend {execution.backend!r}" if isinstance(err, UnknownNameError)
                          else f"backend {execution.backend!r} cannot be loaded: {err}")
                raise self.fail("execution.backend", f"{detail}; valid names: {', '.join(backend_names())}") from None
        tracking = self.typed(Tracking, top.get("tracking"), "tracking")
        if tracking.experiment is not None:  # an MLflow experiment's name: the same rule as a study's
            self.name(tracking.experiment, "tracking.experiment", "MLflow experiment")
        return resources, execution, tracking

    def storage(self, top: dict) -> str | None:
        """The spec's ``storage:`` (a folder, relative to the working directory, or an fsspec URL)."""
        value = top.get("storage")
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail("storage", "expected a folder or an fsspec URL such as s3://bucket/runs")
        from .runstorage import normalize

        return normalize(value.strip())

    def parse_teachers(self, raw: Any, base_data: dict, section: str = "teachers") -> dict[str, TeacherSpec]:
        """Named runs trained once and shared: ``teachers`` (distilled from) or ``pretrained``
        (fine-tuned from); each may itself learn from a teacher."""
        teachers = {}
        what = "teacher" if section == "teachers" else "pretrained run"
        for name, body in self.mapping(raw, section).items():
            path = f"{section}.{name}"
            self.label(name, path, what)
            body = self.mapping(body, path, {"set", "teacher"})
            overrides = self.overrides(body.get("set"), f"{path}.set")
            teachers[name] = TeacherSpec(name, overrides, body.get("teacher"), self.config(base_data, overrides, f"{path}.set"))
        if section != "teachers":  # their teachers are checked against the teachers section
            return teachers
        # teachers of teachers must exist and must not form a cycle
        for name, t in teachers.items():
            chain, current = [name], t.teacher
            while current is not None:
                if current not in teachers:
                    raise self.fail(f"teachers.{chain[-1]}.teacher", f"unknown teacher {current!r}; defined: {', '.join(sorted(teachers)) or 'none'}")
                if current in chain:
                    raise self.fail(f"teachers.{name}.teacher", f"teachers form a cycle: {' -> '.join(chain + [current])}")
                chain.append(current)
                current = teachers[current].teacher
        return teachers

    def references(self, value: Any, path: str) -> tuple[float | None, tuple[tuple[str, float], ...]]:
        """A row's ``reference``: the paper's value of the table's metric (a number), or of several
        metrics (``{top1: 53.7, top5: 76.8}``). Returns (the table metric's value, the others)."""
        if value is None:
            return None, ()
        if not isinstance(value, dict):
            value = {self.metric: value}
        found = {}
        for metric, number in value.items():
            if metric not in self.task_metrics:
                raise self.fail(f"{path}.{metric}", f"unknown metric {metric!r} for a reference; allowed: "
                                f"{', '.join(self.task_metrics)}")
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise self.fail(f"{path}.{metric}" if len(value) > 1 or metric != self.metric else path,
                                f"expected the paper's value (a number), got {number!r}")
            found[metric] = float(number)
        return found.pop(self.metric, None), tuple(found.items())

    def row_init(self, init: Any, path: str, stages: str | None) -> str | None:
        """A row's ``init``: the ``pretrained`` run it is fine-tuned from."""
        if init is None:
            return None
        if init not in self.pretrained:
            raise self.fail(f"{path}.init", f"unknown pretrained run {init!r}; defined under pretrained: "
                            f"{', '.join(sorted(self.pretrained)) or 'none'}")
        if stages not in (None, "single"):
            raise self.fail(f"{path}.init", f"a {stages} row initializes its stage 2 from its stage 1; "
                            "fine-tuning from a pretrained run needs a single-stage row")
        return init

    def row_extras(self, body: dict, path: str, teachers: dict) -> tuple[str | None, str | None]:
        stages = body.get("stages")
        if isinstance(stages, dict):
            stages = stages.get("kind")
        if stages is not None and stages not in STAGE_KINDS:
            raise self.fail(f"{path}.stages", f"unknown stages {stages!r}; allowed: {', '.join(STAGE_KINDS)}")
        teacher = body.get("teacher")
        if teacher is not None and teacher not in teachers:
            raise self.fail(f"{path}.teacher", f"unknown teacher {teacher!r}; defined under teachers: "
                            f"{', '.join(sorted(teachers)) or 'none'}")
        return stages, teacher

    def stage_epochs(self, body: dict, path: str, stages: str, cfg: TrainConfig) -> tuple[int, int] | None:
        """``stages: {kind: ..., stage1_epochs: N, stage2_epochs: M}`` (default: the row's epochs,
        split in half); a two-stage row needs at least 2 epochs."""
        raw = body.get("stages")
        if stages == "single":
            if isinstance(raw, dict) and set(raw) - {"kind"}:
                raise self.fail(f"{path}.stages", "stage epochs apply to two-stage rows (reverse_order, standard)")
            return None
        if not isinstance(raw, dict):
            if cfg.epochs < 2:
                raise self.fail(f"{path}.stages", f"a two-stage row splits its {cfg.epochs} epoch(s) between two "
                                "stages: give it at least 2 epochs")
            return None
        self.mapping(raw, f"{path}.stages", {"kind", "stage1_epochs", "stage2_epochs"})
        e1, e2 = raw.get("stage1_epochs"), raw.get("stage2_epochs")
        for name, v in (("stage1_epochs", e1), ("stage2_epochs", e2)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 10_000):
                raise self.fail(f"{path}.stages.{name}", f"expected epochs in [1, 10000], got {v!r}")
        if e1 is None and e2 is None:
            return None
        if e1 is None or e2 is None:  # one given: the other is the rest of the row's epochs
            given = e1 if e1 is not None else e2
            if given >= cfg.epochs:
                raise self.fail(f"{path}.stages", f"{given} epochs leave none of the row's {cfg.epochs} for the "
                                "other stage; give both stage1_epochs and stage2_epochs for a longer budget")
            e1, e2 = (given, cfg.epochs - given) if e1 is not None else (cfg.epochs - given, given)
        return e1, e2

    def parse_ablation(self, raw: Any, path: str, base_data: dict, teachers: dict) -> Ablation:
        body = self.mapping(raw, path, {"name", "mode", "rows", "axes", "references", "baseline"})
        name = self.label(body.get("name"), f"{path}.name", "ablation")
        mode = body.get("mode", "incremental")
        if mode not in ablation_modes.ABLATION_MODES:
            raise self.fail(f"{path}.mode", f"unknown mode {mode!r}; allowed: {', '.join(ablation_modes.ABLATION_MODES)}")
        rows = ablation_modes.ABLATION_MODES[mode](self, body, path, name, base_data, teachers)
        baseline = body.get("baseline", rows[0].name)
        if baseline not in [r.name for r in rows]:
            raise self.fail(f"{path}.baseline", f"no row named {baseline!r} in this ablation")
        return Ablation(name, mode, baseline, tuple(rows))


_MODELS: dict = {}  # model config -> a built model (or why it cannot be built), once per process


def check_model(cfg: TrainConfig) -> None:
    """Build the config's network (cached by its model config): a shape no block accepts (e.g. too
    few channels for a block) is the spec's error, named now, not a worker's traceback later. Its
    ``lambda_groups`` must name groups the model has (path ``lambda_groups[i].group``)."""
    from bnnctl.workers.models import build_model
    from bnnctl.workers.schedules import check_groups

    key = repr(cfg.model)
    if key not in _MODELS:
        _MODELS[key] = _built(cfg.model, meta=True)
    if isinstance(_MODELS[key], ConfigError):
        raise _MODELS[key]
    if cfg.lambda_groups:
        if _MODELS[key] is None:
            _MODELS[key] = build_model(cfg.model)
        check_groups(_MODELS[key], cfg.lambda_groups)


def _built(model_config, meta: bool):
    """The model, built on torch's meta device (shapes only: milliseconds even for a ResNet-18 with
    decomposed layers); a ConfigError when it cannot be built (a real build confirms it); None when
    it computes on its weights while built (a decomposition): the check is then left to training."""
    import torch

    from bnnctl.workers.models import build_model

    try:
        if not meta:
            return build_model(model_config)
        with torch.device("meta"):
            return build_model(model_config)
    except (ValueError, ConfigError) as err:
        if meta:
            return _built(model_config, meta=False)
        return ConfigError("model", f"this network cannot be built: {getattr(err, 'message', err)}")
    except Exception:  # noqa: BLE001 - an operation meta tensors do not support (e.g. .item())
        if meta:
            return None
        raise


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """Every path of a config as an absolute path of this machine (or a URL, unchanged), resolved
    once, at load. The rule: a relative path is relative to the working directory of the command
    (the project folder, where .bnnctl/ lives), never to the folder a worker runs in."""
    def absolute(p: str | None) -> str | None:
        if p is None or "://" in p or os.path.isabs(p):
            return p
        return str(Path(p).expanduser().resolve())

    root, init, teacher = absolute(cfg.data.root), absolute(cfg.init_from), absolute(cfg.distill.teacher)
    if (root, init, teacher) == (cfg.data.root, cfg.init_from, cfg.distill.teacher):
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=root), init_from=init,
                               distill=dataclasses.replace(cfg.distill, teacher=teacher))


def spec_hash(data: Any) -> str:
    return hashlib.sha256(yaml.safe_dump(data, sort_keys=True).encode()).hexdigest()[:16]


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None, tag: str | None = None) -> StudySpec:
    """Parse and validate a study spec file. ``overrides`` (``--set``): dotted config paths applied
    last to every variant's config (they become part of the variants' identities); with them, or
    with a ``tag`` (``--tag``), the spec is a version of the study, named ``NAME@VERSION`` (see
    :func:`version_name`).

    Raises:
        SpecError: the file is missing, not YAML, or invalid; the message names the YAML path and
            line and what is allowed. ConfigError: an override is invalid (named ``--set PATH``).
    """
    path = Path(path)
    data, lines = load_yaml(path)
    return SpecParser(path, data, lines, tuple((overrides or {}).items()), tag).parse()

