"""Ablation-table logic as pure functions, and the exports parsed back."""
import csv
import io
from types import SimpleNamespace as NS

import pytest

from bnnctl.orchestrator.formats import format_delta, format_value, to_csv, to_latex, to_markdown
from bnnctl.orchestrator.report import Cell, build_tables, paired_p_value

LAYOUT = {"metric": "pckh", "seeds": [0, 1, 2], "ablations": [
    {"name": "T1", "mode": "incremental", "baseline": "base",
     "rows": [{"name": "base", "reference": 76.3}, {"name": "+ a", "reference": 78.1}, {"name": "+ b", "reference": None},
              {"name": "+ c", "reference": None}]},
    {"name": "T3", "mode": "isolated", "baseline": "alone", "rows": [{"name": "alone", "reference": 1.0}]}]}


def _variant(key, status, value=None, epochs=8, deps=(), kind="row", best=None, env=None, latency=None):
    result = None if value is None else {"metrics": {"pckh": value}, "accounting": {"params": 6_200_000, "bops": 8e9,
                                                                                     "deployed_bytes": 2**20}}
    if result is not None and latency is not None:
        result["latency"] = {"binary_ms": latency, "float_ms": 10.0, "machine": "CPU X (AVX2)", "quiet": True}
    if result is not None and best is not None:
        result["best_metrics"] = {"pckh": best}
    if result is not None and env is not None:
        result["environment"] = env
    return NS(key=key, status=status, result=result, config={"epochs": epochs}, deps=list(deps), kind=kind)


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
            # measured latencies of the T1 rows (seed 2 of "+ a" failed: not counted)
            ms = {("T1", "base"): (3.0, 3.2, 2.8), ("T1", "+ a"): (2.0, 2.2, 9.9)}.get((ab, row))
            variants[key] = _variant(key, status, value, latency=ms[seed] if ms else None)
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
            assert line.count("&") == 8
    # latency: the median over a row's completed seeds, its speed-up over float32, and the machine
    assert rows[0]["latency_ms"] == "3.0" and rows[1]["latency_ms"] == "2.1" and rows[0]["latency_float_ms"] == "10.0"
    assert rows[0]["latency_machine"] == "CPU X (AVX2)" and rows[2]["latency_ms"] == "" and rows[4]["latency_machine"] == ""
    assert "3 ms (3.3x)" in tex and "measured on CPU X (AVX2)" in tex
    md = to_markdown(tables)
    # + a is the best row (bold) and its +3.0 over 2 shared seeds is not significant
    assert "| + a | **75.0 ± 0.0 (2/3 seeds)** | +3.0 (n.s.) | 78.1 | 8 | 6.20M | 8.00G | 1.00 MiB | 2.1 ms (4.8x) |" in md
    assert "| + b | failed | — | — | 8 | — | — | — | — |" in md  # nothing measured for failed rows
    assert "| alone | **50.0 ± 0.0** | baseline | 1.0 | 8 | 6.20M | 8.00G | 1.00 MiB | — |" in md  # not measured
    assert md.split("### T3")[1].count("latency: the deployed model") == 0  # no machine to name
    # every export states the rule: which epoch, which test
    rule = "pckh at each run's last epoch; mean ± std over seeds; Δ vs base: paired t-test over shared seeds, α = 0.05"
    assert rule in md and rows[0]["report"] == "last" and rows[1]["test"] == "paired-t" and rows[0]["epochs"] == "8"
    assert r"\caption{T1. pckh at each run's last epoch" in tex and r"$\alpha$ = 0.05" in tex
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

    from bnnctl.orchestrator.formats import to_html

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


def _one_table(values: dict, layout_extra=None, **variant_kw):
    """A one-ablation table from {row: [(seed, value) ...]} (first row the baseline)."""
    rows = list(values)
    layout = {"metric": "pckh", "seeds": sorted({s for v in values.values() for s, _ in v}), "ablations": [
        {"name": "T", "mode": "isolated", "baseline": rows[0], "rows": [{"name": r} for r in rows]}],
        **(layout_extra or {})}
    members, variants = [], {}
    for row, vals in values.items():
        for seed, v in vals:
            key = f"{row}-{seed}"
            members.append(NS(variant_key=key, ablation="T", row=row, seed=seed))
            kw = {k: (w(row, seed) if callable(w) else w) for k, w in variant_kw.items()}
            variants[key] = _variant(key, "completed", v, **kw)
    return build_tables(layout, members, variants)[0], members, variants


def test_a_single_seed_shows_as_such_never_as_significant_or_with_a_spread():
    t, _, _ = _one_table({"base": [(0, 70.0)], "up": [(0, 80.0)]})
    base, up = t.rows
    assert base.cell.std is None and format_value(base.cell) == "70.0 (n=1)"
    assert up.significant is None and format_delta(up) == "+10.0 (n=1)"
    row = list(csv.DictReader(io.StringIO(to_csv([t]))))[1]
    assert row["std"] == "" and row["p_value"] == "" and row["significant"] == ""  # not 0.0000, not a claim


def test_holm_correction_adjusts_the_p_values_of_a_tables_rows():
    from bnnctl.orchestrator.report import holm

    assert holm([None, 0.01, 0.04, 0.03]) == [None, 0.03, 0.06, 0.06]  # 3*0.01, max(2*0.03, .03), max(1*0.04, .06)
    seeds = range(4)
    base = [(s, 70.0 + s) for s in seeds]
    values = {"base": base, "a": [(s, 72.1 + s + (0.3 if s % 2 else -0.3)) for s in seeds],
              "b": [(s, 71.0 + s + (0.5 if s % 2 else -0.5)) for s in seeds]}
    plain, _, _ = _one_table(values)
    corrected, _, _ = _one_table(values, {"correction": "holm"})
    for p_row, c_row in zip(plain.rows[1:], corrected.rows[1:]):
        assert c_row.p_value == p_row.p_value and c_row.p_adjusted >= p_row.p_value
    assert [r.significant for r in plain.rows[1:]] == [True, True]
    low, high = sorted(corrected.rows[1:], key=lambda r: r.p_value)
    assert low.p_adjusted == pytest.approx(min(1.0, 2 * low.p_value))
    assert high.p_adjusted == pytest.approx(max(high.p_value, low.p_adjusted))
    assert "Holm-corrected" in corrected.rule and "Holm" not in plain.rule


def test_the_reporting_rule_picks_the_last_or_the_best_epoch():
    values = {"base": [(0, 70.0), (1, 71.0)], "x": [(0, 60.0), (1, 61.0)]}
    best = lambda row, seed: {"base": 75.0, "x": 80.0}[row] + seed  # noqa: E731
    last, _, _ = _one_table(values, best=best)
    at_best, _, _ = _one_table(values, {"report": "best"}, best=best)
    assert [r.cell.mean for r in last.rows] == [70.5, 60.5]
    assert [r.cell.mean for r in at_best.rows] == [75.5, 80.5] and at_best.rows[1].delta == 5.0
    assert "best epoch" in at_best.rule and "last epoch" in last.rule


def test_budgets_count_every_stage_of_a_row():
    from bnnctl.orchestrator.report import budget

    variants = {"s1": _variant("s1", "completed", 1.0, epochs=4, kind="stage1"),
                "row": _variant("row", "completed", 2.0, epochs=4, deps=["s1", "teacher"]),
                "teacher": _variant("teacher", "completed", 3.0, epochs=8, kind="teacher"),
                "plain": _variant("plain", "completed", 2.0, epochs=8)}
    assert budget("row", variants) == 8 and budget("plain", variants) == 8  # the teacher's epochs are not the row's
    assert budget("missing", variants) is None


def test_rows_from_different_environments_are_flagged():
    env = lambda row, seed: {"torch": "2.13.0", "device": "cpu", "cpu_capability": "AVX512" if row == "x" else "AVX2",  # noqa: E731
                             "threads": 1}
    t, _, _ = _one_table({"base": [(0, 70.0), (1, 71.0)], "x": [(0, 60.0), (1, 61.0)]}, env=env)
    assert t.environments == ("torch 2.13.0, cpu, AVX2, 1 threads", "torch 2.13.0, cpu, AVX512, 1 threads")
    assert "WARNING: its rows trained in 2 different environments" in t.rule
    same, _, _ = _one_table({"base": [(0, 70.0)], "x": [(0, 60.0)]},
                            env={"torch": "2.13.0", "device": "cpu", "threads": 1})
    assert len(same.environments) == 1 and "WARNING" not in same.rule


def test_other_metrics_the_paper_gives_stand_beside_the_tables_metric():
    """IT Table 4 / MT Table 2 give top-1 and top-5: the table (and each export) shows both, each with
    the paper's value beside the measured mean ± std."""
    import json

    from bnnctl.orchestrator.formats import export, headers, table_cells

    layout = {"metric": "top1", "seeds": [0, 1], "ablations": [
        {"name": "IT Table 4", "mode": "isolated", "baseline": "XNOR-Net",
         "rows": [{"name": "XNOR-Net", "reference": 51.2, "also": {"top5": 73.2}},
                  {"name": "IT", "reference": 53.7, "also": {"top5": 76.8}}, {"name": "extra", "reference": None}]}]}
    members, variants = [], {}
    for row, values in (("XNOR-Net", [(50.0, 72.0), (52.0, 74.0)]), ("IT", [(54.0, 77.0), (55.0, 78.0)]),
                        ("extra", [(40.0, 60.0), (41.0, 61.0)])):
        for seed, (top1, top5) in enumerate(values):
            key = f"{row}-{seed}"
            members.append(NS(variant_key=key, ablation="IT Table 4", row=row, seed=seed))
            variants[key] = NS(key=key, status="completed", config={"epochs": 80}, deps=[], kind="row",
                               result={"metrics": {"top1": top1, "top5": top5}, "accounting": {}})
    (t,) = build_tables(layout, members, variants)
    assert t.also == ("top5",)
    assert headers(t)[:6] == ["row", "metric", "Δ", "paper", "top5", "top5 paper"]
    cells = table_cells(t)
    assert cells[0][4:6] == ["73.0 ± 1.4", "73.2"] and cells[1][4:6] == ["77.5 ± 0.7", "76.8"]
    assert cells[2][4:6] == ["60.5 ± 0.7", "—"]
    rows = list(csv.DictReader(io.StringIO(to_csv([t]))))
    assert [(r["top5_mean"], r["top5_paper"]) for r in rows] == [("73.0000", "73.2"), ("77.5000", "76.8"), ("60.5000", "")]
    assert "| top5 | top5 paper |" in to_markdown([t]) and r"\begin{tabular}{lrrrrrrrrrr}" in to_latex([t])
    data = json.loads(export([t], "json", "s"))["tables"][0]
    assert data["also"] == ["top5"] and data["rows"][1]["also"][0] == {"metric": "top5", "value": "77.5 ± 0.7",
                                                                       "mean": 77.5, "std": pytest.approx(0.7071, abs=1e-4),
                                                                       "reference": 76.8}
    html = export([t], "html", "s")
    assert html.count('class="paper also"') == 3 and "<th>top5 paper</th>" in html


def test_an_adaptive_table_shows_each_rows_decision_seeds_and_paired_difference():
    """Adaptive seeds: the rows have different numbers of seeds; Δ is the mean of the pairs the
    decision used (the baseline's extra seeds do not enter a row's Δ), and every export says the
    decision."""
    from bnnctl.orchestrator.formats import export, headers, table_cells

    layout = {"metric": "pckh", "seeds": list(range(7)), "correction": "holm",
              "adaptive": {"alpha": 0.05, "power": 0.8, "min_seeds": 5, "max_seeds": 7, "batch": 2, "margin": 0.5},
              "ablations": [{"name": "A", "mode": "isolated", "baseline": "base",
                             "rows": [{"name": "base"}, {"name": "big"}, {"name": "null"}]}]}
    base = [20.0, 22.0, 21.0, 23.0, 19.0, 30.0, 28.0]  # its last two seeds are high
    values = {"base": base, "big": [b + 30 + 0.1 * i for i, b in enumerate(base[:5])],
              "null": [b + (-1) ** i for i, b in enumerate(base)]}
    members, variants = [], {}
    for row, vals in values.items():
        for seed, v in enumerate(vals):
            key = f"{row}-{seed}"
            members.append(NS(variant_key=key, ablation="A", row=row, seed=seed))
            variants[key] = NS(key=key, status="completed", result={"metrics": {"pckh": v}, "accounting": {}},
                               config={"epochs": 4}, deps=[], kind="row")
    (t,) = build_tables(layout, members, variants)
    base_row, big, null = t.rows
    assert [len(r.cell.values) for r in t.rows] == [7, 5, 7] and big.cell.status == "done"
    assert big.decision == "better" and big.delta == pytest.approx(30.2)  # not 32.2 - 23.3: the pairs
    assert null.decision == "inconclusive" and null.delta == pytest.approx(1 / 7)
    assert [look.seeds for look in t.looks] == [{"big": 5, "null": 5, "base": 5}, {"big": 5, "null": 7, "base": 7}]
    assert headers(t)[3] == "decision" and table_cells(t)[1][3].startswith("better, 5 seeds, p ")
    rows = list(csv.DictReader(io.StringIO(to_csv([t]))))
    assert [r["decision"] for r in rows] == ["", "better", "inconclusive"] and rows[2]["interval_low"] != ""
    assert "adaptive seeds (5 to 7 per row" in to_markdown([t]) and "inconclusive, 7 seeds, [" in export([t], "html", "s")
