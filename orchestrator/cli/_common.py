"""Helpers shared by the CLI command groups: user errors become one clear paragraph and exit 1."""
from __future__ import annotations

import functools
import sys
from typing import Annotated, Callable, Optional, TypeVar

import typer

F = TypeVar("F", bound=Callable)

# Options of the commands that run variants on Ray (``study run``, ``tune run``).
TrackingUriOption = Annotated[Optional[str], typer.Option(help="MLflow tracking URI (default: sqlite under .bnnctl/).")]
AddressOption = Annotated[Optional[str], typer.Option(
    help="Ray cluster to join: HOST:PORT of its head, or `auto` for the cluster `ray start` runs on this machine "
         "(default: $RAY_ADDRESS, else a private local cluster started for this run).")]
CpusOption = Annotated[Optional[int], typer.Option(help="CPUs of the local Ray cluster (default: all).")]
NoTrackOption = Annotated[bool, typer.Option("--no-track", help="Do not log to MLflow.")]
TakeoverOption = Annotated[bool, typer.Option(
    "--takeover", help="Take the study over from another driver even though its heartbeat is recent "
                       "(a lease older than 60 s is taken over without it).")]
StorageOption = Annotated[Optional[str], typer.Option(
    help="Run storage for checkpoints and images: a folder or an fsspec URL (s3://bucket/prefix, gs://..., "
         "file:///nfs/...) that every node reaches (default: the spec's `storage`, $BNNCTL_STORAGE, else .bnnctl/runs).")]
BackendOption = Annotated[Optional[str], typer.Option(
    help="What runs the variants: a registered backend (ray, inprocess, or one a package adds through the "
         "`bnnctl.backends` entry point; default: the spec's execution.backend, $BNNCTL_BACKEND, else ray).")]
MaxParallelOption = Annotated[Optional[int], typer.Option(help="Variants at once (default: the spec's "
                                                          "execution.max_parallel).")]


def run_options(*, db: str | None = None, tracking_uri: str | None = None, address: str | None = None,
                cpus: int | None = None, max_parallel: int | None = None, no_track: bool = False,
                backend: str | None = None, storage: str | None = None, takeover: bool = False,
                set_: list[str] | tuple = (), tag: str | None = None, only: list[str] | tuple = (),
                variant: list[str] | tuple = (), rerun_failed: bool = False, trials: int | None = None):
    """The run option group shared by ``study run``/``rerun`` and ``tune run``, parsed once into
    the command line's :class:`~bnnctl.orchestrator.runcore.RunOptions` (resolved against the spec
    and the environment by ``RunOptions.resolve``)."""
    from bnnctl.orchestrator.runcore import RunOptions

    return RunOptions(db=db, tracking_uri=tracking_uri, address=address, cpus=cpus, max_parallel=max_parallel,
                      track=not no_track, backend=backend, storage=storage, takeover=takeover,
                      overrides=tuple(parse_assignments(list(set_), "--set").items()), tag=tag, only=tuple(only),
                      variant_keys=tuple(variant), rerun_failed=rerun_failed, trials=trials)


def fail(message: str) -> "typer.Exit":
    """Print ``message`` as the error paragraph on stderr and return the exit to raise."""
    from bnnctl.orchestrator.urls import mask_text

    typer.secho(f"error: {mask_text(message)}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=1)


def user_errors(fn: F) -> F:
    """Decorator: a BnnctlError raised by the command is printed (no traceback) and exits 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from bnnctl.workers.errors import BnnctlError

        try:
            return fn(*args, **kwargs)
        except BnnctlError as err:
            raise fail(str(err)) from None
        except KeyboardInterrupt as err:  # Ctrl-C: one line, exit 130 (the shell's code for SIGINT)
            import signal

            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the clean-up at exit
            running = getattr(err, "running", None)
            what = "interrupted" if not str(err) or "SIGTERM" not in str(err) else "terminated (SIGTERM)"
            ran = (f"{running} variant(s) were running (each resumes from its last checkpoint); " if running
                   else "no variant was running; ")
            typer.secho(f"{what}: {ran}run the same command again to resume", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def parse_assignments(items: list[str], option: str) -> dict[str, object]:
    """``["a.b=1", "c=prelu"]`` -> ``{"a.b": 1, "c": "prelu"}``; values are parsed as YAML 1.2
    scalars (``1e-3`` is a float) or flow collections."""
    from bnnctl.orchestrator.yamlio import parse_value
    from bnnctl.workers.errors import ConfigError

    out: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(option, f"expected KEY=VALUE (for example activation.kind=prelu), got {item!r}")
        out[key.strip()] = parse_value(raw)
    return out


def console():
    from rich.console import Console

    return Console(file=sys.stdout, soft_wrap=False, width=max(120, Console().width))


def stop_on_sigterm() -> None:
    """SIGTERM (a stopped Ray job, `kill`) ends a driver like Ctrl-C: the study is left `stopped` with
    the reason and its MLflow run ended, instead of `running` with no driver."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def _terminate(signum, frame):
        raise KeyboardInterrupt("terminated (SIGTERM)")

    signal.signal(signal.SIGTERM, _terminate)


def submit_and_report(file, kind: str, address: str, db, storage, tracking_uri, track: bool, max_parallel,
                      follow_hint: str, set_: list[str] | None = None, tag: str | None = None) -> None:
    """`study submit` / `tune submit`: submit ``file`` as a Ray job and say how to follow it (a study
    with ``--set`` or ``--tag``: as that version)."""
    from bnnctl.orchestrator.submit import submit
    from bnnctl.orchestrator.urls import mask_url

    overrides = tuple(parse_assignments(set_ or [], "--set").items())
    done = submit(file, kind, address, db, storage, tracking_uri, track, max_parallel, overrides, tag)
    typer.echo(f"{kind} {done.study}: submitted as job {done.job_id} to {mask_url(done.address)}")
    typer.echo(f"follow it: bnnctl study logs {done.study}    {follow_hint} {done.study}    "
               f"stop it: bnnctl study cancel {done.study}   (each with the same --db)")
