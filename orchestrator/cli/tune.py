"""``bnnctl tune``: Optuna searches of lambda schedules, distillation weights (any config path)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bnnctl.orchestrator.formats import format_number

from ._common import (
    AddressOption,
    BackendOption,
    CpusOption,
    NoTrackOption,
    StorageOption,
    TrackingUriOption,
    console,
    run_options,
    fail,
    stop_on_sigterm,
    submit_and_report,
    TakeoverOption,
    user_errors,
)

app = typer.Typer(help="Tune lambda schedules, distillation weights (any config value) with Optuna.",
                  no_args_is_help=True)

DbOption = Annotated[Optional[str], typer.Option("--db", help="SQLAlchemy URL of the state database, which also "
                                                  "holds Optuna's storage (default: sqlite under .bnnctl/).")]


def _name(ref: str) -> str:
    p = Path(ref)
    if p.suffix in (".yaml", ".yml") or p.exists():
        from bnnctl.orchestrator.tunespec import load_tune_spec

        return load_tune_spec(p).name
    return ref


def _params(params: dict) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1] if k.count('.') else k}={format_number(v)}" for k, v in params.items())


@app.command("run")
@user_errors
def run(
    file: Annotated[Path, typer.Argument(help="The tuning spec (YAML, `kind: tuning`).")],
    db: DbOption = None,
    tracking_uri: TrackingUriOption = None,
    address: AddressOption = None,
    cpus: CpusOption = None,
    max_parallel: Annotated[Optional[int], typer.Option(help="Trials at once (default: the spec's execution.max_parallel).")] = None,
    no_track: NoTrackOption = False,
    backend: BackendOption = None,
    storage: StorageOption = None,
    takeover: TakeoverOption = False,
    trials: Annotated[Optional[int], typer.Option("--trials", help="Finished trials per arm to reach (default: "
                                                  "the spec's `trials`); more continues the same Optuna study.")] = None,
) -> None:
    """Run a tuning, or continue it up to its number of trials (the same command resumes it)."""
    import dataclasses

    from bnnctl.orchestrator.runcore import RunOptions
    from bnnctl.orchestrator.tunespec import load_tune_spec
    from bnnctl.orchestrator.tuning import run_tuning, with_trials

    from .progress import TuneProgress

    options = run_options(db=db, tracking_uri=tracking_uri, address=address, cpus=cpus, max_parallel=max_parallel,
                          no_track=no_track, backend=backend, storage=storage, takeover=takeover, trials=trials)
    spec = load_tune_spec(file)  # a bad spec (or --trials) is refused before anything is shown or started
    if trials is not None:
        spec = with_trials(spec, trials)
    options = RunOptions.resolve(spec, options)
    out = console()
    header = (f"tuning {spec.name}: {spec.trials * len(spec.arms)} trials requested ({len(spec.arms)} arm(s) x "
              f"{spec.trials}); finished trials of an earlier run count")
    stop_on_sigterm()
    with TuneProgress(out, spec.objective.metric, _params) as progress:
        events = dataclasses.replace(progress.events(), begun=lambda: progress.line(header))  # once it passed its checks
        outcome = run_tuning(spec, options, events=events, on_trial=progress.trial)
    _closing(outcome, db, out, not no_track, tracking_uri)


def _closing(outcome, db: str | None, out, track: bool, tracking_uri: str | None) -> None:
    """The tuning's summary table, its state (and why it stopped), where to look next; exit 1
    unless it completed."""
    from bnnctl.orchestrator.tracking import ui_hint

    _show(outcome.name, db, out, trials=False)
    out.print(f"tuning {outcome.name}: {outcome.status} "
              f"({', '.join(f'{arm}: {n} finished trials' for arm, n in outcome.finished.items())}; "
              f"{outcome.trained} trained in this run)")
    if outcome.status == "stopped":
        from bnnctl.orchestrator.store import Store

        stopped = Store(db, readonly=True).study(outcome.name)
        if stopped is not None and stopped.layout.stopped_reason:
            out.print(f"[yellow]stopped[/]: {stopped.layout.stopped_reason}")
    out.print(f"details: bnnctl tune show {outcome.name}    Optuna's dashboard: optuna-dashboard "
              f"{_storage_url(db)}")
    if track:
        out.print(f"compare the trials in MLflow: {ui_hint(tracking_uri)}")
    if outcome.status == "cancelled":
        from .study import await_job_stop

        await_job_stop()  # a submitted tuning's job then ends STOPPED
    if outcome.status != "completed":
        raise typer.Exit(code=1)


@app.command("submit")
@user_errors
def submit(
    file: Annotated[Path, typer.Argument(help="The tuning spec (YAML, `kind: tuning`).")],
    address: Annotated[str, typer.Option(help="The cluster's job server: http://HEAD:8265.", envvar="RAY_ADDRESS")],
    db: DbOption = None,
    storage: StorageOption = None,
    tracking_uri: TrackingUriOption = None,
    no_track: NoTrackOption = False,
    max_parallel: Annotated[Optional[int], typer.Option(help="Trials at once (default: the spec's).")] = None,
) -> None:
    """Run a tuning on a Ray cluster as a job (see `bnnctl study submit`); follow it with
    `bnnctl study logs NAME`, stop it with `bnnctl study cancel NAME`."""
    submit_and_report(file, "tuning", address, db, storage, tracking_uri, not no_track, max_parallel,
                      "bnnctl tune show")


def _storage_url(db: str | None) -> str:
    from bnnctl.orchestrator.store import default_url
    from bnnctl.orchestrator.urls import mask_url

    return mask_url(db or default_url())


def _show(name: str, db: str | None, out, trials: bool = True) -> None:
    from rich.markup import escape
    from rich.table import Table

    from bnnctl.orchestrator.tuneresults import load_tuning, summarize

    _, row, studies = load_tuning(name, db)
    layout = row.layout
    metric = f"{layout.metric} ({layout.value} epoch, {layout.direction})"
    summary_table = Table(title=f"tuning {row.name}: {row.status} — objective {metric}, {layout.sampler} sampler, "
                                f"{layout.pruner} pruner")
    for col in ("arm", "finished", "default", "best", "Δ", "best trial", "best values"):
        summary_table.add_column(col, justify="left" if col in ("arm", "best values") else "right")
    summaries = {arm: summarize(study) for arm, study in studies.items()}
    for arm, s in summaries.items():
        finished = sum(1 for t in s["trials"] if t["state"] in ("COMPLETE", "PRUNED", "FAIL"))
        d = s["default"]["value"] if s["default"] else None
        b = s["best"]["value"] if s["best"] else None
        delta = f"{b - d:+.3g}" if b is not None and d is not None else "—"
        summary_table.add_row(arm, f"{finished}/{layout.trials}", format_number(d), format_number(b), delta,
                              str(s["best"]["number"]) if s["best"] else "—",
                              _params(s["best"]["params"]) if s["best"] else "—")
    out.print(summary_table)
    if not trials:
        return
    for arm, s in summaries.items():
        t = Table(title=f"{arm}: trials")
        for col in ("#", "state", "value", "epochs", "values", "note"):
            t.add_column(col, justify="left" if col in ("values", "note", "state") else "right")
        for tr in s["trials"]:
            note = "default" if tr["default"] else ""
            if tr["reason"]:
                note = (note + "; " if note else "") + tr["reason"]
            if s["best"] and tr["number"] == s["best"]["number"]:
                note = (note + "; " if note else "") + "best"
            value = format_number(tr["value"]) if tr["state"] == "COMPLETE" else (
                f"({format_number(tr['value'])} @ {tr['epochs']})" if tr["state"] == "PRUNED" and tr["value"] is not None else "—")
            t.add_row(str(tr["number"]), tr["state"], value, str(tr["epochs"]), escape(_params(tr["params"])),
                      escape(note))
        out.print(t)
        if s["importances"]:
            out.print(f"{arm}: parameter importances (fANOVA): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in s["importances"].items()))
        else:
            out.print(f"{arm}: parameter importances need at least 3 completed trials with different values")


@app.command("show")
@user_errors
def show(
    tuning: Annotated[str, typer.Argument(help="Tuning name or spec file.")],
    db: DbOption = None,
) -> None:
    """Best values against the default, every trial with its state, and parameter importances."""
    _show(_name(tuning), db, console())


@app.command("best")
@user_errors
def best(
    tuning: Annotated[str, typer.Argument(help="Tuning name or spec file.")],
    as_spec: Annotated[Path, typer.Option("--as-spec", help="Write a study spec (YAML) comparing each arm's "
                                          "default with its best values.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")] = False,
    db: DbOption = None,
) -> None:
    """Write the best values into a study spec, runnable with `bnnctl study run`."""
    import yaml

    from bnnctl.orchestrator.tuneresults import best_as_spec, load_tuning

    _, row, studies = load_tuning(_name(tuning), db)
    spec = best_as_spec(row.layout, studies)
    if as_spec.exists() and not force:
        raise fail(f"--as-spec: {as_spec} exists; choose another file or add --force to overwrite it")
    text = (f"# Written by `bnnctl tune best {row.name}`: each arm's default against its best trial.\n"
            + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    tmp = as_spec.with_name(as_spec.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(as_spec)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise fail(f"--as-spec: cannot write {as_spec}: {err.strerror}") from None
    from bnnctl.orchestrator.spec import load_spec

    load_spec(as_spec)  # what we wrote is a valid study spec
    typer.echo(f"wrote {as_spec}; run it with: bnnctl study run {as_spec}")
