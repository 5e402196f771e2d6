"""Ablation-table logic as pure functions, and the exports parsed back."""
import csv
import io
from types import SimpleNamespace as NS

import pytest

from bnnctl.dashboard.tables import build_tables, format_value, to_csv, to_latex, to_markdown

LAYOUT = {"metric": "pckh", "seeds": [0, 1, 2], "ablations": [
    {"name": "T1", "mode": "incremental", "baseline": "base",
     "rows": [{"name": "base", "reference": 76.3}, {"name": "+ a", "reference": 78.1}, {"name": "+ b", "reference": None},
              {"name": "+ c", "reference": None}]},
    {"name": "T3", "mode": "isolated", "baseline": "alone", "rows": [{"name": "alone", "reference": 1.0}]}]}


def _variant(key, status, value=None):
    result = None if value is None else {"metrics": {"pckh": value}, "accounting": {"params": 6_200_000, "bops": 8e9,
                                                                                     "deployed_bytes": 2**20}}
    return NS(key=key, status=status, result=result)


def _fixture():
    members, variants = [], {}
    data = {("T1", "base"): [("completed", 70.0), ("completed", 72.0), ("completed", 74.0)],
            ("T1", "+ a"): [("completed", 75.0), ("completed", 75.0), ("failed", None)],
            ("T1", "+ b"): [("failed", None)] * 3,
            ("T1", "+ c"): [("pending", None)] * 3,
            ("T3", "alone"): [("completed", 50.0)] * 3}
    for (ab, row), seeds in data.items():
        for seed, (status, value) in enumerate(seeds):
            key = f"{ab}-{row}-{seed}"
            members.append(NS(variant_key=key, ablation=ab, row=row, seed=seed))
            variants[key] = _variant(key, status, value)
    return members, variants


def test_mean_std_delta_and_states():
    t1, t3 = build_tables(LAYOUT, *_fixture())
    base, a, b, c = t1.rows
    assert [r.name for r in t1.rows] == ["base", "+ a", "+ b", "+ c"]  # spec order
    assert base.cell.mean == pytest.approx(72.0) and base.cell.std == pytest.approx(2.0) and base.is_baseline
    assert a.cell.mean == 75.0 and a.cell.status == "partial" and a.delta == pytest.approx(3.0)
    assert b.cell.status == "failed" and b.cell.mean is None and b.delta is None
    assert c.cell.status == "pending" and c.cell.mean is None
    assert format_value(base.cell) == "72.0 ± 2.0"
    assert format_value(a.cell) == "75.0 ± 0.0 (2/3 seeds)"
    assert format_value(b.cell) == "failed" and format_value(c.cell) == "—"  # never shown as 0
    assert t3.rows[0].delta == 0.0 and t3.rows[0].is_baseline


def test_csv_parses_back_and_latex_and_markdown_are_well_formed():
    tables = build_tables(LAYOUT, *_fixture())
    rows = list(csv.DictReader(io.StringIO(to_csv(tables))))
    assert len(rows) == 5
    assert rows[0]["row"] == "base" and float(rows[0]["mean"]) == pytest.approx(72.0) and rows[0]["paper"] == "76.3"
    assert rows[2]["status"] == "failed" and rows[2]["mean"] == ""
    tex = to_latex(tables)
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 2
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex and r"$\pm$" in tex
    for line in tex.splitlines():
        if line.endswith(r"\\"):
            assert line.count("&") == 6
    md = to_markdown(tables)
    assert "| + a | 75.0 ± 0.0 (2/3 seeds) | +3.0 | 78.1 | 6.20M | 8.00G | 1.00 MiB |" in md
