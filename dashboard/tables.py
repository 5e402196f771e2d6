"""Ablation tables as pure functions: rows in spec order, the metric as mean ± std over seeds, the
difference to the ablation's baseline row with a paired test across the seeds both rows share
(differences that are not significant are marked "n.s."), the best row marked, the paper's value
beside it, and the accounting. Missing seeds and failed variants are shown as such, never as zeros."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

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
        return statistics.stdev(self.values) if len(self.values) > 1 else (0.0 if self.values else None)


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

    @property
    def significant(self) -> bool | None:
        """Whether the difference to the baseline is significant at ALPHA (None: cannot tell)."""
        return None if self.p_value is None else self.p_value < ALPHA


@dataclass(frozen=True)
class Table:
    name: str
    mode: str
    metric: str
    baseline: str
    rows: tuple[TableRow, ...]


def cell(results: list[dict | None], statuses: list[str], metric: str, expected: int,
         seeds: list[int] | None = None) -> Cell:
    seeds = list(range(len(results))) if seeds is None else seeds
    by_seed = tuple((seed, float(r["metrics"][metric])) for seed, r, s in zip(seeds, results, statuses)
                    if s == "completed" and r is not None and metric in r["metrics"])
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


def build_tables(layout: dict, members: list, variants: dict) -> list[Table]:
    """Tables of a study from its stored layout, its members and their variants (store snapshots)."""
    metric = layout["metric"]
    seeds = layout["seeds"]
    by_row: dict[tuple[str, str], list] = {}
    for m in members:
        if m.ablation is not None:
            by_row.setdefault((m.ablation, m.row), []).append(m)
    tables = []
    for ab in layout["ablations"]:
        rows = []
        cells = {}
        extra = {}
        for r in ab["rows"]:
            ms = sorted(by_row.get((ab["name"], r["name"]), []), key=lambda m: m.seed)
            vs = [variants.get(m.variant_key) for m in ms]
            results = [v.result if v else None for v in vs]
            statuses = [v.status if v else "pending" for v in vs]
            cells[r["name"]] = cell(results, statuses, metric, len(seeds), [m.seed for m in ms])
            acc = next((res["accounting"] for res in results if res), None)
            extra[r["name"]] = acc
        base = cells.get(ab["baseline"])
        means = [c.mean for c in cells.values() if c.mean is not None]
        top = max(means) if means else None
        for r in ab["rows"]:
            c = cells[r["name"]]
            delta = (c.mean - base.mean) if (c.mean is not None and base is not None and base.mean is not None) else None
            acc = extra[r["name"]] or {}
            is_base = r["name"] == ab["baseline"]
            p = None if is_base or base is None else paired_p_value(c, base)
            rows.append(TableRow(r["name"], c, delta, r.get("reference"), acc.get("params"), acc.get("bops"),
                                 acc.get("deployed_bytes"), is_base, p, c.mean is not None and c.mean == top))
        tables.append(Table(ab["name"], ab["mode"], metric, ab["baseline"], tuple(rows)))
    return tables


def format_value(c: Cell) -> str:
    if c.mean is None:
        return {"failed": "failed", "pending": "—"}.get(c.status, "—")
    text = f"{c.mean:.1f}" if c.std is None or len(c.values) < 2 else f"{c.mean:.1f} ± {c.std:.1f}"
    if c.status == "partial":
        text += f" ({len(c.values)}/{c.expected} seeds)"
    return text


def format_delta(row: TableRow) -> str:
    if row.is_baseline:
        return "baseline"
    if row.delta is None:
        return "—"
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


HEADERS = ("row", "metric", "Δ", "paper", "params", "BOPs", "deployed")


def table_cells(t: Table) -> list[list[str]]:
    out = []
    for r in t.rows:
        out.append([r.name, format_value(r.cell), format_delta(r),
                    "—" if r.reference is None else f"{r.reference:.1f}",
                    _millions(r.params), _giga(r.bops), _size(r.deployed_bytes)])
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
        parts.append("")
    return "\n".join(parts)


def to_csv(tables: list[Table]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["ablation", "mode", "row", "metric", "mean", "std", "seeds_done", "seeds_expected", "status",
                "delta", "p_value", "significant", "best", "paper", "params", "bops", "deployed_bytes"])
    for t in tables:
        for r in t.rows:
            c = r.cell
            w.writerow([t.name, t.mode, r.name, t.metric, "" if c.mean is None else f"{c.mean:.4f}",
                        "" if c.std is None else f"{c.std:.4f}", len(c.values), c.expected, c.status,
                        "" if r.delta is None else f"{r.delta:.4f}", "" if r.p_value is None else f"{r.p_value:.4g}",
                        "" if r.significant is None else int(r.significant), int(r.best),
                        "" if r.reference is None else r.reference,
                        r.params or "", r.bops or "", r.deployed_bytes or ""])
    return buf.getvalue()


def _latex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):
        s = s.replace(a, b)
    return s


def to_latex(tables: list[Table]) -> str:
    parts = []
    for t in tables:
        parts += [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{lrrrrrr}", r"\toprule",
                  " & ".join(["Method", _latex_escape(t.metric), r"$\Delta$", "Paper", "Params", "BOPs", "Size"]) + r" \\",
                  r"\midrule"]
        for r, row in zip(t.rows, table_cells(t)):
            cells = [_latex_escape(c).replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("—", "--") for c in row]
            if r.best:
                cells[1] = rf"\textbf{{{cells[1]}}}"
            parts.append(" & ".join(cells) + r" \\")
        parts += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_latex_escape(t.name)}}}", r"\end{table}", ""]
    return "\n".join(parts)

