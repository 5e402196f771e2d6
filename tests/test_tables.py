"""Ablation-table logic as pure functions, and the exports parsed back."""
import csv
import io
from types import SimpleNamespace as NS

import pytest

from bnnctl.dashboard.tables import (Cell, build_tables, format_delta, format_value, paired_p_value, to_csv, to_latex,
                                     to_markdown)

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
    # + a is the best row (bold) and its +3.0 over 2 shared seeds is not significant
    assert "| + a | **75.0 ± 0.0 (2/3 seeds)** | +3.0 (n.s.) | 78.1 | 6.20M | 8.00G | 1.00 MiB |" in md
    assert rows[1]["best"] == "1" and rows[1]["significant"] == "0" and float(rows[1]["p_value"]) > 0.05
    assert r"\textbf{75.0 $\pm$ 0.0 (2/3 seeds)}" in tex


def _cell(pairs):
    return Cell(tuple(v for _, v in pairs), 5, 0, "done", tuple(pairs))


def test_paired_test_across_shared_seeds():
    base = _cell([(0, 70.0), (1, 72.0), (2, 71.0), (3, 69.0), (4, 73.0)])
    clearly = _cell([(0, 75.1), (1, 76.9), (2, 76.2), (3, 73.8), (4, 78.0)])  # +5 +-0.2 on every seed
    noise = _cell([(0, 72.0), (1, 70.0), (2, 71.5), (3, 70.0), (4, 71.0)])
    assert paired_p_value(clearly, base) < 0.001
    assert paired_p_value(noise, base) > 0.5
    # only seeds both rows finished are paired; fewer than two: no verdict
    assert paired_p_value(_cell([(0, 80.0), (9, 90.0)]), base) is None
    assert paired_p_value(_cell([(0, 75.0), (1, 77.0)]), base) == 0.0  # the same +5 on both seeds
    assert paired_p_value(_cell([(0, 70.0), (1, 72.0)]), base) == 1.0  # identical


def test_significance_marks_and_best_row_in_the_table():
    layout = {"metric": "pckh", "seeds": [0, 1, 2, 3], "ablations": [
        {"name": "T", "mode": "isolated", "baseline": "base",
         "rows": [{"name": "base"}, {"name": "big"}, {"name": "tiny"}]}]}
    values = {"base": [70.0, 72.0, 71.0, 69.0], "big": [75.1, 76.9, 76.2, 73.8], "tiny": [70.5, 71.0, 71.8, 69.2]}
    members, variants = [], {}
    for row, vals in values.items():
        for seed, v in enumerate(vals):
            members.append(NS(variant_key=f"{row}{seed}", ablation="T", row=row, seed=seed))
            variants[f"{row}{seed}"] = _variant(f"{row}{seed}", "completed", v)
    (t,) = build_tables(layout, members, variants)
    base, big, tiny = t.rows
    assert base.p_value is None and base.significant is None and format_delta(base) == "baseline"
    assert big.significant is True and format_delta(big) == "+5.0"
    assert tiny.significant is False and format_delta(tiny) == "+0.1 (n.s.)"
    assert [r.best for r in t.rows] == [False, True, False]


def test_html_export_is_the_dashboards_table_markup():
    from html.parser import HTMLParser

    from bnnctl.dashboard.app import to_html

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.row, self.cell, self.classes = [], None, None, []

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.row = []
                self.classes.append(dict(attrs).get("class", ""))
            elif tag in ("td", "th") and self.row is not None:
                self.cell = ""

        def handle_endtag(self, tag):
            if tag in ("td", "th") and self.cell is not None:
                self.row.append(self.cell.strip())
                self.cell = None
            elif tag == "tr":
                self.rows.append(self.row)
                self.row = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

    tables = build_tables(LAYOUT, *_fixture())
    html = to_html(tables, "T — ablation tables")
    assert html.startswith("<!doctype html>") and "<style>" in html and "/static/" not in html  # standalone
    parser = Cells()
    parser.feed(html)
    body = [(r, c) for r, c in zip(parser.rows, parser.classes) if r and r[0] != "row"]
    assert [r[0] for r, _ in body] == ["base", "+ a best", "+ b", "+ c", "alone best"]
    a, a_class = body[1]
    assert a[1:4] == ["75.0 ± 0.0 (2/3 seeds)", "+3.0 (n.s.)", "78.1"] and "best" in a_class.split()
    assert body[2][0][1] == "failed" and body[3][0][1] == "—"  # never a zero
