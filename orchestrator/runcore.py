"""What running a study and running a tuning share: the driver's session.

A :class:`DriverSession` opens MLflow (in a thread) while the backend connects and warms its workers
up, marks the study running, builds the executor with a cancel poller, and records the final status.
If anything escapes (the cluster went away, Ctrl-C, a database error), the study is left
``stopped`` with the reason, never ``running`` with no driver, and its MLflow run ends KILLED.
:func:`run_study` and :func:`run_tuning` are the parts that differ.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping

from bnnctl.workers.errors import BnnctlError, UnknownNameError

from .backends import Backend, make_backend
from .errors import LeaseHeld, StoreError
from .executor import Events, Executor, Hooks
from .plan import Plan
from .runstorage import RunStorage
from .spec import Execution, Resources
from .store import Store
from .urls import mask_text, mask_url


@dataclass(frozen=True)
class RunOptions:
    """How to run, from the command line (None: the spec's or the default)."""

    db: str | None = None
    tracking_uri: str | None = None
    address: str | None = None
    cpus: int | None = None
    max_parallel: int | None = None
    track: bool = True
    #: `--backend NAME` (default: the spec's `execution.backend`, $BNNCTL_BACKEND, else "ray")
    backend: str | None = None
    #: run storage root: a folder or an fsspec URL (default: the spec's `storage`, $BNNCTL_STORAGE,
    #: else .bnnctl/runs)
    storage: str | None = None
    #: an already-built backend (tests inject an in-process one with scripted tasks)
    backend_instance: Backend | None = None
    #: take the study's lease even though another driver's heartbeat is recent
    takeover: bool = False
    #: a lease whose heartbeat is older than this is taken over (its driver crashed)
    lease_timeout_s: float = 60.0
    #: `--set PATH=VALUE`: applied last to every variant's config (part of the identities)
    overrides: tuple[tuple[str, Any], ...] = ()
    #: `--tag NAME`: the version's name (default: the overrides written out; see spec.version_name)
    tag: str | None = None
    #: `--only ROW` (a row name, or ABLATION/ROW) and `--variant KEY` (a key or a unique prefix):
    #: run only these (and what they depend on); empty: everything
    only: tuple[str, ...] = ()
    variant_keys: tuple[str, ...] = ()
    #: retry failed variants (a plain run skips them and says so)
    rerun_failed: bool = False
    #: a tuning's trials per arm instead of the spec's (`tune run --trials N`)
    trials: int | None = None
    #: where ``storage`` and ``backend`` came from, for messages (set by :meth:`resolve`)
    storage_source: str = ""
    backend_source: str = ""
    resolved: bool = False

    @classmethod
    def resolve(cls, spec: Any, cli: "RunOptions | None" = None, env: Mapping[str, str] | None = None) -> "RunOptions":
        """The options a run of ``spec`` (a study or tuning spec) uses, each decided here once by
        one rule -- the command line, then the spec, then the environment, then the default:

        - storage: ``--storage``, the spec's ``storage``, ``$BNNCTL_STORAGE``, ``.bnnctl/runs``;
        - backend: ``--backend``, the spec's ``execution.backend``, ``$BNNCTL_BACKEND``, ``ray``
          (a name the registry knows: :func:`~bnnctl.orchestrator.backends.backend_class`);
        - max_parallel: ``--max-parallel``, the spec's ``execution.max_parallel``.

        ``db`` and ``tracking_uri`` are resolved by the store and the tracker the same way (option,
        then environment, then default). Resolving resolved options returns them unchanged."""
        cli = cli or cls()
        if cli.resolved:
            return cli
        env = os.environ if env is None else env
        storage, storage_source = _first((cli.storage, "--storage"), (spec.storage, "storage"),
                                         (env.get("BNNCTL_STORAGE") or None, "$BNNCTL_STORAGE"))
        if storage is None:
            storage_source = "the default run storage (.bnnctl/runs; --storage or `storage:` in the spec to choose)"
        execution = spec.execution
        backend, backend_source = _first((cli.backend, "--backend"), (execution.backend, "execution.backend"),
                                         (env.get("BNNCTL_BACKEND") or None, "$BNNCTL_BACKEND"))
        if backend is None:
            backend, backend_source = "ray", "the default backend"
        from .backends import backend_class, backend_names

        try:
            backend_class(backend)
        except UnknownNameError:
            raise UnknownNameError("backend", backend, backend_names(), backend_source) from None
        return dataclasses.replace(cli, storage=storage, storage_source=storage_source, backend=backend,
                                   backend_source=backend_source,
                                   max_parallel=cli.max_parallel or execution.max_parallel, resolved=True)

    def make_backend(self) -> Backend:
        """The run's backend: the injected one, else the one named, built from the options."""
        if self.backend_instance is not None:
            return self.backend_instance
        assert self.backend is not None, "RunOptions.resolve names the backend"
        return make_backend(self.backend, address=self.address, cpus=self.cpus)


def _first(*candidates: tuple[Any, str]) -> tuple[Any, str]:
    """The first (value, where) whose value is given; (None, "") when none is."""
    for value, where in candidates:
        if value is not None:
            return value, where
    return None, ""


def _dead_here(holder: str) -> bool:
    """Whether ``holder`` (host:pid) is a process of this machine that no longer exists."""
    import os
    import socket

    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class StorageNotShared(BnnctlError):
    """A multi-node cluster with the default, machine-local run storage."""


def shared_storage_problem(backend: Backend, options: RunOptions) -> str:
    """Why the run storage does not fit the backend's cluster (several nodes, or an autoscaler that
    adds machines, with the default folder of this machine); "" when it does (or is not known yet).
    ``options`` are resolved (:meth:`RunOptions.resolve`): a storage from the option, the spec or the
    environment is given; None is the default folder."""
    grows = getattr(backend, "may_grow", False)
    if not (backend.node_count > 1 or grows) or options.storage is not None:
        return ""
    nodes = ("has an autoscaler (the nodes it adds are other machines)" if grows and backend.node_count == 1
             else f"has {backend.node_count} nodes")
    return (f"{backend.describe()} {nodes}, but the run storage is the default folder {RunStorage(None).root} of "
            "this machine, which the other nodes cannot see (their checkpoints would stay on them). Give a run "
            "storage every node reaches: --storage s3://bucket/prefix (or gs://...), or a folder every node mounts "
            "at the same path (--storage /shared/runs), or set `storage:` in the spec")


class LeaseLost(StoreError):
    """Another driver took this driver's study over."""


class StateLost(StoreError):
    """The state database was deleted or replaced while the driver ran."""


class LeaseKeeper:
    """The driver's lease on a study or tuning: taken before anything is written, renewed by a
    heartbeat thread, released at the end. ``lost`` turns True when another driver took it over
    (this driver then stops starting work and leaves the study to it)."""

    def __init__(self, store: Store, name: str, options: RunOptions) -> None:
        import os
        import socket
        import uuid

        self.store, self.name = store, name
        self.token = uuid.uuid4().hex
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        try:
            store.acquire_lease(name, self.holder, self.token, options.lease_timeout_s, options.takeover)
        except LeaseHeld as held:
            dead = _dead_here(held.lease.holder)
            if not dead:
                raise
            # its driver ran on this machine and is gone (killed): no need to wait for the timeout;
            # only one of several new drivers replaces that token
            store.acquire_lease(name, self.holder, self.token, options.lease_timeout_s, replace=held.lease.token)
        self.lost = False
        self.gone: str | None = None  # the state database was deleted or replaced under this driver
        self._identity = store.file_identity()
        self._stop = threading.Event()
        self._every = max(options.lease_timeout_s / 6, 0.5)
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"lease-{name}")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self._every):
            if not self.verify():
                return
            try:
                if not self.store.renew_lease(self.name, self.token):
                    if self.store.lease(self.name) is None:  # not taken over: the database lost the row
                        self.gone = (f"the state database {self.store.display_url} no longer holds this "
                                     "driver's lease (was it replaced or restored from a copy?)")
                    self.lost = True
                    return
            except Exception:  # noqa: BLE001 - a database hiccup: try again at the next beat
                continue

    def verify(self) -> bool:
        """False (and ``gone`` says why) once the sqlite file this driver writes to was deleted or
        replaced: its writes would go to a file nobody will read again."""
        if self.gone is None and self.store.is_file and self.store.file_identity() != self._identity:
            path = self.store.url.removeprefix("sqlite:///")
            self.gone = (f"the state database {path} was {'replaced' if os.path.exists(path) else 'deleted'} "
                         "while this driver ran")
        return self.gone is None

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if not self.lost and self.gone is None:
            try:
                self.store.release_lease(self.name, self.token)
            except Exception:  # noqa: BLE001 - an expired lease is taken over anyway
                pass


def cancel_poller(store: Store, study_id: int, lease: LeaseKeeper | None = None, every: float = 2.0):
    """A cheap 'was the study cancelled (or its lease lost)?' check for the executor loop (one query
    every ``every`` s)."""
    last = [0.0, False]

    def cancelled() -> bool:
        if lease is not None and lease.lost:
            return True
        now = time.monotonic()
        if now - last[0] >= every:
            last[0] = now
            if lease is not None and not lease.verify():
                return True
            last[1] = store.study(study_id).status == "cancelled"
        return last[1]

    return cancelled


class DriverSession:
    """One driver run of a study or tuning (see the module docstring)."""

    def __init__(self, store: Store, study_id: int, name: str, existing_run: str | None, spec_file: str,
                 experiment: str, options: RunOptions, execution: Execution, resources: Resources,
                 events: Events | None = None, kind: str = "study", lease: LeaseKeeper | None = None) -> None:
        self.store, self.study_id, self.name = store, study_id, name
        self.options, self.execution, self.resources = options, execution, resources
        self.storage = RunStorage(options.storage)
        self.lease = lease
        self.events = events or Events()
        self.parallel = options.max_parallel or execution.max_parallel
        self.tracker: Any = None  # the Tracker (MLflow): the study's own run, reconciling
        self.writer: Any = None  # an mlwriter.Writer: the variants' MLflow work, in a process beside this one
        self.parent: str | None = None
        self.backend: Backend | None = None
        self._opened: dict = {}
        self._thread: threading.Thread | None = None
        self._args = (existing_run, spec_file, experiment, kind)
        self._running = False  # the study was marked running by this driver
        self.halted: str | None = None  # why the executor ended with work left (a full disk)

    # -- start ------------------------------------------------------------------------------------
    def begin(self, work: bool) -> None:
        """Open MLflow (in a thread) while the backend starts (only when there is ``work``)."""
        if self.options.track:
            self._thread = threading.Thread(target=self._open_tracking, daemon=True)
            self._thread.start()
            if work:  # the variants' MLflow writer: a process, started while the backend starts
                from .mlwriter import Writer

                self.writer = Writer()
        try:
            if work:
                self._start_backend()
        finally:
            if self._thread is not None:  # even when refused: MLflow's store is never left half-created
                self._thread.join()
        if self._thread is not None:
            if "error" in self._opened:
                raise self._opened["error"]
            self.tracker, self.parent = self._opened["tracker"], self._opened["run"]
            if self.writer is not None:
                self.writer.open(self.tracker.uri, self._args[2], self.storage.root, self.store.url,
                                 recovered_parent=self.parent if self.tracker.recovered else None)
            self.store.annotate_study(self.study_id, mlflow_experiment_id=self.tracker.experiment_id)
        self.store.annotate_study(self.study_id, storage=mask_url(self.storage.root))
        self.store.set_study_status(self.study_id, "running", self.parent)
        self._running = True
        self.events.begun()

    def _start_backend(self) -> None:
        self.backend = self.options.make_backend()
        self.backend.start(self.parallel, self.resources.cpus, self.resources.gpus, self.resources.workers)
        problem = shared_storage_problem(self.backend, self.options)
        if problem:
            raise StorageNotShared(problem)
        self.backend.warm(self.parallel, self.resources.cpus, self.resources.gpus)

    def _open_tracking(self) -> None:
        existing_run, spec_file, experiment, kind = self._args
        try:
            from .tracking import Tracker

            t = Tracker(self.options.tracking_uri, experiment, self.storage)
            self._opened["run"] = t.study_run(self.name, existing_run, spec_file)
            if kind != "study":
                t.client.set_tag(self._opened["run"], "bnnctl.kind", kind)
            # a driver killed earlier may have left runs RUNNING that the store says are over
            keys = [m.variant_key for m in self.store.members(self.study_id)]
            self._opened["reconciled"] = t.reconcile(self.store.variants(keys).values())
            self._opened["tracker"] = t
        except BaseException as err:  # re-raised in the driver's thread by begin()
            self._opened["error"] = err

    # -- run --------------------------------------------------------------------------------------
    def execute(self, plan: Plan, hooks: Hooks | None = None, events: Events | None = None) -> dict[str, str]:
        assert self.backend is not None, "begin(work=True) starts the backend"
        executor = Executor(self.store, self.writer, self.backend, self.storage, max_parallel=self.parallel,
                            retries=self.execution.retries, events=events or self.events,
                            wait_warning_s=self.execution.wait_warning_s)
        try:
            status = executor.run(plan, self.name, self.parent, hooks=hooks,
                                  cancelled=cancel_poller(self.store, self.study_id, self.lease))
        except StoreError:
            if self.lease is not None and not self.lease.verify():
                self._raise_gone()
            raise
        finally:  # MLflow's queued work done (its error raised only when nothing else is)
            if self.writer is not None:
                self.writer.flush(raise_errors=sys.exc_info()[0] is None)
        self.halted = executor.halted
        if self.lease is not None and self.lease.gone:
            self._raise_gone()
        if self.lease is not None and self.lease.lost:
            raise LeaseLost(f"another driver took over {self.name!r} (--takeover, or this driver's heartbeat "
                            "stopped); this driver stopped its variants and left the study to it")
        return status

    def _raise_gone(self) -> None:
        assert self.lease is not None and self.lease.gone
        raise StateLost(f"{self.lease.gone}; this driver stopped starting variants and stopped the running "
                        "ones. Nothing trained is lost: their checkpoints are in the run storage, and running "
                        "the study again (with the state database back, or a new one) resumes them")

    # -- end --------------------------------------------------------------------------------------
    def final_status(self, all_done: bool) -> str:
        if self.store.study(self.study_id).status == "cancelled":
            return "cancelled"
        if self.halted and not all_done:
            self.store.annotate_study(self.study_id, stopped_reason=self.halted)
            return "stopped"
        return "completed" if all_done else "failed"

    def finish(self, status: str) -> None:
        self.store.set_study_status(self.study_id, status)
        if self.writer is not None:
            self.writer.flush()
        if self.tracker is not None and self.parent is not None:
            self.tracker.end_study(self.parent, status)
        self.close()

    def abort(self, err: BaseException) -> None:
        """Something escaped the run: leave the study stopped with the reason (best effort)."""
        reason = "interrupted" if isinstance(err, KeyboardInterrupt) else mask_text(f"{type(err).__name__}: {err}")
        if not self._running or isinstance(err, (LeaseLost, StateLost)):  # not started, or not ours any more
            self.close()
            return
        try:
            self.store.annotate_study(self.study_id, stopped_reason=reason[:2000])
            self.store.set_study_status(self.study_id, "stopped")
            if self.writer is not None:
                self.writer.flush(raise_errors=False)
            if self.tracker is not None and self.parent is not None:
                self.tracker.end_study(self.parent, "stopped")
        except Exception:  # noqa: BLE001 - the store itself may be what failed; the error is re-raised
            pass
        self.close()

    def close(self) -> None:
        if self.writer is not None:  # what was queued is written (a driver interrupted: its runs marked)
            self.writer.close()
            self.writer = None
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def __enter__(self) -> DriverSession:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.abort(exc)
