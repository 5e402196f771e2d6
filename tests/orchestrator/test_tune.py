"""Optuna tuning end to end: real Ray, real sqlite (state + Optuna storage), real MLflow, real training."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import studies as specs
import yaml
from typer.testing import CliRunner

from bnnctl.orchestrator.cli import app
from bnnctl.orchestrator.errors import SpecError
from bnnctl.orchestrator.spec import load_spec
from bnnctl.orchestrator.store import Store
from bnnctl.orchestrator.tunespec import Param, load_tune_spec
from bnnctl.orchestrator.tuning import load_tuning, objective_value, run_tuning, summarize

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()

def _tiny(name, root, epochs=3, trials=4, parallel=2, pruner="{name: none}", extra=""):
    """The tiny tuning of lambda_start and lambda_end; ``pruner`` and ``extra`` (more top-level
    sections) as YAML text."""
    doc = specs.tuning(name, root, {
        "lambda_schedule.lambda_start": {"type": "float", "low": 0.5, "high": 5, "log": True},
        "lambda_schedule.lambda_end": {"type": "float", "low": 10, "high": 200, "log": True},
    }, trials=trials, sampler={"name": "random", "seed": 3}, pruner=yaml.safe_load(pruner),
        execution={"max_parallel": parallel, "retries": 2}, tracking={"experiment": "tune-tests"},
        base_fields={"epochs": epochs, "model": {"binarize": {"quantizer": "tanh"}},
                     "lambda_schedule": {"kind": "exponential", "lambda_start": 1.0, "lambda_end": 20.0}})
    doc.update(yaml.safe_load(extra) or {})
    return doc


def _spec(tmp_path, name="t", epochs=3, trials=4, parallel=2, pruner="{name: none}", extra=""):
    return specs.write(tmp_path, _tiny(name, tmp_path / "syn", epochs, trials, parallel, pruner, extra))


def _optuna(tmp_path, name, db=None):
    storage = optuna.storages.RDBStorage(db or f"sqlite:///{tmp_path / '.bnnctl' / 'state.db'}")
    return optuna.load_study(study_name=name, storage=storage)


def _mlflow_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / '.bnnctl' / 'mlflow.db'}")
    exp = c.get_experiment_by_name("tune-tests")
    return c.search_runs([exp.experiment_id], max_results=1000)


# --------------------------------------------------------------------------- specs

def test_shipped_tuning_specs_load():
    names = {}
    for path in sorted((ROOT / "studies").glob("tune_*.yaml")):
        spec = load_tune_spec(path)
        names[path.name] = spec
        assert spec.params and spec.trials >= 8 and spec.sampler.name == "tpe" and spec.pruner.name == "median"
    assert set(names) == {"tune_lambda.yaml", "tune_distill.yaml"}
    assert {p.path for p in names["tune_lambda.yaml"].params} >= {"lambda_schedule.lambda_start",
                                                                   "lambda_schedule.lambda_end"}
    distill = names["tune_distill.yaml"]
    assert "distill.weight" in {p.path for p in distill.params} and distill.arms[0].teacher is not None


BAD = {
    "low above high": ("lambda_schedule.lambda_end: {type: float, low: 200, high: 10}", "search.lambda_schedule.lambda_end",
                       "low (200) must be below high (10)"),
    "unknown path": ("model.colour: {type: float, low: 0, high: 1}", "search.model.colour", "unknown config path"),
    "unknown section": ("optimiser.lr: {type: float, low: 0.1, high: 1}", "search.optimiser.lr", "unknown config path"),
    "value the config rejects": ("distill.weight: {type: float, low: 0.5, high: 2}", "search.distill.weight",
                                 "must be in [0, 1]"),
    "empty choices": ("lambda_schedule.kind: {type: categorical, choices: []}", "search.lambda_schedule.kind",
                      "non-empty list of choices"),
    "bad choice": ("lambda_schedule.kind: {type: categorical, choices: [linear, wobbly]}", "search.lambda_schedule.kind",
                   "'wobbly' is not allowed"),
    "unknown type": ("optim.lr: {type: complex, low: 0, high: 1}", "search.optim.lr.type", "unknown type 'complex'"),
    "log of zero": ("optim.lr: {type: float, low: 0, high: 1, log: true}", "search.optim.lr.low", "log-scale"),
}


def _bad_spec(tmp_path, search_line: str, extra: str = "") -> Path:
    f = tmp_path / "bad.yaml"
    f.write_text("kind: tuning\nname: bad\nbase: {loss: mse, model: {width: 8, depth: 2}}\nsearch:\n  "
                 + search_line + "\n" + extra)
    return f


def _assert_refused(tmp_path, f, *words):
    result = runner.invoke(app, ["tune", "run", str(f), "--no-track"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and str(f) in result.output
    for w in words:
        assert w in result.output, result.output
    assert not (tmp_path / ".bnnctl").exists()  # nothing started, nothing written


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_search_spaces_fail_clearly_and_write_nothing(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    line, where, words = BAD[case]
    f = _bad_spec(tmp_path, line)
    with pytest.raises(SpecError) as err:
        load_tune_spec(f)
    assert where in str(err.value) and words in str(err.value) and "line 5" in str(err.value)
    _assert_refused(tmp_path, f, where, words)


@pytest.mark.parametrize("extra,words", [
    ("sampler: {name: annealing}", ("sampler.name", "unknown sampler 'annealing'", "tpe, random, grid, gp")),
    ("pruner: {name: patience}", ("pruner.name", "unknown pruner 'patience'", "median, percentile, hyperband")),
    ("pruner: {name: median, warmup: 2}", ("pruner.warmup", "unknown option", "startup_trials, warmup_epochs")),
    ("objective: {metric: accuracy}", ("objective.metric", "unknown metric 'accuracy'", "pckh")),
    ("trials: 0", ("trials", "an integer in [1, 100000]")),
    ("kind: study", ("kind", "kind: tuning")),
    ("sampler: grid", ("search.optim.lr", "grid sampler needs categorical choices or a `step`")),
    ("arms: [{name: a}, {name: a}]", ("arms", "duplicate arm names (compared ignoring case): a")),
    ("teacher: ghost", ("teacher", "unknown teacher 'ghost'")),
])
def test_bad_tuning_options_fail_clearly_and_write_nothing(tmp_path, monkeypatch, extra, words):
    monkeypatch.chdir(tmp_path)
    text = _bad_spec(tmp_path, "optim.lr: {type: float, low: 0.0001, high: 0.01, log: true}", extra).read_text()
    if extra.startswith("kind:"):
        text = text.replace("kind: tuning\n", "")
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    _assert_refused(tmp_path, f, *words)


def test_a_study_spec_is_not_a_tuning_and_vice_versa(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = _spec(tmp_path)
    with pytest.raises(SpecError, match="tuning spec; run it with `bnnctl tune run`"):
        load_spec(f)
    _assert_refused(tmp_path, ROOT / "studies" / "quickstart.yaml", "kind: tuning")


def test_grid_values_and_objective_reduction():
    assert Param("x", "int", 1, 7, step=3).grid() == [1, 4, 7]
    assert Param("x", "float", 0.0, 1.0, step=0.25).grid() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert Param("x", "categorical", choices=("a", "b")).grid() == ["a", "b"]
    history = {"pckh": [(1, 10.0), (2, 30.0), (3, 20.0)], "val_loss": [(1, 0.5), (2, 0.2), (3, 0.3)]}
    assert objective_value(history, "pckh", "maximize", "best") == 30.0
    assert objective_value(history, "pckh", "maximize", "last") == 20.0
    assert objective_value(history, "val_loss", "minimize", "best") == 0.2
    assert objective_value(history, "top1", "maximize", "best") is None


# --------------------------------------------------------------------------- running

def test_pruner_stops_trials_after_the_first_epoch(workdir):
    """A threshold pruner no run can pass: every trial but the default stops after epoch 1,
    recorded as PRUNED in Optuna and in MLflow; the default trial is never pruned."""
    f = _spec(workdir, name="prune", epochs=3, trials=4, pruner="{name: threshold, lower: 1000}")
    outcome = run_tuning(f, cpus=2)
    assert outcome.status == "completed" and outcome.finished == {"base": 4}
    study = _optuna(workdir, "prune/base")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert trials[0].user_attrs["bnnctl.default"] and trials[0].state.name == "COMPLETE"
    assert sorted(trials[0].intermediate_values) == [1, 2, 3]
    store = Store()
    for t in trials[1:]:
        assert t.state.name == "PRUNED"
        assert list(t.intermediate_values) == [1]  # reported epoch 1, then stopped
        key = t.user_attrs["bnnctl.variant"]
        v = store.variant(key)
        assert v.status == "stopped" and v.result["epochs_done"] == 1
        assert sorted({e for e, _ in store.metrics(key)["pckh"]}) == [1]  # epoch 2 never trained
    runs = {r.data.tags.get("bnnctl.trial"): r for r in _mlflow_runs(workdir) if "bnnctl.trial" in r.data.tags}
    assert set(runs) == {"0", "1", "2", "3"}
    assert runs["0"].info.status == "FINISHED" and runs["0"].data.tags["bnnctl.trial_state"] == "COMPLETE"
    assert runs["0"].data.metrics["objective"] == pytest.approx(trials[0].value)
    for n in ("1", "2", "3"):
        assert runs[n].info.status == "KILLED" and runs[n].data.tags["bnnctl.trial_state"] == "PRUNED"
        assert float(runs[n].data.params["trial.lambda_schedule.lambda_end"]) == pytest.approx(
            trials[int(n)].params["lambda_schedule.lambda_end"])
        assert runs[n].data.tags["mlflow.parentRunId"] == runs["0"].data.tags["mlflow.parentRunId"]
    # what users of Optuna and MLflow read: the objective by name (optuna-dashboard's axes), the
    # experiment opening on its runs (MLflow 3 opens an experiment of no kind on its GenAI overview)
    assert study.metric_names == ["pckh"]
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(f"sqlite:///{workdir / '.bnnctl' / 'mlflow.db'}").get_experiment_by_name("tune-tests")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # a pruned trial reads "pruned" everywhere (the store keeps "stopped")
    import json

    listing = json.loads(runner.invoke(app, ["study", "list", "--json"]).output)
    assert [s["variants"] for s in listing if s["name"] == "prune"] == [{"completed": 1, "pruned": 3}]
    status = runner.invoke(app, ["study", "status", "prune"], env={"COLUMNS": "200"}).output
    assert status.count("pruned") == 3 and "stopped" not in status, status


@pytest.mark.slow
def test_four_parallel_trials_on_sqlite_never_lock(workdir):
    """4 trials at once on Ray (4 worker slots), Optuna storage and state in one sqlite file, MLflow
    in another, and a reader polling the tuning meanwhile (as `tune show` or the dashboard would).
    (Once run three times per suite to catch a rare lock; every CI run repeats it now.)"""
    _four_parallel_trials(workdir, "par", None)


@pytest.mark.slow
def test_four_parallel_trials_on_postgresql(workdir, pg_server):
    """The same on a real PostgreSQL server: state and Optuna's storage in one database."""
    _four_parallel_trials(workdir, "pg", pg_server.database())


def _four_parallel_trials(workdir, name, db):
    f = _spec(workdir, name=name, epochs=2, trials=8, parallel=4, pruner="{name: median, startup_trials: 2}")
    errors: list[str] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                _, _, studies = load_tuning(name, db)
                summarize(studies["base"])
            except Exception as err:  # noqa: BLE001 - "no tuning yet" at the very start is fine
                if "locked" in str(err).lower():
                    errors.append(str(err))
            time.sleep(0.1)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        outcome = run_tuning(f, db=db, cpus=4)
    finally:
        stop.set()
        t.join()
    assert outcome.status == "completed" and outcome.finished == {"base": 8}
    assert not errors
    trials = _optuna(workdir, f"{name}/base", db).trials
    assert len(trials) == 8 and all(tr.state.name in ("COMPLETE", "PRUNED") for tr in trials)
    # the trials really ran 4 at a time: some moment had 4 attempts in flight
    store = Store(db)
    spans = [(a.started_at, a.ended_at) for tr in trials for a in store.attempts(tr.user_attrs["bnnctl.variant"])]
    peak = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert peak == 4


@pytest.mark.slow
def test_interrupted_tuning_resumes_to_exactly_the_requested_trials(workdir):
    f = _spec(workdir, name="resume", epochs=4, trials=6, parallel=2)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-c", "from bnnctl.orchestrator.cli import main; main()", "tune", "run", str(f), "--cpus", "2"]
    log = workdir / "driver.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cli, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            time.sleep(0.5)
            if proc.poll() is not None:
                pytest.fail(f"the tuning driver exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                trials = _optuna(workdir, "resume/base").trials
            except Exception:  # noqa: BLE001 - not created yet
                continue
            done = [t for t in trials if t.state.is_finished()]
            running = [t for t in trials if t.state.name == "RUNNING"]
            if len(done) >= 2 and running:
                break
        else:
            pytest.fail(f"the tuning did not get going:\n{log.read_text()[-3000:]}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray cluster
        proc.wait()
    interrupted = {t.number for t in _optuna(workdir, "resume/base").trials if t.state.name == "RUNNING"}
    assert interrupted
    outcome = run_tuning(f, cpus=2)
    assert outcome.status == "completed"
    trials = _optuna(workdir, "resume/base").trials
    assert len(trials) == 6 and all(t.state.name == "COMPLETE" for t in trials), [(t.number, t.state.name, t.user_attrs) for t in trials]
    store = Store()
    for t in trials:
        if t.number in interrupted:  # resumed: a second attempt on the same variant, or its only
            attempts = store.attempts(t.user_attrs["bnnctl.variant"])  # attempt ended before the kill
            assert len(attempts) >= 2 or [a.status for a in attempts] == ["completed"], attempts
        # every epoch of every trial is recorded, those a killed driver never got included
        assert store.metric_epochs(t.user_attrs["bnnctl.variant"]) == {1, 2, 3, 4}
    # running it again changes nothing: the budget is reached
    again = run_tuning(f, cpus=2)
    assert again.trained == 0 and len(_optuna(workdir, "resume/base").trials) == 6
    # more trials requested: the same study continues
    bigger = f.read_text().replace("trials: 6", "trials: 7")
    f.write_text(bigger)
    assert run_tuning(f, cpus=2).finished == {"base": 7}
    # a changed search space is refused (its trials would not compare)
    f.write_text(bigger.replace("high: 200", "high: 300"))
    layout = Store().study("resume").spec
    with pytest.raises(SpecError, match="different base, arms, search space"):
        run_tuning(f, cpus=2)
    assert Store().study("resume").spec == layout  # refused before anything was written


def test_arms_get_the_same_budget_and_best_becomes_a_study_spec(workdir):
    extra = ("arms:\n  - {name: relu, set: {model.activation.kind: relu}}\n"
             "  - {name: prelu, set: {model.activation.kind: prelu}}\n")
    f = _spec(workdir, name="arms", epochs=2, trials=3, parallel=2, extra=extra)
    outcome = run_tuning(f, cpus=2, track=False)
    assert outcome.finished == {"relu": 3, "prelu": 3}
    store, row, studies = load_tuning("arms")
    for arm, study in studies.items():
        s = summarize(study)
        assert len(s["trials"]) == 3 and s["default"]["number"] == 0
        assert s["default"]["params"] == {"lambda_schedule.lambda_start": 1.0, "lambda_schedule.lambda_end": 20.0}
        assert s["best"]["value"] == max(t["value"] for t in s["trials"] if t["state"] == "COMPLETE")
        cfg = store.variant(s["best"]["variant"]).config
        assert cfg["model"]["activation"]["kind"] == arm  # each arm's trials train its own config
    shown = runner.invoke(app, ["tune", "show", "arms"])
    assert shown.exit_code == 0 and "relu: trials" in shown.output and "prelu: trials" in shown.output
    out = workdir / "best.yaml"
    result = runner.invoke(app, ["tune", "best", "arms", "--as-spec", str(out)])
    assert result.exit_code == 0, result.output
    spec = load_spec(out)
    rows = spec.ablations[0].rows
    assert [r.name for r in rows][0::2] == ["relu: default", "prelu: default"]
    best_prelu = summarize(studies["prelu"])["best"]["params"]
    tuned = rows[3].config
    assert tuned.model.activation.kind == "prelu"
    assert tuned.lambda_schedule.lambda_end == pytest.approx(best_prelu["lambda_schedule.lambda_end"])
    assert rows[2].config.lambda_schedule.lambda_end == 20.0  # the default row keeps the base values
    again = runner.invoke(app, ["tune", "best", "arms", "--as-spec", str(out)])
    assert again.exit_code == 1 and "--force" in again.output
    assert yaml.safe_load(out.read_text())["name"] == "arms-best"


def test_failed_trials_keep_their_reason(workdir):
    """Sampled values the config rejects (lambda_end below lambda_start) fail the trial with the reason."""
    f = _spec(workdir, name="fails", trials=3, extra="default_trial: false\n")
    f.write_text(f.read_text().replace("{type: float, low: 0.5, high: 5, log: true}", "{type: float, low: 300, high: 400}"))
    outcome = run_tuning(f, cpus=2, track=False)
    assert outcome.status == "failed" and outcome.finished == {"base": 3} and outcome.trained == 0
    trials = _optuna(workdir, "fails/base").trials
    assert [t.state.name for t in trials] == ["FAIL"] * 3
    for t in trials:
        assert "invalid combination of sampled values" in t.user_attrs["fail_reason"]
        assert "lambda_end" in t.user_attrs["fail_reason"] and "must be >= lambda_start" in t.user_attrs["fail_reason"]
    shown = runner.invoke(app, ["tune", "show", "fails"])
    assert shown.exit_code == 0 and shown.output.count("FAIL") == 3 and "invalid combination" in shown.output


def test_tune_run_trials_option_sets_the_budget_from_the_command_line(workdir):
    f = _spec(workdir, name="few", epochs=1, trials=5, parallel=1)
    bad = runner.invoke(app, ["tune", "run", str(f), "--trials", "0", "--no-track"])
    assert bad.exit_code == 1 and "--trials: expected an integer in [1, 100000], got 0" in bad.output
    assert not (workdir / ".bnnctl" / "state.db").exists()
    ok = runner.invoke(app, ["tune", "run", str(f), "--trials", "1", "--no-track", "--cpus", "2"])
    assert ok.exit_code == 0, ok.output
    text = " ".join(ok.output.split())  # the console may wrap long lines
    assert "1 trials requested" in text and "[1 done in this run: 0 pruned, 0 failed]" in text, text
    assert [t.state.name for t in _optuna(workdir, "few/base").trials] == ["COMPLETE"]


def test_a_trial_its_driver_left_unsampled_is_sampled_and_trained_not_failed(workdir):
    """A driver killed between creating a trial and sampling its values (inside Optuna's ask)."""
    f = _spec(workdir, name="half", epochs=1, trials=1, parallel=1)
    assert run_tuning(f, cpus=2, track=False).finished == {"base": 1}
    orphan = _optuna(workdir, "half/base").ask()  # RUNNING, no values: what the kill leaves
    assert orphan.params == {}
    f.write_text(f.read_text().replace("trials: 1", "trials: 2"))
    out = run_tuning(f, cpus=2, track=False)
    assert out.status == "completed" and out.finished == {"base": 2} and out.trained == 1
    trials = _optuna(workdir, "half/base").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert set(trials[1].params) == {"lambda_schedule.lambda_start", "lambda_schedule.lambda_end"}
    # the next driver finds as many trials as the last one did, but that one drew values meanwhile:
    # its new trial must not repeat them (it did, when the seed followed the trial count alone)
    f.write_text(f.read_text().replace("trials: 2", "trials: 3"))
    assert run_tuning(f, cpus=2, track=False).trained == 1
    trials = _optuna(workdir, "half/base").trials
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 3


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from bnnctl.orchestrator.cli import main; main()", *args]


@pytest.mark.slow
def test_tune_run_piped_prints_one_timestamped_unwrapped_line_per_event(workdir):
    """`tune run` into a pipe (a narrow 60-column setting): every event is one plain line that starts
    with the time, however long it is (the trial's line carries its value, parameters and the best
    so far), in the order things happened."""
    import re

    f = _spec(workdir, name="piped", epochs=2, trials=3, pruner="{name: threshold, lower: 1000}")
    run = subprocess.run(_cli("tune", "run", str(f), "--no-track", "--cpus", "2"), cwd=workdir, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "COLUMNS": "60"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    stamp = r"\d\d:\d\d:\d\d "
    assert re.match(stamp + r"tuning piped: 3 trials requested", lines[0]), lines[:3]
    events = [line[9:] for line in lines if re.match(stamp, line)]
    for n in range(3):
        mine = [e for e in events if f"[base] trial {n} " in e or f"[base] trial   {n} " in e]
        assert mine[0] == f"started  [base] trial {n} (2 epochs)", mine
        assert mine[1].startswith(f"epoch    [base] trial {n} 1/2 pckh "), mine
    default = [e for e in events if "trial   0 " in e and e.startswith("complete")]
    assert len(default) == 1 and "best so far" in default[0] and "lambda_end=" in default[0]  # one line, not wrapped
    pruned = [e for e in events if e.startswith("pruned   [base]")]
    assert len(pruned) == 2 and all(len(e) > 60 and "[3 done in this run" in pruned[-1] for e in pruned), pruned
    assert not [line for line in lines[:lines.index(next(li for li in lines if "3 done in this run" in li)) + 1]
                if not re.match(stamp, line)]  # nothing before the summary without its time


@pytest.mark.slow
def test_tune_run_on_a_terminal_shows_a_live_table_of_trials(workdir):
    """`tune run` in a pseudo-terminal: a live table of the trials (state, epoch, the objective's
    last value, best so far) titled with the tally and an ETA, and one line per finished trial."""
    import re

    from terminal import run_in_terminal

    f = _spec(workdir, name="live", epochs=3, trials=4, pruner="{name: threshold, lower: 1000}")
    code, screen = run_in_terminal(_cli("tune", "run", str(f), "--no-track", "--cpus", "2"), workdir)
    assert code == 0, screen[-3000:]
    # the title: the tally of this run and an ETA (none before a trial has taken its time)
    assert re.search(r"trials: 0/4 done in this run, [12] running, 0 pruned, 0 failed; ETA —", screen), screen[-3000:]
    assert re.search(r"trials: [123]/4 done in this run, [012] running, [123] pruned, 0 failed; ETA \d+ s", screen), \
        screen[-3000:]
    header = re.search(r"arm\s+.\s+trial\s+.\s+state\s+.\s+epoch\s+.\s+pckh \(last\)\s+.\s+best so far", screen)
    assert header, screen[-3000:]
    assert re.search(r"base\s+.\s+0\s+.\s+running\s+.\s+[0-3]/3\s", screen), screen[-3000:]
    assert re.search(r"base\s+.\s+[123]\s+.\s+pruned\s+.\s+1/3\s+.\s+[\d.]+\s", screen), screen[-3000:]
    assert len(re.findall(r"pruned   \[base\] trial   [123] ", screen)) == 3  # the lines that stay
    assert re.search(r"complete \[base\] trial   0 .*best so far [\d.]+ \(trial 0\)", screen), screen[-3000:]
