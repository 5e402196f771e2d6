"""A study on a real 2-node Ray cluster whose second node cannot see the project folder, with run
storage on a real S3-protocol server (moto's standalone server on 127.0.0.1, spoken to by s3fs).

The second node runs in its own mount namespace with an empty tmpfs over the project folder and over
the workers' scratch folder, as another machine would. Nodes are stopped by process group.
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnnctl.orchestrator.store import Store

from raynodes import RayNodes, free_port, run_cli, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                reason="needs root and unshare for the second node's private mount namespace")

BUCKET = "bnnctl-test"
SPEC = """
name: cluster
base:
  model: {{width: 8, depth: 2}}
  data: {{root: data/syn, synthetic: {{train: 160, valid: 16}}, input_size: 32}}
  epochs: {epochs}
  batch_size: 16
  loss: mse
  threads: 1
  latency: false
seeds: {seeds}
teachers:
  real:
    set: {{model.binarize.activations: false, model.binarize.weights: false}}
ablations:
  - name: ab
    mode: isolated
    rows:
      - {{name: prelu, set: {{model.activation.kind: prelu}}}}
      - {{name: reverse, set: {{model.activation.kind: prelu}}, stages: reverse_order}}
      - {{name: distill, set: {{model.activation.kind: prelu, distill.weight: 0.5}}, teacher: real}}
execution: {{max_parallel: 2, retries: 2}}
"""


@pytest.fixture()
def s3(tmp_path):
    """moto's S3 server on a free loopback port; yields the environment a client or node needs."""
    port = free_port()
    server = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=open(tmp_path / "moto.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        import s3fs

        def up():
            try:
                fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"])
                fs.mkdir(BUCKET)
                return fs
            except Exception:  # noqa: BLE001 - not listening yet
                return None

        fs = wait_for(up, 60, "moto's S3 server", every=0.5)
        yield env, fs
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _write(folder: Path, seeds, epochs=6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    f = folder / "cluster.yaml"
    f.write_text(SPEC.format(seeds=list(seeds), epochs=epochs))
    return f


def _results(folder: Path) -> dict:
    """{(ablation, row, seed): final metrics} and {key: attempts} of the project's study."""
    store = Store(f"sqlite:///{folder / '.bnnctl' / 'state.db'}")
    s = store.study("cluster")
    members = store.members(s.id)
    variants = store.variants([m.variant_key for m in members])
    metrics = {(m.ablation, m.row, m.seed): {k: v for k, v in variants[m.variant_key].result["metrics"].items()
                                             if k != "epoch_time"}  # everything but the clock
               for m in members if m.ablation is not None}
    attempts = {k: store.attempts(k) for k in variants}
    return {"metrics": metrics, "attempts": attempts, "store": store, "members": members}


def test_a_study_runs_on_two_nodes_with_s3_storage_and_survives_a_lost_node(tmp_path, s3):
    env_s3, fs = s3
    # the reference: the same study on a private local cluster with the default local storage
    local = tmp_path / "local"
    out = run_cli(["study", "run", str(_write(local, [0, 1])), "--cpus", "2", "--no-track"],
                  {**os.environ, "PYTHONUNBUFFERED": "1"}, local, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    reference = _results(local)["metrics"]

    project = tmp_path / "project"
    spec = _write(project, [0])
    nodes = RayNodes(tmp_path / "ray", extra_env={**env_s3, "RAY_health_check_period_ms": "1000",
                                                  "RAY_health_check_failure_threshold": "5"})
    try:
        _, address = nodes.head(cpus=1)
        worker = nodes.worker(address, cpus=1, hide=[project, Path("/tmp/bnnctl-scratch")], resources='{"node2": 1}')
        both = nodes.node_ids(address, expect=2)
        (second,) = nodes.node_ids(address, expect=2, resource="node2")
        # the default storage folder is this machine's only: refused on a cluster of 2 nodes, nothing trained
        out = run_cli(["study", "run", str(spec), "--address", address], nodes.env, project, timeout=300)
        assert out.returncode == 1 and "has 2 nodes, but the run storage is the default folder" in out.stderr, \
            out.stdout + out.stderr
        assert not (project / ".bnnctl" / "runs").exists()
        storage = f"s3://{BUCKET}/runs"
        t0 = time.monotonic()
        out = run_cli(["study", "run", str(spec), "--address", address, "--storage", storage], nodes.env, project,
                      timeout=900)
        wall = time.monotonic() - t0
        assert out.returncode == 0, out.stdout + out.stderr
        run1 = _results(project)
        print(f"2-node run: {wall:.1f} s wall for {len(run1['attempts'])} variants")
        # attempts ran on both nodes, recorded with their node ids
        ran_on = {a.node_id for atts in run1["attempts"].values() for a in atts}
        assert ran_on == set(both), (ran_on, both)
        # identical metrics to the local cluster's run
        for row, m in run1["metrics"].items():
            assert m == reference[row], row
        # every checkpoint and image is in the bucket; the project folder holds none
        for key in run1["attempts"]:
            names = {Path(p).name for p in fs.ls(f"{BUCKET}/runs/{key}")}
            assert {"last.pt", "best.pt", "predictions.png"} <= names, (key, names)
        assert not (project / ".bnnctl" / "runs").exists()
        v = run1["store"].variant(next(iter(run1["attempts"])))
        assert v.checkpoint_dir.startswith(f"s3://{BUCKET}/runs/") and v.result["best_checkpoint"] == f"{v.key}/best.pt"
        # the MLflow runs have their artifacts (read back from the bucket by the driver)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{project / '.bnnctl' / 'mlflow.db'}")
        for key in run1["attempts"]:
            run_id = run1["store"].variant(key).mlflow_run_id
            names = {a.path for a in client.list_artifacts(run_id)}
            assert {"predictions.png", "checkpoint", "result.json"} <= names, (key, names)
            assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == ["checkpoint/best.pt"]
        # `study status` names the node of each attempt
        status = run_cli(["study", "status", "cluster"], nodes.env, project)
        assert f"(node {second[:8]})" in status.stdout

        # a second seed; the node is killed while a variant trains on it
        spec = _write(project, [0, 1])
        proc = subprocess.Popen(
            [sys.executable, "-c", "from bnnctl.orchestrator.cli import main; main()", "study", "run", str(spec),
             "--address", address, "--storage", storage],
            env=nodes.env, cwd=project, stdout=open(tmp_path / "run2.log", "w"), stderr=subprocess.STDOUT)
        store = Store(f"sqlite:///{project / '.bnnctl' / 'state.db'}")

        def training_on_second_node():
            for key in run1["attempts"].keys() ^ {m.variant_key for m in store.members(store.study("cluster").id)}:
                atts = store.attempts(key)
                # one epoch done, five to go (10 batches each: seconds, more than the driver takes to
                # record an epoch, so the node dies while the variant still trains there)
                if atts and atts[-1].status == "running" and atts[-1].node_id == second and store.metrics(key):
                    return key
            return None

        victim = wait_for(training_on_second_node, 300, "a variant with an epoch done on the second node", every=0.05)
        nodes.kill(worker)
        assert proc.wait(timeout=900) == 0, (tmp_path / "run2.log").read_text()
        run2 = _results(project)
        assert [a.status for a in run2["attempts"][victim]][:1] == ["lost"]
        assert run2["attempts"][victim][-1].status == "completed" and run2["attempts"][victim][-1].node_id != second
        assert "NodeDiedError" in run2["attempts"][victim][0].error or "WorkerCrashedError" in run2["attempts"][victim][0].error
        for row, m in run2["metrics"].items():
            assert m == reference[row], row  # resumed from the bucket to the same numbers
    finally:
        nodes.close()
