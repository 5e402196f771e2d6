"""Latency you can compare: a study's deployed models timed again at its end, on a quiet worker.

A variant's worker times its deployed model when its training ends (``workers/latency.py``), while
other variants may train beside it on the same node: the same network then measured 2.5 to 9.6 ms
in one table. So once a study's variants are trained, the driver times each distinct deployed
network once more, one at a time, in a task that holds every CPU of the largest node (Ray schedules
nothing else there while it runs). The timing depends on the network (architecture, widths, input
size, binary layers), not on its trained weights, so one measurement serves every variant of that
network (the seeds of a row, the rows that share it): it replaces their end-of-training figure, with
``quiet: True``. A figure still taken beside other work (a study stopped before its end, a failed
quiet task) keeps ``quiet: False`` and the tables mark it.
"""
from __future__ import annotations

import json
import time

from bnnctl.workers.train.loop import LAST

from .backends import Backend, Finished, Task
from .store import Store, Variant


def _network(v: Variant) -> str:
    """What a latency depends on: the model config and the input size."""
    config = v.config or {}
    return json.dumps([config.get("model"), (config.get("data") or {}).get("input_size")], sort_keys=True, default=str)


def pending(store: Store, study_id: int) -> list[list[Variant]]:
    """The study's completed variants whose latency was measured at the end of their training but
    not yet quietly, grouped by network (each group's variants first that already have a quiet
    measurement to share)."""
    keys = sorted({m.variant_key for m in store.members(study_id)})
    groups: dict[str, list[Variant]] = {}
    for v in store.variants(keys).values():
        lat = (v.result or {}).get("latency") or {}
        if v.status != "completed" or lat.get("binary_ms") is None or not (v.result or {}).get("last_checkpoint"):
            continue
        groups.setdefault(_network(v), []).append(v)
    out = []
    for group in groups.values():
        if any(not v.result["latency"].get("quiet") for v in group):
            out.append(sorted(group, key=lambda v: (not v.result["latency"].get("quiet"), v.key)))
    return out


def measure_quietly(store: Store, backend: Backend, storage_root: str, study_id: int, tracker=None,
                    say=lambda text: None, timeout_s: float = 600.0) -> dict[str, int]:
    """Time every network of the study that has no quiet measurement yet (see the module
    docstring), one task at a time with ``backend.node_cpus()`` CPUs held, and record the result
    on each of its variants (store, and their MLflow runs through ``tracker``). Returns counts:
    ``measured`` (tasks run), ``shared`` (variants given an existing quiet figure), ``updated``
    (variants updated), ``failed`` (tasks that failed: those variants keep their figure)."""
    counts = {"measured": 0, "shared": 0, "updated": 0, "failed": 0}
    groups = pending(store, study_id)
    if not groups:
        return counts
    cpus = backend.node_cpus()
    todo = sum(1 for g in groups if not g[0].result["latency"].get("quiet"))
    if todo:
        say(f"latency: timing {todo} deployed network(s) on a quiet worker ({cpus:g} CPUs held, one at a time)")
    for group in groups:
        first = group[0]
        quiet = first.result["latency"] if first.result["latency"].get("quiet") else None
        if quiet is None:
            out = _run(backend, Task(first.key, first.config, storage_root, cpus=cpus, kind="latency",
                                     fetch=(("checkpoint", f"{first.key}/{LAST}"),)), timeout_s)
            if out is None or out.status != "completed":
                counts["failed"] += 1
                say(f"latency of {first.label}: not measured again ({out.error if out else 'timed out'}); "
                    "its figure from the end of its training stays, marked")
                continue
            quiet = out.result["latency"]
            counts["measured"] += 1
        else:
            counts["shared"] += len(group) - 1
        later = [v for v in group if not v.result["latency"].get("quiet")]
        store.set_latency([v.key for v in later], quiet)
        counts["updated"] += len(later)
        if tracker is not None:
            for v in later:
                if v.mlflow_run_id:
                    _log(tracker, v, quiet)
    return counts


def _run(backend: Backend, task: Task, timeout_s: float) -> Finished | None:
    backend.submit(task)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for out in backend.wait(1.0):
            backend.messages()  # its Started message: nothing to show
            if out.key == task.key:
                return out
    backend.cancel(task.key)
    return None


def _log(tracker, v: Variant, latency: dict) -> None:
    """The quiet figure on the variant's MLflow run: the same metrics at the same step, later (so
    MLflow shows it), and a tag saying how it was measured."""
    from mlflow.entities import Metric, RunTag

    from .tracking import metric_name

    ts, step = int(time.time() * 1000), int((v.result or {}).get("epochs_done") or 0)
    metrics = [Metric(metric_name(f"latency.{k}"), float(latency[k]), ts, step)
               for k in ("binary_ms", "float_ms", "speedup") if latency.get(k) is not None]
    try:
        tracker.log_batches(v.mlflow_run_id, metrics, [], [RunTag("bnnctl.latency", "quiet worker, end of study")])
    except Exception:  # noqa: BLE001 - a deleted run: the store has the figure
        pass
