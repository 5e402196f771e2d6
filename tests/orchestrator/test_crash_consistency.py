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

from bnnctl.orchestrator.backends.inprocess import InProcessBackend
from bnnctl.orchestrator.runcore import RunOptions
from bnnctl.orchestrator.store import Store
from bnnctl.orchestrator.study import run_study
from bnnctl.orchestrator.tuning import objective_value, run_tuning
from bnnctl.workers.config import from_dict
from bnnctl.workers.train import LocalReporter, TrainConfig, run_variant

CLI = [sys.executable, "-c", "from bnnctl.orchestrator.cli import main; main()"]
HISTORY = ("pckh", "val_loss", "train_loss")

STUDY = """
name: crash
base:
  model: {{width: 8, depth: 2}}
  data: {{root: {root}, synthetic: {{train: 48, valid: 16}}, input_size: 32}}
  epochs: {epochs}
  batch_size: 16
  loss: mse
  threads: 1
  latency: false
seeds: [0]
ablations:
  - name: acts
    mode: isolated
    rows:
      - {{name: relu, set: {{model.activation.kind: relu}}}}
      - {{name: prelu, set: {{model.activation.kind: prelu}}}}
      - {{name: leaky, set: {{model.activation.kind: leaky_relu}}}}
      - {{name: reverse, set: {{model.activation.kind: prelu}}, stages: reverse_order}}
tracking: {{experiment: crash}}
execution: {{max_parallel: 2, retries: 2}}
"""

TUNING = """
kind: tuning
name: tcrash
base:
  model: {{width: 8, depth: 2, binarize: {{quantizer: tanh}}}}
  data: {{root: {root}, synthetic: {{train: 32, valid: 16}}, input_size: 32}}
  epochs: 3
  batch_size: 16
  loss: mse
  threads: 1
  latency: false
  lambda_schedule: {{kind: exponential, lambda_start: 1.0, lambda_end: 20.0}}
search:
  lambda_schedule.lambda_start: {{type: float, low: 0.5, high: 5, log: true}}
  lambda_schedule.lambda_end: {{type: float, low: 10, high: 200, log: true}}
trials: 5
sampler: {{name: random, seed: 7}}
pruner: {{name: none}}
execution: {{max_parallel: 2, retries: 2}}
tracking: {{experiment: tcrash}}
"""


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
    spec = workdir / "crash.yaml"
    spec.write_text(STUDY.format(root="syn", epochs=4))  # relative: the reference folder has the same identities
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

    spec = workdir / "tcrash.yaml"
    spec.write_text(TUNING.format(root=workdir / "syn"))
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
    spec = workdir / "crash.yaml"
    spec.write_text(STUDY.format(root=workdir / "syn", epochs=6).replace("max_parallel: 2", "max_parallel: 1"))
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
