"""Running a study: spec -> plan -> state store -> executor on a backend (Ray) -> MLflow."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from bnnctl.workers.config import to_dict

from .executor import Events
from .plan import Plan, build_plan
from .runcore import DriverSession, LeaseKeeper, RunOptions
from .spec import StudySpec, load_spec
from .store import Member, Store

DEFAULT_METRIC = {"pose": "pckh", "classification": "top1"}


def table_layout(spec: StudySpec) -> dict:
    """What the tables need from the spec, stored with the study (the dashboard reads it)."""
    metric = spec.metric or ("pck" if spec.base.data.dataset == "lsp" else DEFAULT_METRIC[spec.base.task])
    return {
        "name": spec.name, "description": spec.description, "seeds": list(spec.seeds), "metric": metric,
        "report": spec.report, "alpha": spec.statistics.alpha, "correction": spec.statistics.correction,
        "ablations": [{"name": a.name, "mode": a.mode, "baseline": a.baseline,
                       "rows": [{"name": r.name, "reference": r.reference} for r in a.rows]} for a in spec.ablations],
    }


def check_data(plan: Plan) -> None:
    """Fail before anything is started when a real dataset is missing (message: where and how to get it)."""
    check_configs([v.config for v in plan.order()])


def check_configs(configs) -> None:
    """Check that the dataset of every config is present. The embedded sets (synthetic, digits) are
    written here, once, by the driver, before any task starts (tasks on other nodes write their own
    copy; writing is atomic, so concurrent writers are safe)."""
    from bnnctl.workers.data.classification import scan_image_folder
    from bnnctl.workers.data.pose import check_mpii_layout, read_lsp
    from bnnctl.workers.train.tasks import dataset_root, prepare_root

    seen = set()
    for cfg in configs:
        d = cfg.data
        root = dataset_root(cfg)
        if root in seen:
            continue
        seen.add(root)
        if d.dataset in ("synthetic", "digits"):
            prepare_root(cfg)
            continue
        if d.dataset == "mpii":
            check_mpii_layout(root)
        elif d.dataset == "lsp":
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


def run_study(path: str | Path, db: str | None = None, tracking_uri: str | None = None, address: str | None = None,
              cpus: int | None = None, max_parallel: int | None = None, events: Events | None = None,
              track: bool = True, options: RunOptions | None = None) -> Outcome:
    """Run (or continue) the study in ``path``. Finished variants are reused, unfinished ones resume.

    ``options`` (when given) replaces the separate ``db`` ... ``track`` arguments."""
    opts = options or RunOptions(db, tracking_uri, address, cpus, max_parallel, track)
    spec = load_spec(path)
    if opts.storage is None and spec.storage is not None:  # --storage, then the spec's, then $BNNCTL_STORAGE
        opts = dataclasses.replace(opts, storage=spec.storage)
    check_data(build_plan(spec))
    store = Store(opts.db)
    lease = LeaseKeeper(store, spec.name, opts)  # before anything is written: one driver per study
    try:
        return _run_study(spec, path, store, opts, events, lease)
    finally:
        lease.release()


def _run_study(spec: StudySpec, path, store: Store, opts: RunOptions, events, lease) -> Outcome:
    plan = build_plan(spec)
    study = store.upsert_study(spec.name, str(path), spec.spec_hash, table_layout(spec))
    for v in plan.order():
        store.ensure_variant(v.key, v.label, v.kind, to_dict(v.config), list(v.deps))
    members = [Member(key, ab, row, seed) for (ab, row, seed), key in plan.rows.items()]
    members += [Member(v.key, None, None, v.seed) for v in plan.order() if v.kind != "row"]
    store.set_members(study.id, members)
    before = {k: v.status for k, v in store.variants(list(plan.variants)).items()}
    todo = [k for k, s in before.items() if s != "completed"]
    with DriverSession(store, study.id, spec.name, study.mlflow_run_id, str(path), spec.experiment, opts,
                       spec.execution, spec.resources, events, lease=lease) as session:
        session.begin(work=bool(todo))
        status = session.execute(plan) if todo else dict(before)
        final = session.final_status(all(s == "completed" for s in status.values()))
        if session.tracker is not None and session.parent is not None:
            log_tables(session.tracker, session.parent, store, study.id, str(path))
        session.finish(final)
    counts: dict[str, int] = {}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    return Outcome(spec.name, final, counts, len(todo))


def log_tables(tracker, run_id: str, store: Store, study_id: int, spec_file: str) -> None:
    """The study's spec and its tables as they stand (md, csv, html) on its MLflow parent run."""
    from .report import build_tables, to_csv, to_html, to_markdown

    study = store.study(study_id)
    members = store.members(study_id)
    tables = build_tables(study.spec, members, store.variants([m.variant_key for m in members]))
    tracker.study_files(run_id, spec_file, {"tables.md": to_markdown(tables), "tables.csv": to_csv(tables),
                                            "tables.html": to_html(tables, f"{study.name} — ablation tables")})


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
