"""Running a study: spec -> plan -> state store -> executor on a backend (Ray) -> MLflow."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnnctl.workers.config import to_dict, with_overrides

from .executor import Events
from .latency import measure_quietly
from .latency import pending as quiet_pending
from .layouts import AblationLayout, RowLayout, StudyLayout
from .plan import Plan, Variant, build_plan
from .preflight import preflight
from .report import reported
from .runcore import DriverSession, LeaseKeeper, RunOptions
from .sequential import Replay, replay
from .spec import StudySpec, load_spec
from .store import Member, Store
from .tracking import flatten


def table_layout(spec: StudySpec) -> dict:
    """What the tables need from the spec, stored with the study (the dashboard reads it): a
    :class:`~bnnctl.orchestrator.layouts.StudyLayout` as plain data."""
    adaptive = spec.statistics.adaptive
    return StudyLayout(
        name=spec.name, description=spec.description, seeds=tuple(spec.seed_order), metric=spec.table_metric,
        report=spec.report, alpha=spec.statistics.alpha, correction=spec.statistics.correction,
        adaptive=None if adaptive is None else {**dataclasses.asdict(adaptive), "alpha": spec.statistics.adaptive_alpha},
        ablations=tuple(AblationLayout(a.name, a.mode, a.baseline,
                                       tuple(RowLayout(r.name, r.reference, dict(r.also)) for r in a.rows))
                        for a in spec.ablations),
        version=spec.version, overrides=dict(spec.overrides),
        base=flatten(to_dict(with_overrides(spec.base, dict(spec.overrides)) if spec.overrides else spec.base)),
    ).to_dict()


def check_data(plan: Plan, spec=None) -> None:
    """Fail before anything is started when a real dataset is missing (message: the spec field that
    names it, where it was looked for and how to get it)."""
    check_configs([v.config for v in plan.order()], spec)


def prepare_data(configs) -> None:
    """Write the embedded sets (synthetic, digits) of these configs, once, by the driver, before any
    task starts (tasks on other nodes write their own copy; writing is atomic, so concurrent writers
    are safe). After the pre-flight checks: a refused run writes nothing."""
    from bnnctl.workers.train.tasks import dataset_root, prepare_root

    seen = set()
    for cfg in configs:
        if cfg.data.dataset in ("synthetic", "digits") and dataset_root(cfg) not in seen:
            seen.add(dataset_root(cfg))
            prepare_root(cfg)


def check_configs(configs, spec=None) -> None:
    """Check that the dataset of every config is present (the embedded sets: see :func:`prepare_data`);
    with the ``spec``, a missing one is the spec's error, naming the field that sets its root."""
    from bnnctl.workers.errors import DataError

    fields = {c.path: c for c in spec.data_roots} if spec is not None else {}
    seen: set = set()
    for cfg in configs:
        if cfg.data.dataset in ("synthetic", "digits") or (cfg.data.dataset, cfg.data.root) in seen:
            continue
        seen.add((cfg.data.dataset, cfg.data.root))
        try:
            _check_dataset(cfg)
        except DataError as err:
            if spec is None:
                raise
            from .errors import SpecError

            c = fields.get(cfg.data.root or "")
            field, line = (c.field, c.line) if c is not None else ("base.data", None)
            raise SpecError(spec.file, field, f"{err} (a relative data root is relative to the folder the command "
                            "runs in, the project folder)", line) from None


def _check_dataset(cfg) -> None:
    from bnnctl.workers.data.classification import scan_image_folder
    from bnnctl.workers.data.pose import check_mpii_layout, read_lsp
    from bnnctl.workers.train.tasks import dataset_root

    root = dataset_root(cfg)
    if cfg.data.dataset == "mpii":
        check_mpii_layout(root)
    elif cfg.data.dataset == "lsp":
        read_lsp(root)
    else:
        scan_image_folder(root, "train")
        scan_image_folder(root, "val")


@dataclass(frozen=True)
class Outcome:
    study: str
    status: str
    counts: dict[str, int]
    trained: int
    skipped_failed: int = 0  # failed variants not retried (`study rerun` retries them)
    not_selected: int = 0  # variants outside --only / --variant
    selected_done: bool = False  # --only / --variant: every selected variant completed (the study did not)


@dataclass(frozen=True)
class PlanItem:
    """One variant of a study's plan and what a run would do with it."""

    variant: Variant
    stored: str | None  # its state in the store (None: new)
    attempts: int
    action: str  # reuse, resume, train, retry, skip-failed, blocked, not-selected

    @property
    def runs(self) -> bool:
        return self.action in ("resume", "train", "retry")


def select(plan: Plan, only: tuple[str, ...], keys: tuple[str, ...]) -> set[str] | None:
    """The variant keys ``--only`` rows and ``--variant`` keys name, with everything they depend on
    (None: no selection). Unknown names are refused with what there is."""
    from bnnctl.workers.errors import ConfigError

    if not only and not keys:
        return None
    chosen: set[str] = set()
    for name in only:
        hits = {k for (ab, row, _), k in plan.rows.items() if name in (row, f"{ab}/{row}")}
        if not hits:
            rows = sorted({f"{ab}/{row}" for ab, row, _ in plan.rows})
            raise ConfigError("--only", f"no row {name!r}; rows: {', '.join(rows)}")
        chosen |= hits
    for prefix in keys:
        hits = {k for k in plan.variants if k.startswith(prefix)}
        if len(hits) != 1:
            raise ConfigError("--variant", f"{prefix!r} matches {len(hits)} variants of this study; give a key "
                              "(or a unique prefix) from `bnnctl study plan`")
        chosen |= hits
    todo = list(chosen)
    while todo:
        for dep in plan.variants[todo.pop()].deps:
            if dep not in chosen:
                chosen.add(dep)
                todo.append(dep)
    return chosen


#: failures of the machine, not of the config: retried by every run (a NaN loss or a bug is not)
TRANSIENT = ("no space left on device", "worker lost", "run storage", "dependency ", "the autoscaler of ")


def transient(error: str | None) -> bool:
    return bool(error) and error.startswith(TRANSIENT)


def plan_items(plan: Plan, store: Store | None, opts: RunOptions) -> list[PlanItem]:
    """What a run with ``opts`` does with each variant of ``plan`` (read-only; ``store`` None: a
    study never run)."""
    stored = store.variants(list(plan.variants)) if store is not None else {}
    unfinished = [k for k, s in stored.items() if s.status != "completed"]
    tried = store.attempt_counts(unfinished) if store is not None and unfinished else {}
    chosen = select(plan, opts.only, opts.variant_keys)
    items: dict[str, PlanItem] = {}
    for v in plan.order():  # topological: dependencies first
        s = stored.get(v.key)
        status = s.status if s else None
        attempts = tried.get(v.key, 0) if status != "completed" else 0
        if chosen is not None and v.key not in chosen:
            action = "not-selected" if status != "completed" else "reuse"
        elif status == "completed":
            action = "reuse"
        elif any(items[d].action in ("skip-failed", "blocked") for d in v.deps):
            action = "blocked"
        elif status == "failed":
            action = "retry" if opts.rerun_failed or transient(stored[v.key].error) else "skip-failed"
        elif status is not None and attempts:
            action = "resume"
        else:
            action = "train"
        items[v.key] = PlanItem(v, status, attempts, action)
    return list(items.values())


def run_study(spec: StudySpec | str | Path, options: RunOptions | None = None, *, events: Events | None = None,
              plan: Plan | None = None, **cli: Any) -> Outcome:
    """Run (or continue) the study ``spec``. Finished variants are reused, unfinished ones resume;
    failed ones are skipped unless ``options.rerun_failed``.

    ``spec``: the parsed spec (a path is loaded here, with ``options.overrides`` and ``tag``: a
    convenience for Python callers); ``options``: the command line's, resolved here once against
    the spec and the environment (:meth:`RunOptions.resolve`); ``cli``: RunOptions fields given as
    keywords (``run_study("s.yaml", cpus=2, track=False)``); ``plan``: the spec's plan when the
    caller has built it already (the plan is built once per run)."""
    opts = dataclasses.replace(options or RunOptions(), **cli) if cli else (options or RunOptions())
    if not isinstance(spec, StudySpec):
        spec = load_spec(spec, dict(opts.overrides), opts.tag)
    opts = RunOptions.resolve(spec, opts)
    if plan is None or spec.statistics.adaptive is not None:
        plan = build_plan(spec)
    select(plan, opts.only, opts.variant_keys)  # unknown rows or keys: refused before anything is written
    check_data(plan, spec)
    opts = preflight(spec, opts)  # storage, checkpoints, resources: before anything is written
    prepare_data([v.config for v in plan.order()])
    store = Store(opts.db)
    lease = LeaseKeeper(store, spec.name, opts)  # before anything is written: one driver per study
    try:
        return _run_study(spec, spec.file, store, opts, events, lease, plan)
    finally:
        lease.release()


@dataclass
class _Round:
    """One round of a study's run: its plan (the rows' seeds so far), what happens to each variant,
    and the part that runs."""

    plan: Plan
    items: list[PlanItem]
    sub: Plan
    before: dict[str, str]

    @property
    def todo(self) -> list[str]:
        return [k for k, s in self.before.items() if s != "completed"]


def record_plan(store: Store, study_id: int, plan: Plan, queued: list[Variant]) -> None:
    """Write a plan into the store: the ``queued`` variants (new ones created, unfinished ones put
    back to pending), in batches, and the study's membership (its rows and prerequisites)."""
    store.ensure_variants([(v.key, v.label, v.kind, to_dict(v.config), list(v.deps)) for v in queued])
    members = [Member(key, ab, row, seed) for (ab, row, seed), key in plan.rows.items()]
    members += [Member(v.key, None, None, v.seed) for v in plan.order() if v.kind != "row"]
    store.set_members(study_id, members)


def _round(spec: StudySpec, store: Store, study_id: int, opts: RunOptions, first: Plan | None = None) -> _Round:
    """Plan the study as the stored results say (adaptive seeds: the seeds each row needs now),
    record its variants and membership, and pick the variants this round runs or reuses. ``first``:
    the plan the run already built (used when the seeds are not adaptive)."""
    allotted = adaptive_allotment(spec, store)[0] if spec.statistics.adaptive is not None else None
    plan = first if first is not None and allotted is None else build_plan(spec, allotted)
    items = plan_items(plan, store, opts)
    # new rows exist for the tables; the ones to run are (re)queued
    record_plan(store, study_id, plan, [i.variant for i in items if i.stored is None or i.runs])
    running = {i.variant.key for i in items if i.runs or i.action == "reuse"}
    sub = Plan({k: v for k, v in plan.variants.items() if k in running},
               {r: k for r, k in plan.rows.items() if k in running})
    return _Round(plan, items, sub, {k: v.status for k, v in store.variants(list(sub.variants)).items()})


def adaptive_allotment(spec: StudySpec, store: Store | None) -> tuple[dict[tuple[str, str], int], dict[str, Replay]]:
    """Adaptive seeds: the seeds each row needs now, and each table's looks, re-derived from the
    stored results (never from a driver's memory: a killed driver's successor decides the same)."""
    a = spec.statistics.adaptive
    assert a is not None
    full = build_plan(spec, {(r.ablation, r.name): a.max_seeds for r in spec.rows})
    stored = store.variants(list(full.variants)) if store is not None else {}
    allotted: dict[tuple[str, str], int] = {}
    replays: dict[str, Replay] = {}
    for ab in spec.ablations:
        values: dict[str, dict[int, float | None]] = {}
        for r in ab.rows:
            values[r.name] = {}
            for seed in spec.seed_order:
                v = stored.get(full.rows[(ab.name, r.name, seed)])
                if v is not None and v.status == "completed":
                    values[r.name][seed] = reported(v.result or {}, spec.table_metric, spec.report)
                elif v is not None and v.status == "failed":
                    values[r.name][seed] = None  # ended without a value
        rp = replay([r.name for r in ab.rows], ab.baseline, values, spec.seed_order, a,
                    spec.statistics.adaptive_alpha, spec.statistics.correction)
        replays[ab.name] = rp
        allotted.update({(ab.name, name): n for name, n in rp.needed.items()})
    return allotted, replays


def _run_study(spec: StudySpec, path, store: Store, opts: RunOptions, events, lease, plan: Plan) -> Outcome:
    study = store.upsert_study(spec.name, str(path), spec.spec_hash, table_layout(spec))
    rnd = _round(spec, store, study.id, opts, plan)
    ran = set(rnd.todo)
    # a finished study whose latencies were all taken beside other work still needs a worker
    unquiet = not rnd.todo and bool(quiet_pending(store, study.id))
    with DriverSession(store, study.id, spec.name, study.mlflow_run_id, str(path), spec.experiment, opts,
                       spec.execution, spec.resources, events, lease=lease) as session:
        session.begin(work=bool(rnd.todo) or unquiet)
        status = session.execute(rnd.sub) if rnd.todo else dict(rnd.before)
        # adaptive seeds: after each round, the stored results decide which rows get more seeds
        while (spec.statistics.adaptive is not None and rnd.todo and not session.halted
               and all(s == "completed" for s in status.values())):
            rnd = _round(spec, store, study.id, opts)
            if not rnd.todo:
                break
            ran |= set(rnd.todo)
            session.events.planned(len(rnd.todo))
            status.update(session.execute(rnd.sub))
        status = {k: status.get(k, s) for k, s in rnd.before.items()}
        items = rnd.items
        running = set(rnd.sub.variants)
        left_out = [i for i in items if i.variant.key not in running]
        ok = all(s == "completed" for s in status.values())
        selected_done = ok and bool(left_out) and all(i.action == "not-selected" for i in left_out)
        if selected_done and not session.halted:
            session.halted = (f"ran the selected variants only (--only / --variant); {len(left_out)} others were "
                              "not run")
        final = session.final_status(ok and not left_out)
        if final == "completed" and session.backend is not None:  # every variant trained: time them quietly
            measure_quietly(store, session.backend, session.storage.root, study.id, session.tracker,
                            session.events.note)
        if session.tracker is not None and session.parent is not None:
            log_tables(session.tracker, session.parent, store, study.id, str(path))
        session.finish(final)
    counts: dict[str, int] = {}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    skipped = sum(1 for i in items if i.action in ("skip-failed", "blocked"))
    # what this run trained to an end (a cancelled or interrupted run: not the ones it put back)
    trained = sum(1 for k in ran if status.get(k) in ("completed", "failed", "stopped"))
    return Outcome(spec.name, final, counts, trained, skipped, sum(1 for i in items if i.action == "not-selected"),
                   selected_done and final == "stopped")


def log_tables(tracker, run_id: str, store: Store, study_id: int, spec_file: str) -> None:
    """The study's spec and its tables as they stand (md, csv, html) on its MLflow parent run."""
    from .formats import export
    from .report import study_tables

    study = store.study(study_id)
    tables = study_tables(store, study)
    tracker.study_files(run_id, spec_file, {f"tables.{fmt}": export(tables, fmt, study.name) for fmt in ("md", "csv", "html")})
    tracker.link_runs(run_id, study.name, row_links(store, study_id, tracker.children(run_id)))


def row_links(store: Store, study_id: int, own: dict[str, str]) -> list[dict]:
    """The rows of a study whose variant's MLflow run is not that row's run under the study's
    parent (``own``: variant key -> run id of its children): a result reused from another study or
    tuning, a row that is the same function as a teacher, a variant that is a row of two ablations.
    Each gets a link run (:meth:`Tracker.link_runs`)."""
    from .tracking import CREATING

    members = [m for m in store.members(study_id) if m.ablation is not None]
    variants = store.variants(sorted({m.variant_key for m in members}))
    links = []
    for m in members:
        v = variants.get(m.variant_key)
        if v is None or v.status != "completed" or not v.mlflow_run_id or v.mlflow_run_id == CREATING:
            continue
        label = f"{m.ablation} / {m.row} / seed {m.seed}"
        if own.get(v.key) == v.mlflow_run_id and v.kind == "row" and v.label == label:
            continue  # the row's own run, tagged with its row
        result = v.result or {}
        links.append({"key": v.key, "run": v.mlflow_run_id, "ablation": m.ablation, "row": m.row, "seed": m.seed,
                      "label": v.label, "config": v.config or {},
                      "epoch": max(int((v.config or {}).get("epochs", 1)) - 1, 0),
                      "metrics": {k: x for k, x in (result.get("metrics") or {}).items()
                                  if isinstance(x, (int, float)) and not isinstance(x, bool)}})
    return links


def cancel_study(name: str, db: str | None = None) -> bool:
    """Mark a study cancelled: its running driver stops starting variants, stops the running ones
    (they resume from their checkpoints when the study is run again). False if it is not running."""
    store = Store(db)
    study = store.study(name)
    if study is None:
        from bnnctl.workers.errors import ConfigError

        raise ConfigError("study", f"no study named {name!r}")
    if study.status != "running":
        return False
    store.set_study_status(study.id, "cancelled")
    return True
