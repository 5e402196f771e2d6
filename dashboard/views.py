"""What each dashboard page shows, as plain data assembled from the orchestrator's store (read-only).

The web app (``app.py``) renders these with templates and serves them as JSON for live refresh;
nothing here writes anything.
"""
from __future__ import annotations

import dataclasses
import math
from datetime import datetime

from bnnctl.orchestrator.layouts import StudyLayout, split_name, versions_of
from bnnctl.orchestrator.formats import table_data
from bnnctl.orchestrator.records import shown_counts
from bnnctl.orchestrator.store import collector_paused
from bnnctl.orchestrator.report import ALPHA, budget, build_tables, cell_variants, reported, sample_std, sources
from bnnctl.orchestrator.tracking import CREATING, flatten
from bnnctl.workers.metrics import CURVES, HEADLINE_METRICS, MPII_GROUPS, named_joint_groups


#: the config values a study page reads (a row's budget, where a stage 2 starts): only these are
#: read from the store (see ``Store.study_variants``)
PAGE_CONFIG = ("epochs", "schedule_offset")


class NotFound(LookupError):
    """An unknown study, tuning or variant: the app answers 404."""


def _counts(statuses: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in statuses:
        out[s] = out.get(s, 0) + 1
    return out


def studies(store) -> list[dict]:
    """The studies page: name, version, kind, spec file, status, metric, variants by state, last
    activity, and the base config's values (two queries: the studies, and their variants counted by
    state in SQL)."""
    out = []
    counted = store.study_counts()
    for s in store.studies():
        counts, last = counted.get(s.id, ({}, None))
        counts = shown_counts(s.kind, counts)
        layout = s.layout
        base = layout.base if s.kind == "study" else flatten((layout.data or {}).get("base") or {})
        out.append({"name": s.name, "kind": s.kind, "spec_file": s.spec_file, "status": s.status,
                    "version": split_name(s.name)[1], "metric": layout.metric, "config": base,
                    "counts": counts, "total": sum(counts.values()),
                    "last_activity": _iso(s.updated_at if last is None else max(_aware(last), _aware(s.updated_at)))})
    return out


def config_columns(configs: list[dict[str, str]], shown: int = 8) -> dict:
    """The config columns of a table of ``configs`` (flattened): the paths whose values differ
    between them (shown, at most ``shown``, the rest selectable), and every other path (selectable).
    A config that lacks a path (a tuning's base as written) does not count for it; ``common``: the
    value of each path that does not differ (nor is ``seed``)."""
    paths = sorted({k for c in configs for k in c})
    differ = [p for p in paths if p != "seed" and len({c[p] for c in configs if p in c}) > 1]
    changing = set(differ) | {"seed"}
    common = {p: next(c[p] for c in configs if p in c) for p in paths if p not in changing}
    return {"paths": paths, "shown": differ[:shown], "differ": differ, "common": common}


#: a study page lists its variants (with their configs) up to this many; beyond, results() has them
VARIANTS_TABLE_MAX = 2000


def variants_table(store, study_id: int, members: list, variants: dict, layout: StudyLayout) -> dict:
    """The study page's variants table: one line per row and seed (ablation, row, seed, state,
    reported value, budget: epochs over all its stages) with the config values, the ones that differ
    between rows shown."""
    import json

    rows = [m for m in members if m.ablation is not None and m.variant_key in variants]
    if len(rows) > VARIANTS_TABLE_MAX:
        return {"rows": [], "too_many": len(rows), "columns": config_columns([])}
    texts = store.config_texts(study_id)
    flats = {k: flatten(json.loads(t)) for k, t in texts.items() if k in {m.variant_key for m in rows}}
    lines = []
    for m in rows:
        v = variants[m.variant_key]
        value = reported(v.result, layout.metric, layout.report) if v.result and v.status == "completed" else None
        lines.append({"ablation": m.ablation, "row": m.row, "seed": m.seed, "key": v.key, "status": v.shown,
                      "reported": value, "budget": budget(v.key, variants),
                      "config": flats.get(v.key, {})})
    columns = config_columns([line["config"] for line in lines])
    for line in lines:  # a value every row shares is kept once (columns["common"]): a compact page and JSON
        line["config"] = {p: x for p, x in line["config"].items() if p not in columns["common"]}
    return {"rows": lines, "too_many": 0, "columns": columns}


def _aware(t: datetime | str) -> datetime:
    """A time as the store wrote it (UTC), whether read back with its zone or without (sqlite), as
    a datetime or as text (an aggregate over sqlite)."""
    from datetime import UTC

    t = datetime.fromisoformat(t) if isinstance(t, str) else t
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.strftime("%Y-%m-%d %H:%M:%S")


def _study(store, name: str, kind: str):
    s = store.study(name)
    if s is None or s.kind != kind:
        raise NotFound(f"no {kind} named {name!r}")
    return s


def study(store, name: str) -> dict:
    """A study page: its tables, per-joint table, chart data and the variants behind every cell."""
    with collector_paused():  # tens of thousands of acyclic objects (see the store's collector_paused)
        return _study_view(store, name)


def _study_view(store, name: str) -> dict:
    s = _study(store, name, "study")
    members = store.members(s.id)
    variants = store.study_variants(s.id, config=PAGE_CONFIG)
    layout = s.layout
    tables = build_tables(layout, members, variants)
    cells = cell_variants(members, variants)
    busy = [v for v in variants.values() if v.status == "running"]
    prereqs = [variants[m.variant_key] for m in members if m.ablation is None and m.variant_key in variants]
    metric = layout.metric
    return {
        "groups": joint_groups(layout, members, variants, metric),
        "curves": row_curves(store.metrics_of([], [metric], study_id=s.id), layout, members, variants, metric),
        "progress": running(store.metrics_of([], study_id=s.id, state="running") if busy else {}, busy),
        "name": s.name, "status": s.status, "spec_file": s.spec_file, "description": layout.description,
        "metric": metric, "seeds": list(layout.seeds), "alpha": ALPHA, "adaptive": layout.adaptive,
        "counts": _counts([v.shown for v in variants.values()]), "updated": _iso(s.updated_at),
        "tables": [table_data(t, cells) for t in tables],
        "seeds_over_time": [{"table": t.name, "traces": seeds_traces(t)} for t in tables if t.looks],
        "per_joint": per_joint(layout, members, variants),
        "prerequisites": [{"key": v.key, "label": v.label, "status": v.status} for v in prereqs],
        "variants_table": variants_table(store, s.id, members, variants, layout),
        "version": split_name(s.name)[1], "overrides": layout.overrides,
        "versions": versions_of(split_name(s.name)[0], [o.name for o in store.studies()]),
        "units": unit_of(metric),
    }


#: units of the metrics the pages plot: every axis says its metric and unit
UNITS = {"pckh": "%", "pck": "%", "pckh@0.1": "%", "top1": "%", "top5": "%", "epoch_time": "s",
         "flip_ratio": "fraction of binary weights", "clip_fraction": "fraction"}


def unit_of(metric: str) -> str:
    return UNITS.get(metric) or ("%" if metric.startswith(("pckh_", "pck_")) else "")


def metric_title(metric: str) -> str:
    """An axis title: the metric and its unit ("pckh (%)")."""
    unit = unit_of(metric)
    return f"{metric} ({unit})" if unit else metric


def whole_axis(title: str, largest: float) -> dict:
    """A Plotly axis of whole numbers (epochs, trials): ticks on integers only, every 1, 2, 5, 10,
    20, 50... so that about ten show (never 1.2, 1.4, ...)."""
    step = 1
    for scale in (1, 10, 100, 1000, 10000):
        step = next((m * scale for m in (1, 2, 5) if largest / (m * scale) <= 10), 0)
        if step:
            break
    return {"title": {"text": title}, "tick0": 0, "dtick": max(step, 1), "tickformat": "d"}


def row_curves(histories: dict, layout: StudyLayout, members: list, variants: dict, metric: str) -> list[dict]:
    """Per table, each row's validation curve over its whole budget: the mean over its finished
    seeds and a ± std band. A two-stage row is drawn over both stages, its stage 1's epochs first
    (1 .. e1), then its stage 2's (e1 + 1 .. e1 + e2), the change of stage marked. ``histories``:
    the variants' metrics as ``Store.metrics_of`` reads them (a study's stage 1 variants included)."""
    by_row: dict[tuple, list] = {}
    for m in members:
        if m.ablation is not None and m.variant_key in variants:
            by_row.setdefault((m.ablation, m.row), []).append(variants[m.variant_key])
    out = []
    for ab in layout.ablations:
        lines = []
        for r in ab.rows:
            per_epoch: dict[int, list[float]] = {}
            stage2 = None
            for v in by_row.get((ab.name, r.name), ()):
                offset = int(v.config.get("schedule_offset") or 0)
                first = next((variants[d] for d in v.deps or () if d in variants and variants[d].kind == "stage1"), None)
                parts = [(first, 0), (v, offset)] if first is not None else [(v, offset)]
                if first is not None and offset:
                    stage2 = offset + 1
                for part, shift in parts:
                    for epoch, value in histories.get(part.key, {}).get(metric, []):
                        per_epoch.setdefault(epoch + shift, []).append(value)
            if not per_epoch:
                continue
            xs = sorted(per_epoch)
            means = [sum(per_epoch[x]) / len(per_epoch[x]) for x in xs]
            stds = [sample_std(per_epoch[x]) for x in xs]
            lines.append({"row": r.name, "epochs": xs, "mean": means, "low": [m - d for m, d in zip(means, stds)],
                          "high": [m + d for m, d in zip(means, stds)], "stage2": stage2,
                          "seeds": max(len(v) for v in per_epoch.values())})
        title = f"{ab.name} — validation {metric} per epoch (mean ± std over seeds)"
        out.append({"ablation": ab.name, "metric": metric, "lines": lines, "traces": curve_traces(lines),
                    "layout": curve_layout(lines, metric, title)})
    return out


def curve_layout(lines: list[dict], metric: str, title: str, height: int = 360) -> dict:
    """The layout of validation curves: whole epochs on x, the metric and its unit on y, and a
    dashed line where two-stage rows go from stage 1 to stage 2."""
    largest = max((x for line in lines for x in line["epochs"]), default=1)
    starts: dict[int, list[str]] = {}
    for line in lines:
        if line.get("stage2"):
            starts.setdefault(line["stage2"], []).append(line["row"])
    shapes, notes = [], []
    for at, rows in sorted(starts.items()):
        x = at - 0.5
        shapes.append({"type": "line", "x0": x, "x1": x, "yref": "paper", "y0": 0, "y1": 1,
                       "line": {"dash": "dash", "width": 1, "color": "#666"}})
        who = "" if len(starts) == 1 else f" ({', '.join(rows)})"
        notes.append({"x": x, "y": 1, "yref": "paper", "yanchor": "bottom", "showarrow": False,
                      "text": f"stage 1 | stage 2{who}", "font": {"size": 11, "color": "#444"}})
    return {"title": {"text": title}, "height": height, "margin": {"t": 60},
            "xaxis": whole_axis("epoch of the row's budget (two-stage rows: stage 1, then stage 2)"
                                if starts else "epoch", largest),
            "yaxis": {"title": {"text": metric_title(metric)}, "rangemode": "nonnegative" if unit_of(metric) == "%" else "normal"},
            "shapes": shapes, "annotations": notes}


def curve_traces(lines: list[dict]) -> list[dict]:
    """Plotly traces: each line's mean, with its ± std band (over seeds) as a filled area."""
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf"]
    traces = []
    for i, line in enumerate(lines):
        colour = palette[i % len(palette)]
        name = line["row"]
        if line["seeds"] > 1:
            traces.append({"x": line["epochs"] + line["epochs"][::-1], "y": line["high"] + line["low"][::-1],
                           "fill": "toself", "fillcolor": colour, "opacity": 0.15, "line": {"width": 0},
                           "hoverinfo": "skip", "showlegend": False, "legendgroup": name, "name": name + " ± std"})
        traces.append({"x": line["epochs"], "y": line["mean"], "name": name, "legendgroup": name,
                       "line": {"color": colour}, "mode": "lines+markers"})
    return traces


def seeds_traces(table) -> list[dict]:
    """Adaptive seeds: each row's seeds at every look of its table (one line per row, the baseline
    dashed), the decision taken at that look in the hover text."""
    traces = []
    for name in table.looks[0].seeds:
        xs = list(range(1, len(table.looks) + 1))
        ys = [look.seeds.get(name) for look in table.looks]
        texts = [("baseline" if name == table.baseline else
                  (look.comparisons[name].decision if name in look.comparisons else "")) for look in table.looks]
        traces.append({"x": xs, "y": ys, "text": texts, "name": name, "mode": "lines+markers",
                       "hovertemplate": "look %{x}: %{y} seeds, %{text}<extra>" + name + "</extra>",
                       "line": {"dash": "dash"} if name == table.baseline else {}})
    return traces


def joint_groups(layout: StudyLayout, members: list, variants: dict, metric: str) -> dict | None:
    """Pose studies on MPII's joints: the paper's per-joint table (Head, Shoulder, Elbow, Wrist, Hip,
    Knee, Ankle, Mean) of every row, the mean over its finished seeds. The groups are derived from
    each result's per-joint PCKh by the one rule of ``workers.metrics`` (a group with a joint never
    labeled is undefined), so results of every version are shown alike."""
    if not metric.startswith("pckh"):
        return None
    columns = [*MPII_GROUPS, "Mean"]
    rows = []
    by_row: dict[tuple, list] = {}
    for m in members:
        v = variants.get(m.variant_key)
        if m.ablation is not None and v is not None and v.status == "completed" and v.result:
            by_row.setdefault((m.ablation, m.row), []).append(v.result)
    for ab in layout.ablations:
        for r in ab.rows:
            results = by_row.get((ab.name, r.name), [])
            found: dict[str, list[float]] = {}
            for res in results:
                groups = named_joint_groups(res.get("per_joint") or {})
                mean = (res.get("metrics") or {}).get("pckh")
                for name, value in (*groups.items(), ("Mean", mean)):
                    if value is not None and math.isfinite(value):
                        found.setdefault(name, []).append(value)
            # a group shown only where every finished seed defines it
            values = {name: sum(v) / len(v) for name, v in found.items() if len(v) == len(results)}
            rows.append({"ablation": ab.name, "row": r.name, "values": values})
    if not any(r["values"] for r in rows):
        return None
    return {"columns": columns, "rows": rows}


def running(histories: dict, variants: list) -> list[dict]:
    """The running variants' progress: epochs recorded of their budget, the last metric
    (``histories``: their metrics as ``Store.metrics_of`` reads them)."""
    out = []
    for v in sorted(variants, key=lambda v: v.label):
        history = histories.get(v.key, {})
        done = max((e for pts in history.values() for e, _ in pts), default=0)
        metric = next((m for m in HEADLINE_METRICS if m in history), None)
        last = history[metric][-1][1] if metric else None
        out.append({"key": v.key, "label": v.label, "epoch": done, "epochs": v.config.get("epochs"),
                    "metric": metric, "last": last})
    return out


def compare(store, names: list[str], selected: list[str]) -> dict:
    """The compare page: the chosen studies' tables side by side, and the chosen rows
    ("STUDY/ABLATION/ROW") overlaid as curves with seed bands."""
    chosen, lines = [], []
    everything = [{"name": s.name, "checked": s.name in names} for s in store.studies() if s.kind == "study"]
    for name in names:
        st = _study(store, name, "study")
        members = store.members(st.id)
        variants = store.study_variants(st.id)
        layout = st.layout
        tables = build_tables(layout, members, variants)
        rows = [f"{name}/{t.name}/{r.name}" for t in tables for r in t.rows]
        chosen.append({"name": name, "tables": [table_data(t) for t in tables], "rows": rows,
                       "metric": layout.metric})
        histories = store.metrics_of([], [layout.metric], study_id=st.id)
        for c in row_curves(histories, layout, members, variants, layout.metric):
            for line in c["lines"]:
                ref = f"{name}/{c['ablation']}/{line['row']}"
                if ref in selected:
                    lines.append({**line, "row": ref})
    metrics = sorted({c["metric"] for c in chosen})
    return {"studies": everything, "chosen": chosen, "selected": selected, "traces": curve_traces(lines),
            "layout": curve_layout(lines, " / ".join(metrics) or "metric",
                                   "validation curves (mean ± std over seeds)", height=420)}


def per_joint(layout: StudyLayout, members: list, variants: dict) -> dict | None:
    """Pose studies: per-joint PCKh of every row (mean over finished seeds), in spec order."""
    rows, joints = [], []
    by_row: dict[tuple[str, str], list] = {}
    for m in members:
        if m.ablation is not None:
            by_row.setdefault((m.ablation, m.row), []).append(variants.get(m.variant_key))
    for ab in layout.ablations:
        for r in ab.rows:
            tables = [v.result["per_joint"] for v in by_row.get((ab.name, r.name), [])
                      if v is not None and v.status == "completed" and v.result and v.result.get("per_joint")]
            if not tables:
                rows.append({"ablation": ab.name, "row": r.name, "by_joint": {}})
                continue
            for j in tables[0]:
                if j not in joints:
                    joints.append(j)
            # a joint never labeled in a seed's validation set (None) has no value for the row
            rows.append({"ablation": ab.name, "row": r.name,
                         "by_joint": {j: sum(t[j] for t in tables) / len(tables) for j in tables[0]
                                      if all(t.get(j) is not None for t in tables)}})
    if not joints:
        return None
    return {"joints": joints, "rows": rows}


def _place(store, key: str, study_name: str):
    """(the study, {ablation, row, seed} of the variant in it, the baseline row's variant of the same
    seed) for a variant shown within a study."""
    s = store.study(study_name)
    if s is None:
        raise NotFound(f"no study named {study_name!r}")
    members = store.members(s.id)
    mine = next((m for m in members if m.variant_key == key), None)
    if mine is None or mine.ablation is None or s.kind != "study":
        return s, None, None
    ablation = s.layout.ablation(mine.ablation)
    base = next((m for m in members if ablation is not None and m.ablation == mine.ablation
                 and m.row == ablation.baseline and m.seed == mine.seed), None)
    baseline = store.variant(base.variant_key) if base is not None and base.variant_key != key else None
    return s, {"ablation": mine.ablation, "row": mine.row, "seed": mine.seed}, baseline


def _sources(store, v, flat: dict) -> list[dict]:
    """What the variant was initialized from and learned from; ``flat`` (its flattened config) gets
    those checkpoints named, as they are filled in only at execution."""
    found = []
    deps = store.variants(list(v.deps or ()))
    for role, dep in sources(v, deps):
        d = deps.get(dep)
        label = d.label if d else dep
        found.append({"role": "initialized from" if role == "init" else "teacher", "key": dep, "label": label,
                      "status": d.status if d else "?"})
        field = "init_from" if role == "init" else "distill.teacher"
        if flat.get(field) in (None, "None"):
            flat[field] = f"{'last' if field == 'init_from' else 'best'} checkpoint of {label} ({dep})"
    return found


def variant(store, key: str, study_name: str | None = None, mlflow_url: str | None = None) -> dict:
    """A variant page: config (and its diff against the baseline row's variant), curves, accounting,
    diagnostics, status and attempts, and its MLflow run."""
    v = store.variant(key)
    if v is None:
        raise NotFound(f"no variant {key!r}")
    s = baseline = place = experiment = None
    if study_name:
        s, place, baseline = _place(store, key, study_name)
        experiment = s.layout.mlflow_experiment_id
    mine_flat = flatten(v.config)
    found = _sources(store, v, mine_flat)
    diff = []
    if baseline is not None:
        base_flat = flatten(baseline.config)
        diff = [{"path": path, "baseline": base_flat.get(path), "value": mine_flat.get(path)}
                for path in sorted(set(mine_flat) | set(base_flat)) if mine_flat.get(path) != base_flat.get(path)]
    history = store.metrics(key)
    curves = {name: {"epochs": [e for e, _ in pts], "values": [x for _, x in pts]}
              for name, pts in history.items() if name in CURVES or name.startswith("lambda/")}
    result = v.result or {}
    report = reported_value = None
    if s is not None and s.kind == "study" and result:  # the study's reporting rule
        report = s.layout.report
        reported_value = reported(result, s.layout.metric or result.get("metric"), report)
    run = None if v.mlflow_run_id == CREATING else v.mlflow_run_id  # CREATING: a creation a killed driver began
    return {
        "key": v.key, "label": v.label, "kind": v.kind, "status": v.status, "error": v.error,
        "status_shown": v.shown,
        "study": study_name, "place": place, "baseline": None if baseline is None else
        {"key": baseline.key, "label": baseline.label},
        "config": mine_flat, "diff": diff, "curves": curves,
        # flip ratios are fractions: their axis starts at 0 (Plotly puts a flat 0 line at -1..1)
        "flip_range": [0, max([0.01] + [1.05 * x for x in curves.get("flip_ratio", {}).get("values", [])
                                        if isinstance(x, (int, float))])],
        "epoch_axis": whole_axis("epoch", max((e for c in curves.values() for e in c["epochs"]), default=1)),
        "metrics": result.get("metrics", {}), "best_metric": result.get("best_metric"),
        "best_epoch": result.get("best_epoch"), "metric": result.get("metric"),
        "accounting": result.get("accounting", {}), "per_joint": result.get("per_joint", {}),
        "latency": result.get("latency") or {},
        "timings": result.get("timings", {}), "epochs_done": result.get("epochs_done"),
        "predictions": bool(result.get("predictions_image")),
        "attempts": [{"number": a.number, "status": a.status, "node": a.node, "node_id": a.node_id, "error": a.error,
                      "started": _iso(a.started_at), "ended": _iso(a.ended_at)} for a in store.attempts(key)],
        "mlflow_run": run,
        "mlflow_link": f"{mlflow_url.rstrip('/')}/#/experiments/{experiment}/runs/{run}"
        if run and mlflow_url and experiment is not None else None,
        "deps": v.deps, "sources": found, "updated": _iso(v.updated_at),
        "report": report, "reported": reported_value,
    }


def parallel_traces(paths: list[str], trials: list[dict], metric: str, maximize: bool) -> dict:
    """Parallel coordinates drawn as SVG lines (Plotly's parcoords needs WebGL, which a headless or
    GPU-less browser lacks): each axis scaled to [0, 1] over the trials, one line per trial, the
    better the objective the darker the line; hover shows the real values."""
    axes = paths + [metric]
    columns = [[t["params"].get(p) for t in trials] for p in paths] + [[t["value"] for t in trials]]
    scaled = []
    for col in columns:
        nums = [float(x) for x in col if isinstance(x, (int, float))]
        lo, hi = (min(nums), max(nums)) if nums else (0.0, 1.0)
        scaled.append([(float(x) - lo) / (hi - lo) if isinstance(x, (int, float)) and hi > lo else 0.5 for x in col])
    values = [t["value"] for t in trials]
    order = sorted(range(len(trials)), key=lambda i: values[i], reverse=maximize)  # best first
    traces = []
    for rank, i in enumerate(order):
        shade = int(40 + 170 * rank / max(len(order) - 1, 1))
        traces.append({"x": list(range(len(axes))), "y": [col[i] for col in scaled], "mode": "lines+markers",
                       "name": f"trial {trials[i]['number']}", "line": {"color": f"rgb({shade},{shade},230)"},
                       "text": [f"{a} = {col[i]:.4g}" if isinstance(col[i], (int, float)) else f"{a} = {col[i]}"
                                for a, col in zip(axes, columns)], "hoverinfo": "text+name"})
    # long dotted paths broken at their dots, so that the axes' names do not run into each other
    labels = [a.replace(".", ".<br>") if len(a) > 14 else a for a in axes]
    return {"traces": traces, "axes": axes, "labels": labels}


def tuning(store, name: str, studies_by_arm: dict) -> dict:
    """A tuning page: per arm the trials, optimization history, importances and the best schedule."""
    from bnnctl.orchestrator.tuneresults import summarize
    from bnnctl.workers.config import from_dict, with_overrides
    from bnnctl.workers.schedules import LambdaSchedule, epoch_values
    from bnnctl.workers.train import TrainConfig

    s = _study(store, name, "tuning")
    layout = s.layout
    base_data = layout.data.get("base") or {}  # the tuning spec as written
    arms = []
    for arm in layout.arms:
        summary = summarize(studies_by_arm[arm.name])
        history, best_so_far, running_best = [], [], None
        maximize = layout.maximize
        for t in sorted(summary["trials"], key=lambda t: t["number"]):
            if t["state"] == "COMPLETE" and t["value"] is not None:
                if running_best is None or (t["value"] > running_best if maximize else t["value"] < running_best):
                    running_best = t["value"]
                history.append({"number": t["number"], "value": t["value"]})
            best_so_far.append({"number": t["number"], "best": running_best})
        schedule = None
        if summary["best"] is not None:  # the best lambda schedule as a curve (when one was searched)
            params = summary["best"]["params"]
            if any(p.startswith("lambda_schedule.") for p in params):
                base = from_dict(LambdaSchedule, base_data.get("lambda_schedule") or {})
                sched = with_overrides(base, {p.removeprefix("lambda_schedule."): v for p, v in params.items()
                                              if p.startswith("lambda_schedule.")})
                epochs = int(base_data.get("epochs", TrainConfig.__dataclass_fields__["epochs"].default))
                schedule = {"epochs": list(range(1, epochs + 1)), "best": epoch_values(sched, epochs),
                            "default": epoch_values(base, epochs)}  # the trainer's own rule (workers/schedules.py)
        complete = [t for t in summary["trials"] if t["state"] == "COMPLETE" and t["value"] is not None]
        paths = layout.param_paths
        logs = {p.path: p.log for p in layout.params}
        few = len(complete) < 4 * max(len(paths), 1)
        arms.append({"name": arm.name, "trials": summary["trials"], "best": summary["best"],
                     "default": summary["default"], "importances": summary["importances"],
                     "importance_note": (f"from {len(complete)} completed trials for {len(paths)} parameters: too "
                                         "few to rank them reliably (aim for 4 per parameter or more)") if few else None,
                     "intermediate": [{"x": list(t["intermediate"]), "y": list(t["intermediate"].values()),
                                       "name": f"trial {t['number']}" + (" (pruned)" if t["state"] == "PRUNED" else ""),
                                       # markers too: a trial pruned after one epoch is one point, no line
                                       "mode": "lines+markers", "line": {"dash": "dot" if t["state"] == "PRUNED" else "solid"}}
                                      for t in summary["trials"] if t["intermediate"]],
                     "parallel": parallel_traces(paths, complete, layout.metric, maximize) if len(complete) >= 2 else None,
                     "slices": [{"path": p, "log": logs.get(p, False),
                                 "x": [t["params"].get(p) for t in complete], "y": [t["value"] for t in complete],
                                 "text": [f"trial {t['number']}" for t in complete]} for p in paths],
                     "history": history, "best_so_far": best_so_far, "schedule": schedule,
                     "epochs": max([1] + [e for t in summary["trials"] for e in t["intermediate"]]),
                     "finished": sum(1 for t in summary["trials"] if t["state"] in ("COMPLETE", "PRUNED", "FAIL"))})
    return {"name": s.name, "status": s.status, "spec_file": s.spec_file, "description": layout.description,
            "metric": layout.metric, "direction": layout.direction, "value": layout.value,
            "trials": layout.trials, "sampler": layout.sampler, "pruner": layout.pruner,
            "params": [dataclasses.asdict(p) for p in layout.params], "arms": arms, "updated": _iso(s.updated_at)}
