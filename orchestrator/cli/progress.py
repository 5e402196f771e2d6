"""What a running study or tuning shows: on a terminal, a bar with the real total and an ETA, a bar
per running variant, and one line per finished variant that stays (a tuning: a live table of its
trials, see :class:`TuneProgress`); piped to a file, one plain line per event (started, resumed,
each epoch, finished, waiting, retrying) with the time."""
from __future__ import annotations

import time
from datetime import datetime

from bnnctl.orchestrator.formats import format_number

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
                      scaling=self.scaling, resumed=self.resumed, planned=self.planned, note=self.note)

    def note(self, text: str) -> None:
        self.line(text)

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



_STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}


class TuneProgress:
    """What a running tuning shows. On a terminal: a live table of its trials (the running ones and
    the last finished: state, epoch, last value of the objective's metric, the arm's best so far),
    titled with the tally (done of this run's total, running, pruned, failed) and an ETA; a line per
    finished trial stays above it. Piped: one time-stamped plain line per event (a trial started, each
    epoch, a trial finished with its value and the best so far; teachers, retries, waits), never
    wrapped."""

    SHOWN = 10  # finished trials kept in the live table

    def __init__(self, console, metric: str, params=lambda p: "", tty: bool | None = None) -> None:
        import threading

        self.console, self.metric, self.params = console, metric, params
        self.tty = console.is_terminal if tty is None else tty
        self.lock = threading.Lock()  # the table is drawn by rich's refresh thread
        self.trials: dict[tuple[str, int], dict] = {}  # (arm, number) -> its row, in start order
        self.of_variant: dict[str, tuple[str, int]] = {}
        self.started_at: dict[str, float] = {}
        self.total: int | None = None  # what this run trains (trials and teachers), once planned
        self.done = 0
        self.running_most = 1
        self.took: list[float] = []
        self.counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
        self.best: dict[str, tuple[float, int]] = {}
        self.live = None

    # -- output -----------------------------------------------------------------------------------
    def line(self, text: str, markup: str | None = None) -> None:
        """``text`` as a line that stays (``markup``: the same with rich colours, for a terminal)."""
        if self.tty:
            self.console.print(markup or text, highlight=False, markup=markup is not None)
        else:
            print(f"{datetime.now():%H:%M:%S} {text}", file=self.console.file, flush=True)

    def __enter__(self) -> TuneProgress:
        if self.tty:
            from rich.live import Live

            self.live = Live(get_renderable=self.table, console=self.console, refresh_per_second=4, transient=True)
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.stop()

    def eta(self) -> str:
        if self.total is None or not self.took:
            return "—"
        left = max(self.total - self.done, 0)
        return _duration(sum(self.took) / len(self.took) * left / self.running_most) if left else "0 s"

    def title(self) -> str:
        running = sum(1 for t in self.trials.values() if t["state"] == "running")
        total = "?" if self.total is None else self.total
        return (f"trials: {self.done}/{total} done in this run, {running} running, {self.counts['PRUNED']} pruned, "
                f"{self.counts['FAIL']} failed; ETA {self.eta()}")

    def table(self):
        """The live table (called by rich's refresh thread)."""
        from rich.table import Table

        with self.lock:
            rows = [(arm, n, dict(t)) for (arm, n), t in self.trials.items()]
            best = dict(self.best)
            title = self.title()
        shown = [r for r in rows if r[2]["state"] == "running"]
        shown = [r for r in rows if r[2]["state"] != "running"][-self.SHOWN:] + shown
        t = Table()
        for col in ("arm", "trial", "state", "epoch", f"{self.metric} (last)", "best so far"):
            t.add_column(col, justify="left" if col in ("arm", "state") else "right")
        colour = {"complete": "green", "pruned": "yellow", "failed": "red"}
        for arm, n, row in shown:
            b = best.get(arm)
            state = row["state"]
            t.add_row(arm, str(n), f"[{colour[state]}]{state}[/]" if state in colour else state,
                      f"{row['epoch']}/{row['epochs']}", format_number(row["value"]) if row["value"] is not None else "",
                      f"{format_number(b[0])} (trial {b[1]})" if b else "")
        from rich.console import Group
        from rich.text import Text

        return Group(Text(title, no_wrap=True, overflow="ellipsis"), t)  # the tally on one line, above the table

    # -- executor events --------------------------------------------------------------------------
    def events(self):
        from bnnctl.orchestrator.executor import Events

        return Events(started=self.started, epoch=self.epoch, finished=self.finished, waiting=self.waiting,
                      scaling=self.scaling, resumed=self.resumed, planned=self.planned)

    def planned(self, count: int) -> None:
        with self.lock:
            self.total = count

    @staticmethod
    def _trial(v) -> tuple[str, int] | None:
        if v.kind != "trial" or not (v.row or "").startswith("trial "):
            return None
        return v.ablation, int(v.row.split()[-1])

    def started(self, v) -> None:
        self.started_at[v.key] = time.monotonic()
        place = self._trial(v)
        if place is None:
            self.line(f"started  {v.label} ({v.config.epochs} epochs)")
            return
        with self.lock:
            self.of_variant[v.key] = place
            self.trials[place] = {"state": "running", "epoch": 0, "epochs": v.config.epochs, "value": None}
            self.running_most = max(self.running_most,
                                    sum(1 for t in self.trials.values() if t["state"] == "running"))
        if not self.tty:
            self.line(f"started  [{place[0]}] trial {place[1]} ({v.config.epochs} epochs)")

    def resumed(self, v, epoch: int) -> None:
        place = self.of_variant.get(v.key)
        if place is not None:
            with self.lock:
                self.trials[place]["epoch"] = epoch
        self.line(f"resumed  {v.label} after epoch {epoch}/{v.config.epochs}")

    def epoch(self, v, e: int, metrics: dict) -> None:
        place = self.of_variant.get(v.key)
        value = metrics.get(self.metric)
        if place is not None:
            with self.lock:
                self.trials[place].update(epoch=e, value=value)
        if not self.tty:
            what = f"[{place[0]}] trial {place[1]}" if place else v.label
            self.line(f"epoch    {what} {e}/{v.config.epochs}"
                      + (f" {self.metric} {format_number(value)}" if value is not None else ""))

    def finished(self, v, status: str, error: str | None) -> None:
        if status == "retrying":
            self.line(f"retrying {v.label} ({error}); it resumes from its checkpoint")
            return
        with self.lock:
            self.done += 1
            if v.key in self.started_at:
                self.took.append(time.monotonic() - self.started_at.pop(v.key))
        if self._trial(v) is None:  # a teacher (a trial's end is its trial event)
            self.line(f"{'done' if status == 'completed' else status:8s} {v.label}" + (f" ({error})" if error else ""))

    def trial(self, e) -> None:
        """A trial's end as Optuna recorded it (``tuning.TrialEvent``)."""
        state = _STATES[e.state]
        with self.lock:
            self.counts[e.state] += 1
            row = self.trials.setdefault((e.arm, e.number), {"state": state, "epoch": 0, "epochs": 0, "value": None})
            row["state"] = state
            if e.value is not None:
                row["value"] = e.value
            if e.best_number is not None:
                self.best[e.arm] = (e.best_value, e.best_number)
            tally = (f"[{sum(self.counts.values())} done in this run: {self.counts['PRUNED']} pruned, "
                     f"{self.counts['FAIL']} failed]")
        value = format_number(e.value) if e.value is not None else ""
        best = f"  best so far {format_number(e.best_value)} (trial {e.best_number})" if e.best_number is not None else ""
        reason = f"  {e.reason}" if e.reason else ""
        text = f"{state:8s} [{e.arm}] trial {e.number:3d} {value:>8s}  {self.params(e.params)}{best}{reason}  {tally}"
        from rich.markup import escape

        colour = {"complete": "green", "pruned": "yellow", "failed": "red"}[state]
        self.line(text, f"[{colour}]{state:8s}[/] {escape(text[9:])}")

    def scaling(self, v, seconds: float, why: str) -> None:
        self.line(f"waiting for nodes: {v.label} ({seconds:.0f} s so far): {why}")

    def waiting(self, v, seconds: float) -> None:
        self.line(f"waiting  {v.label}: no worker with {v.resources.cpus:g} CPUs / {v.resources.gpus:g} GPUs free for "
                  f"{seconds:.0f} s (the cluster may be busy or scaling up)")
