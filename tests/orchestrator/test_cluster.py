"""A study on a real 2-node Ray cluster whose second node cannot see the project folder, with run
storage on a real S3-protocol server (moto's standalone server on 127.0.0.1, spoken to by s3fs).

The second node runs in its own mount namespace with an empty tmpfs over the project folder and over
the workers' scratch folder, as another machine would. Nodes are stopped by process group.
"""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnnctl.orchestrator.store import Store

from conftest import BUCKET
from raynodes import RayNodes, run_cli, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                                        reason="needs root and unshare for the second node's private mount namespace")]

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
            assert {"predictions.png", "result.json"} <= names and "checkpoint" not in names, (key, names)
            # the checkpoints stay in the bucket (one copy): the run names the best one there
            assert client.get_run(run_id).data.tags["bnnctl.checkpoint"] == f"s3://{BUCKET}/runs/{key}/best.pt"
            assert fs.exists(f"{BUCKET}/runs/{key}/best.pt")
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


NO_CREDENTIALS = """
name: creds
base:
  model: {width: 8, depth: 2}
  data: {root: data/syn, synthetic: {train: 96, valid: 16}, input_size: 32}
  epochs: 2
  batch_size: 16
  loss: mse
  threads: 1
  latency: false
seeds: [0]
ablations:
  - name: ab
    mode: isolated
    rows:
      - {name: relu, set: {model.activation.kind: relu}}
      - {name: prelu, set: {model.activation.kind: prelu}}
execution: {max_parallel: 2, retries: 2}
"""


def test_a_node_without_storage_credentials_loses_its_variant_to_the_other_node(tmp_path, s3):
    """Two nodes of one CPU; the second has no S3 credentials. The variant that lands there fails
    at its first storage call (botocore's NoCredentialsError): one line naming that node and the
    storage URL, no traceback; it is retried on the node that has credentials and completes."""
    env_s3, fs = s3
    project = tmp_path / "project"
    project.mkdir()
    (project / "creds.yaml").write_text(NO_CREDENTIALS)
    nodes = RayNodes(tmp_path / "ray", extra_env=env_s3)
    bare = {k: v for k, v in nodes.env.items() if not k.startswith("AWS_") or k == "AWS_DEFAULT_REGION"}
    bare.update(AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
                AWS_CONFIG_FILE="/nonexistent")
    try:
        _, address = nodes.head(cpus=1)
        nodes.worker(address, cpus=1, hide=[project, Path("/tmp/bnnctl-scratch")], resources='{"node2": 1}', env=bare)
        (second,) = nodes.node_ids(address, expect=2, resource="node2")
        storage = f"s3://{BUCKET}/creds"
        out = run_cli(["study", "run", "creds.yaml", "--address", address, "--storage", storage], nodes.env, project,
                      timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        store = Store(f"sqlite:///{project / '.bnnctl' / 'state.db'}")
        keys = [m.variant_key for m in store.members(store.study("creds").id)]
        attempts = {k: store.attempts(k) for k in keys}
        on_second = [a for atts in attempts.values() for a in atts if a.node_id == second]
        assert on_second, attempts  # both variants started at once: one of them on the bare node
        for a in on_second:
            assert a.status == "lost", a
            assert a.error.startswith(f"worker lost: storage failure on node {a.node} ({second[:8]}): run storage "
                                      f"{storage}/{a.variant_key}/"), a.error
            assert a.error.endswith("NoCredentialsError: Unable to locate credentials"), a.error
        for key, atts in attempts.items():
            assert atts[-1].status == "completed" and atts[-1].node_id != second, (key, atts)
            assert {"best.pt", "last.pt"} <= {Path(p).name for p in fs.ls(f"{BUCKET}/creds/{key}")}
        retried = [line for line in out.stdout.splitlines() if line.strip().startswith("retrying")
                   or " retrying " in line]
        assert retried and all("NoCredentialsError" in line for line in retried), out.stdout
        assert "Traceback" not in out.stdout + out.stderr
    finally:
        nodes.close()


DATA_PARALLEL = """
name: dpc
base:
  model: {{width: 8, depth: 2, binarize: {{activations: false, weights: false}}}}
  data: {{root: data/syn, synthetic: {{train: 480, valid: 16}}, input_size: 32}}
  optim: {{name: sgd, lr: 0.05, momentum: 0.9}}
  epochs: 4
  batch_size: 16
  loss: mse
  threads: 1
  latency: false
seeds: [0]
resources: {{workers: {workers}, cpus: 1}}
ablations:
  - name: ab
    mode: isolated
    rows:
      - {{name: relu, set: {{model.activation.kind: relu}}}}
execution: {{max_parallel: 1, retries: 2}}
"""


def _dp_project(root: Path, name: str, workers: int) -> Path:
    project = root / name
    project.mkdir()
    (project / "dpc.yaml").write_text(DATA_PARALLEL.format(workers=workers))
    return project


def _dp_run(project: Path) -> dict:
    store = Store(f"sqlite:///{project / '.bnnctl' / 'state.db'}")
    (key,) = [m.variant_key for m in store.members(store.study("dpc").id)]
    return {"key": key, "store": store, "attempts": store.attempts(key), "metrics": store.metrics(key),
            "final": {k: v for k, v in store.variant(key).result["metrics"].items() if k != "epoch_time"}}


def test_a_data_parallel_variant_spans_two_nodes_and_resumes_after_one_rank_node_dies(tmp_path, s3):
    """One variant, two ranks (Ray Train, gloo) on two nodes of one CPU each, the second blind to the
    project folder, storage on S3: it trains what one worker trains (same global batch) and, when the
    node of one rank dies mid-training, the whole group restarts on the nodes left (a third joins)
    from the checkpoint in the bucket and ends with the uninterrupted run's numbers."""
    env_s3, fs = s3
    nodes = RayNodes(tmp_path / "ray", extra_env={**env_s3, "RAY_health_check_period_ms": "1000",
                                                  "RAY_health_check_failure_threshold": "5"})
    projects = tmp_path / "projects"  # the nodes' own folder (their token) stays visible
    projects.mkdir()
    hide = [projects, Path("/tmp/bnnctl-scratch")]
    try:
        _, address = nodes.head(cpus=1)
        worker = nodes.worker(address, cpus=1, hide=hide, resources='{"node2": 1}')
        head_and_second = set(nodes.node_ids(address, expect=2))
        (second,) = nodes.node_ids(address, expect=2, resource="node2")
        walls = {}
        for workers in (1, 2):
            project = _dp_project(projects, f"w{workers}", workers)
            t0 = time.monotonic()
            out = run_cli(["study", "run", "dpc.yaml", "--address", address, "--storage", f"s3://{BUCKET}/w{workers}"],
                          nodes.env, project, timeout=600)
            walls[workers] = time.monotonic() - t0
            assert out.returncode == 0, out.stdout + out.stderr
        one, two = _dp_run(projects / "w1"), _dp_run(projects / "w2")
        print(f"2-node cluster, 1 CPU each: 1 worker {walls[1]:.1f} s, 2 workers {walls[2]:.1f} s (study wall time)")
        assert one["key"] == two["key"]  # the number of workers does not change the math (sync BatchNorm)
        (attempt,) = two["attempts"]
        assert attempt.status == "completed" and attempt.node_id.startswith("group:")
        assert {i for i in attempt.node_id.removeprefix("group:").split(",")} == {n[:8] for n in head_and_second}
        assert "rank 0)" in attempt.node and "rank 1)" in attempt.node  # a rank on each node
        diffs = {name: max(abs(a[1] - b[1]) for a, b in zip(one["metrics"][name], two["metrics"][name]))
                 for name in ("train_loss", "val_loss")}
        print("2 workers on 2 nodes vs 1 worker, largest per-epoch difference:", diffs)
        assert len(two["metrics"]["train_loss"]) == 4 and diffs["train_loss"] < 1e-5 and diffs["val_loss"] < 1e-5

        # the same 2-worker variant again; the node of rank 1 dies after an epoch
        project = _dp_project(projects, "killed", 2)
        proc = subprocess.Popen([sys.executable, "-c", "from bnnctl.orchestrator.cli import main; "
                                "main()", "study", "run", "dpc.yaml", "--address", address, "--storage",
                                f"s3://{BUCKET}/killed"], env=nodes.env, cwd=project,
                                stdout=open(tmp_path / "killed.log", "w"), stderr=subprocess.STDOUT)
        db = project / ".bnnctl" / "state.db"

        def one_epoch_done():
            if not db.exists():
                return False
            store = Store(f"sqlite:///{db}")
            study = store.study("dpc")
            keys = [m.variant_key for m in store.members(study.id)] if study else []
            return bool(keys) and len(store.metrics(keys[0]).get("train_loss", [])) >= 1

        wait_for(one_epoch_done, 300, "the 2-worker variant's first epoch", every=0.1)
        nodes.kill(worker)
        nodes.worker(address, cpus=1, hide=hide, name="worker3")  # the machine that replaces it
        assert proc.wait(timeout=900) == 0, (tmp_path / "killed.log").read_text()
        killed = _dp_run(project)
        statuses = [a.status for a in killed["attempts"]]
        assert statuses[0] == "lost" and statuses[-1] == "completed", killed["attempts"]
        assert second[:8] not in killed["attempts"][-1].node_id  # restarted on the nodes left
        assert "of the data-parallel group was lost: " in killed["attempts"][0].error, killed["attempts"][0].error
        log = (tmp_path / "killed.log").read_text()
        assert re.search(r"resumed\s+ab / relu / seed 0 after epoch [1-3]/4", log), log  # from the bucket's last.pt
        assert killed["final"] == two["final"], (killed["final"], two["final"])
        for name in ("train_loss", "val_loss"):
            assert killed["metrics"][name] == two["metrics"][name], name
    finally:
        nodes.close()
