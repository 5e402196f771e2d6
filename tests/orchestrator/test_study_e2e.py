"""End to end on a real local Ray cluster, a real sqlite state store and a real MLflow store."""
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
from bnnctl.orchestrator.store import SCHEMA_VERSION, Store
from bnnctl.orchestrator.study import run_study
from bnnctl.workers.config import from_dict
from bnnctl.workers.train import LocalReporter, TrainConfig, run_variant

pytestmark = pytest.mark.slow

def _spec(tmp_path, epochs):
    f = specs.write(tmp_path, specs.study(
        "e2e", tmp_path / "syn", specs.ACTIVATIONS, ablation="acts", tracking={"experiment": "e2e"},
        execution={"max_parallel": 2, "retries": 2},
        base_fields={"epochs": epochs, "train": 64, "model": {"width": 16}}))
    return f


def _mlflow_runs(path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{path}")
    exp = c.get_experiment_by_name("e2e")
    return c.search_runs([exp.experiment_id], max_results=1000)


def test_run_reuse_and_tables(workdir, db_url):
    """The same study on each state backend: sqlite and a real PostgreSQL server."""
    spec = _spec(workdir, 2)
    out = run_study(spec, db=db_url, cpus=2)
    assert out.status == "completed" and out.trained == 3
    store = Store(db_url)
    study = store.study("e2e")
    members = store.members(study.id)
    variants = store.variants([m.variant_key for m in members])
    assert all(v.status == "completed" and 0 <= v.result["metrics"]["pckh"] <= 100 for v in variants.values())
    assert all(len(store.metrics(k)["pckh"]) == 2 for k in variants)  # per-epoch metrics reached the store
    runs = _mlflow_runs(workdir / ".bnnctl" / "mlflow.db")
    assert len(runs) == 4  # one parent, three children
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / '.bnnctl' / 'mlflow.db'}")
    child = next(r for r in runs if r.data.tags.get("bnnctl.kind") == "row")
    names = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"result.json", "per_joint.csv", "predictions.png"} <= names and "checkpoint" not in names
    # one copy of each checkpoint, in the run storage: the run says where (and every epoch's metrics
    # arrived, sent in batches)
    key = child.data.tags["bnnctl.variant"]
    best = Path(child.data.tags["bnnctl.checkpoint"])
    assert best == (workdir / ".bnnctl" / "runs" / key / "best.pt").resolve() and best.is_file()
    assert Path(child.data.tags["bnnctl.checkpoint_last"]).is_file()
    assert not list((workdir / ".bnnctl" / "mlartifacts").rglob("*.pt"))
    assert [m.step for m in client.get_metric_history(child.info.run_id, "pckh")] == [1, 2]
    assert child.info.status == "FINISHED" and child.data.metrics["final.pckh"] == variants[key].result["metrics"]["pckh"]
    # artifacts live beside the local tracking store, never in ./mlruns of the working folder
    assert not (workdir / "mlruns").exists()
    assert (workdir / ".bnnctl" / "mlartifacts" / child.info.run_id / "artifacts" / "predictions.png").exists()
    assert child.data.params["model.arch"] == "hourglass" and "pckh" in child.data.metrics
    t0 = time.time()
    again = run_study(spec, db=db_url, cpus=2)
    assert again.trained == 0 and again.status == "completed" and time.time() - t0 < 30
    assert len(_mlflow_runs(workdir / ".bnnctl" / "mlflow.db")) == 4  # no duplicates
    from bnnctl.orchestrator.report import build_tables

    tables = build_tables(study.spec, members, variants)
    assert [r.name for r in tables[0].rows] == ["relu", "prelu", "leaky"]
    assert all(r.cell.mean is not None for r in tables[0].rows)


def _wait(predicate, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_killed_driver_resumes_without_retraining_or_duplicate_runs(workdir):
    spec = _spec(workdir, 6)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-c", "from bnnctl.orchestrator.cli import main; main()",
           "study", "run", str(spec), "--cpus", "2", "--max-parallel", "1"]
    proc = subprocess.Popen(cli, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def one_done_one_running():
            if not (workdir / ".bnnctl" / "state.db").exists():
                return False
            store = Store()
            s = store.study("e2e")
            if s is None:
                return False
            states = [v.status for v in store.variants([m.variant_key for m in store.members(s.id)]).values()]
            return states.count("completed") >= 1 and states.count("running") >= 1
        assert _wait(one_done_one_running, 240)
        time.sleep(1.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    store = Store()
    s = store.study("e2e")
    before = {k: v.status for k, v in store.variants([m.variant_key for m in store.members(s.id)]).items()}
    done_before = [k for k, st in before.items() if st == "completed"]
    out = run_study(spec, cpus=2)
    errors = {k: v.error for k, v in store.variants(list(before)).items()}
    assert out.status == "completed" and out.trained == 3 - len(done_before), (out, before, errors)
    for k in done_before:
        assert len(store.attempts(k)) == 1  # not retrained
    runs = _mlflow_runs(workdir / ".bnnctl" / "mlflow.db")
    assert len(runs) == 4, [(r.info.run_name, r.info.status, r.data.tags.get("bnnctl.variant")) for r in runs]


def test_killed_worker_is_retried_and_resumes_to_the_same_metrics(workdir):
    spec = _spec(workdir, 5)
    import threading

    from bnnctl.orchestrator.plan import build_plan
    from bnnctl.orchestrator.spec import load_spec

    plan = build_plan(load_spec(spec))
    victim = plan.rows[("acts", "prelu", 0)]
    ckpt = workdir / ".bnnctl" / "runs" / victim
    killed = {}

    def killer():
        def ready():
            return (ckpt / "last.pt").exists() and (ckpt / "worker.pid").exists()
        if _wait(ready, 240):
            pid = int((ckpt / "worker.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            killed["pid"] = pid

    t = threading.Thread(target=killer)
    t.start()
    out = run_study(spec, cpus=2, track=False)
    t.join()
    assert killed, "the worker was never seen running"
    store = Store()
    attempts = store.attempts(victim)
    assert [a.status for a in attempts] == ["lost", "completed"]
    assert out.status == "completed"
    resumed = store.variant(victim).result["metrics"]
    reference = run_variant(from_dict(TrainConfig, store.variant(victim).config), LocalReporter(workdir / "ref"))
    for key in ("pckh", "val_loss", "train_loss"):
        assert resumed[key] == reference.metrics[key], key


def test_cancel_stops_the_study_and_a_rerun_finishes_it(workdir):
    import threading

    from bnnctl.orchestrator.study import cancel_study

    spec = _spec(workdir, 8)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("out", run_study(spec, cpus=2, track=False)))
    t.start()
    assert _wait(lambda: (workdir / ".bnnctl" / "state.db").exists() and Store().study("e2e") is not None
                 and any(Store().metrics(v.key) for v in Store().variants(
                     [m.variant_key for m in Store().members(Store().study("e2e").id)]).values()), 240)
    assert cancel_study("e2e")
    t.join(timeout=120)
    assert not t.is_alive() and result["out"].status == "cancelled"
    store = Store()
    states = {v.status for v in store.variants([m.variant_key for m in store.members(store.study("e2e").id)]).values()}
    assert "running" not in states and "pending" in states
    import ray

    ray.shutdown()
    # the rerun's backend does not matter here: the driver's own threads (no second Ray start)
    rerun = RunOptions(track=False, backend_instance=InProcessBackend(capacity=2))
    assert run_study(spec, options=rerun).status == "completed"
    assert not cancel_study("e2e")  # not running any more


def test_concurrent_first_opens_of_the_store_do_not_race(tmp_path):
    """A driver and `study status` may create a new state database at the same moment."""
    import racers

    for round_ in range(3):
        url = f"sqlite:///{tmp_path / f'state{round_}.db'}"
        outcomes = racers.race(racers.open_store, (url,), 6, timeout=120)
        assert outcomes == [SCHEMA_VERSION] * 6, outcomes


def test_two_drivers_started_at_once_one_trains_the_other_refuses(workdir, tmp_path_factory):
    """Two terminals, one study, the same moment: in an empty folder, then again with the store there."""
    ref_dir = tmp_path_factory.mktemp("reference")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-c", "from bnnctl.orchestrator.cli import main; main()"]

    def race(spec):
        procs = [subprocess.Popen(cli + ["study", "run", str(spec), "--cpus", "2"], env=env, cwd=workdir,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        return [(p.wait(timeout=600), *p.communicate()) for p in procs]

    for seeds in ([0], [0, 1]):  # the second round finds the store, MLflow and the first seed's runs
        spec = _spec(workdir, 3)
        spec.write_text(spec.read_text().replace("seeds: [0]", f"seeds: {seeds}"))
        outcomes = race(spec)
        codes = sorted(code for code, _, _ in outcomes)
        assert codes == [0, 1], outcomes
        loser = next(err for code, _, err in outcomes if code == 1)
        assert "'e2e' is being run by another driver: " in loser and "Traceback" not in loser, loser
        store = Store()
        members = store.members(store.study("e2e").id)
        assert len(members) == 3 * len(seeds)
        for m in members:
            assert [a.status for a in store.attempts(m.variant_key)] == ["completed"]  # trained exactly once
        assert store.lease("e2e") is None  # released by the winner
    runs = _mlflow_runs(workdir / ".bnnctl" / "mlflow.db")
    assert len(runs) == 1 + 6 and sum(1 for r in runs if "mlflow.parentRunId" not in r.data.tags) == 1
    # the same results as one driver alone
    ref = ref_dir / "e2e.yaml"
    ref.write_text(spec.read_text())
    os.chdir(ref_dir)  # in the driver's own thread: one task at a time, as the torch RNG is shared
    assert run_study(ref, options=RunOptions(track=False, backend_instance=InProcessBackend(capacity=1))).status == "completed"
    mine = {(m.row, m.seed): store.variant(m.variant_key).result["metrics"]["pckh"] for m in members}
    alone = Store()
    theirs = {(m.row, m.seed): alone.variant(m.variant_key).result["metrics"]["pckh"]
              for m in alone.members(alone.study("e2e").id)}
    assert mine == theirs
