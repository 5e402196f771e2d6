"""A study's tables (:mod:`.report`'s model) as text and markup: the cells as the CLI, the dashboard and
the exports show them, and each export format (Markdown, CSV, LaTeX, standalone HTML, JSON). The
HTML is the dashboard's own table markup (``templates/``), so a downloaded table looks as it does
on the study page."""
from __future__ import annotations

import math
from pathlib import Path

from .layouts import split_name
from .report import ALPHA, Cell, Table, TableRow


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


def format_latency(ms: float | None, float_ms: float | None = None, spread: tuple | list | None = None,
                   quiet: bool | None = None) -> str:
    """"2.68 ms [2.61–2.75] (2.0x)": the binary model's latency (median), the lowest and highest of
    its rounds, and its speed-up over float32; "*" after the time when it was measured beside other
    work (``quiet`` False)."""
    if ms is None:
        return "—"

    def t(x: float) -> str:
        return f"{x:.3g}" if x < 100 else f"{x:.0f}"

    text = f"{t(ms)} ms" + ("*" if quiet is False else "")
    if spread and t(spread[0]) != t(spread[1]):
        text += f" [{t(spread[0])}–{t(spread[1])}]"
    return text + (f" ({float_ms / ms:.1f}x)" if float_ms and ms > 0 else "")


HEADERS = ("row", "metric", "Δ", "paper", "epochs", "params", "BOPs", "deployed", "latency")


def headers(t: Table) -> list[str]:
    """A table's column headers: HEADERS with, for adaptive seeds, the decision after Δ, and each of
    its other metrics (and the paper's value of it) after the paper column."""
    decision = ["decision"] if t.adaptive else []
    return [*HEADERS[:3], *decision, HEADERS[3], *(h for m in t.also for h in (m, f"{m} paper")), *HEADERS[4:]]


def format_decision(row: TableRow) -> str:
    """Adaptive seeds: "better, 6 seeds, p 0.003", "equivalent, 20 seeds, [-0.6, +0.4]", ...; the
    baseline: "baseline"."""
    if row.is_baseline:
        return "baseline"
    if row.decision is None:
        return "—"
    text = f"{row.decision}, {len(row.cell.values)} seeds"
    if row.decision in ("better", "worse") and row.p_adjusted is not None:
        return text + f", p {row.p_adjusted:.2g}"
    lo, hi = row.interval or (None, None)
    if lo is not None and hi is not None:
        text += f", [{lo:+.1f}, {hi:+.1f}]"
    return text


def _reference(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def table_cells(t: Table) -> list[list[str]]:
    """Each row's cells, in the order of :func:`headers`."""
    out = []
    for r in t.rows:
        also = [text for c, ref in r.also for text in (format_value(c), _reference(ref))]
        decision = [format_decision(r)] if t.adaptive else []
        out.append([r.name, format_value(r.cell), format_delta(r), *decision, _reference(r.reference), *also,
                    "—" if r.epochs is None else str(r.epochs),
                    _millions(r.params), _giga(r.bops), _size(r.deployed_bytes),
                    format_latency(r.latency_ms, r.latency_float_ms, r.latency_spread, r.latency_quiet)])
    return out


def to_markdown(tables: list[Table]) -> str:
    parts = []
    for t in tables:
        parts.append(f"### {t.name} ({t.mode}; {t.metric}, Δ vs {t.baseline})\n")
        parts.append("| " + " | ".join(headers(t)) + " |")
        parts.append("|" + "---|" * len(headers(t)))
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
    also = list(dict.fromkeys(m for t in tables for m in t.also))  # other metrics, a column group each
    w.writerow(["ablation", "mode", "row", "metric", "report", "mean", "std", "seeds_done", "seeds_expected",
                "status", "delta", "test", "alpha", "p_value", "p_adjusted", "significant", "best", "paper",
                "epochs", "params", "bops", "deployed_bytes", "environment", "latency_ms", "latency_float_ms",
                "latency_machine", "decision", "interval_low", "interval_high",
                *(f"{m}_{part}" for m in also for part in ("mean", "std", "paper"))])
    for t in tables:
        for r in t.rows:
            c = r.cell
            by_metric = dict(zip(t.also, r.also))
            lo, hi = r.interval or (None, None)
            extra = [r.decision or "", "" if lo is None else f"{lo:.4f}", "" if hi is None else f"{hi:.4f}"]
            for m in also:
                oc, ref = by_metric.get(m, (None, None))
                extra += ["" if oc is None or oc.mean is None else f"{oc.mean:.4f}",
                          "" if oc is None or oc.std is None else f"{oc.std:.4f}", "" if ref is None else ref]
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
                        " and ".join(t.latency_machines), *extra])
    return buf.getvalue()


def _latex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):
        s = s.replace(a, b)
    return s


_LATEX_HEADERS = {"row": "Method", "Δ": r"$\Delta$", "decision": "Decision", "paper": "Paper", "epochs": "Epochs",
                  "params": "Params", "deployed": "Size", "latency": "Latency"}


def to_latex(tables: list[Table]) -> str:
    parts = []
    for t in tables:
        names = [_LATEX_HEADERS.get(h, _latex_escape(h)) for h in headers(t)]
        names[1] = _latex_escape(t.metric)
        parts += [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{l{'r' * (len(names) - 1)}}}", r"\toprule",
                  " & ".join(names) + r" \\", r"\midrule"]
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
            "latency": format_latency(r.latency_ms, r.latency_float_ms, r.latency_spread, r.latency_quiet),
            "latency_spread": list(r.latency_spread) if r.latency_spread else None, "latency_quiet": r.latency_quiet,
            "also": [{"metric": m, "value": format_value(c), "mean": c.mean, "std": c.std, "reference": ref}
                     for m, (c, ref) in zip(t.also, r.also)],
            "decision": r.decision, "decision_text": format_decision(r), "interval": list(r.interval or ()) or None,
            "variants": sorted((cells or {}).get((t.name, r.name), []), key=lambda c: c["seed"]),
        })
    return {"name": t.name, "mode": t.mode, "metric": t.metric, "baseline": t.baseline, "rows": rows,
            "report": t.report, "alpha": t.alpha, "correction": t.correction, "rule": t.rule,
            "environments": list(t.environments), "latency_machines": list(t.latency_machines), "also": list(t.also),
            "adaptive": t.adaptive,
            "looks": [{"seeds": look.seeds, "decisions": {n: c.decision for n, c in look.comparisons.items()}}
                      for look in t.looks]}


def to_html(tables: list[Table], title: str) -> str:
    """A standalone HTML document of the ablation tables (``bnnctl study show --format html``, the
    study's MLflow run): the same table markup as the dashboard's study page, stylesheet inlined."""
    css = (TEMPLATES / "style.css").read_text()
    return jinja_env().get_template("export.html").render(
        title=title, css=css, tables=[table_data(t) for t in tables], alpha=ALPHA)


#: the formats a study's tables export to (the CLI's `study show --format`, the dashboard's downloads,
#: the study's MLflow run)
FORMATS = ("md", "csv", "latex", "html", "json")


def export(tables: list[Table], fmt: str, study: str, cells: dict | None = None) -> str:
    """``tables`` of ``study`` as one of FORMATS; ``cells`` (JSON): the variants behind each row
    (:func:`~.report.cell_variants`)."""
    if fmt == "html":
        return to_html(tables, f"{study} — ablation tables")
    if fmt == "json":
        import json

        return json.dumps({"study": study, "version": split_name(study)[1], "tables": [table_data(t, cells) for t in tables]}, indent=2, default=str)
    return {"md": to_markdown, "csv": to_csv, "latex": to_latex}[fmt](tables)
