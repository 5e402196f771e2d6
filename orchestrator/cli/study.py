"""``bnnctl study``: run, inspect and export ablation studies."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import (
    AddressOption,
    BackendOption,
    CpusOption,
    MaxParallelOption,
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


def _version_line(store, study) -> str | None:
    """What version of its spec a study is ("version epochs=2 of quickstart: --set epochs=2"), and,
    for the spec's own, the versions beside it; None when there are none."""
    from bnnctl.orchestrator.layouts import split_name, versions_of

    base, version = split_name(study.name)
    if version:
        sets = " ".join(f"--set {k}={v}" for k, v in study.layout.overrides.items())
        return f"version {version} of {base}" + (f": {sets}" if sets else " (tagged; the spec as written)")
    others = versions_of(base, [s.name for s in store.studies()])
    if others:
        return f"the spec as written; other versions: {', '.join(others)}"
    return None


def _refuse_tuning(study) -> None:
    if study.kind == "tuning":
        raise fail(f"{study.name!r} is a tuning, not a study; see it with: bnnctl tune show {study.name}")


def _tables(store, study):
    from bnnctl.orchestrator.report import study_tables

    _refuse_tuning(study)
    return study_tables(store, study)


def print_tables(tables, out) -> None:
    from rich.table import Table as RichTable

    from bnnctl.orchestrator.formats import headers, table_cells

    for t in tables:
        rt = RichTable(title=f"{t.name} — {t.mode}, {t.metric} (Δ vs {t.baseline})")
        for h in headers(t):
            rt.add_column(h, justify="left" if h == "row" else "right")
        for row in table_cells(t):
            rt.add_row(*row)
        rt.caption = t.rule
        out.print(rt)


SetOption = Annotated[list[str], typer.Option("--set", help="Override a config value of every variant: PATH=VALUE "
                                              "(dotted, e.g. epochs=2); part of the variants' identities.")]
TagOption = Annotated[Optional[str], typer.Option("--tag", help="Name this version of the study (default, with --set: "
                                                "the overrides, e.g. quickstart@epochs=2); stored, listed and "
                                                "tracked as NAME@TAG, never mixed with the spec's own.")]
OnlyOption = Annotated[list[str], typer.Option("--only", help="Run only this row (its name, or ABLATION/ROW) and "
                                               "what it depends on; repeatable.")]
VariantOption = Annotated[list[str], typer.Option("--variant", help="Run only this variant (a key or unique prefix "
                                                  "from `study plan`) and what it depends on; repeatable.")]
VerboseOption = Annotated[bool, typer.Option("--verbose", help="Show Ray's and MLflow's own start-up messages.")]


@app.command("run")
@user_errors
def run(
    file: Annotated[Path, typer.Argument(help="The study spec (YAML).")],
    db: DbOption = None,
    tracking_uri: TrackingUriOption = None,
    address: AddressOption = None,
    cpus: CpusOption = None,
    max_parallel: MaxParallelOption = None,
    no_track: NoTrackOption = False,
    backend: BackendOption = None,
    storage: StorageOption = None,
    takeover: TakeoverOption = False,
    set_: SetOption = [],
    tag: TagOption = None,
    only: OnlyOption = [],
    variant: VariantOption = [],
    rerun_failed: Annotated[bool, typer.Option("--rerun-failed", help="Retry failed variants too (a plain run "
                                               "skips those that failed for their config, e.g. a NaN loss).")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Run a study (or continue it): finished variants are reused, unfinished ones resume."""
    _run(file, run_options(db=db, tracking_uri=tracking_uri, address=address, cpus=cpus, max_parallel=max_parallel,
                           no_track=no_track, backend=backend, storage=storage, takeover=takeover, set_=set_, tag=tag,
                           only=only, variant=variant, rerun_failed=rerun_failed), verbose)


@app.command("rerun")
@user_errors
def rerun(
    file: Annotated[Path, typer.Argument(help="The study spec (YAML).")],
    db: DbOption = None,
    tracking_uri: TrackingUriOption = None,
    address: AddressOption = None,
    cpus: CpusOption = None,
    no_track: NoTrackOption = False,
    backend: BackendOption = None,
    storage: StorageOption = None,
    set_: SetOption = [],
    tag: TagOption = None,
    only: OnlyOption = [],
    variant: VariantOption = [],
    verbose: VerboseOption = False,
) -> None:
    """Run a study again, retrying its failed variants (= study run --rerun-failed)."""
    _run(file, run_options(db=db, tracking_uri=tracking_uri, address=address, cpus=cpus, no_track=no_track,
                           backend=backend, storage=storage, set_=set_, tag=tag, only=only, variant=variant,
                           rerun_failed=True), verbose)


def _run(file: Path, options, verbose: bool) -> None:
    """``study run``: the spec parsed once, the options resolved once, the plan built once; all
    three handed to ``run_study``."""
    from bnnctl.orchestrator.plan import build_plan
    from bnnctl.orchestrator.runcore import RunOptions
    from bnnctl.orchestrator.spec import load_spec
    from bnnctl.orchestrator.study import adaptive_allotment, plan_items, run_study, select
    from bnnctl.orchestrator.tracking import ui_hint

    from .progress import StudyProgress

    db, tracking_uri = options.db, options.tracking_uri
    spec = load_spec(file, dict(options.overrides), options.tag)  # refused before anything is shown or started
    options = RunOptions.resolve(spec, options)
    store = _existing_store(db)
    # adaptive seeds: the first round is what the stored results say; later looks add to the total
    plan = build_plan(spec, adaptive_allotment(spec, store)[0] if spec.statistics.adaptive is not None else None)
    select(plan, options.only, options.variant_keys)
    total = sum(1 for i in plan_items(plan, store, options) if i.runs)
    out = console()
    if verbose:
        import os

        os.environ["BNNCTL_VERBOSE"] = "1"
    stop_on_sigterm()
    with StudyProgress(out, total) as progress:
        outcome = run_study(spec, options, events=progress.events(), plan=plan)
    store, study = _load(outcome.study, db)
    print_tables(_tables(store, study), out)
    out.print(f"study {outcome.study}: {outcome.status} ({', '.join(f'{n} {s}' for s, n in sorted(outcome.counts.items()))}; "
              f"{outcome.trained} trained or resumed in this run)")
    if outcome.skipped_failed:
        out.print(f"[yellow]skipped[/] {outcome.skipped_failed} failed variant(s) and what depends on them; retry "
                  f"with: bnnctl study rerun {file}")
    if outcome.status == "stopped" and study.layout.stopped_reason:
        out.print(f"[yellow]stopped[/]: {study.layout.stopped_reason}")
    if options.track:
        out.print(f"compare the runs in MLflow: {ui_hint(tracking_uri)}")
    if outcome.status == "cancelled":
        await_job_stop()
    if outcome.status != "completed" and not outcome.selected_done:  # selected variants that all succeeded: 0
        raise typer.Exit(code=1)


def await_job_stop(wait_s: float = 60.0) -> None:
    """A submitted driver whose study was cancelled (`bnnctl study cancel`) has stopped its variants;
    it waits for the job server's stop, which `study cancel` sends once the driver let the study go,
    so that the Ray job ends STOPPED, not FAILED. Without a stop in ``wait_s``, it ends as it is."""
    import os
    import time

    from bnnctl.orchestrator.submit import AWAITING_STOP

    if not os.environ.get("BNNCTL_JOB"):
        return
    print(AWAITING_STOP, flush=True)  # `study cancel` stops the job once this line is in its log
    try:
        time.sleep(wait_s)
    except KeyboardInterrupt:  # the job server's SIGTERM (see stop_on_sigterm)
        raise typer.Exit(code=0) from None


def _existing_store(db: str | None):
    """The state database, or None when it is a sqlite file not created yet (nothing is created
    just to look). A server database is opened as `study run` opens it (tables created or migrated
    when needed); one that cannot be reached is an error, said as such."""
    from bnnctl.orchestrator.store import Store, default_url

    url = db or default_url()
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return None
    return Store(url)  # migrates an older schema, as `study list` always did


@app.command("plan")
@user_errors
def plan_cmd(
    file: Annotated[Path, typer.Argument(help="The study spec (YAML).")],
    db: DbOption = None,
    set_: SetOption = [],
    tag: TagOption = None,
    only: OnlyOption = [],
    variant: VariantOption = [],
    rerun_failed: Annotated[bool, typer.Option("--rerun-failed", help="As `study run --rerun-failed` would.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Show what `study run` would do: every variant, its row, seed, stages, dependencies, budget, and
    whether it is reused, resumed, trained or skipped. Writes nothing."""
    import json

    from rich.table import Table as RichTable

    from bnnctl.orchestrator.plan import build_plan
    from bnnctl.orchestrator.runcore import RunOptions
    from bnnctl.orchestrator.spec import load_spec
    from bnnctl.orchestrator.study import plan_items

    from ._common import parse_assignments

    overrides = tuple(parse_assignments(set_, "--set").items())
    spec, store = load_spec(file, dict(overrides), tag), _existing_store(db)
    adaptive = adaptive_budget(spec, store) if spec.statistics.adaptive is not None else None
    plan = build_plan(spec, adaptive["allotted"] if adaptive else None)
    items = plan_items(plan, store, RunOptions(db, overrides=overrides, only=tuple(only),
                                               variant_keys=tuple(variant), rerun_failed=rerun_failed))
    where = {k: (ab, row) for (ab, row, _), k in plan.rows.items()}
    rows = []
    for i in items:
        v = i.variant
        ab, row = where.get(v.key, (v.ablation, v.row))
        stage = "stage 1" if v.kind == "stage1" else ("stage 2" if v.init_dep else "")
        rows.append({"variant": v.key, "label": v.label, "kind": v.kind, "ablation": ab, "row": row, "seed": v.seed,
                     "stage": stage, "epochs": v.config.epochs, "depends_on": list(v.deps), "stored": i.stored,
                     "attempts": i.attempts, "action": i.action})
    to_train = [r for r in rows if r["action"] in ("train", "resume", "retry")]
    summary = {"study": spec.name, "variants": len(rows), "to_run": len(to_train),
               "reused": sum(1 for r in rows if r["action"] == "reuse"),
               "skipped": sum(1 for r in rows if r["action"] in ("skip-failed", "blocked", "not-selected")),
               "epochs_to_run": sum(r["epochs"] for r in to_train), "epochs_total": sum(r["epochs"] for r in rows)}
    if adaptive:
        summary["adaptive"] = {k: v for k, v in adaptive.items() if k != "allotted"}
    if as_json:
        typer.echo(json.dumps({"summary": summary, "variants": rows}, indent=2))
        return
    t = RichTable(title=f"plan of {spec.name}")
    for col in ("variant", "label", "kind", "stage", "epochs", "depends on", "stored", "action"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["variant"][:10], r["label"], r["kind"], r["stage"], str(r["epochs"]),
                  ", ".join(d[:8] for d in r["depends_on"]), r["stored"] or "new", r["action"])
    out = console()
    out.print(t)
    out.print(f"{summary['variants']} variants: {summary['to_run']} to run ({summary['epochs_to_run']} epochs), "
              f"{summary['reused']} reused, {summary['skipped']} skipped")
    if adaptive:
        print_adaptive(out, adaptive)


def print_adaptive(out, a: dict) -> None:
    """`study plan`'s lines on adaptive seeds: the budget's bounds and each comparison so far."""
    out.print(f"adaptive seeds: the study trains {a['min_variants']} to {a['max_variants']} variants "
              f"({a['min_epochs']} to {a['max_epochs']} epochs), {a['min_seeds']} to {a['max_seeds']} seeds a row")
    for r in a["rows"]:
        more = (f"; about {r['forecast']} seeds for power {a['power']:g} at its observed difference"
                if r["forecast"] else "")
        out.print(f"  {r['ablation']} / {r['row']}: {r['decision']} with {r['seeds']} seeds{more}")


def adaptive_budget(spec, store) -> dict:
    """Adaptive seeds, for `study plan`: the seeds each row needs now, the study's smallest and
    largest budget, and each row's decision so far (with a forecast of the seeds an open one needs)."""
    from bnnctl.orchestrator.plan import build_plan
    from bnnctl.orchestrator.sequential import forecast
    from bnnctl.orchestrator.study import adaptive_allotment

    a = spec.statistics.adaptive
    allotted, replays = adaptive_allotment(spec, store)
    out = {"allotted": allotted, "min_seeds": a.min_seeds, "max_seeds": a.max_seeds, "power": a.power, "rows": []}
    for bound, n in (("min", a.min_seeds), ("max", a.max_seeds)):
        p = build_plan(spec, {(r.ablation, r.name): n for r in spec.rows})
        out[f"{bound}_variants"] = len(p.variants)
        out[f"{bound}_epochs"] = sum(v.config.epochs for v in p.variants.values())
    alpha, rows = spec.statistics.adaptive_alpha, {ab.name: len(ab.rows) - 1 for ab in spec.ablations}
    for ab in spec.ablations:
        look = replays[ab.name].looks[-1] if replays[ab.name].looks else None
        for r in ab.rows:
            if r.name == ab.baseline:
                continue
            c = look.comparisons.get(r.name) if look else None
            decision = c.decision if c else "open"
            estimate = None
            if c is not None and decision == "open":
                level = alpha / max(rows[ab.name], 1) if spec.statistics.correction == "holm" else alpha
                estimate = forecast(look.diffs.get(r.name, []), a, level)
            out["rows"].append({"ablation": ab.name, "row": r.name, "decision": decision,
                                "seeds": allotted.get((ab.name, r.name), a.min_seeds), "forecast": estimate})
    return out


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
    set_: SetOption = [],
    tag: TagOption = None,
) -> None:
    """Run a study on a Ray cluster as a job: the driver runs there, this command returns at once.
    Follow it with `study status`, `study logs`; stop it with `study cancel`."""
    submit_and_report(file, "study", address, db, storage, tracking_uri, not no_track, max_parallel,
                      "bnnctl study status", set_, tag)


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
    typer.echo(f"job {s.layout.job['id']}: {status}")


@app.command("show")
@user_errors
def show(
    study: Annotated[str, typer.Argument(help="Study name or spec file.")],
    fmt: Annotated[str, typer.Option("--format", help="table, md, csv, latex, html or json.")] = "table",
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="The tables as JSON (= --format json).")] = False,
) -> None:
    """Print a study's ablation tables (or export them as Markdown, CSV, LaTeX, standalone HTML or JSON)."""
    from bnnctl.orchestrator.formats import FORMATS, export

    if as_json:
        fmt = "json"

    from bnnctl.orchestrator.report import study_report

    store, s = _load(study, db)
    _refuse_tuning(s)
    tables, cells = study_report(store, s)  # the variants behind each row too (--json lists them)
    if fmt == "table":
        line = _version_line(store, s)
        if line:
            console().print(line, highlight=False)
        print_tables(tables, console())
    elif fmt in FORMATS:
        typer.echo(export(tables, fmt, s.name, cells))
    else:
        raise fail(f"--format: unknown format {fmt!r}; allowed: table, md, csv, latex, html, json")


#: a study with more variants than this is summarised by row unless --all or --page asks for them
STATUS_PAGE = 100


@app.command("status")
@user_errors
def status(study: Annotated[str, typer.Argument(help="Study name or spec file.")], db: DbOption = None,
           as_json: Annotated[bool, typer.Option("--json", help="One record per variant as JSON (the records "
                                                 "of bnnctl.orchestrator.results).")] = False,
           every: Annotated[bool, typer.Option("--all", help="Every variant, however many (a study of more "
                                               f"than {STATUS_PAGE} is summarised by row without it).")] = False,
           page: Annotated[Optional[int], typer.Option("--page", min=1, help=f"Variants {STATUS_PAGE} at a time: "
                                                       "page N of the study's variants.")] = None) -> None:
    """Show the state of every variant of a study (a large study: a summary by row, and the variants
    that are running or failed; --all or --page for the rest)."""
    from bnnctl.orchestrator.records import shown_state

    store, s = _load(study, db)
    if as_json:
        import json

        from bnnctl.orchestrator.results import records

        typer.echo(json.dumps({"study": s.name, "status": s.status, "variants": records(s.name, store=store)},
                              indent=2, default=str))
        return
    members = store.members(s.id)
    states = store.study_states(s.id)  # the variants' states only: one query, whatever the size
    if s.kind == "tuning":  # its stopped variants are the trials its pruner stopped
        states = {k: shown_state("trial", st) for k, st in states.items()}
    reason = f" ({s.layout.stopped_reason})" if s.status == "stopped" and s.layout.stopped_reason else ""
    title = f"{s.name}: {s.status}{reason}{_job_line(s)}"
    line = _version_line(store, s)
    if line:
        title += f"\n{line}"
    order = list(dict.fromkeys(m.variant_key for m in members if m.variant_key in states))
    if every or len(order) <= STATUS_PAGE and page is None:
        console().print(_variant_table(store, title, order))
        return
    if page is not None:
        pages = -(-len(order) // STATUS_PAGE)
        if page > pages:
            raise fail(f"--page {page}: {s.name} has {len(order)} variants, {pages} page(s) of {STATUS_PAGE}")
        shown = order[(page - 1) * STATUS_PAGE:page * STATUS_PAGE]
        console().print(_variant_table(store, f"{title} (variants {(page - 1) * STATUS_PAGE + 1}-"
                                       f"{(page - 1) * STATUS_PAGE + len(shown)} of {len(order)}, page {page} of "
                                       f"{pages})", shown))
        return
    console().print(_summary(title, members, states, store.attempt_counts(study_id=s.id)))
    busy = [k for k in order if states[k] in ("running", "failed", "interrupted")]
    if busy:
        console().print(_variant_table(store, f"running and failed variants ({min(len(busy), STATUS_PAGE)} of "
                                       f"{len(busy)})", busy[:STATUS_PAGE]))
    console().print(f"{len(order)} variants: --all shows every one, --page N {STATUS_PAGE} at a time")


def _variant_table(store, title: str, keys: list[str]):
    """One line per variant: kind, state, attempts, where its last attempt ran, what it started
    from, its result or error (the variants, their dependencies and attempts read in batches)."""
    from rich.table import Table as RichTable

    variants = store.variants(keys)
    variants.update(store.variants([d for v in variants.values() for d in v.deps or () if d not in variants]))
    attempts = store.attempts_of(keys)
    t = RichTable(title=title)
    for col in ("variant", "kind", "status", "attempts", "node (last attempt)", "from", "result / error"):
        t.add_column(col)
    for key in keys:
        v, tried = variants[key], attempts.get(key, [])
        detail = v.error or (f"{v.result['metric']} {v.result['metrics'][v.result['metric']]:.2f}" if v.result else "")
        t.add_row(v.label, v.kind, v.shown, str(len(tried)), node_label(tried[-1]) if tried else "",
                  provenance(v, variants), detail)
    return t


def _summary(title: str, members: list, states: dict[str, str], attempts: dict[str, int]):
    """One line per table row (per table when the study has more than STATUS_PAGE rows), and one
    for the prerequisites: its variants by state and their attempts."""
    from rich.table import Table as RichTable

    rows = {(m.ablation, m.row) for m in members if m.ablation is not None}
    by_row = len(rows) <= STATUS_PAGE
    groups: dict[tuple, set[str]] = {}
    for m in members:
        if m.variant_key in states:
            group = ("prerequisites", "") if m.ablation is None else (m.ablation, m.row if by_row else "")
            groups.setdefault(group, set()).add(m.variant_key)
    found = sorted(set(states.values()))
    t = RichTable(title=f"{title}, by {'row' if by_row else 'table'}")
    for col in ("table", "row", "variants", *found, "attempts"):
        t.add_column(col, justify="left" if col in ("table", "row") else "right")
    for (table, row), keys in groups.items():
        counts = {state: sum(1 for k in keys if states[k] == state) for state in found}
        t.add_row(table, row if by_row else f"{len({r for a, r in rows if a == table})} rows", str(len(keys)),
                  *(str(counts[state] or "") for state in found), str(sum(attempts.get(k, 0) for k in keys)))
    return t


def _job_line(study) -> str:
    """'; job ID on ADDRESS: RUNNING' for a submitted study (the job server asked now)."""
    job = study.layout.job
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
    from bnnctl.orchestrator.report import sources

    return "; ".join(f"depends on {key[:8]}" if role is None else f"{role}: {variants[key].label} ({key[:8]})"
                     for role, key in sources(v, variants))


def node_label(attempt) -> str:
    """'host (node 1a2b3c4d)' of an attempt, '' when its worker never announced itself."""
    if not attempt.node:
        return ""
    plain = attempt.node_id and attempt.node_id != "in-process" and not attempt.node_id.startswith("group:")
    return attempt.node + (f" (node {attempt.node_id[:8]})" if plain else "")  # a group's node names its nodes


@app.command("list")
@user_errors
def list_studies(db: DbOption = None,
                 as_json: Annotated[bool, typer.Option("--json", help="The list as JSON.")] = False) -> None:
    """List the studies and tunings in the state database."""
    import json

    from rich.table import Table as RichTable

    from bnnctl.orchestrator.records import shown_counts
    from bnnctl.orchestrator.layouts import split_name

    store = _existing_store(db)
    studies = store.studies() if store is not None else []
    by_study = store.study_counts() if store is not None else {}  # counted in SQL, nothing loaded
    listing = []
    for s in studies:
        counts = shown_counts(s.kind, by_study.get(s.id, ({}, None))[0])
        listing.append({"name": s.name, "version": split_name(s.name)[1], "kind": s.kind, "status": s.status,
                        "variants": counts, "updated": f"{s.updated_at:%Y-%m-%d %H:%M}", "spec_file": s.spec_file})
    if as_json:
        typer.echo(json.dumps(listing, indent=2))
        return
    if not listing:
        typer.echo("no studies yet" + (f" in {store.display_url}" if store is not None else " (no state database here)"))
        return
    t = RichTable()
    for col in ("name", "kind", "status", "variants", "updated", "spec file"):
        t.add_column(col)
    for r in listing:
        t.add_row(r["name"], r["kind"], r["status"], ", ".join(f"{n} {k}" for k, n in sorted(r["variants"].items())),
                  r["updated"], r["spec_file"])
    console().print(t)


@app.command("delete")
@user_errors
def delete(
    study: Annotated[str, typer.Argument(help="Study or tuning name, or spec file.")],
    db: DbOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    files: Annotated[bool, typer.Option("--files", help="Also delete the removed variants' folders in the run "
                                        "storage (checkpoints, images).")] = False,
    storage: StorageOption = None,
) -> None:
    """Delete a study (or tuning) from the state database: its rows and the variants no other study
    uses. MLflow runs are kept (delete them in the MLflow UI)."""
    from bnnctl.orchestrator.store import Store

    name = _study_name(study)
    store = Store(db)
    s = store.study(name)
    if s is None:
        raise fail(f"no study or tuning {name!r} in {store.display_url}")
    members = {m.variant_key for m in store.members(s.id)}
    if not yes and not typer.confirm(f"delete {s.kind} {name!r} ({len(members)} variants, those "
                                     "no other study uses with their attempts and metrics)"
                                     + (" and their files in the run storage" if files else "") + "?"):
        raise typer.Exit(code=1)
    removed, kept = store.delete_study(name)
    if s.kind == "tuning":
        import optuna

        from bnnctl.orchestrator.tuneresults import optuna_storage

        storage_ = optuna_storage(store.url)
        for arm in s.layout.arms:
            try:
                optuna.delete_study(study_name=arm.optuna_study, storage=storage_)
            except KeyError:  # never created
                pass
    gone_files = 0
    if files:
        from bnnctl.orchestrator.runstorage import RunStorage

        runs = RunStorage(storage)
        for v in removed:
            where = runs.location(v.key)
            if runs.fs.exists(where):
                runs.fs.rm(where, recursive=True)
                gone_files += 1
    typer.echo(f"deleted {name!r}: {len(removed)} variants removed, {kept} kept (other studies use them)"
               + (f", {gone_files} run folders deleted" if files else "") + "; MLflow runs are kept")


@app.command("cancel")
@user_errors
def cancel(study: Annotated[str, typer.Argument(help="Study name or spec file.")], db: DbOption = None) -> None:
    """Cancel a running study: nothing new starts and running variants stop (they resume on the next run)."""
    from bnnctl.orchestrator.study import cancel_study

    from bnnctl.orchestrator.submit import stop_job

    name = _study_name(study)
    marked = cancel_study(name, db)
    store, s = _load(name, db)
    if s.layout.job:  # a submitted study: its driver stops its variants, then the job server stops the job
        status = stop_job(s, None, grace=30.0 if marked else 0.0, released=lambda: store.lease(name) is None)
        typer.echo(f"study {name}: job {s.layout.job['id']} {status}. Submit it again to continue.")
    elif marked:
        typer.echo(f"study {name}: cancelled; its driver stops within seconds. Run it again to continue.")
    else:
        typer.echo(f"study {name} is not running; nothing to cancel")
