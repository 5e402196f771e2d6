"""Ablation tables as pure functions: rows in spec order, the metric as mean ± std over seeds (each
variant reporting its last epoch, or its best, by the study's one rule), the difference to the
ablation's baseline row with a two-sided paired t-test across the seeds both rows share (at the
study's alpha, optionally Holm-corrected over a table's rows; differences that are not significant
are marked "n.s.", a single seed is marked "n=1" and never tested), the row's training budget
(epochs over all its stages), the best row marked, the paper's value beside it, and the accounting.
Missing seeds and failed variants are shown as such, never as zeros. A table whose rows were
trained in different environments (versions, instruction sets, devices, threads) says so."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from .layouts import StudyLayout

#: Significance level of the paired test against the baseline row.
ALPHA = 0.05


@dataclass(frozen=True)
class Cell:
    """One table row's measured values."""

    values: tuple[float, ...]  # one per finished seed
    expected: int  # seeds in the spec
    failed: int
    status: str  # "done", "partial", "failed", "pending"
    by_seed: tuple[tuple[int, float], ...] = ()  # (seed, value) of the finished seeds

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """The sample standard deviation; None with fewer than 2 values (n = 1 has no spread)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None


@dataclass(frozen=True)
class TableRow:
    name: str
    cell: Cell
    delta: float | None
    reference: float | None
    params: int | None
    bops: int | None
    deployed_bytes: int | None
    is_baseline: bool
    p_value: float | None = None  # paired test vs the baseline over shared seeds (None: < 2 shared)
    best: bool = False
    epochs: int | None = None  # the row's training budget: epochs over all its stages
    p_adjusted: float | None = None  # p_value after the table's correction (Holm), else p_value
    alpha: float = ALPHA
    environment: str | None = None  # a short fingerprint of where its seeds trained
    latency_ms: float | None = None  # the deployed binary model's CPU latency (median over seeds)
    latency_float_ms: float | None = None  # the same network in float32, same machine

    @property
    def significant(self) -> bool | None:
        """Whether the difference to the baseline is significant at alpha after the table's
        correction (None: cannot tell, fewer than 2 shared seeds)."""
        p = self.p_adjusted if self.p_adjusted is not None else self.p_value
        return None if p is None else p < self.alpha


@dataclass(frozen=True)
class Table:
    name: str
    mode: str
    metric: str
    baseline: str
    rows: tuple[TableRow, ...]
    report: str = "last"  # which epoch each variant reports: "last" or "best"
    alpha: float = ALPHA
    correction: str = "none"
    environments: tuple[str, ...] = ()  # the distinct environments its rows trained in
    latency_machines: tuple[str, ...] = ()  # where its latencies were measured

    @property
    def rule(self) -> str:
        """The table's reporting rule and test, in words (printed under every table)."""
        which = "at each run's last epoch" if self.report == "last" else "at each run's best epoch (validation)"
        test = f"paired t-test over shared seeds, α = {self.alpha:g}"
        if self.correction == "holm":
            test += ", Holm-corrected over the table's rows"
        text = (f"{self.metric} {which}; mean ± std over seeds; Δ vs {self.baseline}: {test}; n=1: one seed, "
                "no test; epochs: the row's training budget over all its stages")
        if self.latency_machines:
            text += (f"; latency: the deployed model on the CPU, batch 1, one thread, median (in brackets: "
                     f"speed-up over the same network in float32), measured on {' and '.join(self.latency_machines)}")
        if len(self.environments) > 1:
            text += (f". WARNING: its rows trained in {len(self.environments)} different environments "
                     f"({'; '.join(self.environments)}): numbers may differ for that reason alone")
        return text


def reported(result: dict, metric: str, report: str = "last") -> float | None:
    """A result's value of ``metric`` by the reporting rule: its last epoch's, or its best epoch's."""
    if report == "best":
        best = result.get("best_metrics") or {}
        if metric in best:
            return float(best[metric])
        if metric == result.get("metric") and result.get("best_metric") is not None:  # results before 0.3
            return float(result["best_metric"])
        return None
    value = result.get("metrics", {}).get(metric)
    return None if value is None else float(value)


def cell(results: list[dict | None], statuses: list[str], metric: str, expected: int,
         seeds: list[int] | None = None, report: str = "last") -> Cell:
    seeds = list(range(len(results))) if seeds is None else seeds
    by_seed = tuple((seed, v) for seed, r, s in zip(seeds, results, statuses)
                    if s == "completed" and r is not None and (v := reported(r, metric, report)) is not None)
    values = tuple(v for _, v in by_seed)
    failed = sum(1 for s in statuses if s == "failed")
    if len(values) == expected:
        status = "done"
    elif failed and not values:
        status = "failed"
    elif values or failed:
        status = "partial"
    else:
        status = "pending"
    return Cell(values, expected, failed, status, by_seed)


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (None stays None; the family is the tested rows)."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(tested)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def environment(result: dict | None) -> str | None:
    """A short fingerprint of where a result was trained (None for results that did not record it)."""
    env = (result or {}).get("environment")
    if not env:
        return None
    parts = [f"torch {env.get('torch')}", env.get("device", "?")]
    if env.get("cpu_capability"):
        parts.append(env["cpu_capability"])
    parts.append(f"{env.get('threads')} threads")
    if env.get("cuda"):
        parts.append(f"CUDA {env['cuda']}")
    return ", ".join(str(p) for p in parts)


def latency(results: list[dict | None], statuses: list[str]) -> tuple[float | None, float | None, set[str]]:
    """(binary ms, float ms) medians over a row's completed seeds that measured them, and the machines."""
    found = [r["latency"] for r, st in zip(results, statuses)
             if st == "completed" and r and (r.get("latency") or {}).get("binary_ms") is not None]
    if not found:
        return None, None, set()
    floats = [f["float_ms"] for f in found if f.get("float_ms") is not None]  # none for real-valued networks
    return (statistics.median(f["binary_ms"] for f in found), statistics.median(floats) if floats else None,
            {f.get("machine", "?") for f in found})


def budget(key: str, variants: dict) -> int | None:
    """Epochs a row's variant trained over all its stages (its own, plus its stage-1 chain)."""
    v = variants.get(key)
    if v is None:
        return None
    total = int(v.config.get("epochs", 0))
    for dep in v.deps or ():
        d = variants.get(dep)
        if d is not None and d.kind == "stage1":
            inner = budget(dep, variants)
            total += inner or 0
    return total


def paired_p_value(a: Cell, b: Cell) -> float | None:
    """Two-sided paired t-test of two rows over the seeds both finished; None with fewer than 2.

    Identical differences on every seed (zero variance) give p = 0 when they are not zero, else 1.
    """
    xa, xb = dict(a.by_seed), dict(b.by_seed)
    shared = sorted(set(xa) & set(xb))
    if len(shared) < 2:
        return None
    diffs = [xa[s] - xb[s] for s in shared]
    if max(diffs) - min(diffs) < 1e-12:
        return 0.0 if abs(diffs[0]) > 1e-12 else 1.0
    from scipy import stats

    p = float(stats.ttest_rel([xa[s] for s in shared], [xb[s] for s in shared]).pvalue)
    return p if math.isfinite(p) else None


def build_tables(layout: StudyLayout | dict, members: list, variants: dict) -> list[Table]:
    """Tables of a study from its stored layout (typed, or its stored data), its members and their
    variants (store snapshots)."""
    if not isinstance(layout, StudyLayout):
        layout = StudyLayout.from_dict(layout)
    metric, seeds, report = layout.metric, layout.seeds, layout.report
    by_row: dict[tuple[str, str], list] = {}
    for m in members:
        if m.ablation is not None:
            by_row.setdefault((m.ablation, m.row), []).append(m)
    tables = []
    for ab in layout.ablations:
        cells, extra, budgets, envs, latencies, machines = {}, {}, {}, {}, {}, set()
        for r in ab.rows:
            ms = sorted(by_row.get((ab.name, r.name), []), key=lambda m: m.seed)
            vs = [variants.get(m.variant_key) for m in ms]
            results = [v.result if v else None for v in vs]
            statuses = [v.status if v else "pending" for v in vs]
            cells[r.name] = cell(results, statuses, metric, len(seeds), [m.seed for m in ms], report)
            extra[r.name] = next((res["accounting"] for res in results if res), None)
            budgets[r.name] = next((b for m in ms if (b := budget(m.variant_key, variants)) is not None), None)
            found = sorted({e for res, st in zip(results, statuses) if st == "completed" and (e := environment(res))})
            envs[r.name] = " | ".join(found) if found else None
            *latencies[r.name], where = latency(results, statuses)
            machines |= where
        base = cells.get(ab.baseline)
        means = [c.mean for c in cells.values() if c.mean is not None]
        top = max(means) if means else None
        ps = [None if n == ab.baseline or base is None else paired_p_value(cells[n], base) for n in ab.row_names]
        adjusted = holm(ps) if layout.correction == "holm" else ps
        rows = []
        for r, p, p_adj in zip(ab.rows, ps, adjusted):
            c = cells[r.name]
            delta = (c.mean - base.mean) if (c.mean is not None and base is not None and base.mean is not None) else None
            acc = extra[r.name] or {}
            rows.append(TableRow(r.name, c, delta, r.reference, acc.get("params"), acc.get("bops"),
                                 acc.get("deployed_bytes"), r.name == ab.baseline, p,
                                 c.mean is not None and c.mean == top, budgets[r.name], p_adj, layout.alpha,
                                 envs[r.name], *latencies[r.name]))
        distinct = tuple(sorted({e for row in rows if row.environment for e in row.environment.split(" | ")}))
        tables.append(Table(ab.name, ab.mode, metric, ab.baseline, tuple(rows), report, layout.alpha,
                            layout.correction, distinct, tuple(sorted(machines))))
    return tables


def format_value(c: Cell) -> str:
    if c.mean is None:
        return {"failed": "failed", "pending": "—"}.get(c.status, "—")
    text = f"{c.mean:.1f} (n=1)" if c.std is None else f"{c.mean:.1f} ± {c.std:.1f}"
    if c.status == "partial":
        text += f" ({len(c.values)}/{c.expected} seeds)"
    return text


def format_delta(row: TableRow) -> str:
    if row.is_baseline:
        return "baseline"
    if row.delta is None:
        return "—"
    if row.significant is None:  # fewer than 2 seeds shared with the baseline: no claim either way
        return f"{row.delta:+.1f} (n=1)"
    return f"{row.delta:+.1f}" + (" (n.s.)" if row.significant is False else "")


def format_number(value: object, digits: int = 4) -> str:
    """A value for a table cell: floats to ``digits`` significant digits, None and non-finite as —."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def _millions(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _giga(n: float | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e9:.2f}G" if n >= 1e8 else f"{n / 1e6:.1f}M"


def _size(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 2**20:.2f} MiB" if n >= 2**17 else f"{n / 2**10:.1f} KiB"


def format_latency(ms: float | None, float_ms: float | None = None) -> str:
    """"2.68 ms (2.0x)": the binary model's latency and its speed-up over float32."""
    if ms is None:
        return "—"
    text = f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"
    return text + (f" ({float_ms / ms:.1f}x)" if float_ms and ms > 0 else "")


HEADERS = ("row", "metric", "Δ", "paper", "epochs", "params", "BOPs", "deployed", "latency")


def table_cells(t: Table) -> list[list[str]]:
    out = []
    for r in t.rows:
        out.append([r.name, format_value(r.cell), format_delta(r),
                    "—" if r.reference is None else f"{r.reference:.1f}", "—" if r.epochs is None else str(r.epochs),
                    _millions(r.params), _giga(r.bops), _size(r.deployed_bytes),
                    format_latency(r.latency_ms, r.latency_float_ms)])
    return out


def to_markdown(tables: list[Table]) -> str:
    parts = []
    for t in tables:
        parts.append(f"### {t.name} ({t.mode}; {t.metric}, Δ vs {t.baseline})\n")
        parts.append("| " + " | ".join(HEADERS) + " |")
        parts.append("|" + "---|" * len(HEADERS))
        for r, row in zip(t.rows, table_cells(t)):
            if r.best:
                row[1] = f"**{row[1]}**"
            parts.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
        parts.append(f"\n{t.rule}.\n")
    return "\n".join(parts)


def to_csv(tables: list[Table]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["ablation", "mode", "row", "metric", "report", "mean", "std", "seeds_done", "seeds_expected",
                "status", "delta", "test", "alpha", "p_value", "p_adjusted", "significant", "best", "paper",
                "epochs", "params", "bops", "deployed_bytes", "environment", "latency_ms", "latency_float_ms",
                "latency_machine"])
    for t in tables:
        for r in t.rows:
            c = r.cell
            w.writerow([t.name, t.mode, r.name, t.metric, t.report, "" if c.mean is None else f"{c.mean:.4f}",
                        "" if c.std is None else f"{c.std:.4f}", len(c.values), c.expected, c.status,
                        "" if r.delta is None else f"{r.delta:.4f}",
                        "" if r.is_baseline else "paired-t" + ("+holm" if t.correction == "holm" else ""), t.alpha,
                        "" if r.p_value is None else f"{r.p_value:.4g}",
                        "" if r.p_adjusted is None else f"{r.p_adjusted:.4g}",
                        "" if r.significant is None else int(r.significant), int(r.best),
                        "" if r.reference is None else r.reference, "" if r.epochs is None else r.epochs,
                        r.params or "", r.bops or "", r.deployed_bytes or "", r.environment or "",
                        "" if r.latency_ms is None else r.latency_ms,
                        "" if r.latency_float_ms is None else r.latency_float_ms,
                        " and ".join(t.latency_machines)])
    return buf.getvalue()


def _latex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):
        s = s.replace(a, b)
    return s


def to_latex(tables: list[Table]) -> str:
    parts = []
    for t in tables:
        parts += [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{lrrrrrrrr}", r"\toprule",
                  " & ".join(["Method", _latex_escape(t.metric), r"$\Delta$", "Paper", "Epochs", "Params", "BOPs",
                              "Size", "Latency"]) + r" \\",
                  r"\midrule"]
        for r, row in zip(t.rows, table_cells(t)):
            cells = [_latex_escape(c).replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("—", "--") for c in row]
            if r.best:
                cells[1] = rf"\textbf{{{cells[1]}}}"
            parts.append(" & ".join(cells) + r" \\")
        caption = _latex_escape(f"{t.name}. {t.rule}.")
        for a, b in (("α", r"$\alpha$"), ("Δ", r"$\Delta$"), ("±", r"$\pm$")):
            caption = caption.replace(a, b)
        parts += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{caption}}}", r"\end{table}", ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------- HTML (the dashboard's markup)

TEMPLATES = Path(__file__).resolve().parent / "templates"


def jinja_env(*folders: Path):
    """A Jinja environment over ``folders`` then the report templates, with the table filters."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader([*map(str, folders), str(TEMPLATES)]),
                      autoescape=select_autoescape(["html"]))
    env.filters.update(fmt=format_number, millions=_millions, mib=_size, giga=_giga)
    return env


def table_data(t: Table, cells: dict | None = None) -> dict:
    """A table as plain data (the dashboard's JSON and the HTML template's input); ``cells``:
    (ablation, row) -> the variants behind each seed, for links."""
    rows = []
    for r in t.rows:
        rows.append({
            "name": r.name, "value": format_value(r.cell), "mean": r.cell.mean, "std": r.cell.std,
            "status": r.cell.status, "seeds_done": len(r.cell.values), "seeds": r.cell.expected,
            "delta": format_delta(r), "delta_value": r.delta, "p_value": r.p_value, "significant": r.significant,
            "reference": r.reference, "params": r.params, "bops": r.bops, "deployed_bytes": r.deployed_bytes,
            "baseline": r.is_baseline, "best": r.best, "epochs": r.epochs, "p_adjusted": r.p_adjusted,
            "environment": r.environment, "latency_ms": r.latency_ms, "latency_float_ms": r.latency_float_ms,
            "latency": format_latency(r.latency_ms, r.latency_float_ms),
            "variants": sorted((cells or {}).get((t.name, r.name), []), key=lambda c: c["seed"]),
        })
    return {"name": t.name, "mode": t.mode, "metric": t.metric, "baseline": t.baseline, "rows": rows,
            "report": t.report, "alpha": t.alpha, "correction": t.correction, "rule": t.rule,
            "environments": list(t.environments), "latency_machines": list(t.latency_machines)}


def to_html(tables: list[Table], title: str) -> str:
    """A standalone HTML document of the ablation tables (``bnnctl study show --format html``, the
    study's MLflow run): the same table markup as the dashboard's study page, stylesheet inlined."""
    css = (TEMPLATES / "style.css").read_text()
    return jinja_env().get_template("export.html").render(
        title=title, css=css, tables=[table_data(t) for t in tables], alpha=ALPHA)


def study_tables(store, study) -> list[Table]:
    """A stored study's tables: its layout, membership and variants read from ``store``."""
    members = store.members(study.id)
    return build_tables(study.layout, members, store.variants(sorted({m.variant_key for m in members})))


#: the formats a study's tables export to (the CLI's `study show --format`, the dashboard's downloads,
#: the study's MLflow run)
FORMATS = ("md", "csv", "latex", "html", "json")


def export(tables: list[Table], fmt: str, study: str) -> str:
    """``tables`` of ``study`` as one of FORMATS."""
    if fmt == "html":
        return to_html(tables, f"{study} — ablation tables")
    if fmt == "json":
        import json

        return json.dumps({"study": study, "tables": [table_data(t) for t in tables]}, indent=2, default=str)
    return {"md": to_markdown, "csv": to_csv, "latex": to_latex}[fmt](tables)


def sources(v, variants: dict) -> list[tuple[str | None, str]]:
    """(role, key) of each variant a stored variant depends on: "init" for the stage 1 it was
    initialized from, "teacher" for the one it learned from, None for one not in ``variants``."""
    out = []
    for key in v.deps or ():
        d = variants.get(key)
        out.append((None if d is None else "init" if d.kind == "stage1" else "teacher", key))
    return out
