"""What a running study or tuning shows: on a terminal, a bar with the real total and an ETA, a bar
per running variant, and one line per finished variant that stays; piped to a file, one plain line
per event (started, resumed, each epoch, finished, waiting, retrying) with the time."""
from __future__ import annotations

import time
from datetime import datetime

def _metric(metrics: dict) -> str:
    from bnnctl.workers.metrics import HEADLINE_METRICS

    name = next((k for k in HEADLINE_METRICS if k in metrics), None)
    return f"{name} {metrics[name]:.1f}" if name else ""


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class StudyProgress:
    """Events for the executor (``events()``) and a context manager around the run."""

    def __init__(self, console, total: int, what: str = "variants", tty: bool | None = None) -> None:
        self.console, self.total, self.what = console, total, what
        self.tty = console.is_terminal if tty is None else tty
        self.done = 0
        self.started_at: dict[str, float] = {}
        self.last: dict[str, dict] = {}
        self.bars: dict[str, int] = {}
        self.progress = None
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                     console=console, transient=False)
            self.overall = self.progress.add_task(f"{what} done", total=total)

    # -- output -----------------------------------------------------------------------------------
    def line(self, text: str) -> None:
        if self.tty:
            self.console.print(text)
        else:  # a log: plain text, a time stamp, flushed at once
            print(f"{datetime.now():%H:%M:%S} {text}", file=self.console.file, flush=True)

    def __enter__(self) -> StudyProgress:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    # -- executor events --------------------------------------------------------------------------
    def events(self):
        from bnnctl.orchestrator.executor import Events

        return Events(started=self.started, epoch=self.epoch, finished=self.finished, waiting=self.waiting,
                      scaling=self.scaling, resumed=self.resumed, planned=self.planned)

    def planned(self, count: int) -> None:
        """Adaptive seeds: the last look left comparisons open; ``count`` more variants run for them."""
        self.total += count
        if self.progress is not None:
            self.progress.update(self.overall, total=self.total)
        self.line(f"look     comparisons still open: {count} more variants (seeds) to train, {self.total} in all")

    def started(self, v) -> None:
        self.started_at[v.key] = time.monotonic()
        if self.progress is not None:
            self.bars[v.key] = self.progress.add_task(f"  {v.label}", total=v.config.epochs)
        else:
            self.line(f"started  {v.label} ({v.config.epochs} epochs)")

    def resumed(self, v, epoch: int) -> None:
        if self.progress is not None and v.key in self.bars:
            self.progress.update(self.bars[v.key], completed=epoch, description=f"  {v.label} (resumed)")
        else:
            self.line(f"resumed  {v.label} after epoch {epoch}/{v.config.epochs}")

    def epoch(self, v, e: int, metrics: dict) -> None:
        self.last[v.key] = metrics
        if self.progress is not None and v.key in self.bars:
            text = _metric(metrics)
            self.progress.update(self.bars[v.key], completed=e, description=f"  {v.label}" + (f"  {text}" if text else ""))
        elif self.progress is None:
            self.line(f"epoch    {v.label} {e}/{v.config.epochs} {_metric(metrics)}".rstrip())

    def finished(self, v, status: str, error: str | None) -> None:
        took = time.monotonic() - self.started_at.get(v.key, time.monotonic())
        if self.progress is not None and v.key in self.bars:
            self.progress.remove_task(self.bars.pop(v.key))
        if status == "retrying":
            self.line(f"retrying {v.label} ({error}); it resumes from its checkpoint")
            return
        self.done += 1
        if self.progress is not None:
            self.progress.update(self.overall, completed=self.done)
        counter = f"[{self.done}/{self.total}]"
        if status == "completed":
            self.line(f"done     {v.label}  {_metric(self.last.get(v.key, {}))}  {_duration(took)}  {counter}")
        elif status == "failed":
            self.line(f"failed   {v.label}: {error}  {counter}")
        elif status == "cancelled":
            self.line(f"stopped  {v.label} (study cancelled; it resumes on the next run)")
        else:
            self.line(f"{status:8s} {v.label}  {_duration(took)}  {counter}")

    def scaling(self, v, seconds: float, why: str) -> None:
        self.line(f"waiting for nodes: {v.label} ({seconds:.0f} s so far): {why}")

    def waiting(self, v, seconds: float) -> None:
        self.line(f"waiting  {v.label}: no worker with {v.resources.cpus:g} CPUs / {v.resources.gpus:g} GPUs free for "
                  f"{seconds:.0f} s (the cluster may be busy or scaling up)")

