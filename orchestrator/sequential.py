"""Adaptive seeds: anytime-valid sequential comparisons of a table's rows with its baseline.

A row's comparison is paired over the seeds both rows finished: the differences d_s = row_s -
baseline_s (seed by seed) are taken as independent draws of N(mu, sigma^2), mu and sigma unknown.
After each batch of seeds every row is classified:

- **better** / **worse**: the test of mu = 0 rejects, after the table's multiple-comparison
  correction (Holm over its rows, as the fixed-seed tables);
- **equivalent**: the confidence sequence for mu lies inside (-margin, margin) (an anytime-valid
  TOST: each one-sided test at the same level);
- **open**: neither; the row gets ``batch`` more seeds (and its baseline with it), up to
  ``max_seeds``, where it ends **inconclusive**.

Looking after every batch, and stopping a row as soon as it is resolved, would inflate the error of a
fixed-n t-test. The test here is valid at every look at once. It is the *safe t-test*: the Bayes
factor of the t-statistic with a normal prior on the standardized effect delta = mu / sigma
(variance g) and the right-Haar prior on sigma,

    BF_n(t) = (1 + n g)^(-1/2) * [(1 + t^2/nu) / (1 + t^2 / (nu (1 + n g)))]^((nu + 1) / 2),  nu = n - 1,

(Gönen, Johnson, Lu & Westfall 2005, one-sample form) is a nonnegative martingale with mean 1 under
mu = 0 (Pérez-Ortiz, Lardy, de Heide & Grünwald 2024, "E-statistics, group invariance and anytime
valid testing", Annals of Statistics), so by Ville's inequality P(sup_n BF_n >= 1/alpha) <= alpha:
however the looks fall and whenever a row stops, a null row is called better or worse with
probability at most alpha. We use an equal-weight mixture over g in G_GRID (small to very large
standardized effects; a mixture of test martingales is one), and the running minimum of 1/BF over
the looks as an anytime-valid p-value, which Holm's step-down combines across rows. Inverting the
same test at every mu0 gives the confidence sequence used for equivalence (valid uniformly over
time; at the table's corrected level, Bonferroni over its rows under ``correction: holm``).

Decisions are a pure function of the stored per-seed values: :func:`replay` re-derives every look of
a study from its results, so a killed driver's successor makes the same decisions, and a study whose
results are all stored trains nothing.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Iterable


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


#: Prior variances of the standardized effect mixed (equal weights) in the test: effects from a
#: quarter of the seed-to-seed spread to 16 times it.
G_GRID = (0.25, 1.0, 4.0, 16.0, 64.0, 256.0)
DECISIONS = ("better", "worse", "equivalent", "open", "inconclusive")


@dataclass(frozen=True)
class Adaptive:
    """``statistics.adaptive`` of a study spec.

    Attributes:
        alpha: error rate of every decision (default: the spec's ``statistics.alpha``).
        power: the probability a forecast of an open row's seeds aims at (``study plan`` / ``status``).
        min_seeds, max_seeds: seeds every row gets first, and at most.
        batch: seeds added to each open row after a look.
        margin: equivalence margin, in the table's metric's units (e.g. PCKh points).
    """

    alpha: float | None = None
    power: float = 0.8
    min_seeds: int = 3
    max_seeds: int = 20
    batch: int = 2
    margin: float = 1.0


def _log_bf(t: float, n: int, g: float) -> float:
    nu = n - 1
    a = 1.0 + n * g
    return -0.5 * math.log(a) + 0.5 * (nu + 1) * (math.log1p(t * t / nu) - math.log1p(t * t / (nu * a)))


def e_value(t: float, n: int) -> float:
    """The mixture Bayes factor of a t-statistic over n >= 2 paired differences (inf for |t| = inf)."""
    if math.isinf(t):
        return math.inf
    logs = [_log_bf(t, n, g) for g in G_GRID]
    top = max(logs)
    return math.exp(top) * sum(math.exp(v - top) for v in logs) / len(logs)


def _flat(mean: float, sd: float) -> bool:
    return sd <= 1e-12 * max(1.0, abs(mean))


def _prefixes(diffs: list[float]) -> Iterable[tuple[int, float, float]]:
    """(n, mean, sample sd) of every prefix of two or more differences (running sums), but a prefix
    whose differences are all equal only when every difference is.

    The test takes the differences as "independent draws of N(mu, sigma^2)" (above), under which
    two equal differences have probability zero and a t-statistic without spread is infinite
    evidence. A measured metric is discrete (a top-1 of 100 images moves in steps of 1 %), so two
    seeds can tie by chance: a tied prefix followed by differences that spread is resolution, not
    certainty, and is left out (it would reject mu = 0 at p = 0, and pin the confidence sequence to
    one point). Differences that are all equal at the look (rows that compute the same function,
    or a shift by exactly the same amount at every seed) are taken as they are."""
    n_all = len(diffs)
    mean_all = sum(diffs) / n_all if n_all else 0.0
    spread = n_all >= 2 and not _flat(mean_all, math.sqrt(sum((v - mean_all) ** 2 for v in diffs) / (n_all - 1)))
    total = square = 0.0
    for i, v in enumerate(diffs, start=1):
        total += v
        square += v * v
        if i >= 2:
            mean = total / i
            sd = math.sqrt(max(square - i * mean * mean, 0.0) / (i - 1))
            if not (spread and _flat(mean, sd)):
                yield i, mean, sd


def _t(n: int, mean: float, sd: float, mu0: float = 0.0) -> float:
    if _flat(mean, sd):  # identical differences: no spread to scale by
        return 0.0 if abs(mean - mu0) <= 1e-12 else math.copysign(math.inf, mean - mu0)
    return (mean - mu0) / (sd / math.sqrt(n))


def p_value(diffs: list[float]) -> float | None:
    """Anytime-valid p-value of mu = 0 from the differences in seed order: the running minimum of
    1 / BF over every prefix of two or more (None with fewer than 2)."""
    if len(diffs) < 2:
        return None
    return min(1.0, min((1.0 / e_value(_t(n, mean, sd), n) for n, mean, sd in _prefixes(diffs)), default=1.0))


@functools.lru_cache(maxsize=4096)
def _radius(n: int, alpha: float) -> float:
    """The |t| at which the mixture Bayes factor reaches 1/alpha (inf if it never does at this n)."""
    hi = 1.0
    while e_value(hi, n) < 1.0 / alpha:
        hi *= 2
        if hi > 1e12:
            return math.inf
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if e_value(mid, n) < 1.0 / alpha else (lo, mid)
    return hi


def interval(diffs: list[float], alpha: float) -> tuple[float, float]:
    """The anytime-valid (1 - alpha) confidence sequence for mu at the last look: the intersection
    of the intervals of every prefix of two or more ((-inf, inf) with fewer than 2)."""
    lo, hi = -math.inf, math.inf
    for n, mean, sd in _prefixes(diffs):
        r = _radius(n, alpha) * sd / math.sqrt(n)
        lo, hi = max(lo, mean - r), min(hi, mean + r)
    return lo, hi


@dataclass(frozen=True)
class Comparison:
    """One row's comparison with its baseline at a look."""

    row: str
    seeds: int  # pairs of finished seeds compared
    decision: str  # one of DECISIONS
    p_value: float | None  # anytime-valid, after the table's correction
    p_raw: float | None  # anytime-valid, before it
    low: float | None  # the confidence sequence for the mean difference (None: unbounded)
    high: float | None


def _holm(ps: list[float | None]) -> list[float | None]:

    return holm(ps)


def compare(diffs: dict[str, list[float]], cfg: Adaptive, alpha: float, correction: str,
            allotted: dict[str, int]) -> dict[str, Comparison]:
    """Classify every row of one table from its paired differences (seed order); ``allotted``: the
    seeds each row has (a row at ``max_seeds`` that is still open is inconclusive)."""
    names = list(diffs)
    raw = [p_value(diffs[r]) for r in names]
    adjusted = _holm(raw) if correction == "holm" else raw
    level = alpha / max(len(names), 1) if correction == "holm" else alpha
    out = {}
    for name, p, p0 in zip(names, adjusted, raw):
        d = diffs[name]
        lo, hi = interval(d, level)
        mean = sum(d) / len(d) if d else 0.0
        if p is not None and p <= alpha:
            decision = "better" if mean > 0 else "worse"
        elif -cfg.margin < lo and hi < cfg.margin:
            decision = "equivalent"
        elif allotted.get(name, 0) >= cfg.max_seeds:
            decision = "inconclusive"
        else:
            decision = "open"
        out[name] = Comparison(name, len(d), decision, p, p0, None if math.isinf(lo) else lo,
                               None if math.isinf(hi) else hi)
    return out


@dataclass(frozen=True)
class Look:
    """One look at a table: the seeds each row had and the decisions taken on them."""

    seeds: dict[str, int]
    comparisons: dict[str, Comparison]
    diffs: dict[str, list[float]] = field(default_factory=dict)  # each row's paired differences, seed order


@dataclass(frozen=True)
class Replay:
    """A table's looks re-derived from stored values, and the seeds each row needs now."""

    looks: list[Look] = field(default_factory=list)
    needed: dict[str, int] = field(default_factory=dict)  # row -> seeds (the baseline's: the most any row needs)
    complete: bool = True  # every needed value is stored (False: seeds to train first)


def replay(rows: Iterable[str], baseline: str, values: dict[str, dict[int, float | None]], seeds: list[int],
           cfg: Adaptive, alpha: float, correction: str) -> Replay:
    """The looks of one table from its stored per-seed values (``values[row][seed]``; None for a
    seed that ended without a value, e.g. failed), in the order the driver takes them: every row
    starts with ``min_seeds``; once every value of a look is in, its open rows get ``batch`` more
    seeds (up to ``max_seeds``) and the next look follows. ``seeds``: the study's seed sequence (at
    least ``max_seeds`` long). Pure: the same values give the same looks and decisions, whichever
    driver computes them."""
    rows = [r for r in rows if r != baseline]
    n = {r: min(cfg.min_seeds, cfg.max_seeds) for r in rows}
    looks: list[Look] = []
    while True:
        base_n = max(n.values(), default=cfg.min_seeds)
        needed = {**n, baseline: base_n}
        missing = any(s not in values.get(r, {}) for r, k in needed.items() for s in seeds[:k])
        if missing:
            return Replay(looks, needed, False)
        diffs = {r: [values[r][s] - values[baseline][s] for s in seeds[:n[r]]
                     if values[r][s] is not None and values[baseline][s] is not None] for r in rows}
        comparisons = compare(diffs, cfg, alpha, correction, n)
        looks.append(Look(dict(needed), comparisons, diffs))
        grow = {r for r, c in comparisons.items() if c.decision == "open"}
        if not grow:
            return Replay(looks, needed, True)
        for r in grow:
            n[r] = min(n[r] + cfg.batch, cfg.max_seeds)


def seed_sequence(spec_seeds: tuple[int, ...], count: int) -> list[int]:
    """The study's seeds in order: the spec's, then the smallest unused integers, ``count`` in all."""
    out = list(spec_seeds)
    candidate = 0
    while len(out) < count:
        if candidate not in out:
            out.append(candidate)
        candidate += 1
    return out[:max(count, len(spec_seeds))]


def forecast(diffs: list[float], cfg: Adaptive, alpha: float, runs: int = 200) -> int | None:
    """How many seeds an open row needs: the seeds by which a row whose further differences are
    like its observed ones (their mean and spread, drawn as normal) is resolved with probability
    ``cfg.power``, simulated ``runs`` times from a fixed seed and looked at as the driver does;
    ``alpha``: the row's level (the table's alpha over its rows, under Holm). None when that is
    beyond ``max_seeds`` or there are fewer than 2 differences."""
    import random

    if len(diffs) < 2:
        return None
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) or 1e-9
    rng = random.Random(0)
    resolved_at = []
    for _ in range(runs):
        seq = list(diffs)
        n = len(seq)
        while True:
            p = p_value(seq)
            lo, hi = interval(seq, alpha)
            if (p is not None and p <= alpha) or -cfg.margin < lo < hi < cfg.margin:
                resolved_at.append(n)
                break
            if n >= cfg.max_seeds:
                break
            step = min(cfg.batch, cfg.max_seeds - n)
            seq += [rng.gauss(mean, sd) for _ in range(step)]
            n += step
    need = math.ceil(cfg.power * runs)
    if len(resolved_at) < need:
        return None
    return sorted(resolved_at)[need - 1]
