"""A study tracked on a real MLflow tracking server (`mlflow server` on 127.0.0.1, serving the artifacts)."""
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bnnctl.orchestrator.cli import app

from raynodes import free_port, wait_for

pytestmark = pytest.mark.slow

STUDY = """
name: served
base:
  model: {{width: 8, depth: 2}}
  data: {{root: {root}, synthetic: {{train: 32, valid: 16}}, input_size: 32}}
  epochs: 2
  batch_size: 16
  threads: 1
  latency: false
ablations:
  - name: a
    mode: isolated
    rows:
      - {{name: relu, set: {{model.activation.kind: relu}}}}
      - {{name: prelu, set: {{model.activation.kind: prelu}}}}
tracking: {{experiment: served}}
"""


@pytest.fixture()
def mlflow_server(tmp_path):
    port = free_port()
    folder = tmp_path / "server"
    folder.mkdir()
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
           str(folder / "artifacts"), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=folder, stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)

    def healthy():
        if proc.poll() is not None:
            raise AssertionError("mlflow server exited: " + (folder / "server.log").read_text()[-3000:])
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, 120, "the MLflow server", every=0.5)
        yield f"http://127.0.0.1:{port}", folder
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_runs_metrics_and_artifacts_reach_a_tracking_server(workdir, mlflow_server):
    url, folder = mlflow_server
    (workdir / "s.yaml").write_text(STUDY.format(root=workdir / "syn"))
    result = CliRunner().invoke(app, ["study", "run", "s.yaml", "--tracking-uri", url, "--cpus", "2"])
    assert result.exit_code == 0, result.output
    assert f"compare the runs in MLflow: open {url} (the MLflow tracking server)" in " ".join(result.output.split())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    exp = client.get_experiment_by_name("served")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "pckh")] == [1, 2]
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"result.json", "predictions.png"} <= names and "checkpoint" not in names
        assert Path(child.data.tags["bnnctl.checkpoint"]).is_file()  # in the run storage, once
    # artifact locations relative to the server's store (mlflow-artifacts:), no path of this machine
    assert exp.artifact_location.startswith("mlflow-artifacts:") and str(folder) not in exp.artifact_location
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in runs)
    # the artifacts went through the server into its own store, not into the project folder
    assert list((folder / "artifacts").rglob("predictions.png")) and not (workdir / "mlruns").exists()
    assert not (workdir / ".bnnctl" / "mlartifacts").exists()
