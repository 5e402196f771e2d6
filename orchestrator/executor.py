"""The scheduling loop: ready variants start on a :class:`~.backends.Backend` with their resources,
respecting the DAG and a parallelism limit. Workers' per-epoch metrics come back as messages; the
driver (this process) is the single writer of the state store and of MLflow. The loop knows nothing
of Ray: the backend starts, watches and cancels tasks.

Failures: a lost worker or node (the task's process died, its node went away, it was killed for
memory) is retried up to ``retries`` times and resumes from its last checkpoint; an application error
(invalid config, missing data, NaN loss, a full disk) fails the variant at once with its reason, and
the rest of the study goes on.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from bnnctl.workers.config import to_dict
from bnnctl.workers.train.loop import BEST, LAST

from .backends import NO_SPACE, Backend, EpochMetrics, Finished, Progress, Started, Task
from .plan import Plan, Variant
from .runstorage import RunStorage
from .store import Store
#: Seconds a submitted variant may wait for a worker before the progress display says so.
WAIT_WARNING_S = 60.0


@dataclass
class Events:
    """Callbacks for progress display; all optional.

    ``finished`` statuses: completed, failed, stopped, cancelled, retrying. ``waiting`` is called
    (once) when a variant has waited ``wait_warning_s`` for a worker with the resources it needs.
    """

    started: Callable[[Variant], None] = lambda v: None
    epoch: Callable[[Variant, int, dict], None] = lambda v, e, m: None
    progress: Callable[[Variant, int, int], None] = lambda v, d, t: None
    finished: Callable[[Variant, str, str | None], None] = lambda v, status, error: None
    waiting: Callable[[Variant, float], None] = lambda v, seconds: None
    #: like ``waiting``, for a variant that waits for the autoscaler to add a node (with what it can add)
    scaling: Callable[[Variant, float, str], None] = lambda v, seconds, why: None
    running: Callable[[Variant, str], None] = lambda v, node: None
    #: a resumed run said which epochs its checkpoint holds (the last one)
    resumed: Callable[[Variant, int], None] = lambda v, epoch: None
    #: adaptive seeds: a look left comparisons open, and this many more variants will run for them
    planned: Callable[[int], None] = lambda count: None
    #: the run passed its checks and started (the driver holds the study; nothing was refused)
    begun: Callable[[], None] = lambda: None
    #: a line to show about the run as a whole (e.g. the quiet latency measurement at its end)
    note: Callable[[str], None] = lambda text: None


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


class Executor:
    def __init__(self, store: Store, tracker, backend: Backend, storage: RunStorage | None = None,
                 max_parallel: int = 2, retries: int = 2, events: Events | None = None,
                 wait_warning_s: float = WAIT_WARNING_S) -> None:
        self.store, self.tracker, self.backend = store, tracker, backend
        self.storage = storage or RunStorage()
        self.max_parallel, self.retries = max_parallel, retries
        self.events = events or Events()
        self.wait_warning_s = wait_warning_s
        #: why the last run ended before its work was done (the run storage is full), or None
        self.halted: str | None = None

    def task(self, v: Variant) -> Task:
        """The backend's task for ``v``: its config, and its dependencies' checkpoints to fetch."""
        fetch = []
        if v.init_dep:
            fetch.append(("init_from", f"{v.init_dep}/{LAST}"))
        if v.teacher_dep:
            fetch.append(("distill.teacher", f"{v.teacher_dep}/{BEST}"))
        return Task(v.key, to_dict(v.config), self.storage.root, v.resources.cpus, v.resources.gpus, tuple(fetch),
                    v.resources.workers)

    def run(self, plan: Plan, study_name: str, parent_run: str | None,
            cancelled: Callable[[], bool] = lambda: False, hooks: Hooks | None = None) -> dict[str, str]:
        """Run every unfinished variant of ``plan``; returns the final status of each variant.

        ``cancelled`` is polled while waiting: when it returns True, nothing new starts, running
        variants are stopped and put back to pending (a later run resumes them from their checkpoints).
        ``hooks`` (a tuning) feed new variants as slots free up, judge every epoch and hear every end.
        """
        self.halted = None
        return _Loop(self, plan, study_name, parent_run, hooks or Hooks()).run(cancelled)


class Interrupted(KeyboardInterrupt):
    """The driver was interrupted (Ctrl-C, or SIGTERM) while ``running`` variants ran: they were
    stopped and marked interrupted; the same command resumes them."""

    def __init__(self, reason: str, running: int) -> None:
        super().__init__(reason)
        self.reason, self.running = reason, running


class _Loop:
    """One run of the executor: the state of every variant and the steps of the loop."""

    def __init__(self, ex: Executor, plan: Plan, study: str, parent_run: str | None, hooks: Hooks) -> None:
        self.ex, self.plan, self.study, self.parent_run, self.hooks = ex, plan, study, parent_run, hooks
        self.store, self.backend, self.events = ex.store, ex.backend, ex.events
        self.status = {k: s.status for k, s in self.store.variants(list(plan.variants)).items()}
        self.attempts = {k: 0 for k in plan.variants}
        self.running: dict[str, float] = {}  # key -> submitted at (monotonic)
        self.started: set[str] = set()  # running keys whose worker announced itself
        self.warned: set[str] = set()
        self.runs: dict[str, bool] = {}  # keys whose MLflow run this loop asked for (the writer knows its id)
        self.disk_full: str | None = None  # a variant's "no space left" error: nothing new starts
        self.restored: dict[str, int] = {}  # key -> the last epoch its resumed run restored, not said yet

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, cancelled: Callable[[], bool]) -> dict[str, str]:
        try:
            return self._run(cancelled)
        except KeyboardInterrupt as err:  # Ctrl-C (or SIGTERM): stop what runs, say so in the store
            reason = str(err) or "interrupted (Ctrl-C)"
            running = self.interrupt_all(reason)
            raise Interrupted(reason, running) from None

    def interrupt_all(self, reason: str) -> int:
        """Stop every running variant and mark it interrupted (best effort: the store may be what
        failed); returns how many there were."""
        running = list(self.running)
        for key in running:
            try:
                self.backend.cancel(key)
                self.store.interrupt(key, reason)
                if self.runs.get(key):
                    self.ex.tracker.interrupted(key)
            except Exception:  # noqa: BLE001 - the next run reconciles what this one could not write
                pass
        self.running.clear()
        return len(running)

    def _run(self, cancelled: Callable[[], bool]) -> dict[str, str]:
        poll = 0.2 if self.hooks.prunes else 0.5
        while True:
            if cancelled():
                self.cancel_all()
                break
            self.fail_blocked()
            room = self.room()
            fed = self.feed() if room else False
            for v in self.plan.order():
                if not room or len(self.running) >= self.ex.max_parallel:
                    break
                if self.ready(v):
                    self.submit(v)
            if not self.running:
                if fed:
                    continue  # fed variants that were already complete: ask for more
                if not room:
                    self.ex.halted = (f"{self.disk_full}; the variants not started yet wait: free some space "
                                      "and run it again")
                break
            done = self.backend.wait(poll)
            self.drain()
            for out in done:
                self.collect(out)
            self.warn_waiting()
        self.drain()
        return self.status

    def room(self) -> bool:
        """False while the run storage is full (after a variant failed for it): nothing new starts
        until a probe write succeeds again; with a URL, until the running variants end."""
        if self.disk_full is None:
            return True
        if self.ex.storage.has_room():
            self.disk_full = None
            return True
        return False

    def ready(self, v: Variant) -> bool:
        return self.status[v.key] == "pending" and all(self.status[d] == "completed" for d in v.deps)

    def fail_blocked(self) -> None:
        for v in self.plan.order():
            if self.status[v.key] == "pending" and any(self.status[d] == "failed" for d in v.deps):
                failed_dep = next(d for d in v.deps if self.status[d] == "failed")
                self.store.start_attempt(v.key, None, self.ex.storage.location(v.key))
                self.settle(v.key, "failed", f"dependency {self.plan.variants[failed_dep].label} failed")

    def feed(self) -> bool:
        waiting = sum(1 for v in self.plan.order() if self.status[v.key] == "pending")
        free = self.ex.max_parallel - len(self.running) - waiting
        if free <= 0:
            return False
        fed = self.hooks.feed(free)
        for v in fed:
            if v.key in self.status and self.status[v.key] in ("running", "pending"):
                continue  # already in this run (two trials asked for the same config)
            self.plan.variants[v.key] = v
            self.attempts.setdefault(v.key, 0)
            stored = self.store.variant(v.key)
            self.status[v.key] = stored.status
            if stored.status == "completed":  # trained before: its result is reused
                self.hooks.settled(v, "completed", stored.result, None)
        return bool(fed)

    def submit(self, v: Variant) -> None:
        self.attempts[v.key] += 1
        self.store.start_attempt(v.key, None, self.ex.storage.location(v.key))
        writer = self.ex.tracker  # an mlwriter.Writer: MLflow's work is queued, done beside this loop
        if writer is not None and self.parent_run is not None and v.key not in self.runs:
            stored = self.store.variant(v.key)
            writer.variant_run(v.key, self.parent_run, stored.mlflow_run_id if stored else None, v.label, v.kind,
                               v.seed, to_dict(v.config), self.study, *self.provenance(v))
            self.runs[v.key] = True
        self.backend.submit(self.ex.task(v), verdicts=self.hooks.prunes)
        self.running[v.key] = time.monotonic()
        self.started.discard(v.key)
        self.status[v.key] = "running"
        self.events.started(v)

    @staticmethod
    def provenance(v: Variant) -> tuple[dict[str, str], dict[str, str]]:
        """MLflow tags that place a variant's run (ablation, row, stage) and name the variants it was
        initialized from and learned from; and the tags that link to those variants' runs (tag ->
        variant key: the writer knows their run ids)."""
        tags = {"bnnctl.ablation": v.ablation or "", "bnnctl.row": v.row or "",
                "bnnctl.stage": "1" if v.kind == "stage1" else ("2" if v.init_dep else "single")}
        links = {}
        for dep, name in ((v.init_dep, "init_from"), (v.teacher_dep, "teacher")):
            if dep:
                tags[f"bnnctl.{name}"] = dep
                links[f"bnnctl.{name}_run"] = dep
        return {k: val for k, val in tags.items() if val}, links

    def say_resumed(self, key: str) -> None:
        """The ``resumed`` event of a variant whose restored epochs have all arrived (once)."""
        if key in self.restored:
            self.events.resumed(self.plan.variants[key], self.restored.pop(key))

    def drain(self) -> None:
        for msg in self.backend.messages():
            v = self.plan.variants.get(msg.key)
            if v is None or msg.key not in self.running:
                continue  # a cancelled task's last words
            if isinstance(msg, Started):
                self.started.add(msg.key)
                self.store.set_attempt_node(msg.key, msg.node, msg.node_id)
                self.events.running(v, msg.node)
                continue
            if isinstance(msg, EpochMetrics) and msg.restored:
                self.restored[msg.key] = msg.epoch  # said once, with the last one, when training goes on
                # a resumed run's earlier epochs: record those a crashed driver never got
                if msg.epoch in self.store.metric_epochs(msg.key):
                    continue
                self.record(msg)
                self.hooks.judge(v, msg.epoch, msg.metrics)  # the trial's history; no verdict is awaited
                continue
            self.say_resumed(msg.key)
            if isinstance(msg, EpochMetrics):
                self.record(msg)
                stop = bool(self.hooks.judge(v, msg.epoch, msg.metrics))  # tunings record every epoch
                if self.hooks.prunes:
                    self.backend.decide(msg.key, msg.epoch, stop)
                self.events.epoch(v, msg.epoch, msg.metrics)
            elif isinstance(msg, Progress):
                self.events.progress(v, msg.done, msg.total)

    def record(self, msg: EpochMetrics) -> None:
        """An epoch's metrics into the store, then into the variant's MLflow run."""
        self.store.log_metrics(msg.key, msg.epoch, msg.metrics)
        if self.runs.get(msg.key):
            self.ex.tracker.log_metrics(msg.key, msg.epoch, msg.metrics)

    def collect(self, out: Finished) -> None:
        key = out.key
        if key not in self.running:
            return
        self.say_resumed(key)  # a run that had finished before it was resumed
        del self.running[key]
        if out.status == "lost":
            if self.attempts[key] <= self.ex.retries:
                self.store.requeue(key, f"worker lost: {out.error}")
                self.status[key] = "pending"
                self.events.finished(self.plan.variants[key], "retrying", out.error)
            else:
                self.settle(key, "failed", f"worker lost {self.attempts[key]} times: {out.error}")
            return
        self.settle(key, out.status, out.error, out.result)

    def settle(self, key: str, new: str, error: str | None, result: dict | None = None) -> None:
        self.status[key] = new
        if new == "completed":
            self.store.finish(key, result)
        elif new == "stopped":
            self.store.stop(key, result)
        elif new == "failed":
            self.store.fail(key, error or "failed")
            if (error or "").startswith(NO_SPACE):
                self.disk_full = error.split(" (node ")[0]
        if self.runs.get(key):
            self.ex.tracker.finish(key, result, error, new == "stopped")
        self.hooks.settled(self.plan.variants[key], new, result, error)
        self.events.finished(self.plan.variants[key], new, error)

    def cancel_all(self) -> None:
        for key in list(self.running):
            self.backend.cancel(key)
            self.store.requeue(key, "study cancelled")
            if self.runs.get(key):
                self.ex.tracker.interrupted(key)
            self.status[key] = "pending"
            self.events.finished(self.plan.variants[key], "cancelled", None)
        self.running.clear()

    def warn_waiting(self) -> None:
        now = time.monotonic()
        for key, since in list(self.running.items()):
            refused = "" if key in self.started else self.backend.refused(key)
            if refused:  # it would wait for ever
                self.backend.cancel(key)
                del self.running[key]
                self.settle(key, "failed", refused)
                continue
            if key not in self.started and key not in self.warned and now - since >= self.ex.wait_warning_s:
                self.warned.add(key)
                why = self.backend.waiting_for(key)
                if why:
                    self.events.scaling(self.plan.variants[key], now - since, why)
                else:
                    self.events.waiting(self.plan.variants[key], now - since)
