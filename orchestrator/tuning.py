"""Running a tuning: Optuna ask/tell in the driver, every trial a variant on the Ray executor.

- One Optuna study per arm (``<tuning>/<arm>``), in Optuna's RDB storage inside the orchestrator's
  own database (sqlite by default, PostgreSQL on a cluster). Only this driver writes it: workers
  report through the executor's queue, so parallel trials never contend for sqlite's lock.
- Every trial is a variant with its identity (the sampled config): a trial that repeats an earlier
  config, in this tuning or in a study, reuses its result. Its MLflow run is a child of the tuning's
  run, tagged with the trial number and sampled values; the objective is logged as ``objective``.
- The base config (each arm's own values) is enqueued as the first trial, and never pruned: its
  value is the default the tuned result is compared with.
- Pruning: every epoch's validation metric is reported to the trial; when the pruner says stop, the
  worker stops after that epoch (its checkpoint stays), and the trial is PRUNED in Optuna and in
  MLflow (run KILLED, tag ``bnnctl.trial_state=PRUNED``).
- Resume: running the same spec again continues the same Optuna studies up to ``trials`` finished
  trials (COMPLETE, PRUNED or FAIL) per arm; trials that were running when the driver died resume
  from their checkpoints. Trials lost with a worker are retried by the executor; failed trials keep
  their reason (user attribute ``fail_reason``).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnnctl.workers.config import to_dict
from bnnctl.workers.errors import ConfigError

from .errors import SpecError, StoreError
from .executor import Events, Hooks
from .layouts import ArmLayout, ParamLayout, TuningLayout
from .plan import Plan, Variant, add_teacher, identity
from .preflight import preflight
from .runcore import DriverSession, LeaseKeeper, RunOptions
from .store import Member, Store
from .urls import mask_text
from .study import check_configs, prepare_data
from .optunastudies import check_compatible, open_studies
from .tunespec import Arm, TuneSpec, load_tune_spec, trial_config
from .tuneresults import (  # noqa: F401 - the reading side, also importable from here
    arm_studies,
    best_as_spec,
    importances,
    load_tuning,
    optuna_storage,
    summarize,
)

def tuning_layout(spec: TuneSpec) -> dict:
    """What ``tune show``, ``tune best`` and the dashboard need, stored with the tuning: a
    :class:`~bnnctl.orchestrator.layouts.TuningLayout` as plain data."""
    return TuningLayout(
        name=spec.name, description=spec.description, seed=spec.seed, metric=spec.objective.metric,
        direction=spec.objective.direction, value=spec.objective.value, trials=spec.trials,
        sampler=spec.sampler.name, pruner=spec.pruner.name, space_hash=spec.space_hash,
        arms=tuple(ArmLayout(a.name, spec.optuna_study(a.name), a.teacher) for a in spec.arms),
        params=tuple(ParamLayout(p.path, p.type, p.describe(), p.log) for p in spec.params), data=spec.data,
    ).to_dict()


def objective_value(metrics: dict[str, list[tuple[int, float]]], spec_metric: str, direction: str,
                    which: str) -> float | None:
    """The trial's objective from its per-epoch history: the best epoch's value or the last one's."""
    history = metrics.get(spec_metric, [])
    values = [v for _, v in history if v is not None and math.isfinite(v)]
    if not values:
        return None
    if which == "last":
        return values[-1]
    return max(values) if direction == "maximize" else min(values)


@dataclass
class TrialEvent:
    arm: str
    number: int
    state: str  # COMPLETE, PRUNED, FAIL
    value: float | None
    params: dict[str, Any]
    best_value: float | None
    best_number: int | None
    reason: str | None = None


@dataclass
class TuneOutcome:
    name: str
    status: str
    finished: dict[str, int]  # per arm
    trained: int


@dataclass
class _Active:
    arm: Arm
    trial: Any  # optuna.Trial
    default: bool


@dataclass
class _Driver(Hooks):
    """The executor's hooks for a tuning: ask trials when slots free up, judge epochs, tell results."""

    spec: TuneSpec
    store: Store
    study_id: int
    studies: dict[str, Any]  # arm name -> optuna.Study
    teacher_keys: dict[str, str]
    tracker: Any = None  # the session's mlwriter.Writer (trials' tags by variant key)
    on_trial: Callable[[TrialEvent], None] = lambda e: None
    orphans: list[tuple[Arm, Any]] = field(default_factory=list)  # RUNNING trials of a previous driver
    active: dict[str, list[_Active]] = field(default_factory=dict)  # variant key -> its trials
    reused: set[str] = field(default_factory=set)  # trials whose config had completed before
    trained: int = 0

    @property
    def prunes(self) -> bool:
        return self.spec.pruner.name != "none"

    # -- bookkeeping --------------------------------------------------------------------------------
    def counts(self, arm: str) -> tuple[int, int]:
        """(finished, running) trials of an arm, as Optuna's storage records them."""
        from optuna.trial import TrialState

        trials = self.studies[arm].get_trials(deepcopy=False)
        finished = sum(1 for t in trials if t.state.is_finished())
        running = sum(1 for t in trials if t.state == TrialState.RUNNING)
        return finished, running

    def remaining(self) -> int:
        return sum(max(self.spec.trials - sum(self.counts(a.name)), 0) for a in self.spec.arms)

    # -- Hooks --------------------------------------------------------------------------------------
    def feed(self, free: int) -> list[Variant]:
        out: list[Variant] = []
        while len(out) < free:
            if self.orphans:
                arm, trial = self.orphans.pop(0)
            else:
                arm = self._next_arm()
                if arm is None:
                    break
                trial = self.studies[arm.name].ask({p.path: p.distribution() for p in self.spec.params})
            v = self._variant(arm, trial)
            if v is not None:
                out.append(v)
        return out

    def _next_arm(self) -> Arm | None:
        """The arm with the fewest trials that still has budget (arms advance together)."""
        best, best_n = None, None
        for arm in self.spec.arms:
            n = sum(self.counts(arm.name))
            if n < self.spec.trials and (best_n is None or n < best_n):
                best, best_n = arm, n
        return best

    def _variant(self, arm: Arm, trial) -> Variant | None:
        params = dict(trial.params)
        missing = [p for p in self.spec.params if p.path not in params]
        if missing:  # its driver was killed between creating the trial and sampling it: sample the rest now
            try:
                for p in missing:
                    p.suggest(trial)
            except Exception as err:  # noqa: BLE001 - a sampler that cannot continue such a trial
                self._fail(arm, trial, f"interrupted before its values were sampled "
                           f"({', '.join(p.path for p in missing)}; {type(err).__name__})")
                return None
            params = dict(trial.params)
        try:
            cfg = trial_config(arm, params, self.spec.seed)
        except ConfigError as err:
            self._fail(arm, trial, f"invalid combination of sampled values: {err}")
            return None
        teacher = self.teacher_keys.get(arm.teacher) if arm.teacher else None
        deps = (teacher,) if teacher else ()
        key = identity(cfg, deps)
        label = f"{self.spec.name} / {arm.name} / trial {trial.number}"
        if key in self.active:  # another trial of this driver asked for the same config: it is running now
            stored = self.store.variant(key)
        else:  # new, or left running/failed/stopped by an earlier driver: (re)queued
            stored = self.store.ensure_variant(key, label, "trial", to_dict(cfg), list(deps))
        self.store.add_member(self.study_id, Member(key, arm.name, f"trial {trial.number}", self.spec.seed))
        trial.set_user_attr("bnnctl.variant", key)
        default = bool(trial.user_attrs.get("bnnctl.default"))
        self.active.setdefault(key, []).append(_Active(arm, trial, default))
        if stored.status == "completed":
            self.reused.add(key)
        return Variant(key, stored.label, "trial", cfg, self.spec.resources, self.spec.seed, arm.name,
                       f"trial {trial.number}", teacher_dep=teacher)

    def started(self, v: Variant) -> None:
        """Called by the executor's ``started`` event: the variant's MLflow run now exists."""
        if self.tracker is None or v.key not in self.active:
            return
        for a in self.active[v.key]:  # queued after the run's creation (see mlwriter)
            self.tracker.trial_started(v.key, a.arm.name, a.trial.number, dict(a.trial.params))

    def judge(self, variant: Variant, epoch: int, metrics: dict) -> bool:
        trials = self.active.get(variant.key)
        value = metrics.get(self.spec.objective.metric)
        if not trials or value is None or not math.isfinite(value):
            return False
        verdicts = []
        for a in trials:
            a.trial.report(float(value), epoch)
            verdicts.append(self.prunes and not a.default and a.trial.should_prune())
        return all(verdicts)

    def settled(self, variant: Variant, status: str, result: dict | None, error: str | None) -> None:
        from optuna.trial import TrialState

        if variant.kind != "trial":  # a teacher; if it failed, its trials fail through the executor
            return
        if status in ("completed", "stopped") and variant.key not in self.reused:
            self.trained += 1
        for a in self.active.pop(variant.key, []):
            study = self.studies[a.arm.name]
            value = None
            if status == "completed":
                o = self.spec.objective
                value = objective_value(self.store.metrics(variant.key), o.metric, o.direction, o.value)
                if value is None:
                    self._fail(a.arm, a.trial, f"the run reported no {o.metric}")
                    continue
                frozen = study.tell(a.trial, value)
            elif status == "stopped":
                frozen = study.tell(a.trial, state=TrialState.PRUNED)
            else:
                self._fail(a.arm, a.trial, error or "failed")
                continue
            self._record(a.arm, frozen, variant.key, value)

    def _fail(self, arm: Arm, trial, reason: str) -> None:
        from optuna.trial import TrialState

        study = self.studies[arm.name]
        trial.set_user_attr("fail_reason", reason)
        frozen = study.tell(trial, state=TrialState.FAIL)
        self._record(arm, frozen, trial.user_attrs.get("bnnctl.variant"), None, reason)

    def _record(self, arm: Arm, frozen, key: str | None, value: float | None, reason: str | None = None) -> None:
        state = frozen.state.name
        if self.tracker is not None and key:
            self.tracker.trial_finished(key, state, value)
        best_value = best_number = None
        try:
            bt = self.studies[arm.name].best_trial
            best_value, best_number = bt.value, bt.number
        except ValueError:  # no completed trial yet
            pass
        self.on_trial(TrialEvent(arm.name, frozen.number, state, value, dict(frozen.params), best_value,
                                 best_number, reason))


def with_trials(spec: TuneSpec, trials: int) -> TuneSpec:
    """``spec`` with another number of trials per arm (``tune run --trials``), checked as the spec's."""
    from .tunespec import MAX_TRIALS, grid_size

    if not 1 <= trials <= MAX_TRIALS:
        raise ConfigError("--trials", f"expected an integer in [1, {MAX_TRIALS}], got {trials}")
    if spec.sampler.name == "grid" and trials > (size := grid_size(spec.params)):
        raise ConfigError("--trials", f"{trials} trials exceed the grid's {size} points")
    return dataclasses.replace(spec, trials=trials)


def run_tuning(spec: TuneSpec | str | Path, options: RunOptions | None = None, *, events: Events | None = None,
               on_trial: Callable[[TrialEvent], None] | None = None, **cli: Any) -> TuneOutcome:
    """Run (or continue) the tuning ``spec`` until every arm has ``trials`` finished trials.

    ``spec``: the parsed tuning spec (a path is loaded here); ``options``: the command line's,
    resolved here once (:meth:`RunOptions.resolve`); ``cli``: RunOptions fields as keywords."""
    opts = dataclasses.replace(options or RunOptions(), **cli) if cli else (options or RunOptions())
    if not isinstance(spec, TuneSpec):
        spec = load_tune_spec(spec)
    if opts.trials is not None:
        spec = with_trials(spec, opts.trials)
    opts = RunOptions.resolve(spec, opts)
    configs = [a.config for a in spec.arms] + [t.config for t in spec.teachers.values()]
    check_configs(configs, spec)
    opts = preflight(spec, opts)  # storage, checkpoints, resources: before anything is written
    prepare_data(configs)
    store = Store(opts.db)
    lease = LeaseKeeper(store, spec.name, opts)  # before anything is written: one driver per tuning
    try:
        return _run_tuning(spec, spec.file, store, opts, events, on_trial, lease)
    finally:
        lease.release()


def _run_tuning(spec: TuneSpec, path, store: Store, opts: RunOptions, events, on_trial, lease) -> TuneOutcome:
    from optuna.trial import TrialState

    existing = store.study(spec.name)
    if existing is not None and existing.kind != "tuning":
        raise SpecError(spec.file, "name", f"{spec.name!r} is already the name of a study in {store.display_url}; "
                        "give the tuning another name")
    try:
        storage = optuna_storage(store.url)
    except Exception as err:  # noqa: BLE001 - any storage failure is reported as such
        raise StoreError(mask_text(f"cannot open Optuna's storage in {store.display_url}: {err}")) from None
    check_compatible(spec, storage)
    row = store.upsert_study(spec.name, str(path), spec.spec_hash, tuning_layout(spec))
    studies, orphans = open_studies(spec, storage)

    # teachers first (trained once, shared by every trial that distils from them)
    variants: dict[str, Variant] = {}
    teacher_keys = {}
    for arm in spec.arms:
        if arm.teacher and arm.teacher not in teacher_keys:
            teacher_keys[arm.teacher] = add_teacher(spec.teachers, arm.teacher, spec.seed, spec.resources, variants)
    for v in variants.values():
        store.ensure_variant(v.key, v.label, v.kind, to_dict(v.config), list(v.deps))
    store.set_members(row.id, [Member(v.key, None, None, v.seed) for v in variants.values()]
                      + [m for m in store.members(row.id) if m.ablation is not None])

    with DriverSession(store, row.id, spec.name, row.mlflow_run_id, str(path), spec.experiment, opts,
                       spec.execution, spec.resources, events, kind="tuning", lease=lease) as session:
        driver = _Driver(spec, store, row.id, studies, teacher_keys, None, on_trial or (lambda e: None), orphans)
        todo = driver.remaining() + len(orphans) + sum(1 for v in variants.values()
                                                       if store.variant(v.key).status != "completed")
        session.begin(work=bool(todo))
        driver.tracker = session.writer
        if todo:
            base_events = events or Events()
            base_events.planned(todo)  # what this run trains: trials to reach the budget, orphans, teachers

            def on_started(v):
                driver.started(v)
                base_events.started(v)

            session.execute(Plan(variants, {}), hooks=driver,
                            events=dataclasses.replace(base_events, started=on_started))
        finished = {a.name: driver.counts(a.name)[0] for a in spec.arms}
        complete = {a: len(st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) for a, st in studies.items()}
        # every arm reached its budget, with at least one completed trial to compare
        final = session.final_status(all(n >= spec.trials and complete[a] for a, n in finished.items()))
        if session.tracker is not None and session.parent is not None:
            _log_summary(session.tracker, session.parent, spec, studies)
            session.tracker.study_files(session.parent, str(path), trials_tables(store, spec.name))
        session.finish(final)
    return TuneOutcome(spec.name, final, finished, driver.trained)


def trials_tables(store: Store, name: str) -> dict[str, str]:
    """The tuning's trials table (arm, trial, state, objective, the sampled values, the variant and
    its run) as CSV and Markdown, for its MLflow parent run."""
    import csv
    import io

    from .results import records

    recs = records(name, store=store)
    params = sorted({k for r in recs for k in r if k.startswith("param.")})
    cols = ["arm", "trial", "state", "objective", *params, "epochs", "variant", "mlflow_run_id"]
    rows = [["" if r.get(c) is None else (f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c])) for c in cols]
            for r in recs]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    writer.writerows(rows)
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return {"trials.csv": buf.getvalue(), "trials.md": "\n".join(md) + "\n"}


def _log_summary(tracker, parent: str, spec: TuneSpec, studies: dict) -> None:
    """Best and default objective per arm on the tuning's parent run."""
    import time

    from mlflow.entities import Metric

    ts, metrics = int(time.time() * 1000), []
    for arm, study in studies.items():
        summary = summarize(study)
        for key in ("best", "default"):
            if summary[key] is not None and summary[key]["value"] is not None:
                metrics.append(Metric(f"{key}.{arm}", float(summary[key]["value"]), ts, 0))
    if metrics:
        tracker.client.log_batch(parent, metrics=metrics)
