"""The small protocol through which a training run talks to whoever runs it (an orchestrator over
Ray, the CLI, or a test): report metrics, ask whether to stop, show progress, and a folder for
checkpoints. Like Ray Tune's stoppers, it is deliberately tiny."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Protocol, runtime_checkable


@runtime_checkable
class Reporter(Protocol):
    @property
    def checkpoint_dir(self) -> Path:
        """Folder where the run writes its checkpoints (and finds them again on resume)."""

    def report(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Metrics of a finished epoch (1-based)."""

    def restored(self, history: list[tuple[int, dict[str, float]]]) -> None:
        """On resume: the metrics of every epoch the checkpoint holds, reported before by an earlier
        attempt (whoever runs it may have lost some of them with a crash). Not a new epoch."""

    def should_stop(self) -> bool:
        """Asked after every epoch: True ends the run early (pruning, cancellation)."""

    def progress(self, done: int, total: int, message: str = "") -> None:
        """Batches done out of total in the current epoch."""


class LocalReporter:
    """A reporter that keeps everything in memory; ``stop_after`` epochs ends the run early
    (as an interruption would)."""

    def __init__(self, checkpoint_dir: str | Path, stop_after: int | None = None) -> None:
        self._dir = Path(checkpoint_dir)
        self.stop_after = stop_after
        self.history: list[tuple[int, dict[str, float]]] = []
        self.restored_history: list[tuple[int, dict[str, float]]] = []

    @property
    def checkpoint_dir(self) -> Path:
        return self._dir

    def report(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.history.append((epoch, dict(metrics)))

    def restored(self, history: list[tuple[int, dict[str, float]]]) -> None:
        self.restored_history = [(e, dict(m)) for e, m in history]

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.history) >= self.stop_after

    def progress(self, done: int, total: int, message: str = "") -> None:
        pass
