"""Ray execution of a plan: ready variants run as Ray tasks with their resources, respecting the DAG
and a parallelism limit. Workers report per-epoch metrics through a Ray queue; the driver (this
process) is the single writer of the state store and of MLflow.

Failures: a lost worker or node (the task's process died) is retried up to ``retries`` times and
resumes from its last checkpoint; an application error (invalid config, missing data, NaN loss)
fails the variant at once with its reason, and the rest of the study goes on.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnnctl.workers.config import from_dict, to_dict
from bnnctl.workers.train import TrainConfig
from bnnctl.workers.train.loop import BEST, LAST

from .plan import Plan, Variant
from .store import Store

RUNS_DIR = Path(".bnnctl") / "runs"


class RayReporter:
    """The workers' Reporter, inside a Ray task: messages go to the driver through a Ray queue.

    With a ``decisions`` actor (tuning with a pruner), ``should_stop`` waits for the driver's verdict
    on the epoch just reported, so a trial the pruner stops after epoch k never trains epoch k+1.
    """

    PROGRESS_INTERVAL = 1.0
    DECISION_TIMEOUT = 120.0  # the driver answers within a second; a silent driver means "go on"

    def __init__(self, key: str, checkpoint_dir: str, queue: Any, decisions: Any = None) -> None:
        self.key, self._dir, self.queue, self.decisions = key, Path(checkpoint_dir), queue, decisions
        self._last_progress = 0.0
        self._epoch = 0

    @property
    def checkpoint_dir(self) -> Path:
        return self._dir

    def report(self, epoch: int, metrics) -> None:
        self._epoch = epoch
        self.queue.put(("metrics", self.key, epoch, dict(metrics)))

    def should_stop(self) -> bool:
        if self.decisions is None:
            return False
        import ray

        deadline = time.monotonic() + self.DECISION_TIMEOUT
        while time.monotonic() < deadline:
            verdict = ray.get(self.decisions.get.remote(self.key, self._epoch))
            if verdict is not None:
                return verdict
            time.sleep(0.05)
        return False

    def progress(self, done: int, total: int, message: str = "") -> None:
        now = time.monotonic()
        if now - self._last_progress >= self.PROGRESS_INTERVAL or done == total:
            self._last_progress = now
            self.queue.put(("progress", self.key, done, total, message))


class Decisions:
    """A Ray actor holding the driver's stop/continue verdict per (variant, epoch)."""

    def __init__(self) -> None:
        self._verdicts: dict[tuple[str, int], bool] = {}

    def put(self, key: str, epoch: int, stop: bool) -> None:
        self._verdicts[(key, epoch)] = stop

    def get(self, key: str, epoch: int) -> bool | None:
        return self._verdicts.get((key, epoch))


def train_task(key: str, config: dict, checkpoint_dir: str, queue: Any, decisions: Any = None) -> dict:
    """Body of the Ray task: train one variant; application errors come back as data (no retry)."""
    from bnnctl.workers.errors import BnnctlError
    from bnnctl.workers.train import run_variant

    node = socket.gethostname()
    # the worker's pid beside the checkpoints: operators (and the fault-injection tests) can find it
    Path(checkpoint_dir, "worker.pid").write_text(str(os.getpid()))
    try:
        cfg = from_dict(TrainConfig, config)
        result = run_variant(cfg, RayReporter(key, checkpoint_dir, queue, decisions))
    except BnnctlError as err:
        return {"error": str(err), "reason": getattr(err, "reason", type(err).__name__), "node": node}
    return {"result": dataclasses.asdict(result), "node": node, "pid": os.getpid()}


@dataclass
class Events:
    """Callbacks for progress display; all optional."""

    started: Callable[[Variant], None] = lambda v: None
    epoch: Callable[[Variant, int, dict], None] = lambda v, e, m: None
    progress: Callable[[Variant, int, int], None] = lambda v, d, t: None
    finished: Callable[[Variant, str, str | None], None] = lambda v, status, error: None


class Hooks:
    """How a tuning drives the executor (all optional; the defaults run a fixed plan).

    - ``feed(free)``: up to ``free`` new variants to add to the plan now (asked when slots are free).
    - ``judge(variant, epoch, metrics)``: True stops the variant after this epoch (pruning).
    - ``settled(variant, status, result, error)``: a variant ended: completed, failed or stopped
      (also called at once for a fed variant that had already completed earlier).
    """

    def feed(self, free: int) -> list[Variant]:
        return []

    def judge(self, variant: Variant, epoch: int, metrics: dict) -> bool:
        return False

    def settled(self, variant: Variant, status: str, result: dict | None, error: str | None) -> None:
        pass

    @property
    def prunes(self) -> bool:
        """Whether ``judge`` can ever say stop (then workers wait for each epoch's verdict)."""
        return False


def init_ray(address: str | None, cpus: int | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # a local cluster, sized for small machines
        ray.init(num_cpus=cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 object_store_memory=128 * 1024 * 1024)


class Executor:
    def __init__(self, store: Store, tracker, runs_dir: Path | None = None, max_parallel: int = 2, retries: int = 2,
                 events: Events | None = None) -> None:
        self.store, self.tracker = store, tracker
        self.runs_dir = Path(runs_dir or RUNS_DIR).resolve()
        self.max_parallel, self.retries = max_parallel, retries
        self.events = events or Events()

    def checkpoint_dir(self, key: str) -> Path:
        return (self.runs_dir / key).resolve()

    def _resolved_config(self, v: Variant) -> dict:
        """The variant's config with its dependencies' checkpoints filled in."""
        cfg = v.config
        if v.init_dep:
            cfg = dataclasses.replace(cfg, init_from=str(self.checkpoint_dir(v.init_dep) / LAST))
        if v.teacher_dep:
            cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill,
                                                                       teacher=str(self.checkpoint_dir(v.teacher_dep) / BEST)))
        return to_dict(cfg)

    def run(self, plan: Plan, study_name: str, parent_run: str | None,
            cancelled: Callable[[], bool] = lambda: False, hooks: Hooks | None = None) -> dict[str, str]:
        """Run every unfinished variant of ``plan``; returns the final status of each variant.

        ``cancelled`` is polled while waiting: when it returns True, nothing new starts, running
        variants are stopped and put back to pending (a later run resumes them from their checkpoints).
        ``hooks`` (a tuning) feed new variants as slots free up, judge every epoch and hear every end.
        """
        import ray
        from ray.util.queue import Queue

        hooks = hooks or Hooks()
        queue = Queue()
        decisions = ray.remote(Decisions).options(num_cpus=0).remote() if hooks.prunes else None
        remote = ray.remote(train_task)
        status = {k: s.status for k, s in self.store.variants(list(plan.variants)).items()}
        attempts = {k: 0 for k in plan.variants}
        running: dict[Any, str] = {}
        runs: dict[str, str | None] = {}
        # MLflow work for finished variants waits until the freed worker has new work (overlap)
        to_track: list[tuple[str, dict | None, str | None, bool]] = []

        def ready(v: Variant) -> bool:
            return status[v.key] == "pending" and all(status[d] == "completed" for d in v.deps)

        def blocked(v: Variant) -> bool:
            return status[v.key] == "pending" and any(status[d] == "failed" for d in v.deps)

        def feed() -> bool:
            waiting = sum(1 for v in plan.order() if status[v.key] == "pending")
            free = self.max_parallel - len(running) - waiting
            if free <= 0:
                return False
            fed = hooks.feed(free)
            for v in fed:
                if v.key in status and status[v.key] in ("running", "pending"):
                    continue  # already in this run (two trials asked for the same config)
                plan.variants[v.key] = v
                attempts.setdefault(v.key, 0)
                stored = self.store.variant(v.key)
                status[v.key] = stored.status
                if stored.status == "completed":  # trained before: its result is reused
                    hooks.settled(v, "completed", stored.result, None)
            return bool(fed)

        def submit(v: Variant) -> None:
            ckpt = self.checkpoint_dir(v.key)
            ckpt.mkdir(parents=True, exist_ok=True)
            attempts[v.key] += 1
            self.store.start_attempt(v.key, None, str(ckpt))
            if self.tracker is not None and parent_run is not None and v.key not in runs:
                stored = self.store.variant(v.key)
                run_id = self.tracker.variant_run(parent_run, stored.mlflow_run_id if stored else None, v.key,
                                                  v.label, v.kind, v.seed, to_dict(v.config), study_name)
                self.store.set_mlflow_run(v.key, run_id)
                runs[v.key] = run_id
            opts = {"num_cpus": v.resources.cpus, "num_gpus": v.resources.gpus, "max_retries": 0}
            ref = remote.options(**opts).remote(v.key, self._resolved_config(v), str(ckpt), queue, decisions)
            running[ref] = v.key
            status[v.key] = "running"
            self.events.started(v)

        def drain() -> None:
            while not queue.empty():
                msg = queue.get_nowait()
                v = plan.variants[msg[1]]
                if msg[0] == "metrics":
                    _, key, epoch, metrics = msg
                    self.store.log_metrics(key, epoch, metrics)
                    if runs.get(key):
                        self.tracker.log_metrics(runs[key], epoch, metrics)
                    stop = bool(hooks.judge(v, epoch, metrics))  # tunings record every epoch
                    if decisions is not None:
                        decisions.put.remote(key, epoch, stop)
                    self.events.epoch(v, epoch, metrics)
                else:
                    self.events.progress(v, msg[2], msg[3])

        def settle(key: str, new: str, error: str | None, result: dict | None = None) -> None:
            status[key] = new
            if new == "completed":
                self.store.finish(key, result)
            elif new == "stopped":
                self.store.stop(key, result)
            elif new == "failed":
                self.store.fail(key, error or "failed")
            if runs.get(key):
                to_track.append((runs[key], result, error, new == "stopped"))
            hooks.settled(plan.variants[key], new, result, error)
            self.events.finished(plan.variants[key], new, error)

        while True:
            if cancelled():
                for ref, key in list(running.items()):
                    ray.cancel(ref, force=True)
                    self.store.requeue(key, "study cancelled")
                    status[key] = "pending"
                    self.events.finished(plan.variants[key], "cancelled", None)
                running.clear()
                drain()
                break
            for v in plan.order():
                if blocked(v):
                    failed_dep = next(d for d in v.deps if status[d] == "failed")
                    self.store.start_attempt(v.key, None, str(self.checkpoint_dir(v.key)))
                    settle(v.key, "failed", f"dependency {plan.variants[failed_dep].label} failed")
            fed = feed()
            for v in plan.order():
                if len(running) >= self.max_parallel:
                    break
                if ready(v):
                    submit(v)
            while to_track:
                self.tracker.finish(*to_track.pop(0))
            if not running:
                if fed:
                    continue  # fed variants that were already complete: ask for more
                break
            done, _ = ray.wait(list(running), num_returns=1, timeout=0.2 if decisions is not None else 0.5)
            drain()
            for ref in done:
                key = running.pop(ref)
                try:
                    out = ray.get(ref)
                except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                        ray.exceptions.ObjectLostError, ray.exceptions.TaskUnschedulableError) as err:
                    if attempts[key] <= self.retries:
                        self.store.requeue(key, f"worker lost: {type(err).__name__}")
                        status[key] = "pending"
                        self.events.finished(plan.variants[key], "retrying", type(err).__name__)
                    else:
                        settle(key, "failed", f"worker lost {attempts[key]} times: {type(err).__name__}")
                    continue
                except ray.exceptions.RayTaskError as err:  # a bug, not a user error: keep the traceback
                    settle(key, "failed", f"crashed: {err}")
                    continue
                drain()
                if "error" in out:
                    settle(key, "failed", out["error"])
                elif out["result"]["status"] == "stopped":
                    settle(key, "stopped", None, out["result"])
                else:
                    settle(key, "completed", None, out["result"])
        drain()
        while to_track:
            self.tracker.finish(*to_track.pop(0))
        return status
