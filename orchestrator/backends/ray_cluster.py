"""The Ray backend: variants as Ray tasks on a local or remote Ray cluster.

Connecting (:func:`connect`):
- no address and no ``$RAY_ADDRESS``: a **private local cluster** (Ray's ``address="local"``), sized
  for small machines, whatever ``ray start`` left on the machine (a live cluster of someone else, or
  the stale record of a dead one, which a plain ``ray.init()`` would try to join);
- ``--address auto``: the machine's running cluster (the one ``ray start`` recorded);
- ``--address HOST:PORT`` (or ``ray://...``): that cluster. It is probed first, so an unreachable
  address fails in seconds with one message instead of Ray's two-minute retry loop. Token
  authentication works as Ray documents it (``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN`` or the
  token file ``RAY_AUTH_TOKEN_PATH`` / ``~/.ray/auth_token``); a refused token is one message.

Driver-side actors (the message queue, the pruning verdicts) are pinned to the driver's own node,
so losing a worker node never takes them along. Lost workers, dead nodes and Ray's out-of-memory
kills come back as ``lost`` (the executor retries them); a bug in the task as ``failed`` with Ray's
traceback.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from . import (
    Backend,
    BackendError,
    Channel,
    Finished,
    Message,
    ResourceError,
    Started,
    Task,
    execute,
    hide_gpus,
    register,
)

PROBE_TIMEOUT = 5.0
LOCAL_OBJECT_STORE = 128 * 1024 * 1024


class ClusterError(BackendError):
    """The Ray cluster cannot be reached or refused the connection."""


def _target(address: str) -> tuple[str, int] | None:
    """(host, port) that ``address`` connects to, or None for a local cluster / unknown form."""
    if address == "local":
        return None
    if address == "auto":
        try:  # the address `ray start` recorded on this machine (Ray's own lookup)
            from ray._private.services import canonicalize_bootstrap_address

            address = canonicalize_bootstrap_address("auto") or ""
        except Exception:  # noqa: BLE001 - no record: ray.init says so clearly below
            return None
    rest = address.split("://", 1)[-1]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _probe(address: str) -> None:
    target = _target(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=PROBE_TIMEOUT):
            pass
    except OSError as err:
        raise ClusterError(f"cannot reach the Ray cluster at {address} ({target[0]}:{target[1]}): "
                           f"{err.strerror or err}. Check that its head node is running and the address is right "
                           "(--address or $RAY_ADDRESS; leave both unset for a private local cluster)") from None


def connect(address: str | None = None, cpus: float | None = None) -> str:
    """Join the cluster at ``address`` (default ``$RAY_ADDRESS``), or start a private local one.
    Returns a description of where variants run. Raises ClusterError with one clear message."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return address or "the running Ray session"
    if address and address.startswith(("http://", "https://")):
        raise ClusterError(f"{address} is the address of a Ray dashboard / job server; `study run --address` "
                           "joins a cluster by its GCS address (HOST:6379, or `auto` on one of its nodes); "
                           "use `study submit --address http://...` to run the study as a Ray job")
    _quiet_ray_logs()
    try:
        if address:
            _probe(address)
            with _captured_stderr() as captured:
                try:
                    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
                except Exception as err:  # noqa: BLE001 - reworded below, with what Ray's C++ core printed
                    raise ClusterError(_connect_message(address, err, captured())) from None
            return f"the Ray cluster at {address}"
        ray.init(address="local", num_cpus=int(cpus) if cpus else os.cpu_count(), include_dashboard=False,
                 log_to_driver=False, object_store_memory=LOCAL_OBJECT_STORE, logging_level=logging.WARNING)
        return "a private local Ray cluster"
    except ClusterError:
        raise
    except Exception as err:  # noqa: BLE001 - Ray raises many kinds here; each becomes one message
        raise ClusterError(_connect_message(address, err)) from None


@contextlib.contextmanager
def _captured_stderr():
    """Send file descriptor 2 to a temporary file while joining a cluster: Ray's C++ core logs its
    retries there (and the reason a cluster refused us, e.g. "Unauthenticated"). Yields a function
    that returns what was written."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lambda: (tmp.flush(), tmp.seek(0), tmp.read().decode(errors="replace"))[-1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _connect_message(address: str | None, err: Exception, logged: str = "") -> str:
    where = f"the Ray cluster at {address}" if address else "a private local Ray cluster"
    target = _target(address) if address == "auto" else None
    if target is not None:  # say which cluster "auto" meant
        where += f" ({target[0]}:{target[1]})"
    name = type(err).__name__
    first = str(err).strip().split("\n")[0]
    if (name == "AuthenticationError" or "unauthenticated" in logged.lower() or "authentication" in first.lower()
            or "token" in first.lower()):
        return (f"{where} refused the connection: token authentication failed ({first.split('. ')[0]}). "
                "Give this process the cluster's token as Ray documents it: RAY_AUTH_MODE=token and "
                "RAY_AUTH_TOKEN=<token>, or RAY_AUTH_TOKEN_PATH=<the token file the head wrote> "
                "(default ~/.ray/auth_token)")
    if address == "auto" and name == "ConnectionError":
        return ("--address auto: no running Ray cluster was found on this machine (start one with "
                "`ray start --head`, or leave --address unset for a private local cluster)")
    return f"cannot connect to {where}: {name}: {first}"


def _quiet_ray_logs() -> None:
    """Ray's start-up chatter (token-auth notices, 'Started a local Ray instance') stays out of the
    user's terminal; errors still reach it."""
    for name in ("ray", "ray._private", "ray._private.authentication.authentication_token_setup",
                 "ray._private.worker"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cluster_nodes() -> list[dict]:
    """Alive nodes with their resources: [{"host", "node_id", "cpus", "gpus"}]."""
    import ray

    out = []
    for n in ray.nodes():
        if n.get("Alive"):
            r = n.get("Resources", {})
            out.append({"host": n.get("NodeManagerHostname") or n.get("NodeManagerAddress", "?"),
                        "address": n.get("NodeManagerAddress", "?"), "node_id": n.get("NodeID", ""),
                        "cpus": float(r.get("CPU", 0)), "gpus": float(r.get("GPU", 0))})
    return out


#: a node type the autoscaler may add whose resources the driver cannot read (Ray's own autoscaler,
#: v1 or v2, keeps its node types in the head's cluster YAML; only KubeRay-style setups publish them)
UNKNOWN_TYPE = {"name": "nodes of the types in its cluster config", "cpus": 1e6, "gpus": 1e6, "count": 10**6,
                "known": False}


def scalable_node_types() -> list[dict]:
    """The node types the cluster's autoscaler may start: [{"name", "cpus", "gpus", "count"}] with
    ``count`` its most nodes of that type. Read from the cluster config published to Ray's GCS
    (KubeRay, Ray Data's view of the cluster); when none is published but an autoscaler reports to
    the GCS (Ray's autoscaler v2 or v1, e.g. ``ray up``), its node types are unknown here: one
    :data:`UNKNOWN_TYPE` (the autoscaler decides; see :func:`autoscaler_verdict`). [] on a cluster
    without an autoscaler."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older cluster or no GCS record: no published config
        config = None
    out = []
    for group in config.node_group_configs if config is not None else []:
        if group.max_count == 0:
            continue
        out.append({"name": group.name, "cpus": float(group.resources.get("CPU", 0)),
                    "gpus": float(group.resources.get("GPU", 0)), "count": 10**6 if group.max_count < 0 else group.max_count})
    if not out and autoscaler_verdict() is not None:
        out.append(dict(UNKNOWN_TYPE))
    return out


def _status_reply():
    """The GCS's autoscaling state (Ray's autoscaler v2 reports there), or None."""
    import ray
    from ray._raylet import GcsClient
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    reply = GetClusterStatusReply()
    reply.ParseFromString(GcsClient(address=ray.get_runtime_context().gcs_address).get_cluster_status(timeout_s=5))
    return reply


def autoscaler_verdict() -> dict | None:
    """What the cluster's autoscaler last said, or None when the cluster has none that can add
    nodes: {"pending": nodes being added, "infeasible": [{"CPU": 1, "GPU": 1}, ...] requests it says
    no node type of its config can hold (or none more of: a type at its most nodes)}.

    Every Ray cluster runs an autoscaler process; without a cluster config it is a read-only one
    that names each node "node_<id>" (v1) or leaves node types unnamed (v2), and adds nothing. One
    started with a config (``ray up``, KubeRay, ``ray start --autoscaling-config``) names the types
    of its nodes, the head's included. Autoscaler v2 reports through the GCS's autoscaling state;
    v1 writes its status to the GCS's key-value store (pending nodes only)."""
    try:
        reply = _status_reply()
        state = reply.autoscaling_state
        if state.autoscaler_state_version > 0:
            if not any(n.ray_node_type_name for n in reply.cluster_resource_state.node_states):
                return None  # read-only: a cluster without an autoscaling config
            infeasible = [dict(r.resources_bundle) for r in state.infeasible_resource_requests]
            infeasible += [dict(r.resources_bundle) for g in state.infeasible_gang_resource_requests for r in g.requests]
            pending = sum(r.count for r in state.pending_instance_requests) + len(state.pending_instances)
            return {"pending": pending, "infeasible": infeasible}
    except Exception:  # noqa: BLE001 - no autoscaling state (an older GCS): try v1's record
        pass
    try:
        import json

        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get("__autoscaling_status")
        report = (json.loads(raw).get("autoscaler_report") or {}) if raw else {}
        types = report.get("node_type_mapping") or {}
        if all(name == f"node_{node}" for node, name in types.items()):
            return None  # read-only (or no record)
        pending = len(report.get("pending_nodes") or []) + sum((report.get("pending_launches") or {}).values())
        return {"pending": pending, "infeasible": []}
    except Exception:  # noqa: BLE001 - no readable record: no autoscaler
        return None


def describe_nodes(nodes: list[dict]) -> str:
    if not nodes:
        return "no alive node"
    return "; ".join(f"{n['host']} ({n['address']}, node {n['node_id'][:8]}): {n['cpus']:g} CPUs, {n['gpus']:g} GPUs"
                     for n in nodes)


def _fits(n: dict, cpus: float, gpus: float) -> int:
    """How many workers of ``cpus``/``gpus`` node ``n`` holds at once."""
    by_cpu = int(n["cpus"] // cpus + 1e-9) if cpus > 0 else 10**6
    by_gpu = int(n["gpus"] // gpus + 1e-9) if gpus > 0 else 10**6
    return min(by_cpu, by_gpu)


def check_resources(cpus: float, gpus: float, nodes: list[dict], where: str, ranks: int = 1,
                    scalable: list[dict] = ()) -> bool:
    """Refuse a request the cluster can never hold (Ray would keep it pending forever): a worker of
    ``cpus``/``gpus`` that no node has, or ``ranks`` such workers at once (a data-parallel group is
    placed as a whole). ``scalable``: node types an autoscaler may add (see
    :func:`scalable_node_types`), counted at their most nodes. Returns True when the request fits
    only once the autoscaler has added nodes."""
    now = sum(_fits(n, cpus, gpus) for n in nodes)
    later = sum(_fits(t, cpus, gpus) * t["count"] for t in scalable)
    if now >= ranks:
        return False
    if now + later >= ranks:
        return True
    group = f"{ranks} data-parallel workers of " if ranks > 1 else ""
    scaling = ("; node types its autoscaler may add: " + ", ".join(
        f"{t['name']} ({t['cpus']:g} CPUs, {t['gpus']:g} GPUs, up to {t['count']})" for t in scalable)) if scalable else ""
    raise ResourceError(f"no node of {where} can run a variant that needs {group}{cpus:g} CPUs and {gpus:g} GPUs "
                        f"(resources: workers/cpus/gpus in the spec); the cluster's nodes: {describe_nodes(nodes)}"
                        f"{scaling}")


class Decisions:
    """A Ray actor holding the driver's stop/continue verdict per (variant, epoch)."""

    def __init__(self) -> None:
        self._verdicts: dict[tuple[str, int], bool] = {}

    def put(self, key: str, epoch: int, stop: bool) -> None:
        self._verdicts[(key, epoch)] = stop

    def get(self, key: str, epoch: int) -> bool | None:
        return self._verdicts.get((key, epoch))


class _Sender:
    """Sends messages to the driver without waiting for them: a task blocked in ``ray.get`` lends
    its CPUs out (Ray starts another task on them), so a variant would not hold what it asked for.
    ``flush`` waits (polling futures, never blocked in Ray) until every message sent has reached the
    driver's queue: a task flushes before it returns, or the driver could see it finished before
    its last words arrived (the epochs a resumed run says again, a group's outcome) and drop them."""

    FLUSH_TIMEOUT = 60.0

    def __init__(self, queue: Any) -> None:
        self.actor, self._sent = queue.actor, []

    def __call__(self, message: Message) -> None:
        self._sent = [f for f in self._sent if not f.done()]
        self._sent.append(self.actor.put_nowait.remote(message).future())

    def flush(self) -> None:
        deadline = time.monotonic() + self.FLUSH_TIMEOUT
        while any(not f.done() for f in self._sent) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._sent = []


def _asker(decisions: Any):
    """The driver's verdict on (key, epoch), or None while it has none, read without ``ray.get``
    (a future resolved by Ray's callback; the task never counts as blocked)."""

    def verdict(key: str, epoch: int) -> bool | None:
        future = decisions.get.remote(key, epoch).future()
        while not future.done():
            time.sleep(0.01)
        return future.result()

    return verdict


def _deaf_to_ctrl_c() -> None:
    """A worker ignores SIGINT: a Ctrl-C in the driver's terminal reaches every process of its group,
    the private cluster's workers included; the driver stops them itself (one line, resumable), a
    worker killed by the signal would only add Ray's 'worker died' errors. (Ray's own processes
    block it the same way; a task body runs on its worker's main thread; a Ray Train rank does not,
    and its actor process is not in the terminal's group.)"""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def ray_task(task: Task, queue: Any, decisions: Any = None) -> Finished:
    """Body of the Ray task: announce the node, then train (see backends.execute)."""
    import ray

    _deaf_to_ctrl_c()

    node, node_id = socket.gethostname(), ray.get_runtime_context().get_node_id()
    send = _Sender(queue)
    send(Started(task.key, node, node_id))
    hide_gpus(task)
    try:
        return execute(task, Channel(send, _asker(decisions) if decisions is not None else None), node, node_id=node_id)
    finally:
        send.flush()


@dataclass(frozen=True)
class GroupOutcome:
    """Rank 0's outcome of a data-parallel variant, sent through the message queue (Ray Train's
    ``fit`` returns no value of the training function)."""

    key: str
    finished: Finished


class GroupFailure(Exception):
    """Raised by a rank whose variant failed (bad config, storage...), so Ray Train stops the whole
    group at once instead of leaving the other ranks waiting in a collective."""

    def __init__(self, finished: Finished) -> None:
        super().__init__(finished.error or finished.status)
        self.finished = finished

    def __reduce__(self):
        return (GroupFailure, (self.finished,))


def _rank_loop(config: dict) -> None:
    """One rank of a data-parallel variant, inside Ray Train's worker (process group set up)."""
    import ray
    import torch.distributed as dist

    task, queue, decisions = config["task"], config["queue"], config["decisions"]
    rank = dist.get_rank()
    node, node_id = socket.gethostname(), ray.get_runtime_context().get_node_id()
    placed: list = [None] * dist.get_world_size()
    dist.all_gather_object(placed, (node, node_id))
    send = _Sender(queue) if rank == 0 else _Silent()
    where, ids = group_nodes(placed), GROUP + ",".join(dict.fromkeys(p[1][:8] for p in placed))
    send(Started(task.key, where, ids[:100]))
    asker = _asker(decisions) if decisions is not None and rank == 0 else None
    hide_gpus(task)
    try:
        out = execute(task, Channel(send, asker), node, rank, node_id=node_id)
        if out.status not in ("completed", "stopped"):
            raise GroupFailure(out)
        send(GroupOutcome(task.key, dataclasses.replace(out, node=where)))
    finally:
        send.flush()  # the launcher returns after every rank: rank 0's outcome is in the queue by then


class _Silent:
    """The sender of ranks other than 0: rank 0 speaks for the group."""

    def __call__(self, message: Message) -> None:
        pass

    def flush(self) -> None:
        pass


#: how a data-parallel group's ``node_id`` starts (then its nodes' short ids); its ``node`` names them
GROUP = "group:"


def group_nodes(placed: list[tuple[str, str]]) -> str:
    """Where a group's ranks run, from each rank's (host, node id), in rank order:
    "a (node 1a2b3c4d, ranks 0-1), a (node 5e6f7a8b, rank 2)" (several nodes of one host are told
    apart by their ids), cut to the store's 200 characters."""
    spans: list[list] = []
    for rank, (host, node_id) in enumerate(placed):
        if spans and spans[-1][0] == (host, node_id):
            spans[-1][2] = rank
        else:
            spans.append([(host, node_id), rank, rank])
    text = ", ".join(f"{h} (node {i[:8]}, rank {a})" if a == b else f"{h} (node {i[:8]}, ranks {a}-{b})"
                     for (h, i), a, b in spans)
    return text if len(text) <= 200 else text[:197] + "..."


def group_task(task: Task, queue: Any, decisions: Any = None) -> Finished:
    """A data-parallel variant: Ray Train's ``TorchTrainer`` runs ``task.workers`` ranks (gloo on
    CPUs, NCCL on GPUs), each holding the variant's CPUs/GPUs; this launcher holds none. No Ray
    Train retries: a lost rank fails the group, and the executor runs it again from the last
    checkpoint (all ranks restart)."""
    import shutil as _shutil
    import uuid

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    per_worker = {"CPU": task.cpus, **({"GPU": task.gpus} if task.gpus else {})}
    folder = tempfile.mkdtemp(prefix=f"bnnctl-train-{task.key}-")  # Ray Train's own bookkeeping, not ours
    trainer = TorchTrainer(
        _rank_loop, train_loop_config={"task": task, "queue": queue, "decisions": decisions},
        torch_config=TorchConfig(backend="nccl" if task.gpus else "gloo"),
        scaling_config=ScalingConfig(num_workers=task.workers, use_gpu=task.gpus > 0, resources_per_worker=per_worker),
        run_config=RunConfig(name=f"bnnctl-{task.key}-{uuid.uuid4().hex[:8]}", storage_path=folder,
                             failure_config=FailureConfig(max_failures=0)))
    try:
        trainer.fit()
    except Exception as err:  # noqa: BLE001 - Ray Train's errors become the executor's outcomes
        return _group_error(task.key, err)
    finally:
        _shutil.rmtree(folder, ignore_errors=True)
    return Finished(task.key, "completed", None)  # rank 0's outcome is in the queue (see RayBackend)


#: what Ray and Ray Train say when a rank's process or node went away (a machine's failure)
DEATH = ("ActorDied", "HealthCheck", "NodeDied", "Preemption", "OutOfMemory", "WorkerCrashed", "ActorUnavailable",
         "ControllerError", "died")


def _line(text: str) -> str:
    """The line of an error text that says what happened: one that names a death, else the first
    that is not a header, a traceback frame or a marker."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    plain = [ln for ln in lines if not ln.startswith(("Training failed", "[Rank", "Traceback", "File ", "^", "~"))]
    deaths = [ln for ln in plain if any(word in ln for word in DEATH)]
    return (deaths or plain or [text.strip()])[0][:300]


def _group_error(key: str, err: Exception) -> Finished:
    """A failed ``fit``: a rank's own failure (GroupFailure: its variant failed, or its storage was
    lost) as that rank said it; a rank or node that died as ``lost`` (the group restarts from the
    checkpoint), naming the rank; anything else as a crash with Ray's text."""
    failures = getattr(err, "worker_failures", None) or {}
    for rank in sorted(failures):
        cause = failures[rank]
        while cause is not None and not isinstance(cause, GroupFailure):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if isinstance(cause, GroupFailure):
            return cause.finished
    for rank in sorted(failures):
        said = f"{type(failures[rank]).__name__}: {failures[rank]}"
        if any(word in said for word in DEATH):
            return Finished(key, "lost", error=f"rank {rank} of the data-parallel group was lost: {_line(said)}")
    text = f"{type(err).__name__}: {err}".strip()
    if any(word in text for word in DEATH):
        return Finished(key, "lost", error=f"a rank of the data-parallel group was lost: {_line(text)}")
    return Finished(key, "failed", error=f"crashed: {text}")


def _warm_task() -> int:
    _deaf_to_ctrl_c()
    import bnnctl.workers.train  # noqa: F401  (torch and the trainer, imported once per worker process)

    return os.getpid()


@register("ray")
class RayBackend(Backend):
    """Ray tasks with the variant's resources (``num_cpus``, fractional ``num_gpus``), no Ray retries
    (the executor retries lost workers itself, resuming from the checkpoint)."""

    @classmethod
    def from_options(cls, *, address: str | None = None, cpus: float | None = None) -> "RayBackend":
        return cls(address=address, cpus=cpus)

    def __init__(self, address: str | None = None, cpus: float | None = None) -> None:
        self.address, self.cpus = address, cpus
        self.where = "a Ray cluster"
        self._queue = self._decisions = self._remote = None
        self._here = None
        self._running: dict[Any, str] = {}  # ObjectRef -> key
        self._outcomes: dict[str, Finished] = {}  # data-parallel variants: rank 0's outcome
        self._groups: set[str] = set()
        self._pending: list[Message] = []  # read while looking for a group's outcome
        self._warm: list = []
        self._node_of: dict[str, str] = {}  # key -> the node id(s) its latest attempt started on
        self._avoid: dict[str, set[str]] = {}  # key -> nodes it was lost on (its retry goes elsewhere)
        self._tasks: dict[str, Task] = {}
        self._types: list[dict] = []  # node types the cluster's autoscaler may add
        self._verdict_at: tuple[float, dict] = (float("-inf"), {})
        self._infeasible: dict[str, float] = {}  # key -> since when the autoscaler calls it infeasible
        self._joined = False  # connected, and the request checked against the nodes

    def preflight(self, workers: int, cpus: float, gpus: float, ranks: int = 1) -> None:
        """A cluster to join (``--address``, ``$RAY_ADDRESS``, or Ray already running in this
        process): joined now and its nodes read (no worker starts). The private local cluster is not
        started: its one node is this machine, with the CPUs it would get and the GPUs Ray finds."""
        import ray

        if ray.is_initialized() or self.address or os.environ.get("RAY_ADDRESS"):
            self._join(cpus, gpus, ranks)
            return
        from ray._private.accelerators import get_accelerator_manager_for_resource

        manager = get_accelerator_manager_for_resource("GPU")
        found, visible = manager.get_current_node_num_accelerators(), manager.get_current_process_visible_accelerator_ids()
        machine = {"host": socket.gethostname(), "address": "this machine", "node_id": "local",
                   "cpus": float(int(self.cpus) if self.cpus else (os.cpu_count() or 1)),
                   "gpus": float(min(found, len(visible)) if visible is not None else found)}
        check_resources(cpus, gpus, [machine], "a private local Ray cluster (--cpus, or every CPU of this "
                        "machine)", ranks)

    def _join(self, cpus: float, gpus: float, ranks: int) -> None:
        """Connect (once) and refuse a request no node (or node type the autoscaler may add) holds."""
        if self._joined:
            return
        self.where = connect(self.address, self.cpus)
        nodes = cluster_nodes()
        self.node_count = len({n["node_id"] for n in nodes})
        self._types = scalable_node_types()
        check_resources(cpus, gpus, nodes, self.where, ranks, self._types)
        self._joined = True

    def start(self, workers: int, cpus: float, gpus: float, ranks: int = 1) -> None:
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._join(cpus, gpus, ranks)
        # the driver's actors live on the driver's node: a lost worker node never takes them along
        self._here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": self._here})
        self._remote = ray.remote(ray_task)
        self._group = ray.remote(group_task)

    def warm(self, workers: int, cpus: float, gpus: float) -> None:
        import ray

        # workers import torch and the trainer now, while the driver opens MLflow; Ray reuses them
        warm = ray.remote(_warm_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
        self._warm = [warm.remote() for _ in range(workers)]

    def _decision_actor(self):
        import ray

        if self._decisions is None:
            self._decisions = ray.remote(Decisions).options(num_cpus=0, scheduling_strategy=self._here).remote()
        return self._decisions

    def submit(self, task: Task, verdicts: bool = False) -> None:
        decisions = self._decision_actor() if verdicts else None
        self._tasks[task.key] = task
        if task.workers > 1:  # the launcher holds nothing; Ray Train's ranks hold the resources
            ref = self._group.options(num_cpus=0, max_retries=0).remote(task, self._queue, decisions)
            self._groups.add(task.key)
        else:
            opts = {"num_cpus": task.cpus, "num_gpus": task.gpus, "max_retries": 0, **self._elsewhere(task)}
            ref = self._remote.options(**opts).remote(task, self._queue, decisions)
        self._running[ref] = task.key

    def node_cpus(self) -> float:
        """The CPUs of the largest alive node (a task asking for them has that node to itself)."""
        return max((n["cpus"] for n in cluster_nodes()), default=1.0) or 1.0

    @property
    def may_grow(self) -> bool:
        """Whether the cluster has an autoscaler that may add nodes."""
        return bool(self._types)

    def _beyond_alive(self, key: str) -> Task | None:
        """The task of ``key`` when no alive node could ever hold it but the autoscaler may add one."""
        task = self._tasks.get(key)
        if task is None or not self._types:
            return None
        try:
            if not check_resources(task.cpus, task.gpus, self._verdict()["nodes"], self.where, task.workers, self._types):
                return None  # it fits the nodes alive: they are busy
        except ResourceError:
            return None
        return task

    def _verdict(self) -> dict:
        """The autoscaler's last word and the nodes alive, asked of the GCS at most every 2 s."""
        if time.monotonic() - self._verdict_at[0] >= 2.0:
            said = autoscaler_verdict() or {"pending": 0, "infeasible": []}
            self._verdict_at = (time.monotonic(), {**said, "nodes": cluster_nodes()})
        return self._verdict_at[1]

    def waiting_for(self, key: str) -> str:
        """Why ``key`` waits when no alive node can hold it but the autoscaler can add one."""
        task = self._beyond_alive(key)
        if task is None:
            return ""
        pending = self._verdict()["pending"]
        more = f", {pending} node{'s' if pending != 1 else ''} pending" if pending else ""
        if any(t.get("known", True) is False for t in self._types):
            return f"no alive node can hold it; the cluster's autoscaler may add one{more}"
        fitting = ", ".join(f"{t['name']} ({t['cpus']:g} CPUs, {t['gpus']:g} GPUs)" for t in self._types
                            if _fits(t, task.cpus, task.gpus))
        return f"no alive node can hold it; the cluster's autoscaler can add {fitting}{more}"

    #: how long the autoscaler must call a request infeasible, with no node pending, before the
    #: variant fails: it also calls a request infeasible while its node types are at their most
    #: nodes (a second request of a type limited to one node), which a launch or a finished
    #: variant resolves
    INFEASIBLE_GRACE_S = 10.0

    def refused(self, key: str) -> str:
        """A variant the cluster's autoscaler reports it cannot place (no node type of its config
        holds the request, none being added) fails with that, instead of waiting for ever."""
        task = self._beyond_alive(key)
        verdict = self._verdict() if task is not None else {}
        asked = {"CPU": float(task.cpus), "GPU": float(task.gpus)} if task is not None else {}
        if not task or verdict["pending"] or not any(
                {"CPU": float(b.get("CPU", 0)), "GPU": float(b.get("GPU", 0))} == asked for b in verdict["infeasible"]):
            self._infeasible.pop(key, None)
            return ""
        if time.monotonic() - self._infeasible.setdefault(key, time.monotonic()) < self.INFEASIBLE_GRACE_S:
            return ""
        group = f"{task.workers} data-parallel workers of " if task.workers > 1 else ""
        return (f"the autoscaler of {self.where} reports that none of its node types can hold "
                f"{group}{task.cpus:g} CPUs and {task.gpus:g} GPUs (resources: workers/cpus/gpus in the spec; "
                f"the node types are in the cluster's config); nodes alive: {describe_nodes(verdict['nodes'])}")

    def _elsewhere(self, task: Task) -> dict:
        """A retry of a variant lost on some nodes (dead, or their storage failed) prefers an alive
        node it was not lost on that can hold it (Ray's soft node affinity: when that node cannot,
        the variant runs wherever Ray places it). A data-parallel group is placed by Ray Train."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        avoid = self._avoid.get(task.key)
        if not avoid:
            return {}
        others = [n for n in cluster_nodes() if n["node_id"] not in avoid and _fits(n, task.cpus, task.gpus)]
        if not others:
            return {}
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(others[0]["node_id"], soft=True)}

    def wait(self, timeout: float) -> list[Finished]:
        import ray

        if not self._running:
            return []
        done, _ = ray.wait(list(self._running), num_returns=1, timeout=timeout)
        if done:
            more, _ = ray.wait([r for r in self._running if r not in done], num_returns=len(self._running) - len(done),
                               timeout=0)
            done += more
        out = [self._group_outcome(self._outcome(ref, self._running.pop(ref))) for ref in done]
        if any(f.status == "lost" for f in out):
            self._pending.extend(self._read_queue())  # its Started message says where it was lost
            for f in out:
                if f.status == "lost" and self._node_of.get(f.key):
                    self._avoid.setdefault(f.key, set()).add(self._node_of[f.key])
        return out

    def _group_outcome(self, out: Finished) -> Finished:
        """A data-parallel variant's outcome: rank 0's (sent through the queue before its launcher
        returned), or the launcher's when the group failed."""
        if out.key not in self._groups:
            return out
        self._pending.extend(self._read_queue())
        self._groups.discard(out.key)
        if out.status == "completed" and out.result is None:
            return self._outcomes.pop(out.key, None) or Finished(out.key, "lost", error="the data-parallel group "
                                                                 "ended without rank 0's outcome")
        self._outcomes.pop(out.key, None)
        return out

    @staticmethod
    def _outcome(ref, key: str) -> Finished:
        import ray
        from ray import exceptions as rx

        lost = (rx.WorkerCrashedError, rx.NodeDiedError, rx.ObjectLostError, rx.OwnerDiedError,
                rx.TaskUnschedulableError, rx.OutOfMemoryError, rx.LocalRayletDiedError, rx.RaySystemError)
        try:
            return ray.get(ref)
        except lost as err:
            return Finished(key, "lost", error=f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}")
        except rx.RayTaskError as err:  # a bug, not a user error: keep the traceback
            return Finished(key, "failed", error=f"crashed: {err}")

    def _read_queue(self) -> list[Message]:
        from ray import exceptions as rx

        out: list[Message] = []
        try:
            # two round trips to the queue's actor per read, however many messages wait (one per
            # message cost most of a driver's CPU with short variants); later ones: the next read
            size = self._queue.qsize()
            for msg in self._queue.get_nowait_batch(size) if size else ():
                if isinstance(msg, GroupOutcome):
                    self._outcomes[msg.key] = msg.finished
                else:
                    if isinstance(msg, Started) and not msg.node_id.startswith(GROUP):
                        self._node_of[msg.key] = msg.node_id
                    out.append(msg)
        except (rx.RayActorError, rx.ActorUnavailableError) as err:
            raise BackendError(f"the driver's message queue on {self.where} was lost ({type(err).__name__}); "
                               "the study stops, run it again to continue") from None
        return out

    def messages(self) -> list[Message]:
        out, self._pending = self._pending + self._read_queue(), []
        return out

    def decide(self, key: str, epoch: int, stop: bool) -> None:
        self._decision_actor().put.remote(key, epoch, stop)

    def cancel(self, key: str) -> None:
        import ray

        for ref, k in list(self._running.items()):
            if k == key:
                ray.cancel(ref, force=True)
                del self._running[ref]

    def describe(self) -> str:
        return self.where

    def close(self) -> None:
        import ray

        if self._queue is None or not ray.is_initialized():  # never started: nothing to release
            return
        try:
            ray.get(self._warm, timeout=5)
        except Exception:  # noqa: BLE001 - warm-up only: a failure here changes nothing
            pass
        for actor in (self._decisions, getattr(self._queue, "actor", None)):
            if actor is not None:
                try:
                    ray.kill(actor)
                except Exception:  # noqa: BLE001 - already gone with its node
                    pass
        self._queue = self._decisions = None
