"""The in-process backend: every task is a thread of the driver's own process.

For the scheduling loop's fast tests (no cluster starts) and for stepping through a variant in a
debugger. It honours the same contract as the Ray backend: a CPU capacity (tasks beyond it wait,
and say nothing until they start), verdicts for pruning, cancellation (the task stops after its
current epoch and is never reported). ``run`` replaces the task body (default: real training), so
tests can script what a worker does; a body that raises :class:`WorkerLost` stands for a worker
process that died (the executor retries it), any other exception for a bug in the task.
"""
from __future__ import annotations

import os
import queue
import socket
import threading
import traceback
from collections.abc import Callable

from . import (
    Backend,
    Channel,
    Finished,
    Message,
    ResourceError,
    Started,
    Task,
    execute,
    register,
)

NODE_ID = "in-process"


class WorkerLost(Exception):
    """Raised by a scripted task body: the worker 'died' (the executor treats it as a lost worker)."""


@register("inprocess")
class InProcessBackend(Backend):
    def __init__(self, capacity: float | None = None, gpus: float = 0.0,
                 run: Callable[[Task, Channel, str], Finished] = execute) -> None:
        self.capacity = float(capacity if capacity is not None else (os.cpu_count() or 1))
        self.gpu_capacity = gpus
        self._run = run
        self._messages: queue.Queue[Message] = queue.Queue()
        self._done: queue.Queue[Finished] = queue.Queue()
        self._verdicts: dict[tuple[str, int], bool] = {}
        self._cancelled: set[str] = set()
        self._free = threading.Condition()
        self._used = 0.0
        self.submitted: list[Task] = []

    def preflight(self, workers: int, cpus: float, gpus: float, ranks: int = 1) -> None:
        self.start(workers, cpus, gpus, ranks)  # nothing to start: the same checks

    def start(self, workers: int, cpus: float, gpus: float, ranks: int = 1) -> None:
        if ranks > 1:
            raise ResourceError(f"resources.workers: {ranks} data-parallel workers per variant need the Ray backend "
                                "(a process group of several processes); the in-process backend runs one thread "
                                "per variant")
        if cpus > self.capacity or gpus > self.gpu_capacity:
            raise ResourceError(f"no node can run a variant that needs {cpus:g} CPUs and {gpus:g} GPUs; "
                                f"this process has {self.capacity:g} CPUs and {self.gpu_capacity:g} GPUs")

    def submit(self, task: Task, verdicts: bool = False) -> None:
        self.submitted.append(task)
        self._cancelled.discard(task.key)
        threading.Thread(target=self._body, args=(task, verdicts), daemon=True, name=f"task-{task.key}").start()

    def _body(self, task: Task, verdicts: bool) -> None:
        with self._free:  # wait for capacity, like a Ray task waiting for resources
            self._free.wait_for(lambda: self._used + task.cpus <= self.capacity or task.key in self._cancelled)
            if task.key in self._cancelled:
                return
            self._used += task.cpus
        node = socket.gethostname()
        channel = Channel(self._messages.put, (lambda k, e: self._verdicts.get((k, e))) if verdicts else None,
                          cancelled=lambda: task.key in self._cancelled)
        try:
            self._messages.put(Started(task.key, node, NODE_ID))
            out = self._run(task, channel, node)
        except WorkerLost as err:
            out = Finished(task.key, "lost", error=f"WorkerLost: {err}", node=node)
        except Exception:  # a bug in the task: keep the traceback, as Ray's RayTaskError does
            out = Finished(task.key, "failed", error=f"crashed: {traceback.format_exc()}", node=node)
        finally:
            with self._free:
                self._used -= task.cpus
                self._free.notify_all()
        if task.key not in self._cancelled:
            self._done.put(out)

    def wait(self, timeout: float) -> list[Finished]:
        try:
            out = [self._done.get(timeout=timeout)]
        except queue.Empty:
            return []
        while not self._done.empty():
            out.append(self._done.get_nowait())
        return out

    def messages(self) -> list[Message]:
        out = []
        while not self._messages.empty():
            out.append(self._messages.get_nowait())
        return out

    def decide(self, key: str, epoch: int, stop: bool) -> None:
        self._verdicts[(key, epoch)] = stop

    def cancel(self, key: str) -> None:
        with self._free:
            self._cancelled.add(key)
            self._free.notify_all()

    def node_cpus(self) -> float:
        return self.capacity

    def describe(self) -> str:
        return f"this process ({self.capacity:g} CPUs)"
