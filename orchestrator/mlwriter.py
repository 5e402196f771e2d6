"""MLflow's per-variant work off the driver: a writer process beside it.

The driver's loop only queues (a thread beside it pickles each message into a pipe); the writer
process does MLflow's work in order (run creation, epoch metrics, final metrics and artifacts,
trial tags), in as few calls as MLflow allows, on a core of its own: MLflow's client costs tens of
milliseconds of CPU per variant (its SQLAlchemy store), which in the driver's process would share
the interpreter with the loop. Calls name variants by key; the writer knows their run ids.

Crash safety is the state store's, as without the writer: the store is written first (a variant's
state, metrics, result), MLflow after; a driver killed with work queued leaves runs RUNNING, and
the next driver's :meth:`~bnnctl.orchestrator.tracking.Tracker.reconcile` ends them from the store.
A run's creation is announced in the store first (:data:`~bnnctl.orchestrator.tracking.CREATING`),
so a driver killed during it never makes the next one create a second run. The writer dies with
its driver (``PR_SET_PDEATHSIG`` on Linux, and it checks its parent before each message): it never
writes to MLflow on behalf of a driver that is gone, beside the driver that replaces it. It ignores
the terminal's Ctrl-C and SIGTERM: its driver stops it, after the runs are marked.

The writer is ``python -m bnnctl.orchestrator.mlwriter`` (no ``multiprocessing``: nothing of the
caller's ``__main__`` is imported again); messages are pickled tuples over its stdin, its answers
pickled over a copy of its stdout (its own stdout goes to stderr, so a library's print never
corrupts the channel). Both ends are this module, on one machine, through an anonymous pipe.
"""
from __future__ import annotations

import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any, BinaryIO

#: a running variant's epoch metrics are sent to MLflow at most this often (the rest wait, and go
#: in one batch with the next ones or with the final metrics: a short variant costs one batch)
METRICS_EVERY_S = 10.0


class Writer:
    """The driver's side: start it, :meth:`open` it once MLflow's experiment exists, queue work,
    :meth:`flush` to wait for it (and learn its first error), :meth:`close` at the end."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen([sys.executable, "-m", "bnnctl.orchestrator.mlwriter", str(os.getpid())],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._queue: queue.Queue = queue.Queue()
        self._broken: str | None = None  # why the pipe to the writer failed
        self._token = 0
        self.cpu_s = 0.0  # the writer process's CPU time, known once closed (what tracking costs)
        self._feeder = threading.Thread(target=self._feed, name="bnnctl-mlflow-feeder", daemon=True)
        self._feeder.start()

    def open(self, uri: str, experiment: str, storage_root: str, db_url: str,
             every_s: float = METRICS_EVERY_S, recovered_parent: str | None = None) -> None:
        """The MLflow store and experiment, the run storage and the state database it writes to.
        ``recovered_parent``: the study's parent run when the state store had lost it (its variants'
        runs are looked up once, and continued)."""
        self._put("open", uri, experiment, storage_root, db_url, every_s, recovered_parent)

    # -- what the driver's loop calls (queued) ------------------------------------------------------
    def variant_run(self, key: str, parent: str, existing: str | None, label: str, kind: str, seed: int,
                    config: dict, study: str, tags: dict[str, str], links: dict[str, str]) -> None:
        """Create (or reopen) the variant's run with ``tags``; ``links``: tag -> variant key, set to
        that variant's run id (the writer knows the ids of runs it created moments before)."""
        self._put("start", key, parent, existing, label, kind, seed, config, study, tags, links)

    def log_metrics(self, key: str, epoch: int, metrics: dict[str, float]) -> None:
        self._put("metrics", key, epoch, dict(metrics))

    def finish(self, key: str, result: dict | None, error: str | None = None, stopped: bool = False) -> None:
        self._put("finish", key, result, error, stopped)

    def interrupted(self, key: str) -> None:
        self._put("interrupted", key)

    def trial_started(self, key: str, arm: str, number: int, params: dict[str, Any]) -> None:
        self._put("trial_started", key, arm, number, params)

    def trial_finished(self, key: str, state: str, objective: float | None) -> None:
        self._put("trial_finished", key, state, objective)

    def flush(self, raise_errors: bool = True) -> None:
        """Wait until everything queued is done; raise the first error the writer met (MLflow down:
        the state store holds everything, and the next run brings MLflow in line)."""
        self._token += 1
        self._put("flush", self._token)
        error = self._answer("flushed", self._token)
        if error is not None and raise_errors:
            from .tracking import TrackingError

            raise TrackingError(f"MLflow: {error}")

    def close(self) -> None:
        """Finish what was queued and stop the writer (a writer that does not stop in 30 s is killed)."""
        if self._proc.poll() is None:
            self._put("close")
            self._answer("closed", None)
        self._queue.put(None)
        self._feeder.join(timeout=30)
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for pipe in (self._proc.stdin, self._proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    # -- the pipe -----------------------------------------------------------------------------------
    def _put(self, *message) -> None:
        self._queue.put(message)

    def _feed(self) -> None:
        """The feeder thread: pickles each message into the writer's stdin, in order."""
        while True:
            message = self._queue.get()
            if message is None:
                return
            if self._broken is not None:
                continue
            try:
                pickle.dump(message, self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                self._proc.stdin.flush()
            except (OSError, ValueError) as err:  # the writer is gone: its answers say so
                self._broken = f"{type(err).__name__}: {err}"

    def _answer(self, kind: str, token) -> str | None:
        """Read the writer's answers up to the one for (``kind``, ``token``); its error, if any. A
        writer that died answers with how it ended."""
        while True:
            try:
                answer = pickle.load(self._proc.stdout)
            except (EOFError, OSError, pickle.UnpicklingError):
                rc = self._proc.wait()
                return f"the MLflow writer process ended (exit status {rc})" + \
                    (f" after {self._broken}" if self._broken else "")
            if answer[0] == kind and (kind == "closed" or answer[1] == token):
                if kind == "closed":
                    self.cpu_s = answer[1]
                return answer[2]


class _Work:
    """The writer process's side: the messages, done with MLflow's client and the state store."""

    def __init__(self, uri: str, experiment: str, storage_root: str, db_url: str, every_s: float,
                 recovered_parent: str | None) -> None:
        from .runstorage import RunStorage
        from .store import Store
        from .tracking import Tracker

        self.tracker = Tracker(uri, experiment, RunStorage(storage_root))
        self.store = Store(db_url)
        self.every_s = every_s
        # runs the state store lost (a deleted database): key -> run id, continued, never made twice
        self._lost = self.tracker.children(recovered_parent) if recovered_parent else {}
        self._runs: dict[str, str] = {}  # key -> run id
        self._fresh: set[str] = set()  # runs created by this driver
        self._pending: dict[str, tuple[list, list]] = {}  # key -> (metrics, params) not sent yet
        self._sent: dict[str, float] = {}  # key -> when its metrics were last sent (monotonic)

    def start(self, key, parent, existing, label, kind, seed, config, study, tags, links) -> None:
        from .tracking import CREATING, params_of

        if existing is None:
            existing = self._lost.get(key)
        if existing is None:  # announced before it exists (see CREATING)
            self.store.set_mlflow_run(key, CREATING)
        tags = dict(tags)
        for tag, dep in links.items():
            run = self._runs.get(dep)
            if run is None:
                stored = self.store.variant(dep)
                run = stored.mlflow_run_id if stored is not None and stored.mlflow_run_id != CREATING else None
            if run:
                tags[tag] = run
        run_id, created = self.tracker.open_variant_run(parent, existing, key, label, kind, seed, config, study, tags)
        self.store.set_mlflow_run(key, run_id)
        self._runs[key] = run_id
        if created:
            self._fresh.add(key)
        self._pending[key] = ([], params_of(config) if created else [])  # sent with its first batch
        self._sent[key] = time.monotonic()

    def metrics(self, key: str, epoch: int, metrics: dict[str, float]) -> None:
        from .tracking import metrics_of

        if key not in self._runs:
            return
        self._pending[key][0].extend(metrics_of(epoch, metrics))
        if time.monotonic() - self._sent[key] >= self.every_s:
            self._send(key)

    def _send(self, key: str) -> None:
        waiting, params = self._pending.get(key, ([], []))
        if waiting or params:
            self._pending[key] = ([], [])
            self.tracker.log_batches(self._runs[key], waiting, params, [])
        self._sent[key] = time.monotonic()

    def finish(self, key: str, result: dict | None, error: str | None, stopped: bool) -> None:
        if key not in self._runs:
            return
        pending = self._pending.pop(key, ([], []))
        self.tracker.finish(self._runs[key], result, error, stopped, pending=pending, fresh=key in self._fresh)

    def interrupted(self, key: str) -> None:
        if key in self._runs:
            self._send(key)  # the epochs it did are shown
        self._on_run(key, self.tracker.interrupted)

    def trial_started(self, key: str, arm: str, number: int, params: dict) -> None:
        self._on_run(key, self.tracker.trial_started, arm, number, params)

    def trial_finished(self, key: str, state: str, objective: float | None) -> None:
        self._on_run(key, self.tracker.trial_finished, state, objective)

    def _on_run(self, key: str, fn, *args) -> None:
        """``fn(run id, *args)`` on the variant's run: the one this driver opened, else the one the
        store names (a trial reusing an earlier variant's result)."""
        from .tracking import CREATING

        run_id = self._runs.get(key)
        if run_id is None:
            stored = self.store.variant(key)
            run_id = stored.mlflow_run_id if stored is not None and stored.mlflow_run_id != CREATING else None
        if run_id is not None:
            fn(run_id, *args)


def _die_with(parent: int) -> None:
    """Be killed when the driver dies (Linux); and never outlive it unnoticed elsewhere (checked
    before each message)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the line above
        os._exit(0)


def serve(parent: int, inbox: BinaryIO, outbox: BinaryIO) -> None:
    """The writer's loop: one message at a time, in order; errors kept (the first one is answered
    to the next flush) and the next messages still done."""
    work: _Work | None = None
    error: str | None = None
    while True:
        try:
            message = pickle.load(inbox)
        except EOFError:  # the driver is gone
            return
        if os.getppid() != parent:
            os._exit(0)
        kind, args = message[0], message[1:]
        if kind in ("flush", "close"):
            answer = ("flushed", args[0], error) if kind == "flush" else ("closed", time.process_time(), error)
            error = None
            pickle.dump(answer, outbox, protocol=pickle.HIGHEST_PROTOCOL)
            outbox.flush()
            if kind == "close":
                return
            continue
        try:
            if kind == "open":
                work = _Work(*args)
            elif work is not None:
                getattr(work, kind)(*args)
        except Exception as err:  # noqa: BLE001 - answered to the next flush; the next messages still run
            if error is None:
                error = f"{type(err).__name__}: {err}"


def main() -> None:
    parent = int(sys.argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C: the driver stops its writer
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with(parent)
    outbox = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a library's print goes to stderr, never into the channel
    import mlflow  # noqa: F401 - imported while the driver starts its cluster (MLflow's start-up is seconds)

    serve(parent, sys.stdin.buffer, outbox)


if __name__ == "__main__":
    main()
