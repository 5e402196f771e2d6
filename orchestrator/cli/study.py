"""``bnnctl study``: run, inspect and export ablation studies."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import (
    AddressOption,
    CpusOption,
    NoTrackOption,
    StorageOption,
    TrackingUriOption,
    console,
    fail,
    stop_on_sigterm,
    submit_and_report,
    TakeoverOption,
    user_errors,
)

app = typer.Typer(help="Run and inspect ablation studies.", no_args_is_help=True)

DbOption = Annotated[Optional[str], typer.Option("--db", help="SQLAlchemy URL of the state database "
                                                  "(default: sqlite under .bnnctl/, or $BNNCTL_DB).")]


def _study_name(ref: str) -> str:
    p = Path(ref)
    if p.suffix in (".yaml", ".yml") or p.exists():
        from bnnctl.orchestrator.spec import load_spec

        return load_spec(p).name
    return ref


def _load(ref: str, db: str | None):
    from bnnctl.orchestrator.store import Store

    store = Store(db)
    study = store.study(_study_name(ref))
    if study is None:
        known = ", ".join(s.name for s in store.studies()) or "none yet"
        raise fail(f"no study {ref!r} in {store.display_url}; known studies: {known}")
    return store, study


def _tables(store, study):
    from bnnctl.orchestrator.report import build_tables

    if study.spec.get("kind") == "tuning":
        raise fail(f"{study.name!r} is a tuning, not a study; see it with: bnnctl tune show {study.name}")
    members = store.members(study.id)
    variants = store.variants([m.variant_key for m in members])
    return build_tables(study.spec, members, variants)


def print_tables(tables, out) -> None:
    from rich.table import Table as RichTable

    from bnnctl.orchestrator.report import HEADERS, table_cells

    for t in tables:
        rt = RichTable(title=f"{t.name} — {t.mode}, {t.metric} (Δ vs {t.baseline})")
        for h in HEADERS:
            rt.add_column(h, justify="left" if h == "row" else "right")
        for row in table_cells(t):
            rt.add_row(*row)
        rt.caption = t.rule
        out.print(rt)


@app.command("run")
@user_errors
def run(
    file: Annotated[Path, typer.Argument(help="The study spec (YAML).")],
    db: DbOption = None,
    tracking_uri: TrackingUriOption = None,
    address: AddressOption = None,
    cpus: CpusOption = None,
    max_parallel: Annotated[Optional[int], typer.Option(help="Variants at once (default: the spec's).")] = None,
    no_track: NoTrackOption = False,
    storage: StorageOption = None,
    takeover: TakeoverOption = False,
) -> None:
    """Run a study (or continue it): finished variants are reused, unfinished ones resume."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from bnnctl.orchestrator.executor import Events
    from bnnctl.orchestrator.runcore import RunOptions
    from bnnctl.orchestrator.spec import load_spec
    from bnnctl.orchestrator.study import run_study
    from bnnctl.orchestrator.tracking import ui_hint

    load_spec(file)  # a bad spec is refused before anything is shown or started
    out = console()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), console=out, transient=False)
    tasks: dict[str, int] = {}
    overall = progress.add_task("study", total=None)

    def started(v):
        tasks[v.key] = progress.add_task(f"  {v.label}", total=v.config.epochs)

    def epoch(v, e, metrics):
        if v.key in tasks:
            metric = next((k for k in ("pckh", "pck", "top1") if k in metrics), None)
            desc = f"  {v.label}" + (f"  {metric} {metrics[metric]:.1f}" if metric else "")
            progress.update(tasks[v.key], completed=e, description=desc)

    def finished(v, status, error):
        if v.key in tasks:
            progress.update(tasks[v.key], visible=False)
        if status != "retrying":
            progress.advance(overall)
        if status == "failed":
            progress.console.print(f"[red]failed[/]: {v.label}: {error}")
        elif status == "cancelled":
            progress.console.print(f"[yellow]stopped[/] {v.label} (study cancelled)")
        elif status == "retrying":
            progress.console.print(f"[yellow]retrying[/] {v.label} ({error}); it resumes from its checkpoint")

    def waiting(v, seconds):
        progress.console.print(f"[yellow]waiting[/] {v.label}: no worker with {v.resources.cpus:g} CPUs / "
                               f"{v.resources.gpus:g} GPUs free for {seconds:.0f} s (the cluster may be busy or scaling up)")

    stop_on_sigterm()
    with progress:
        outcome = run_study(file, events=Events(started=started, epoch=epoch, finished=finished, waiting=waiting),
                            options=RunOptions(db, tracking_uri, address, cpus, max_parallel, not no_track,
                                               storage=storage, takeover=takeover))
    store, study = _load(outcome.study, db)
    print_tables(_tables(store, study), out)
    out.print(f"study {outcome.study}: {outcome.status} ({', '.join(f'{n} {s}' for s, n in sorted(outcome.counts.items()))}; "
              f"{outcome.trained} trained or resumed in this run)")
    if outcome.status == "stopped" and study.spec.get("stopped_reason"):
        out.print(f"[yellow]stopped[/]: {study.spec['stopped_reason']}")
    if not no_track:
        out.print(f"compare the runs in MLflow: {ui_hint(tracking_uri)}")
    if outcome.status != "completed":
        raise typer.Exit(code=1)


@app.command("submit")
@user_errors
def submit(
    file: Annotated[Path, typer.Argument(help="The study spec (YAML).")],
    address: Annotated[str, typer.Option(help="The cluster's job server: http://HEAD:8265 (default: $RAY_ADDRESS "
                                         "when it is an http address).", envvar="RAY_ADDRESS")],
    db: DbOption = None,
    storage: StorageOption = None,
    tracking_uri: TrackingUriOption = None,
    no_track: NoTrackOption = False,
    max_parallel: Annotated[Optional[int], typer.Option(help="Variants at once (default: the spec's).")] = None,
) -> None:
    """Run a study on a Ray cluster as a job: the driver runs there, this command returns at once.
    Follow it with `study status`, `study logs`; stop it with `study cancel`."""
    submit_and_report(file, "study", address, db, storage, tracking_uri, not no_track, max_parallel,
                      "bnnctl study status")


@app.command("logs")
@user_errors
def logs(
    study: Annotated[str, typer.Argument(help="Study name or spec file.")],
    db: DbOption = None,
    address: Annotated[Optional[str], typer.Option(help="The job server (default: the one it was submitted to).")] = None,
    follow: Annotated[bool, typer.Option("--follow/--no-follow", help="Keep printing until the job ends.")] = True,
) -> None:
    """Print the output of a submitted study's driver (its Ray job), following it until it ends."""
    import sys

    from bnnctl.orchestrator.submit import follow_logs

    _, s = _load(study, db)

    def out(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    status = follow_logs(s, address, out, follow=follow)
    typer.echo(f"job {s.spec['job']['id']}: {status}")


@app.command("show")
@user_errors
def show(
    study: Annotated[str, typer.Argument(help="Study name or spec file.")],
    fmt: Annotated[str, typer.Option("--format", help="table, md, csv, latex or html.")] = "table",
    db: DbOption = None,
) -> None:
    """Print a study's ablation tables (or export them as Markdown, CSV, LaTeX or standalone HTML)."""
    from bnnctl.orchestrator.report import to_csv, to_latex, to_markdown

    store, s = _load(study, db)
    tables = _tables(store, s)

    def to_html(ts):
        from bnnctl.orchestrator.report import to_html as render

        return render(ts, f"{s.name} — ablation tables")

    exporters = {"md": to_markdown, "csv": to_csv, "latex": to_latex, "html": to_html}
    if fmt == "table":
        print_tables(tables, console())
    elif fmt in exporters:
        typer.echo(exporters[fmt](tables))
    else:
        raise fail(f"--format: unknown format {fmt!r}; allowed: table, md, csv, latex, html")


@app.command("status")
@user_errors
def status(study: Annotated[str, typer.Argument(help="Study name or spec file.")], db: DbOption = None) -> None:
    """Show the state of every variant of a study."""
    from rich.table import Table as RichTable

    store, s = _load(study, db)
    members = store.members(s.id)
    variants = store.variants([m.variant_key for m in members])
    reason = f" ({s.spec['stopped_reason']})" if s.status == "stopped" and s.spec.get("stopped_reason") else ""
    t = RichTable(title=f"{s.name}: {s.status}{reason}{_job_line(s)}")
    for col in ("variant", "kind", "status", "attempts", "node (last attempt)", "from", "result / error"):
        t.add_column(col)
    seen = set()
    for m in members:
        v = variants.get(m.variant_key)
        if v is None or v.key in seen:
            continue
        seen.add(v.key)
        attempts = store.attempts(v.key)
        detail = v.error or (f"{v.result['metric']} {v.result['metrics'][v.result['metric']]:.2f}" if v.result else "")
        t.add_row(v.label, v.kind, v.status, str(len(attempts)), node_label(attempts[-1]) if attempts else "",
                  provenance(v, variants), detail)
    console().print(t)


def _job_line(study) -> str:
    """'; job ID on ADDRESS: RUNNING' for a submitted study (the job server asked now)."""
    job = study.spec.get("job")
    if not job:
        return ""
    from bnnctl.orchestrator.submit import SubmitError, job_of
    from bnnctl.orchestrator.urls import mask_url

    try:
        c, job_id = job_of(study, None)
        state = c.get_job_status(job_id).value
    except (SubmitError, Exception) as err:  # noqa: BLE001 - the table still shows what the database knows
        state = f"job server unreachable ({type(err).__name__})"
    return f"; job {job['id']} on {mask_url(job['address'])}: {state}"


def provenance(v, variants: dict) -> str:
    """'init: <stage-1 label>; teacher: <label>' of a variant (what it started from, learned from)."""
    parts = []
    for dep in v.deps or ():
        d = variants.get(dep)
        if d is None:
            parts.append(f"depends on {dep[:8]}")
        else:
            parts.append(f"{'init' if d.kind == 'stage1' else 'teacher'}: {d.label} ({dep[:8]})")
    return "; ".join(parts)


def node_label(attempt) -> str:
    """'host (node 1a2b3c4d)' of an attempt, '' when its worker never announced itself."""
    if not attempt.node:
        return ""
    return attempt.node + (f" (node {attempt.node_id[:8]})" if attempt.node_id and attempt.node_id != "in-process" else "")


@app.command("list")
@user_errors
def list_studies(db: DbOption = None) -> None:
    """List the studies in the state database."""
    from bnnctl.orchestrator.store import Store

    store = Store(db)
    studies = store.studies()
    if not studies:
        typer.echo(f"no studies yet in {store.display_url}")
    for s in studies:
        counts: dict[str, int] = {}
        members = store.members(s.id)
        for v in store.variants([m.variant_key for m in members]).values():
            counts[v.status] = counts.get(v.status, 0) + 1
        typer.echo(f"{s.name:30s} {s.status:10s} {', '.join(f'{n} {k}' for k, n in sorted(counts.items())):40s} "
                   f"{s.updated_at:%Y-%m-%d %H:%M}  {s.spec_file}")


@app.command("cancel")
@user_errors
def cancel(study: Annotated[str, typer.Argument(help="Study name or spec file.")], db: DbOption = None) -> None:
    """Cancel a running study: nothing new starts and running variants stop (they resume on the next run)."""
    from bnnctl.orchestrator.study import cancel_study

    from bnnctl.orchestrator.submit import stop_job

    name = _study_name(study)
    marked = cancel_study(name, db)
    store, s = _load(name, db)
    if s.spec.get("job"):  # a submitted study: its driver stops by itself, or the job server stops it
        status = stop_job(s, None, grace=30.0 if marked else 0.0)
        typer.echo(f"study {name}: job {s.spec['job']['id']} {status}. Submit it again to continue.")
    elif marked:
        typer.echo(f"study {name}: cancelled; its driver stops within seconds. Run it again to continue.")
    else:
        typer.echo(f"study {name} is not running; nothing to cancel")
