"""Tuning specs: an Optuna search over dotted config paths, parsed once into frozen objects.

A tuning spec has ``kind: tuning`` and, like a study spec, a ``base`` training config, optional
``teachers`` and ``resources``/``execution``/``tracking``. Instead of ablations it has:

- ``search``: ``{dotted.config.path: {type: float|int|categorical, low, high, log, step, choices}}``;
- ``objective``: ``{metric, direction, value: best|last}`` (default: the task's metric, maximized,
  best epoch);
- ``trials`` (per arm), ``sampler`` (tpe, random, grid, gp) and ``pruner`` (median, percentile,
  hyperband, successive_halving, threshold, none), fed by the per-epoch validation metric;
- ``arms`` (optional): named variants of the base, each tuned with the same trial budget (fair
  ablations: the tuned and the default result of every arm side by side);
- ``teacher`` (optional): every trial distils from this teacher (trained once, first).

Every range bound and every choice is applied to every arm's config here, so an unknown path or a
value the config rejects fails before anything is started or written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnnctl.workers.config import path_steps, to_dict, with_overrides
from bnnctl.workers.metrics import LOSSES, TABLE_METRICS
from bnnctl.workers.errors import ConfigError
from bnnctl.workers.train import TrainConfig

from .spec import (
    Checkpoint,
    Execution,
    Resources,
    TeacherSpec,
    Tracking,
    SpecParser,
    same_names,
    load_yaml,
    spec_hash,
)

MAX_TRIALS = 100_000
TOP_KEYS = {"kind", "name", "description", "task", "base", "seed", "resources", "teachers", "teacher", "search",
            "objective", "trials", "sampler", "pruner", "arms", "default_trial", "tracking", "execution", "storage"}
SAMPLERS = {"tpe": {"seed", "startup_trials"}, "random": {"seed"}, "grid": {"seed"}, "gp": {"seed", "startup_trials"}}
PRUNERS = {
    "median": {"startup_trials", "warmup_epochs"},
    "percentile": {"percentile", "startup_trials", "warmup_epochs"},
    "hyperband": {"min_epochs", "reduction_factor"},
    "successive_halving": {"min_epochs", "reduction_factor"},
    "threshold": {"lower", "upper", "warmup_epochs"},
    "none": set(),
}
METRICS = {task: names + LOSSES for task, names in TABLE_METRICS.items()}  # what an objective may use
PARAM_TYPES = ("float", "int", "categorical")


@dataclass(frozen=True)
class Param:
    """One searched config value."""

    path: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def distribution(self):
        import optuna.distributions as d

        if self.type == "categorical":
            return d.CategoricalDistribution(list(self.choices))
        if self.type == "int":
            return d.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return d.FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)

    def suggest(self, trial) -> Any:
        """Sample this value on an Optuna trial (its public suggest API, as ``ask`` does)."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.path, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.path, float(self.low), float(self.high), step=self.step, log=self.log)

    def grid(self) -> list:
        """The values a grid search visits (categorical choices or stepped ranges)."""
        if self.type == "categorical":
            return list(self.choices)
        step = self.step or 1
        count = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        values = [self.low + i * step for i in range(count)]
        return [int(v) for v in values] if self.type == "int" else [round(float(v), 12) for v in values]

    def describe(self) -> str:
        if self.type == "categorical":
            return f"one of {', '.join(map(str, self.choices))}"
        scale = " (log)" if self.log else ""
        return f"{self.type} in [{self.low}, {self.high}]{scale}" + (f" step {self.step}" if self.step else "")


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str  # "maximize" or "minimize"
    value: str = "best"  # "best" epoch or "last" epoch


@dataclass(frozen=True)
class Component:
    """A sampler or pruner: its name and options, as written in the spec."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)


#: One tuned variant of the base (the base itself when the spec has no arms): a named config with
#: its overrides and teacher, the same record as a study's teacher (one class, spec.TeacherSpec).
Arm = TeacherSpec


@dataclass(frozen=True)
class TuneSpec:
    name: str
    description: str
    file: str
    spec_hash: str
    space_hash: str  # what makes trials comparable: base, arms, teachers, search, objective, seed
    data: dict  # the spec as written (``tune best --as-spec`` starts from it)
    base: TrainConfig
    seed: int
    resources: Resources
    execution: Execution
    tracking: Tracking
    teachers: dict[str, TeacherSpec]
    arms: tuple[Arm, ...]
    params: tuple[Param, ...]
    objective: Objective
    trials: int
    sampler: Component
    pruner: Component
    default_trial: bool
    storage: str | None = None  # run storage root (absolute path or URL); None: --storage / env / default
    checkpoints: tuple[Checkpoint, ...] = ()  # see spec.Checkpoint
    data_roots: tuple[Checkpoint, ...] = ()

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    def optuna_study(self, arm: str) -> str:
        """The Optuna study name of an arm (one Optuna study per arm)."""
        return f"{self.name}/{arm}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _TuneParser(SpecParser):
    def parse_tuning(self) -> TuneSpec:
        if not isinstance(self.data, dict) or self.data.get("kind") != "tuning":
            raise self.fail("kind", "a tuning spec starts with `kind: tuning` (a study spec has ablations "
                            "instead; run it with `bnnctl study run`)")
        top = self.mapping(self.data, "", TOP_KEYS)
        name = self.name(top.get("name"), "name", "tuning")
        base_data = self.mapping(top.get("base"), "base")
        base = self.config(base_data, (), "base")
        task = top.get("task", base.task)
        if task != base.task:
            raise self.fail("task", f"the tuning is declared {task!r} but base.data.dataset "
                            f"{base.data.dataset!r} is a {base.task} dataset")
        seed = top.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= 2**32 - 1:
            raise self.fail("seed", f"expected an integer in [0, {2**32 - 1}] (every trial trains with this seed), "
                            f"got {seed!r}")
        resources, execution, tracking = self.run_sections(top, base)
        teachers = self.parse_teachers(top.get("teachers"), base_data)
        teacher = self.teacher_ref(top.get("teacher"), "teacher", teachers)
        arms = self.parse_arms(top.get("arms"), base_data, teachers, teacher)
        params = self.parse_search(top.get("search"), arms)
        objective = self.parse_objective(top.get("objective"), base.task)
        trials = top.get("trials", 10)
        if not isinstance(trials, int) or isinstance(trials, bool) or not 1 <= trials <= MAX_TRIALS:
            raise self.fail("trials", f"expected the number of trials per arm (an integer in [1, {MAX_TRIALS}]), "
                            f"got {trials!r}")
        sampler = self.component(top.get("sampler"), "sampler", SAMPLERS, "tpe")
        pruner = self.component(top.get("pruner"), "pruner", PRUNERS, "median")
        self.check_components(sampler, pruner, params, trials)
        default_trial = top.get("default_trial", True)
        if not isinstance(default_trial, bool):
            raise self.fail("default_trial", "expected true or false (enqueue the base values as the first trial)")
        description = str(top.get("description", ""))
        comparable = {k: self.data.get(k) for k in ("base", "arms", "teachers", "teacher", "search", "objective", "seed")}
        return TuneSpec(
            name=name, description=description, file=self.file, spec_hash=spec_hash(self.data),
            space_hash=hashlib.sha256(json.dumps(comparable, sort_keys=True, default=str).encode()).hexdigest()[:16],
            data=self.data, base=base, seed=seed, resources=resources, execution=execution, tracking=tracking,
            teachers=teachers, arms=arms, params=params, objective=objective, trials=trials, sampler=sampler,
            pruner=pruner, default_trial=default_trial, storage=self.storage(top),
            checkpoints=tuple(self.checkpoints.values()), data_roots=tuple(self.data_roots.values()),
        )

    def teacher_ref(self, value: Any, path: str, teachers: dict) -> str | None:
        if value is not None and value not in teachers:
            raise self.fail(path, f"unknown teacher {value!r}; defined under teachers: {', '.join(sorted(teachers)) or 'none'}")
        return value

    def parse_arms(self, raw: Any, base_data: dict, teachers: dict, teacher: str | None) -> tuple[Arm, ...]:
        if raw is None:
            return (Arm("base", (), teacher, self.config(base_data, (), "base")),)
        if not isinstance(raw, list) or not raw:
            raise self.fail("arms", "expected a non-empty list of arms ({name, set, teacher}), each tuned with the "
                            "same trial budget")
        arms = []
        for i, body in enumerate(raw):
            path = f"arms[{i}]"
            body = self.mapping(body, path, {"name", "set", "teacher"})
            name = self.label(body.get("name"), f"{path}.name", "arm", extra="/")
            overrides = self.overrides(body.get("set"), f"{path}.set")
            arm_teacher = self.teacher_ref(body.get("teacher"), f"{path}.teacher", teachers) or teacher
            arms.append(Arm(name, overrides, arm_teacher, self.config(base_data, overrides, f"{path}.set")))
        twice = same_names([a.name for a in arms])
        if twice:
            raise self.fail("arms", f"duplicate arm names (compared ignoring case): {', '.join(twice)}")
        return tuple(arms)

    def parse_search(self, raw: Any, arms: tuple[Arm, ...]) -> tuple[Param, ...]:
        space = self.mapping(raw, "search")
        if not space:
            raise self.fail("search", "required: the search space, {dotted.config.path: {type: float, low: 1, "
                            "high: 10, log: true}} (types: float, int, categorical)")
        params = []
        for path_key, body in space.items():
            where = f"search.{path_key}"
            body = self.mapping(body, where, {"type", "low", "high", "log", "step", "choices"})
            kind = body.get("type", "categorical" if "choices" in body else "float")
            if kind not in PARAM_TYPES:
                raise self.fail(f"{where}.type", f"unknown type {kind!r}; allowed: {', '.join(PARAM_TYPES)}")
            if kind == "categorical":
                choices = body.get("choices")
                extra = sorted(set(body) - {"type", "choices"})
                if extra:
                    raise self.fail(f"{where}.{extra[0]}", "a categorical parameter takes only `choices`")
                if not isinstance(choices, list) or not choices:
                    raise self.fail(f"{where}.choices", "a categorical parameter needs a non-empty list of choices")
                if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
                    raise self.fail(f"{where}.choices", "choices must be scalars (numbers, strings, booleans or null)")
                if len({json.dumps(c) for c in choices}) != len(choices):
                    raise self.fail(f"{where}.choices", "choices must be distinct")
                param = Param(path_key, kind, choices=tuple(choices))
                probes = list(choices)
            else:
                low, high, log, step = body.get("low"), body.get("high"), body.get("log", False), body.get("step")
                for key, v in (("low", low), ("high", high)):
                    if not _number(v) or (kind == "int" and not isinstance(v, int)):
                        raise self.fail(f"{where}.{key}", f"required: {'an integer' if kind == 'int' else 'a number'}, "
                                        f"got {v!r}")
                if low >= high:
                    raise self.fail(where, f"low ({low}) must be below high ({high})")
                if not isinstance(log, bool):
                    raise self.fail(f"{where}.log", "expected true or false")
                if log and low <= 0:
                    raise self.fail(f"{where}.low", f"a log-scale range needs low > 0, got {low}")
                if step is not None:
                    if not _number(step) or step <= 0 or (kind == "int" and not isinstance(step, int)):
                        raise self.fail(f"{where}.step", f"expected a positive {'integer' if kind == 'int' else 'number'}, "
                                        f"got {step!r}")
                    if log:
                        raise self.fail(f"{where}.step", "a log-scale range cannot have a step")
                param = Param(path_key, kind, low, high, log, step)
                probes = [low, high]
            for arm in arms:  # the path exists and both ends (every choice) are values the config accepts
                for probe in probes:
                    try:
                        with_overrides(arm.config, {path_key: probe})
                    except ConfigError as err:
                        if any(w in err.message for w in ("unknown key", "no such config section", "no item",
                                                          "list index")):
                            raise self.fail(where, f"unknown config path {path_key!r} ({err.path}: {err.message})") from None
                        if err.path != path_key and err.path in space:
                            continue  # rejected against another searched value (lambda_end < lambda_start):
                            # decided per trial, where an invalid combination fails the trial with its reason
                        raise self.fail(where, f"{probe!r} is not allowed at {err.path}: {err.message}"
                                        + (f" (arm {arm.name})" if len(arms) > 1 else "")) from None
            params.append(param)
        return tuple(params)

    def parse_objective(self, raw: Any, task: str) -> Objective:
        body = self.mapping(raw, "objective", {"metric", "direction", "value"})
        default = "pckh" if task == "pose" else "top1"
        metric = body.get("metric", default)
        if metric not in METRICS[task]:
            raise self.fail("objective.metric", f"unknown metric {metric!r} for a {task} task; allowed: "
                            f"{', '.join(METRICS[task])}")
        direction = body.get("direction", "minimize" if metric.endswith("loss") else "maximize")
        if direction not in ("maximize", "minimize"):
            raise self.fail("objective.direction", f"unknown direction {direction!r}; allowed: maximize, minimize")
        value = body.get("value", "best")
        if value not in ("best", "last"):
            raise self.fail("objective.value", f"unknown value {value!r}; allowed: best (best epoch), last (last epoch)")
        return Objective(metric, direction, value)

    def component(self, raw: Any, path: str, known: dict[str, set], default: str) -> Component:
        if raw is None or isinstance(raw, str):
            raw = {"name": raw or default}
        body = self.mapping(raw, path)
        name = body.get("name", default)
        if name not in known:
            raise self.fail(f"{path}.name", f"unknown {path} {name!r}; allowed: {', '.join(known)}")
        options = {k: v for k, v in body.items() if k != "name"}
        for key, value in options.items():
            if key not in known[name]:
                allowed = ", ".join(sorted(known[name])) or "none"
                raise self.fail(f"{path}.{key}", f"unknown option for the {name} {path}; allowed: {allowed}")
            if not _number(value):
                raise self.fail(f"{path}.{key}", f"expected a number, got {value!r}")
        return Component(name, tuple(sorted(options.items())))

    def check_components(self, sampler: Component, pruner: Component, params: tuple[Param, ...], trials: int) -> None:
        if sampler.name == "grid":
            for p in params:
                if p.type == "float" and p.step is None:
                    raise self.fail(f"search.{p.path}", "the grid sampler needs categorical choices or a `step` "
                                    "for float ranges")
            size = grid_size(params)
            if trials > size:
                raise self.fail("trials", f"{trials} trials exceed the grid's {size} points")
        for key in ("startup_trials", "warmup_epochs", "min_epochs"):
            for comp in (sampler, pruner):
                v = comp.get(key)
                if v is not None and (not isinstance(v, int) or v < 0):
                    raise self.fail(f"{'sampler' if comp is sampler else 'pruner'}.{key}",
                                    f"expected a non-negative integer, got {v!r}")
        if pruner.name == "percentile" and not 0 < pruner.get("percentile", 25.0) < 100:
            raise self.fail("pruner.percentile", "must be in (0, 100)")
        if pruner.name == "threshold" and pruner.get("lower") is None and pruner.get("upper") is None:
            raise self.fail("pruner", "the threshold pruner needs `lower` and/or `upper`")
        rf = pruner.get("reduction_factor")
        if rf is not None and (not isinstance(rf, int) or rf < 2):
            raise self.fail("pruner.reduction_factor", "expected an integer >= 2")


def grid_size(params: tuple[Param, ...]) -> int:
    """Points of the grid sampler's grid: the product of the parameters' grid sizes."""
    return math.prod(len(p.grid()) for p in params)


def load_tune_spec(path: str | Path) -> TuneSpec:
    """Parse and validate a tuning spec file.

    Raises:
        SpecError: the file is missing, not YAML, or invalid; the message names the YAML path and
            line and what is allowed.
    """
    path = Path(path)
    data, lines = load_yaml(path)
    return _TuneParser(path, data, lines).parse_tuning()


def default_params(spec: TuneSpec, arm: Arm) -> dict[str, Any]:
    """The arm's own values at every searched path (the default trial)."""
    data = to_dict(arm.config)
    out = {}
    for p in spec.params:
        node: Any = data
        for step in path_steps(p.path):
            node = node[step]
        out[p.path] = node
    return out


def trial_config(arm: Arm, params: dict[str, Any], seed: int) -> TrainConfig:
    """The arm's config with a trial's sampled values; ConfigError if the combination is invalid."""
    return dataclasses.replace(with_overrides(arm.config, params), seed=seed)
