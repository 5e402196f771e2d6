"""The executor's seam to whatever runs variants: a small :class:`Backend` interface.

The scheduling loop (:mod:`bnnctl.orchestrator.executor`: DAG, parallelism, retries, recording
results) knows nothing of Ray. A backend starts tasks, hands back the workers' messages and the
tasks' outcomes, and cancels tasks; that is all. Built-in backends:

- ``ray`` (:mod:`.ray_cluster`): Ray tasks on a local or remote Ray cluster (the product's default);
- ``inprocess`` (:mod:`.inprocess`): threads of the driver's own process, for the loop's fast tests
  and for debugging a variant without a cluster.

A run picks one by name: ``--backend NAME`` on the command line, else ``execution.backend`` in the
spec, else ``$BNNCTL_BACKEND``, else ``ray`` (:meth:`RunOptions.resolve
<bnnctl.orchestrator.runcore.RunOptions.resolve>`). Names resolve through a registry
(:func:`backend_class`): classes registered with :func:`register` (from any module, a test module
included), the built-ins (imported when first named), and third-party packages that declare an
entry point in the group ``bnnctl.backends`` (``dask = "mypkg.backend:DaskBackend"`` under
``[project.entry-points."bnnctl.backends"]``). Nothing in the project names a backend otherwise.

Contract (what a Dask, Slurm or queue backend implements):

- ``from_options(address=..., cpus=...)`` builds it from the run's ``--address`` / ``--cpus``
  (ignore what does not apply). ``start`` connects and refuses a per-variant resource request that
  no node can satisfy (:class:`ResourceError`, with the cluster's resources in the message);
  ``preflight`` refuses the same before anything is written, without starting anything; ``warm``,
  once the driver has accepted the run, may start worker processes ahead of the first task.
- ``submit(task)`` starts a :class:`Task` (plain data: its config, the run storage URL, what to
  fetch, cpus/gpus/workers). On the worker, the task body is :func:`execute(task, channel, node)
  <execute>`: the backend only has to carry the :class:`Channel` -- the message channel -- back to
  the driver. ``channel.send`` delivers :class:`Started` (naming the node, when the task really
  starts: a task waiting for resources has sent none), then :class:`EpochMetrics` and
  :class:`Progress`; the backend queues them for ``messages()``, which returns (and forgets) those
  that arrived, in order. ``channel.verdict(key, epoch)`` returns the driver's pruning decision, or
  None while there is none (the worker polls it); ``channel.cancelled()`` says the task was
  cancelled (the worker stops after its epoch). Over a process or network boundary this is a queue
  and a small key-value store (Ray: an actor; Dask: a ``Queue`` and ``Variable``s; Slurm: files on
  the shared run storage).
- ``wait(timeout)`` returns the tasks that ended within ``timeout`` seconds as :class:`Finished`
  (``completed``, ``stopped``, ``failed`` with the reason, or ``lost``: the worker or its node died
  or ran out of memory; the executor retries those). A cancelled task never comes back.
- With ``verdicts=True`` a worker waits after each epoch for ``decide(key, epoch, stop)``.
- ``cancel(key)`` stops a task; ``close()`` releases what ``start`` acquired (the cluster stays).
- Optional: ``node_count`` (more than one needs shared run storage), ``node_cpus()`` (the quiet
  latency measurement holds a whole node), ``waiting_for``/``refused`` (an autoscaler's word on a
  task that has not started), ``describe()``.
- Errors of the backend itself (the cluster went away) raise :class:`BackendError`.

tests/orchestrator/test_extensions.py registers a backend from the test module alone and runs a
study on it.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Mapping

from bnnctl.workers.errors import BnnctlError

from ..runstorage import SYNCED


class BackendError(BnnctlError):
    """The backend cannot go on (cluster unreachable or lost, driver-side actor gone)."""


class ResourceError(BackendError):
    """A variant asks for resources that no node of the cluster has."""


#: how a variant's error starts when its disk (scratch or run storage) is full
NO_SPACE = "no space left on device"

@dataclass(frozen=True)
class Task:
    """One variant to train.

    Attributes:
        config: its training config (plain data).
        storage: the run storage root (a local folder or an fsspec URL); the variant's files go to
            ``storage/key/``.
        fetch: config fields to fill with a dependency's file before training, as
            ``{"init_from": "<stage-1 key>/last.pt", "distill.teacher": "<teacher key>/best.pt"}``
            (locations relative to the storage root).
        cpus, gpus: what each worker holds; workers: data-parallel workers training the variant
            together (see ``bnnctl.workers.train.parallel``).
        kind: ``train``; or ``latency``: time the deployed model of the checkpoint in ``fetch``
            (``checkpoint``), nothing trained or written (a study's quiet measurement at its end,
            with a whole node's CPUs held: see ``bnnctl.orchestrator.latency``).
    """

    key: str
    config: dict
    storage: str
    cpus: float = 1.0
    gpus: float = 0.0
    fetch: tuple[tuple[str, str], ...] = ()
    workers: int = 1
    kind: str = "train"


@dataclass(frozen=True)
class Started:
    key: str
    node: str  # host name
    node_id: str  # the backend's node id (Ray's hex node id)


@dataclass(frozen=True)
class EpochMetrics:
    key: str
    epoch: int
    metrics: dict
    restored: bool = False  # said again on resume from the checkpoint's history, not a new epoch


@dataclass(frozen=True)
class Progress:
    key: str
    done: int
    total: int
    message: str = ""


Message = Started | EpochMetrics | Progress


@dataclass(frozen=True)
class Finished:
    key: str
    status: Literal["completed", "stopped", "failed", "lost"]
    result: dict | None = None
    error: str | None = None
    node: str | None = None


class Backend(ABC):
    """Runs tasks for the executor (see the module docstring for the contract)."""

    name: str = ""
    #: machines the tasks may land on (known after ``start``); more than one needs shared run storage
    node_count: int = 1

    @classmethod
    def from_options(cls, *, address: str | None = None, cpus: float | None = None) -> "Backend":
        """The backend for a run's ``--address`` and ``--cpus`` (default: neither applies)."""
        return cls()

    @abstractmethod
    def start(self, workers: int, cpus: float, gpus: float, ranks: int = 1) -> None:
        """Connect; refuse (ResourceError) a request of ``ranks`` workers of ``cpus``/``gpus`` per
        task that the cluster cannot hold. Nothing runs on the workers yet: the driver may still
        refuse the run (see ``warm``)."""

    def preflight(self, workers: int, cpus: float, gpus: float, ranks: int = 1) -> None:
        """Refuse (ResourceError) what ``start`` would refuse, as far as it can be told before the
        driver writes anything, without starting a cluster (a backend that starts one checks the
        machine's resources instead). Default: nothing to check before ``start``."""

    def warm(self, workers: int, cpus: float, gpus: float) -> None:
        """Optionally start ``workers`` worker processes of ``cpus``/``gpus`` now (imports and all),
        once the driver has accepted the run, while it opens the rest."""

    @abstractmethod
    def submit(self, task: Task, verdicts: bool = False) -> None:
        """Start ``task``; with ``verdicts`` its worker waits for ``decide`` after every epoch."""

    @abstractmethod
    def wait(self, timeout: float) -> list[Finished]:
        """Tasks that ended within ``timeout`` seconds (possibly none)."""

    @abstractmethod
    def messages(self) -> list[Message]:
        """Workers' messages that arrived since the last call, in order."""

    @abstractmethod
    def decide(self, key: str, epoch: int, stop: bool) -> None:
        """The driver's verdict on ``key``'s ``epoch`` (True: stop after it)."""

    @abstractmethod
    def cancel(self, key: str) -> None:
        """Stop a running task; it will not be reported by ``wait``."""

    def waiting_for(self, key: str) -> str:
        """Why a submitted task has not started, when the backend knows more than "busy" (e.g. the
        cluster's autoscaler must add a node for it); "" otherwise."""
        return ""

    def refused(self, key: str) -> str:
        """Why a submitted task that has not started never will (e.g. the cluster's autoscaler
        reports no node type can hold it): the executor fails it with this; "" otherwise."""
        return ""

    def node_cpus(self) -> float:
        """The CPUs of the largest node: a task that asks for them runs alone on its node (the
        quiet latency measurement). Default: one variant's CPUs (a backend that cannot tell)."""
        return 1.0

    def describe(self) -> str:
        """Where tasks run, for messages (e.g. the cluster's address)."""
        return self.name

    def close(self) -> None:
        """Release what ``start`` acquired (actors, threads); the cluster itself stays."""


BACKENDS: dict[str, type[Backend]] = {}
#: The built-in backends, as ``module:Class``: imported when first named (this module imports neither).
BUILTIN = {"ray": "bnnctl.orchestrator.backends.ray_cluster:RayBackend",
           "inprocess": "bnnctl.orchestrator.backends.inprocess:InProcessBackend"}
#: The entry-point group through which installed packages add backends.
ENTRY_POINTS = "bnnctl.backends"


def register(name: str):
    """Class decorator: make a Backend available under ``name`` (from any module)."""

    def deco(cls):
        if BACKENDS.get(name, cls) is not cls:
            raise ValueError(f"backend {name!r} is registered twice")
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return deco


def _entry_points() -> dict[str, object]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINTS)}


def backend_names() -> list[str]:
    """Every backend a run may name: registered, built in, or declared by an installed package."""
    return sorted(set(BACKENDS) | set(BUILTIN) | set(_entry_points()))


def backend_class(name: str) -> type[Backend]:
    """The Backend class named ``name`` (raises UnknownNameError listing the valid names)."""
    if name in BACKENDS:
        return BACKENDS[name]
    if name in BUILTIN:
        import importlib

        module, _, attr = BUILTIN[name].partition(":")
        cls = getattr(importlib.import_module(module), attr)
    else:
        ep = _entry_points().get(name) if isinstance(name, str) else None
        if ep is None:
            from bnnctl.workers.errors import UnknownNameError

            raise UnknownNameError("backend", name, backend_names())
        cls = ep.load()  # type: ignore[attr-defined]
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"backend {name!r} is {cls!r}, not a subclass of bnnctl.orchestrator.backends.Backend")
    BACKENDS.setdefault(name, cls)
    cls.name = name
    return cls


def make_backend(name: str, *, address: str | None = None, cpus: float | None = None) -> Backend:
    """The backend named ``name``, built for the run's ``--address`` and ``--cpus``."""
    return backend_class(name).from_options(address=address, cpus=cpus)


# --------------------------------------------------------------------------- the worker side

@dataclass(frozen=True)
class Channel:
    """How a worker talks to its driver: ``send`` a message; ``verdict(key, epoch)`` (None: no
    pruning) returns the driver's decision or None while there is none yet; ``cancelled()``."""

    send: Callable[[Message], None]
    verdict: Callable[[str, int], bool | None] | None = None
    cancelled: Callable[[], bool] = lambda: False


class ChannelReporter:
    """The workers' Reporter on any backend: metrics and progress go through the channel; with a
    pruning driver, ``should_stop`` waits for its decision on the epoch just reported. ``on_epoch``
    runs after the epoch's checkpoint is written and before the epoch is reported (uploads)."""

    PROGRESS_INTERVAL = 1.0
    DECISION_TIMEOUT = 120.0  # the driver answers within a second; a silent driver means "go on"

    def __init__(self, key: str, checkpoint_dir: Path, channel: Channel,
                 on_epoch: Callable[[], None] = lambda: None) -> None:
        self.key, self._dir, self.channel, self._on_epoch = key, Path(checkpoint_dir), channel, on_epoch
        self._last_progress = 0.0
        self._epoch = 0

    @property
    def checkpoint_dir(self) -> Path:
        return self._dir

    def report(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self._on_epoch()
        self._epoch = epoch
        self.channel.send(EpochMetrics(self.key, epoch, dict(metrics)))

    def restored(self, history) -> None:
        for epoch, metrics in history:
            self.channel.send(EpochMetrics(self.key, epoch, dict(metrics), restored=True))

    def should_stop(self) -> bool:
        if self.channel.cancelled():
            return True
        if self.channel.verdict is None:
            return False
        deadline = time.monotonic() + self.DECISION_TIMEOUT
        while time.monotonic() < deadline:
            verdict = self.channel.verdict(self.key, self._epoch)
            if verdict is not None:
                return verdict
            time.sleep(0.05)
        return False

    def progress(self, done: int, total: int, message: str = "") -> None:
        now = time.monotonic()
        if now - self._last_progress >= self.PROGRESS_INTERVAL or done == total:
            self._last_progress = now
            self.channel.send(Progress(self.key, done, total, message))


def scratch_root() -> Path:
    """This machine's folder of workers' scratch folders (one per variant training here)."""
    return Path(tempfile.gettempdir()) / "bnnctl-scratch"


def scratch_dir(key: str) -> Path:
    """The worker-local folder where a variant trains when its storage is a URL."""
    return scratch_root() / key


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_scratch(grace_s: float = 60.0) -> tuple[int, int]:
    """Remove the scratch folders on this machine that no live worker uses: those of tasks killed
    before they could clean up (a cancelled, pruned or lost variant; the storage has its
    checkpoints). A folder is in use while a process named by one of its ``*.pid`` files lives, and
    for ``grace_s`` after its last change (a task writes its pid first thing). Returns (folders,
    bytes) removed. Run by every task as it starts, and by ``bnnctl cache clean``."""
    root, removed, freed = scratch_root(), 0, 0
    if not root.is_dir():
        return 0, 0
    for folder in root.iterdir():
        try:
            pids = [int(p.read_text() or 0) for p in folder.rglob("*.pid")]
            if any(pid > 0 and _alive(pid) for pid in pids) or time.time() - folder.stat().st_mtime < grace_s:
                continue
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        except (OSError, ValueError):
            continue  # another worker is removing it, or a pid file being written
        shutil.rmtree(folder, ignore_errors=True)
        removed, freed = removed + 1, freed + size
    return removed, freed


class _Sync:
    """Uploads a variant's files from its scratch folder after every checkpoint (remote storage)."""

    def __init__(self, storage, key: str, folder: Path) -> None:
        self.storage, self.key, self.folder = storage, key, folder
        self._seen: dict[str, int] = {}

    def restore(self) -> None:
        """Bring an interrupted run's files back into scratch. Storage is the reference: this node's
        scratch may hold an older attempt's files while another node got further."""
        for name in SYNCED:
            self.storage.download(f"{self.key}/{name}", self.folder / name)
            if (self.folder / name).exists():
                self._seen[name] = (self.folder / name).stat().st_mtime_ns

    def __call__(self) -> None:
        for name in SYNCED:  # best before last: a resume from last.pt finds its best.pt
            f = self.folder / name
            if f.exists() and self._seen.get(name) != f.stat().st_mtime_ns:
                self.storage.upload(f, f"{self.key}/{name}")
                self._seen[name] = f.stat().st_mtime_ns


def _set(config: dict, dotted: str, value: str) -> dict:
    head, _, rest = dotted.partition(".")
    return {**config, head: _set(config[head], rest, value) if rest else value}


def _worker_folder(storage, task: Task, rank: int) -> Path:
    """Where a rank keeps the variant's files: the storage folder itself when it is this machine's
    (only rank 0 writes there; the others read ``last.pt`` on resume), else a scratch folder."""
    local = storage.local_dir(task.key)
    if local is not None:
        return local
    return scratch_dir(task.key) / f"rank-{rank}" if rank else scratch_dir(task.key)


def hide_gpus(task: Task) -> None:
    """In a worker process of its own (a Ray task or rank), a task that holds no GPU sees none: Ray
    2.60 leaves ``CUDA_VISIBLE_DEVICES`` alone for ``num_gpus=0``. Never called by the in-process
    backend, whose tasks are threads of the driver: one thread's change would reach every other."""
    if task.gpus <= 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _place(config: dict, task: Task) -> dict:
    """A task that holds no GPU trains on the CPU with ``device: auto``, inside the scheduler's
    accounting (see :func:`hide_gpus` for what its process sees)."""
    if task.gpus > 0:
        return config
    return {**config, "device": "cpu"} if config.get("device", "auto") == "auto" else config


def execute(task: Task, channel: Channel, node: str, rank: int = 0, node_id: str = "") -> Finished:
    """The task body every backend runs on its worker (on every rank of a data-parallel group):
    fetch what the variant depends on from run storage, train it (resuming from storage), upload
    its files (rank 0). Application errors (bad config, missing data, NaN loss, a full disk, a
    dependency missing from storage) come back as a failed outcome, never as a retry. A failure of
    the storage layer on this node (no credentials, no network, a refused request: any fsspec,
    s3fs or botocore error) comes back as ``lost``, one message naming the node (``node_id``: the
    backend's id for it) and the masked URL: the executor retries the variant, elsewhere when the
    backend can. A remote storage's scratch folder is deleted whatever the end (the storage holds
    the checkpoints)."""
    from ..runstorage import RunStorage, StorageError

    storage = RunStorage(task.storage)
    if task.kind == "latency":
        try:
            return _measure(task, node, storage)
        except StorageError as err:
            return Finished(task.key, "lost" if err.machine else "failed", error=f"{err} (node {node})", node=node)
    folder = _worker_folder(storage, task, rank)
    if storage.remote:
        sweep_scratch()  # what killed tasks left on this machine
    try:
        return _execute(task, channel, node, rank, storage, folder)
    except StorageError as err:
        where = f"{node} ({node_id[:8]})" if node_id else node
        if err.machine:
            return Finished(task.key, "lost", error=f"storage failure on node {where}: {err}", node=node)
        return Finished(task.key, "failed", error=f"{err} (node {node})", node=node)
    finally:
        if storage.remote:
            shutil.rmtree(folder, ignore_errors=True)


def _measure(task: Task, node: str, storage) -> Finished:
    """A ``latency`` task: the deployed model of the fetched checkpoint, timed on this worker (the
    caller holds every CPU of its node, so no other variant runs beside it)."""
    from bnnctl.workers.latency import measure_checkpoint

    rel = dict(task.fetch)["checkpoint"]
    with tempfile.TemporaryDirectory(prefix="bnnctl-latency-") as tmp:
        path = Path(tmp) / "model.pt" if storage.remote else Path(storage.location(rel))
        if storage.remote and not storage.download(rel, path):
            return Finished(task.key, "failed", error=f"{rel} is missing from the run storage", node=node)
        try:
            latency = measure_checkpoint(path)
        except (BnnctlError, ArithmeticError, RuntimeError) as err:
            return Finished(task.key, "failed", error=f"{type(err).__name__}: {err}"[:500], node=node)
    return Finished(task.key, "completed", {"latency": {**latency, "quiet": True, "node": node}}, node=node)


def _execute(task: Task, channel: Channel, node: str, rank: int, storage, folder: Path) -> Finished:
    from bnnctl.workers.config import from_dict
    from bnnctl.workers.errors import DataError
    from bnnctl.workers.train import TrainConfig, run_variant

    from ..runstorage import StorageError, relative
    from ..urls import mask_text as mask

    lead = rank == 0
    started = time.time()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # the worker's pid beside the checkpoints: operators (and the fault-injection tests) can find it
        (folder / ("worker.pid" if lead else f"worker-rank{rank}.pid")).write_text(str(os.getpid()))
        config = _place(task.config, task)
        for field, rel in task.fetch:  # a stage-1 or teacher checkpoint
            path = folder / "deps" / rel.replace("/", "-") if storage.remote else Path(storage.location(rel))
            if storage.remote and not storage.download(rel, path):
                raise StorageError(f"{mask(storage.location(rel))} is missing (needed for {field})", machine=False)
            config = _set(config, field, str(path))
        sync = _Sync(storage, task.key, folder) if storage.remote else None
        if sync is not None:
            sync.restore()
        train_config = from_dict(TrainConfig, config)
        if train_config.threads is None:  # the task's CPUs, never the previous task's count on a reused worker
            import torch

            torch.set_num_threads(max(1, int(task.cpus)))
        upload = sync if (sync is not None and lead) else (lambda: None)
        result = run_variant(train_config, ChannelReporter(task.key, folder, channel, upload))
        if sync is not None and lead:
            sync()
    except DataError as err:
        return Finished(task.key, "failed", error=f"{err} (on node {node})", node=node)
    except BnnctlError as err:
        return Finished(task.key, "failed", error=str(err), node=node)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            where = err.filename or folder
            return Finished(task.key, "failed", error=f"{NO_SPACE} at {where} (node {node})", node=node)
        raise
    out = asdict(result)
    # when the worker held the variant's resources (wall clock of its node): no two variants of
    # one CPU ever overlap on a one-CPU node
    out["timings"].update(started_at=started, ended_at=time.time())
    for name in ("last_checkpoint", "best_checkpoint", "predictions_image"):
        if out.get(name):  # locations relative to the storage root, never a path of this node
            out[name] = f"{task.key}/{Path(out[name]).name}" if storage.remote else relative(storage, out[name])
    return Finished(task.key, "stopped" if result.status == "stopped" else "completed", out, node=node)
