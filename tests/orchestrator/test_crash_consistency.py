"""State that stays right through crashes: drivers SIGKILLed at chosen moments, the state database
deleted under a running driver, stores created by several processes at once.

Real drivers (the CLI in a subprocess, its own private Ray cluster), real sqlite state and MLflow
stores, real training. Each kill loop writes its figures to ``$BNNCTL_KILL_FIGURES`` when set.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import studies as specs

from bnnctl.orchestrator.backends.inprocess import InProcessBackend
from bnnctl.orchestrator.runcore import RunOptions
from bnnctl.orchestrator.store import Store
from bnnctl.orchestrator.study import run_study
from bnnctl.orchestrator.tuning import objective_value, run_tuning
from bnnctl.workers.config import from_dict
from bnnctl.workers.train import LocalReporter, TrainConfig, run_variant

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-c", "from bnnctl.orchestrator.cli import main; main()"]
HISTORY = ("pckh", "val_loss", "train_loss")

def _study(root, epochs):
    return specs.study("crash", root, specs.ACTIVATIONS + specs.rows(
        {"name": "reverse", "set": {"model.activation.kind": "prelu"}, "stages": "reverse_order"}),
        ablation="acts", tracking={"experiment": "crash"}, execution={"max_parallel": 2, "retries": 2},
        base_fields={"epochs": epochs, "train": 48})

def _tuning(root):
    return specs.tuning("tcrash", root, {
        "lambda_schedule.lambda_start": {"type": "float", "low": 0.5, "high": 5, "log": True},
        "lambda_schedule.lambda_end": {"type": "float", "low": 10, "high": 200, "log": True},
    }, trials=5, sampler={"name": "random", "seed": 7}, pruner={"name": "none"},
        execution={"max_parallel": 2, "retries": 2}, tracking={"experiment": "tcrash"},
        base_fields={"epochs": 3, "model": {"binarize": {"quantizer": "tanh"}},
                     "lambda_schedule": {"kind": "exponential", "lambda_start": 1.0, "lambda_end": 20.0}})


# --------------------------------------------------------------------------- helpers

def _snapshot(workdir: Path, name: str) -> dict[str, int] | None:
    """Counts the kill loop watches: attempts started, variants completed, epochs recorded."""
    if not (workdir / ".bnnctl" / "state.db").exists():
        return None
    try:
        store = Store(readonly=True)
        study = store.study(name)
        if study is None:
            return None
        keys = [m.variant_key for m in store.members(study.id)]
        variants = store.variants(keys)
        return {"started": sum(len(store.attempts(k)) for k in keys),
                "completed": sum(1 for v in variants.values() if v.status == "completed"),
                "epoch": sum(len(store.metric_epochs(k)) for k in keys)}
    except Exception:  # noqa: BLE001 - created but not migrated yet
        return None


def _kill_loop(workdir: Path, args: list[str], name: str, moments: list[str]) -> list[str]:
    """Start the driver, SIGKILL it (and its private Ray cluster) right after each moment in turn:
    'started' (a variant's attempt began), 'completed' (a variant completed), 'epoch' (an epoch's
    metrics were recorded). Returns the moments at which a kill happened (the driver may finish first)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    kills = []
    for i, moment in enumerate(moments):
        before = _snapshot(workdir, name)
        with (workdir / f"driver{i}.log").open("wb") as log:
            proc = subprocess.Popen(CLI + args, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            deadline = time.time() + 240
            while time.time() < deadline and proc.poll() is None:
                now = _snapshot(workdir, name)
                if now is not None and now[moment] > (before or {}).get(moment, 0):
                    os.killpg(proc.pid, signal.SIGKILL)
                    kills.append(moment)
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if not kills or kills[-1] != moment:
            break  # it finished before the moment came
    return kills


def _mlflow(workdir: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / '.bnnctl' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def _check_mlflow(workdir: Path, experiment: str, keys: set[str]) -> dict[str, int]:
    """0 RUNNING runs, one parent, one child per variant (no duplicate), each FINISHED with its
    final metrics and result.json, and no stale error tag."""
    client, runs = _mlflow(workdir, experiment)
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    tagged = sorted(r.data.tags["bnnctl.variant"] for r in children)
    assert tagged == sorted(keys)  # one run per variant: none missing, none twice
    for r in children:
        assert r.info.status == "FINISHED" and "final.pckh" in r.data.metrics, r.info.run_name
        assert "bnnctl.error" not in r.data.tags and "bnnctl.state" not in r.data.tags
        assert "result.json" in {a.path for a in client.list_artifacts(r.info.run_id)}
    return {"runs": len(runs), "children": len(children)}


def _histories(store: Store, keys) -> dict[str, dict[str, list]]:
    out = {}
    for k in keys:
        m = store.metrics(k)
        out[k] = {name: m[name] for name in HISTORY}
    return out


# --------------------------------------------------------------------------- kill loops

def test_a_study_killed_at_every_kind_of_moment_ends_as_if_never_interrupted(workdir, tmp_path_factory):
    spec = specs.write(workdir, _study("syn", 4))  # relative: the reference folder has the same identities
    moments = ["started", "epoch", "completed"]  # one kill of each kind (each restart costs a Ray start)
    kills = _kill_loop(workdir, ["study", "run", str(spec), "--cpus", "2"], "crash", moments)
    assert kills == moments  # the study outlived one kill of each kind before it finished
    out = run_study(spec, cpus=2)
    assert out.status == "completed"
    store = Store()
    keys = [m.variant_key for m in store.members(store.study("crash").id)]
    attempts = {k: store.attempts(k) for k in keys}
    assert [a for k in keys for a in attempts[k] if a.status == "running"] == []  # none left open
    figures = _check_mlflow(workdir, "crash", set(keys))
    # the same numbers as one uninterrupted run (in another folder, without Ray or MLflow)
    ref_dir = tmp_path_factory.mktemp("reference")
    ref_spec = ref_dir / "crash.yaml"
    ref_spec.write_text(spec.read_text())
    os.chdir(ref_dir)
    ref = run_study(ref_spec, options=RunOptions(track=False, backend_instance=InProcessBackend(capacity=1)))  # threads share torch RNG
    assert ref.status == "completed"
    reference = Store()
    assert _histories(store, keys) == _histories(reference, keys)
    for k in keys:
        assert store.variant(k).result["metrics"] == reference.variant(k).result["metrics"] | {
            "epoch_time": store.variant(k).result["metrics"]["epoch_time"]}
    figures.update(kills=len(kills), moments=kills, variants=len(keys),
                   attempts=sum(len(a) for a in attempts.values()),
                   lost=sum(1 for a in attempts.values() for x in a if x.status == "lost"))
    _report("study", figures)


def test_a_tuning_killed_at_every_kind_of_moment_ends_with_exactly_its_trials(workdir):
    import optuna

    spec = specs.write(workdir, _tuning(workdir / "syn"))
    moments = ["started", "completed", "epoch"]
    kills = _kill_loop(workdir, ["tune", "run", str(spec), "--cpus", "2"], "tcrash", moments)
    assert kills == moments
    out = run_tuning(spec, cpus=2)
    assert out.status == "completed" and out.finished == {"base": 5}
    storage = optuna.storages.RDBStorage(f"sqlite:///{workdir / '.bnnctl' / 'state.db'}")
    trials = optuna.load_study(study_name="tcrash/base", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 5
    store = Store()
    keys = {t.user_attrs["bnnctl.variant"] for t in trials}
    assert len(keys) == 5  # a restarted driver samples new values, not its seed's first ones again
    attempts = {k: store.attempts(k) for k in keys}
    assert [a for k in keys for a in attempts[k] if a.status == "running"] == []
    figures = _check_mlflow(workdir, "tcrash", keys)
    for t in trials:  # every trial's value is its variant's, trained as if never interrupted
        key = t.user_attrs["bnnctl.variant"]
        history = store.metrics(key)
        assert t.value == objective_value(history, "pckh", "maximize", "best")
        rep = LocalReporter(workdir / "ref" / key)
        reference = run_variant(from_dict(TrainConfig, store.variant(key).config), rep)
        assert [v for _, v in history["pckh"]] == [m["pckh"] for _, m in rep.history]
        assert store.variant(key).result["metrics"]["pckh"] == reference.metrics["pckh"]
    figures.update(kills=len(kills), moments=kills, trials=len(trials), variants=len(keys),
                   attempts=sum(len(a) for a in attempts.values()),
                   lost=sum(1 for a in attempts.values() for x in a if x.status == "lost"))
    _report("tuning", figures)


def _report(kind: str, figures: dict) -> None:
    print(f"kill loop ({kind}): {json.dumps(figures)}")
    where = os.environ.get("BNNCTL_KILL_FIGURES")
    if where:
        with open(where, "a") as f:
            f.write(json.dumps({"kind": kind, **figures}) + "\n")


# --------------------------------------------------------------------------- the state database vanishes

def test_a_deleted_state_database_stops_the_driver_and_a_rerun_recovers_everything(workdir):
    one_at_a_time = _study(workdir / "syn", 6)
    one_at_a_time["execution"]["max_parallel"] = 1
    spec = specs.write(workdir, one_at_a_time)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(CLI + ["study", "run", str(spec), "--cpus", "2"], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            now = _snapshot(workdir, "crash")
            if now and now["completed"] >= 1 and now["started"] > now["completed"]:
                break
            time.sleep(0.1)
        store = Store(readonly=True)
        done = {k for k, v in store.variants([m.variant_key for m in store.members(store.study("crash").id)]).items()
                if v.status == "completed"}
        for suffix in ("", "-wal", "-shm"):
            (workdir / ".bnnctl" / f"state.db{suffix}").unlink(missing_ok=True)
        deleted_at = time.time()
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1 and time.time() - deleted_at < 60
    assert f"the state database {workdir / '.bnnctl' / 'state.db'} was deleted while this driver ran" in output
    assert "Nothing trained is lost" in output and "Traceback" not in output, output
    # the next run, on a new state database, recovers what was trained from the checkpoints
    out = run_study(spec, cpus=2)
    assert out.status == "completed" and out.counts == {"completed": 5}
    store = Store()
    keys = [m.variant_key for m in store.members(store.study("crash").id)]
    for k in done:
        v = store.variant(k)
        assert v.result["timings"]["train_s"] == 0.0  # not one batch trained again
        assert store.metric_epochs(k) == set(range(1, 7))  # its history came back with it
    _check_mlflow(workdir, "crash", set(keys))  # the same runs continued: none twice


# --------------------------------------------------------------------------- creation races

def test_processes_creating_the_mlflow_store_at_once_all_succeed(tmp_path):
    import racers
    from mlflow.tracking import MlflowClient

    for round_ in range(2):
        uri = f"sqlite:///{tmp_path / f'r{round_}' / 'mlflow.db'}"
        outcomes = racers.race(racers.open_tracker, (uri,), 4)
        assert len(set(outcomes)) == 1 and not outcomes[0].startswith("error"), outcomes
        assert len(MlflowClient(uri).search_experiments(filter_string="name = 'race'")) == 1


# --------------------------------------------------------------------------- the first run's MLflow store

FIRST_RUN = """
import sys
from bnnctl.orchestrator.backends.inprocess import InProcessBackend
from bnnctl.orchestrator.runcore import RunOptions
opts = RunOptions(backend_instance=InProcessBackend(capacity=1))
if sys.argv[1] == "study":
    from bnnctl.orchestrator.study import run_study
    print(run_study(sys.argv[2], options=opts).status)
else:
    from bnnctl.orchestrator.tuning import run_tuning
    print(run_tuning(sys.argv[2], options=opts).status)
"""


def _first_run(folder: Path, kind: str, spec: Path, kill_after: float | None) -> tuple[float | None, float | None]:
    """Run a driver (in-process backend, MLflow tracking) in ``folder``; with ``kill_after``, SIGKILL it
    that many seconds after MLflow's store creation began there (its lock file appeared). Returns when
    the creation began and when the store was published, relative to the driver's start."""
    bnnctl = folder / ".bnnctl"
    proc = subprocess.Popen([sys.executable, "-c", FIRST_RUN, kind, str(spec)], cwd=folder, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    t0, began, published = time.monotonic(), None, None
    try:
        while proc.poll() is None and time.monotonic() - t0 < 300:
            now = time.monotonic() - t0
            if began is None and (bnnctl / "mlflow.db.lock").exists():
                began = now
            if published is None and (bnnctl / "mlflow.db").exists():
                published = now
            if kill_after is not None and began is not None and now - began >= kill_after:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None and kill_after is None:
            proc.wait(timeout=300)
        elif proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0].decode()
    if kill_after is None:
        assert proc.returncode == 0 and out.strip().splitlines()[-1] == "completed", out
    return began, published


FIRST_STUDY = """
name: first
base:
  model: {width: 8, depth: 2}
  data: {root: syn, synthetic: {train: 16, valid: 8}, input_size: 32}
  epochs: 1
  batch_size: 8
  loss: mse
  threads: 1
  latency: false
seeds: [0]
ablations:
  - {name: acts, mode: isolated, rows: [{name: relu, set: {model.activation.kind: relu}}]}
tracking: {experiment: first}
"""

FIRST_TUNING = """
kind: tuning
name: tfirst
base:
  model: {width: 8, depth: 2, binarize: {quantizer: tanh}}
  data: {root: syn, synthetic: {train: 16, valid: 8}, input_size: 32}
  epochs: 1
  batch_size: 8
  loss: mse
  threads: 1
  latency: false
search:
  lambda_schedule.lambda_end: {type: float, low: 10, high: 200, log: true}
trials: 2
sampler: {name: random, seed: 7}
pruner: {name: none}
tracking: {experiment: tfirst}
"""


def _first_run_outcome(folder: Path, kind: str) -> tuple:
    """What the run left: each variant's final metrics but its timings (a study), each trial's state
    (a tuning); MLflow's runs: none RUNNING, one per variant, none twice."""
    import optuna
    from mlflow.tracking import MlflowClient

    state = f"sqlite:///{folder / '.bnnctl' / 'state.db'}"
    store = Store(state)
    if kind == "study":
        keys = [m.variant_key for m in store.members(store.study("first").id)]
        values = {k: {m: v for m, v in store.variant(k).result["metrics"].items() if m != "epoch_time"} for k in keys}
    else:
        trials = optuna.load_study(study_name="tfirst/base", storage=optuna.storages.RDBStorage(state)).trials
        keys = [t.user_attrs["bnnctl.variant"] for t in trials]
        values = [t.state.name for t in trials]
    client = MlflowClient(f"sqlite:///{folder / '.bnnctl' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("first" if kind == "study" else "tfirst")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert [r for r in runs if r.info.status == "RUNNING"] == []
    variants = [r.data.tags["bnnctl.variant"] for r in runs if "bnnctl.variant" in r.data.tags]
    assert sorted(variants) == sorted(keys), (variants, keys)
    return values, len(runs)


@pytest.mark.parametrize("kind,kills", [("study", 10), ("tuning", 10)])
def test_the_first_run_killed_while_mlflow_creates_its_store_then_run_again_ends_as_if_never_killed(tmp_path, kind, kills):
    """MLflow creates and migrates a new sqlite store in 1-4 s (dozens of migrations): a first run
    killed then used to leave a half-migrated `mlflow.db` that no later run could open. Killed at
    10 moments spread over the creation (from its start to the store's publication), the folder
    never holds a half-created store, and the next run ends with the uninterrupted run's numbers (a tuning: its trials) and
    MLflow runs."""
    from concurrent.futures import ThreadPoolExecutor

    from mlflow.tracking import MlflowClient

    spec_text = FIRST_STUDY if kind == "study" else FIRST_TUNING
    folders = [tmp_path / "ref", *(tmp_path / f"k{i}" for i in range(kills))]
    for folder in folders:
        folder.mkdir()
        (folder / "spec.yaml").write_text(spec_text)
    began, published = _first_run(folders[0], kind, folders[0] / "spec.yaml", None)
    assert began is not None and published is not None and published > began
    window = published - began
    reference = _first_run_outcome(folders[0], kind)
    for i, folder in enumerate(folders[1:]):
        _first_run(folder, kind, folder / "spec.yaml", window * i / (kills - 1))
        store = folder / ".bnnctl" / "mlflow.db"
        if store.exists():  # published, so complete
            assert MlflowClient(f"sqlite:///{store}").search_experiments(max_results=1)
    with ThreadPoolExecutor(2) as pool:  # each folder run again to its end, two at a time
        list(pool.map(lambda f: _first_run(f, kind, f / "spec.yaml", None), folders[1:]))
    for i, folder in enumerate(folders[1:]):
        assert _first_run_outcome(folder, kind) == reference, i
        assert not list((folder / ".bnnctl").glob("mlflow.db.creating-*"))
    print(f"MLflow store creation window ({kind}): {window:.2f} s; {kills} kills over it")


def _behind(path: Path) -> None:
    """Make the MLflow store at ``path`` look half-migrated: its recorded schema revision is an early one
    while its tables are the newest (what a first run killed during the migrations left; 451aebb31d03 is
    MLflow's first revision)."""
    import sqlite3

    con = sqlite3.connect(path)
    con.execute("UPDATE alembic_version SET version_num = '451aebb31d03'")
    con.commit()
    con.close()


OPEN = """
import sys
from bnnctl.orchestrator.tracking import Tracker, TrackingError
try:
    t = Tracker(sys.argv[1], sys.argv[2])
    print("run", t.client.create_run(t.experiment_id).info.status)
except TrackingError as err:
    print("refused", err)
"""


def _open(path: Path, experiment: str) -> tuple[str, str]:
    """A new driver process opening the store (MLflow caches a store it verified, per process)."""
    out = subprocess.run([sys.executable, "-c", OPEN, f"sqlite:///{path}", experiment], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    return out.stdout.strip(), out.stderr


def test_a_half_created_store_without_runs_is_created_again_and_one_with_runs_is_left_alone(tmp_path):
    """A store an older bnnctl left half-migrated holds nothing: it is created again, with a one-line
    notice. A store that holds runs is never touched, whatever its state: one message says what to do."""
    import sqlite3

    from bnnctl.orchestrator.tracking import Tracker

    empty = tmp_path / "empty" / "mlflow.db"
    Tracker(f"sqlite:///{empty}", "first")
    _behind(empty)
    out, err = _open(empty, "again")
    assert out == "run RUNNING"
    assert err.strip() == f"bnnctl: the MLflow store {empty} was left half-created by an interrupted first run and " \
        "held no runs; created it again"
    assert sqlite3.connect(empty).execute("SELECT version_num FROM alembic_version").fetchone()[0] != "451aebb31d03"

    held = tmp_path / "held" / "mlflow.db"
    tracker = Tracker(f"sqlite:///{held}", "first")
    tracker.client.create_run(tracker.experiment_id)
    _behind(held)
    before = held.read_bytes()
    text = " ".join(_open(held, "first")[0].split())
    assert text.startswith(f"refused the MLflow store {held} cannot be opened") and \
        "it holds 1 runs, so bnnctl leaves it as it is" in text, text
    assert f"mlflow db upgrade sqlite:///{held}" in text and f"mv {held} {held}.bak" in text and "--no-track" in text
    assert held.read_bytes() == before
