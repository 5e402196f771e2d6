"""Running a study: spec -> plan -> state store -> Ray executor -> MLflow, and reading it back."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bnnctl.workers.config import to_dict

from .executor import Events, Executor, init_ray
from .plan import Plan, build_plan
from .spec import StudySpec, load_spec
from .store import Member, Store

DEFAULT_METRIC = {"pose": "pckh", "classification": "top1"}


def table_layout(spec: StudySpec) -> dict:
    """What the tables need from the spec, stored with the study (the dashboard reads it)."""
    metric = spec.metric or ("pck" if spec.base.data.dataset == "lsp" else DEFAULT_METRIC[spec.base.task])
    return {
        "name": spec.name, "description": spec.description, "seeds": list(spec.seeds), "metric": metric,
        "ablations": [{"name": a.name, "mode": a.mode, "baseline": a.baseline,
                       "rows": [{"name": r.name, "reference": r.reference} for r in a.rows]} for a in spec.ablations],
    }


def check_data(plan: Plan) -> None:
    """Fail before anything is started when a real dataset is missing (message: where and how to get it)."""
    check_configs([v.config for v in plan.order()])


def check_configs(configs) -> None:
    """Check that the dataset of every config is present (embedded sets are written on first use)."""
    from bnnctl.workers.data.classification import scan_image_folder
    from bnnctl.workers.data.pose import check_mpii_layout, read_lsp
    from bnnctl.workers.train.tasks import dataset_root

    seen = set()
    for cfg in configs:
        d = cfg.data
        if d.dataset in ("synthetic", "digits") or (d.dataset, d.root) in seen:
            continue
        seen.add((d.dataset, d.root))
        root = dataset_root(cfg)
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
              track: bool = True) -> Outcome:
    """Run (or continue) the study in ``path``. Finished variants are reused, unfinished ones resume."""
    spec = load_spec(path)
    plan = build_plan(spec)
    check_data(plan)
    store = Store(db)
    study = store.upsert_study(spec.name, str(path), spec.spec_hash, table_layout(spec))
    for v in plan.order():
        store.ensure_variant(v.key, v.label, v.kind, to_dict(v.config), list(v.deps))
    members = [Member(key, ab, row, seed) for (ab, row, seed), key in plan.rows.items()]
    members += [Member(v.key, None, None, v.seed) for v in plan.order() if v.kind != "row"]
    store.set_members(study.id, members)
    before = {k: v.status for k, v in store.variants(list(plan.variants)).items()}
    todo = [k for k, s in before.items() if s != "completed"]
    # MLflow opens its store (seconds on first use) in a thread while Ray starts in this one and the
    # workers import torch: the three start-up costs overlap instead of adding up.
    opened: dict = {}
    mlflow_thread = None
    if track:
        import threading

        def open_tracking() -> None:
            try:
                from .tracking import Tracker

                t = Tracker(tracking_uri, spec.experiment)
                opened["run"] = t.study_run(spec.name, study.mlflow_run_id, str(path))
                opened["tracker"] = t
            except BaseException as err:  # re-raised in the main thread below
                opened["error"] = err

        mlflow_thread = threading.Thread(target=open_tracking, daemon=True)
        mlflow_thread.start()
    warm = []
    if todo:
        init_ray(address, cpus)
        warm = warm_up(spec, max_parallel or spec.execution.max_parallel)
    tracker = parent = None
    if mlflow_thread is not None:
        mlflow_thread.join()
        if "error" in opened:
            raise opened["error"]
        tracker, parent = opened["tracker"], opened["run"]
        store.annotate_study(study.id, mlflow_experiment_id=tracker.experiment_id)
    store.set_study_status(study.id, "running", parent)
    status: dict[str, str] = dict(before)
    if todo:
        executor = Executor(store, tracker, max_parallel=max_parallel or spec.execution.max_parallel,
                            retries=spec.execution.retries, events=events)
        status = executor.run(plan, spec.name, parent, cancelled=_poller(store, study.id))
        _quiet_wait(warm)
    if store.study(study.id).status == "cancelled":
        final = "cancelled"
    else:
        final = "completed" if all(s == "completed" for s in status.values()) else "failed"
    store.set_study_status(study.id, final)
    if tracker is not None and parent is not None:
        tracker.end_study(parent, final)
    counts: dict[str, int] = {}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    return Outcome(spec.name, final, counts, len(todo))


def _warm_task() -> int:
    import os

    import bnnctl.workers.train  # noqa: F401  (torch and the trainer, imported once per worker process)

    return os.getpid()


def warm_up(spec, count: int) -> list:
    """Start ``count`` Ray worker processes that import torch and the trainer now, while the driver
    opens MLflow; Ray reuses those processes for the study's tasks."""
    import ray

    task = ray.remote(_warm_task).options(num_cpus=spec.resources.cpus, num_gpus=spec.resources.gpus, max_retries=0)
    return [task.remote() for _ in range(count)]


def _quiet_wait(refs: list) -> None:
    import ray

    try:
        ray.get(refs, timeout=5)
    except Exception:  # warm-up only: a failure here changes nothing
        pass


def _poller(store: Store, study_id: int, every: float = 2.0):
    """A cheap 'was the study cancelled?' check for the executor loop (one query every ``every`` s)."""
    import time

    last = [0.0, False]

    def cancelled() -> bool:
        now = time.monotonic()
        if now - last[0] >= every:
            last[0] = now
            last[1] = store.study(study_id).status == "cancelled"
        return last[1]

    return cancelled


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
