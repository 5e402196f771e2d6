"""Adaptive seeds (statistics.adaptive): the sequential test's error rates by simulation, its formula
against a numerical integral, and an end-to-end study on the in-process backend with real training,
whose driver is killed in the middle and run again."""
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bnnctl.orchestrator.sequential import Adaptive, e_value, interval, p_value, replay

ALPHA = 0.05
SIM = Adaptive(min_seeds=3, max_seeds=20, batch=2, margin=1.0)


def _simulate(rng, effects: dict[str, float], cfg: Adaptive = SIM, studies: int = 2000, step: float = 0.0):
    """Studies of a baseline and rows whose per-seed values are N(effect, 1) (the baseline N(0, 1)),
    rounded to multiples of ``step`` when given (a measured metric's resolution): the last look's
    decision and seeds of every row, per study."""
    seeds = list(range(cfg.max_seeds))

    def draw(mean: float):
        x = rng.normal(mean, 1, len(seeds))
        return dict(zip(seeds, np.round(x / step) * step if step else x))

    out = []
    for _ in range(studies):
        values = {"base": draw(0.0)}
        values.update({r: draw(e) for r, e in effects.items()})
        look = replay(["base", *effects], "base", values, seeds, cfg, ALPHA, "holm").looks[-1]
        out.append({r: (c.decision, c.seeds) for r, c in look.comparisons.items()})
    return out


@pytest.mark.slow
def test_under_no_effect_the_rate_of_better_or_worse_stays_below_alpha():
    """2,000 simulated studies of three rows with no effect, looked at after every batch of 2 seeds
    from 3 to 20: the family-wise rate of any "better" or "worse" stays <= alpha."""
    rng = np.random.default_rng(0)
    runs = _simulate(rng, {"a": 0.0, "b": 0.0, "c": 0.0})
    wrong = sum(any(d in ("better", "worse") for d, _ in r.values()) for r in runs) / len(runs)
    print(f"\nno effect, 3 rows, Holm: studies with a false better/worse {wrong:.4f} (alpha {ALPHA})")
    assert wrong <= ALPHA
    # the same looks with a fixed-n paired t-test at every look would call far more
    from scipy import stats

    naive = 0
    for _ in range(500):
        d = rng.normal(0, 1, 20) - rng.normal(0, 1, 20)
        naive += any(stats.ttest_1samp(d[:n], 0).pvalue < ALPHA for n in range(3, 21, 2))
    print(f"the naive t-test at every look: {naive / 500:.3f}")
    assert naive / 500 > 2 * wrong


def test_power_and_seeds_under_known_effects():
    rng = np.random.default_rng(1)
    for effect, least in ((1.0, 0.15), (2.0, 0.9), (5.0, 0.99)):  # in units of one seed's spread
        runs = _simulate(rng, {"x": effect}, studies=300)
        power = sum(r["x"][0] == "better" for r in runs) / len(runs)
        seeds = sum(r["x"][1] for r in runs) / len(runs)
        print(f"\neffect {effect} sd: called better in {power:.3f} of studies, {seeds:.1f} seeds on average")
        assert power >= least and not any(r["x"][0] == "worse" for r in runs)


def test_equivalence_is_called_wrongly_at_most_alpha_and_rightly_when_the_spread_is_small():
    rng = np.random.default_rng(2)
    # a true difference of exactly the margin is not equivalent: called so in <= alpha of studies
    runs = _simulate(rng, {"x": 1.0}, studies=2000)
    wrong = sum(r["x"][0] == "equivalent" for r in runs) / len(runs)
    print(f"\ndifference = margin: called equivalent in {wrong:.4f} (alpha {ALPHA})")
    assert wrong <= ALPHA
    # no difference and a spread well under the margin: equivalence is reached, early
    cfg = Adaptive(min_seeds=3, max_seeds=20, batch=2, margin=3.0)
    runs = _simulate(rng, {"x": 0.0}, cfg, studies=300)
    right = sum(r["x"][0] == "equivalent" for r in runs) / len(runs)
    seeds = sum(r["x"][1] for r in runs if r["x"][0] == "equivalent") / max(1, sum(r["x"][0] == "equivalent" for r in runs))
    print(f"no difference, margin 3 sd: equivalent in {right:.3f}, after {seeds:.1f} seeds on average")
    assert right >= 0.8


def test_the_bayes_factor_is_the_t_statistics_likelihood_ratio():
    """The mixture's closed form against the density of t under H1 (delta ~ N(0, g)) integrated
    numerically over the standardized effect, for one g of the mixture and the mixture itself."""
    from scipy import integrate, stats

    from bnnctl.orchestrator.sequential import G_GRID, _log_bf

    for n, t in ((3, 1.5), (6, 4.0), (12, -2.2)):
        nu = n - 1
        for g in (1.0, 16.0):
            marginal = integrate.quad(lambda d: stats.nct.pdf(t, nu, d * math.sqrt(n)) * stats.norm.pdf(d, 0, math.sqrt(g)),
                                      -60, 60, limit=400)[0]
            assert math.exp(_log_bf(t, n, g)) == pytest.approx(marginal / stats.t.pdf(t, nu), rel=1e-6)
        mix = sum(math.exp(_log_bf(t, n, g)) for g in G_GRID) / len(G_GRID)
        assert e_value(t, n) == pytest.approx(mix, rel=1e-12)


def test_p_values_and_intervals_are_running_over_the_looks():
    d = [3.0, 2.5, 3.4, 2.9, 3.1, 2.8]
    assert p_value(d[:1]) is None and p_value(d) <= p_value(d[:4]) <= p_value(d[:3])
    lo, hi = interval(d, ALPHA)
    lo4, hi4 = interval(d[:4], ALPHA)
    assert lo4 <= lo < sum(d) / len(d) < hi <= hi4  # the sequence only narrows
    assert interval([1.0], ALPHA) == (-math.inf, math.inf)


def test_seeds_that_tie_by_the_metrics_resolution_are_not_evidence():
    """The test assumes continuous differences; a measured metric moves in steps (a top-1 of 100
    images: 1 %), so two seeds tie by chance. A tie followed by spread is no evidence (it was p = 0,
    "worse" on differences 1, 1, 4, -6, 0); differences all equal at the look are taken as they are."""
    d = [1.0, 1.0, 4.0, -6.0, 0.0]
    lo, hi = interval(d, ALPHA)
    assert p_value(d) > 0.5 and lo < -5 and hi > 5
    assert p_value(d[2:]) == p_value([4.0, -6.0, 0.0]) and p_value(d[:3]) > 0.2
    assert p_value([2.0] * 5) == 0.0 and interval([2.0] * 5, ALPHA) == (2.0, 2.0)
    assert p_value([0.0] * 5) == 1.0 and interval([0.0] * 3, ALPHA) == (0.0, 0.0)
    # no effect, values in steps of half a seed's spread (ties in about 1 of 6 pairs of seeds): the
    # family-wise rate of a false better/worse stays <= alpha (it was about 3 alpha before)
    runs = _simulate(np.random.default_rng(4), {"a": 0.0, "b": 0.0, "c": 0.0}, studies=1000, step=0.5)
    wrong = sum(any(dd in ("better", "worse") for dd, _ in r.values()) for r in runs) / len(runs)
    print(f"\nno effect, values in steps of 0.5 sd: studies with a false better/worse {wrong:.4f}")
    assert wrong <= ALPHA


def test_the_looks_are_a_pure_function_of_the_stored_values():
    seeds = list(range(9))
    cfg = Adaptive(min_seeds=3, max_seeds=9, batch=2, margin=0.5)
    rng = np.random.default_rng(3)
    values = {"b": {s: float(v) for s, v in zip(seeds, rng.normal(0, 1, 9))},
              "big": {s: float(v) for s, v in zip(seeds, rng.normal(30, 1, 9))},
              "null": {s: float(v) for s, v in zip(seeds, rng.normal(0, 1, 9))}}
    first = replay(["b", "big", "null"], "b", values, seeds, cfg, ALPHA, "holm")
    assert [look.seeds for look in first.looks] == [{"big": 3, "null": 3, "b": 3}, {"big": 3, "null": 5, "b": 5},
                                                    {"big": 3, "null": 7, "b": 7}, {"big": 3, "null": 9, "b": 9}]
    assert first.looks[0].comparisons["big"].decision == "better" and first.complete
    assert first.looks[-1].comparisons["null"].decision == "inconclusive"
    # with only part of the values stored, the replay stops where values are missing and asks for them
    part = {r: {s: v for s, v in vals.items() if s < 5} for r, vals in values.items()}
    cut = replay(["b", "big", "null"], "b", part, seeds, cfg, ALPHA, "holm")
    assert not cut.complete and cut.needed == {"big": 3, "null": 7, "b": 7}
    assert [look.comparisons for look in cut.looks] == [look.comparisons for look in first.looks[:2]]
    # a seed that ended without a value (failed) is left out of the pairs, not waited for
    failed = {r: dict(vals) for r, vals in values.items()}
    failed["null"][1] = None
    again = replay(["b", "big", "null"], "b", failed, seeds, cfg, ALPHA, "holm")
    assert again.complete and again.looks[0].comparisons["null"].seeds == 2


STUDY = """name: adaptive
task: classification
base:
  model: {{arch: resnet18, width: 8, activation: {{kind: prelu}}}}
  data: {{dataset: digits, root: {root}, input_size: 32, train_limit: 400, val_limit: 100}}
  optim: {{name: adam, lr: 0.003}}
  epochs: 4
  batch_size: 32
  loss: ce
  threads: 1
  latency: false
seeds: [0]
statistics:
  alpha: 0.05
  correction: holm
  adaptive: {{min_seeds: 5, max_seeds: 7, batch: 2, margin: 0.5}}
ablations:
  - name: effects
    mode: isolated
    baseline: binary
    rows:
      - {{name: binary}}
      - {{name: real-valued, set: {{model.binarize.activations: false, model.binarize.weights: false}}}}
      - {{name: prelu slope 0.26, set: {{model.activation.slope: 0.26}}}}
"""

DRIVER = """
import sys
from rich.console import Console
from bnnctl.orchestrator.backends.inprocess import InProcessBackend
from bnnctl.orchestrator.cli.progress import StudyProgress
from bnnctl.orchestrator.runcore import RunOptions
from bnnctl.orchestrator.study import run_study
with StudyProgress(Console(file=sys.stdout), int(sys.argv[2]), tty=False) as progress:
    out = run_study(sys.argv[1], events=progress.events(),
                    options=RunOptions(backend_instance=InProcessBackend(capacity=1), track=False))
print(out.status, out.trained)
"""


def _driver(folder, spec, total=0):
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(spec), str(total)], cwd=folder, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _outcome(folder):
    from bnnctl.orchestrator.report import study_tables
    from bnnctl.orchestrator.store import Store

    store = Store(f"sqlite:///{folder}/.bnnctl/state.db")
    study = store.study("adaptive")
    members = store.members(study.id)
    values = {(m.row, m.seed): store.variant(m.variant_key).result["metrics"]["top1"] for m in members if m.ablation}
    (table,) = study_tables(store, study)
    return values, {r.name: (r.decision, len(r.cell.values), r.p_adjusted, r.interval) for r in table.rows}, table


@pytest.mark.slow
def test_an_adaptive_study_spends_seeds_on_the_open_row_and_a_kill_changes_no_decision(tmp_path):
    """The real-valued row (a large effect) stops as soon as it is decided (at min_seeds, or one batch
    later: how decisive 5 seeds are depends on the trained values); the row that changes PReLU's
    initial slope (no real effect) keeps receiving seeds, with its baseline, to max_seeds. A driver
    killed in the middle of the second look, run again, ends with the same values and decisions as
    an uninterrupted run; a third run trains nothing."""
    from bnnctl.orchestrator.store import Store

    ref, killed = tmp_path / "ref", tmp_path / "killed"
    for folder in (ref, killed):
        folder.mkdir()
        (folder / "spec.yaml").write_text(STUDY.format(root=tmp_path / "digits"))
    out, _ = _driver(ref, ref / "spec.yaml", 15).communicate(timeout=600)
    values, decisions, table = _outcome(ref)
    assert len(table.looks) == 2, out
    first, last = (look.seeds for look in table.looks)
    rv = last["real-valued"]  # 5: decided at the first look, 7: at the second
    assert first == {"real-valued": 5, "prelu slope 0.26": 5, "binary": 5}
    assert last == {"real-valued": rv, "prelu slope 0.26": 7, "binary": 7} and rv in (5, 7)
    assert decisions["real-valued"][:2] == ("better", rv)
    assert decisions["prelu slope 0.26"][:2] == ("inconclusive", 7)
    assert decisions["binary"][1] == 7
    total = sum(last.values())
    assert out.strip().splitlines()[-1] == f"completed {total}", out
    # the progress counts the variants each look adds: 15 for the first, the open rows' after it
    assert f"comparisons still open: {total - 15} more variants (seeds) to train, {total} in all" in out
    assert f"[{total}/{total}]" in out

    # `study plan`: the budget's bounds and each comparison's state, from the stored results
    import json

    from typer.testing import CliRunner

    from bnnctl.orchestrator.cli import app

    plan = json.loads(CliRunner().invoke(app, ["study", "plan", str(ref / "spec.yaml"), "--json", "--db",
                                               f"sqlite:///{ref}/.bnnctl/state.db"]).output)["summary"]
    assert (plan["to_run"], plan["reused"]) == (0, total)
    a = plan["adaptive"]
    assert (a["min_variants"], a["max_variants"], a["min_epochs"], a["max_epochs"]) == (15, 21, 60, 84)
    assert [(r["row"], r["decision"], r["seeds"]) for r in a["rows"]] == [("real-valued", "better", rv),
                                                                          ("prelu slope 0.26", "inconclusive", 7)]

    # the study page: each row's decision, and each comparison's seeds look by look
    import urllib.request

    from dashserver import Server

    server = Server(f"sqlite:///{ref}/.bnnctl/state.db", ref / ".bnnctl" / "runs")
    try:
        with urllib.request.urlopen(f"{server.url}/study/adaptive", timeout=30) as response:
            page = response.read().decode()
    finally:
        server.stop()
    assert 'class="chart seeds-over-time"' in page and "adaptive seeds: 5 to 7 per row" in page
    assert f"better, {rv} seeds, p " in page and "inconclusive, 7 seeds, [" in page

    proc = _driver(killed, killed / "spec.yaml")
    store_url = f"sqlite:///{killed}/.bnnctl/state.db"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # kill once the second look's first variant has finished
        if (killed / ".bnnctl" / "state.db").exists():
            s = Store(store_url)
            study = s.study("adaptive")
            if study is not None:
                done = [v for v in s.variants([m.variant_key for m in s.members(study.id)]).values()
                        if v.status == "completed"]
                if len(done) >= 16:
                    break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    out, _ = _driver(killed, killed / "spec.yaml").communicate(timeout=600)
    status, trained = out.strip().splitlines()[-1].split()
    assert status == "completed" and 1 <= int(trained) <= total - 16  # what the killed driver had not finished
    assert _outcome(killed)[:2] == (values, decisions)
    out, _ = _driver(killed, killed / "spec.yaml").communicate(timeout=600)
    assert out.strip().splitlines()[-1] == "completed 0"
