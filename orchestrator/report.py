"""Ablation tables as pure functions: rows in spec order, the metric as mean ± std over seeds (each
variant reporting its last epoch, or its best, by the study's one rule), the difference to the
ablation's baseline row with a two-sided paired t-test across the seeds both rows share (at the
study's alpha, optionally Holm-corrected over a table's rows; differences that are not significant
are marked "n.s.", a single seed is marked "n=1" and never tested), the row's training budget
(epochs over all its stages), the best row marked, the paper's value beside it, and the accounting.
Missing seeds and failed variants are shown as such, never as zeros. A table whose rows were
trained in different environments (versions, instruction sets, devices, threads) says so."""
from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass

from .layouts import StudyLayout
from .sequential import holm  # the tables' and the adaptive looks' one correction

#: Significance level of the paired test against the baseline row.
ALPHA = 0.05
#: the config values the tables read from a variant (its epochs, for the row's budget)
TABLE_CONFIG = ("epochs",)


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

    @functools.cached_property  # read several times per cell (table, export, page)
    def std(self) -> float | None:
        """The sample standard deviation; None with fewer than 2 values (n = 1 has no spread)."""
        return sample_std(self.values) if len(self.values) > 1 else None


def sample_std(values) -> float:
    """The sample standard deviation (n - 1), two passes in floats with exactly rounded sums
    (``statistics.stdev``'s rational arithmetic gives the same to the last bits, at ~10x the cost: most
    of a 10,000-variant study's page); 0 for fewer than two values."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = math.fsum(values) / n
    return math.sqrt(math.fsum((x - mean) ** 2 for x in values) / (n - 1))


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
    #: the table's other metrics (``Table.also``), in order: (measured cell, the paper's value)
    also: tuple[tuple[Cell, float | None], ...] = ()
    #: adaptive seeds: the comparison's decision (better, worse, equivalent, open, inconclusive) and
    #: the anytime-valid confidence sequence for the mean difference (None: unbounded)
    decision: str | None = None
    interval: tuple[float | None, float | None] | None = None
    #: the lowest and highest round medians behind ``latency_ms`` (None: not kept, older results)
    latency_spread: tuple[float, float] | None = None
    #: every seed's latency measured at the end of the study on a quiet worker (False: one was
    #: measured at the end of its training, beside other work; None: no latency)
    latency_quiet: bool | None = None

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
    #: other metrics shown beside the table's (those the paper gives for some row, e.g. top-5)
    also: tuple[str, ...] = ()
    #: adaptive seeds: the settings (alpha, margin, ...) and every look's seeds and decisions
    adaptive: dict | None = None
    looks: tuple = ()

    @property
    def rule(self) -> str:
        """The table's reporting rule and test, in words (printed under every table)."""
        which = "at each run's last epoch" if self.report == "last" else "at each run's best epoch (validation)"
        test = f"paired t-test over shared seeds, α = {self.alpha:g}"
        if self.adaptive:
            a = self.adaptive
            test = (f"adaptive seeds ({a['min_seeds']} to {a['max_seeds']} per row, {a['batch']} more after each "
                    f"look while open): anytime-valid paired safe t-test, α = {a['alpha']:g}; equivalent: its "
                    f"confidence sequence inside ±{a['margin']:g}")
        if self.correction == "holm":
            test += ", Holm-corrected over the table's rows"
        text = (f"{self.metric} {which}; mean ± std over seeds; Δ vs {self.baseline}: {test}; n=1: one seed, "
                "no test; epochs: the row's training budget over all its stages")
        if self.latency_machines:
            text += ("; latency: the deployed model on the CPU, batch 1, one thread, timed at the end of the "
                     "study on a quiet worker (no other variant on its node): the median of its rounds, in square "
                     "brackets the lowest and highest round, in brackets the speed-up over the same network in "
                     f"float32; measured on {' and '.join(self.latency_machines)}")
            if any(r.latency_quiet is False for r in self.rows):
                text += ("; * measured at the end of the variant's training, possibly beside other variants on "
                         "its node (the study did not reach its end: run it again to time it quietly)")
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


def latency(results: list[dict | None], statuses: list[str]) -> dict:
    """A row's latency: ``ms`` and ``float_ms`` (medians over its completed seeds that measured
    them), ``spread`` (the lowest and highest of their rounds' medians, None when not kept),
    ``quiet`` (every figure measured at the end of the study on a quiet worker; None: no figure)
    and the ``machines``."""
    found = [r["latency"] for r, st in zip(results, statuses)
             if st == "completed" and r and (r.get("latency") or {}).get("binary_ms") is not None]
    if not found:
        return {"ms": None, "float_ms": None, "spread": None, "quiet": None, "machines": set()}
    floats = [f["float_ms"] for f in found if f.get("float_ms") is not None]  # none for real-valued networks
    rounds = [x for f in found for x in (f.get("binary_rounds") or ())]
    return {"ms": statistics.median(f["binary_ms"] for f in found),
            "float_ms": statistics.median(floats) if floats else None,
            "spread": (min(rounds), max(rounds)) if rounds else None,
            "quiet": all(bool(f.get("quiet")) for f in found), "machines": {f.get("machine", "?") for f in found}}


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
    # scipy.stats.ttest_rel's statistic and two-sided p-value, from the t distribution's CDF
    # directly (ttest_rel's per-call overhead was most of a 1,000-row table's time)
    from scipy.special import stdtr

    n = len(diffs)
    mean = math.fsum(diffs) / n
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    p = float(2 * stdtr(n - 1, -abs(mean / (sd / math.sqrt(n)))))
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
        also = tuple(dict.fromkeys(m for r in ab.rows for m in r.also))  # other metrics the paper gives
        also_cells: dict[tuple[str, str], Cell] = {}
        values: dict[str, dict[int, float | None]] = {}  # adaptive seeds: the stored values, failed as None
        for r in ab.rows:
            ms = sorted(by_row.get((ab.name, r.name), []), key=lambda m: m.seed)
            vs = [variants.get(m.variant_key) for m in ms]
            results = [v.result if v else None for v in vs]
            statuses = [v.status if v else "pending" for v in vs]
            expected = len(ms) if layout.adaptive else len(seeds)  # adaptive: the seeds the row has now
            cells[r.name] = cell(results, statuses, metric, expected, [m.seed for m in ms], report)
            values[r.name] = {**{m.seed: None for m, st in zip(ms, statuses) if st == "failed"},
                              **dict(cells[r.name].by_seed)}
            for m in also:
                also_cells[(r.name, m)] = cell(results, statuses, m, expected, [mm.seed for mm in ms], report)
            extra[r.name] = next((res["accounting"] for res in results if res), None)
            budgets[r.name] = next((b for m in ms if (b := budget(m.variant_key, variants)) is not None), None)
            found = sorted({e for res, st in zip(results, statuses) if st == "completed" and (e := environment(res))})
            envs[r.name] = " | ".join(found) if found else None
            latencies[r.name] = latency(results, statuses)
            machines |= latencies[r.name]["machines"]
        base = cells.get(ab.baseline)
        means = [c.mean for c in cells.values() if c.mean is not None]
        top = max(means) if means else None
        ps = [None if n == ab.baseline or base is None else paired_p_value(cells[n], base) for n in ab.row_names]
        adjusted = holm(ps) if layout.correction == "holm" else ps
        looks, decided = _adaptive(layout, ab, values)
        if decided:  # the anytime-valid test's p-values replace the fixed-n t-test's
            ps = [decided[n].p_raw if n in decided else None for n in ab.row_names]
            adjusted = [decided[n].p_value if n in decided else None for n in ab.row_names]
        rows = []
        paired = looks[-1].diffs if looks else {}  # adaptive: Δ is the mean of the pairs the decision used
        for r, p, p_adj in zip(ab.rows, ps, adjusted):
            c = cells[r.name]
            acc = extra[r.name] or {}
            rows.append(TableRow(r.name, c, _delta(c, base, paired.get(r.name)), r.reference, acc.get("params"), acc.get("bops"),
                                 acc.get("deployed_bytes"), r.name == ab.baseline, p,
                                 c.mean is not None and c.mean == top, budgets[r.name], p_adj, layout.alpha,
                                 envs[r.name], latencies[r.name]["ms"], latencies[r.name]["float_ms"],
                                 tuple((also_cells[(r.name, m)], r.also.get(m)) for m in also),
                                 decided[r.name].decision if r.name in decided else None,
                                 (decided[r.name].low, decided[r.name].high) if r.name in decided else None,
                                 latencies[r.name]["spread"], latencies[r.name]["quiet"]))
        distinct = tuple(sorted({e for row in rows if row.environment for e in row.environment.split(" | ")}))
        tables.append(Table(ab.name, ab.mode, metric, ab.baseline, tuple(rows), report, layout.alpha,
                            layout.correction, distinct, tuple(sorted(machines)), also, layout.adaptive, tuple(looks)))
    return tables


def _delta(c: Cell, base: Cell | None, pairs: list[float] | None) -> float | None:
    """Δ to the baseline: the mean of the pairs an adaptive decision used, else the means' difference."""
    if pairs:
        return statistics.fmean(pairs)
    if c.mean is None or base is None or base.mean is None:
        return None
    return c.mean - base.mean


def _adaptive(layout: StudyLayout, ab, values: dict[str, dict[int, float | None]]) -> tuple[list, dict]:
    """Adaptive seeds: a table's looks and its last decisions, re-derived from the stored values
    (the driver's own rule, :func:`.sequential.replay`); ([], {}) for fixed seeds."""
    if not layout.adaptive:
        return [], {}
    import dataclasses

    from .sequential import Adaptive, Comparison, replay

    a = Adaptive(**{f.name: layout.adaptive[f.name] for f in dataclasses.fields(Adaptive) if f.name in layout.adaptive})
    rp = replay(ab.row_names, ab.baseline, values, list(layout.seeds), a, a.alpha or layout.alpha, layout.correction)
    if rp.looks:
        return rp.looks, rp.looks[-1].comparisons
    # before the first look is complete every comparison is open, untested
    return [], {n: Comparison(n, 0, "open", None, None, None, None) for n in ab.row_names if n != ab.baseline}


def study_tables(store, study) -> list[Table]:
    """A stored study's tables: its layout, membership and variants read from ``store``."""
    return study_report(store, study)[0]


def study_report(store, study) -> tuple[list[Table], dict[tuple[str, str], list[dict]]]:
    """A stored study's tables and the variants behind their cells (:func:`cell_variants`), from
    one read of its membership and variants."""
    members = store.members(study.id)  # the tables read a config's budget only (see `budget`)
    variants = store.study_variants(study.id, config=TABLE_CONFIG)
    return build_tables(study.layout, members, variants), cell_variants(members, variants)


def cell_variants(members, variants: dict) -> dict[tuple[str, str], list[dict]]:
    """(table, row) -> the variant behind each of its seeds: seed, key and state as shown (the
    dashboard's links, ``study show --json``)."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for m in members:
        if m.ablation is not None:
            v = variants.get(m.variant_key)
            cells.setdefault((m.ablation, m.row), []).append(
                {"seed": m.seed, "key": m.variant_key, "status": v.shown if v else "pending"})
    return cells


def sources(v, variants: dict) -> list[tuple[str | None, str]]:
    """(role, key) of each variant a stored variant depends on: "init" for the stage 1 or the
    pretrained run it was initialized from, "teacher" for the one it learned from, None for one not
    in ``variants``."""
    out = []
    for key in v.deps or ():
        d = variants.get(key)
        out.append((None if d is None else "init" if d.kind in ("stage1", "pretrain") else "teacher", key))
    return out
