"""`study submit` end to end: a real `ray start --head` with its job server, the state in a real
PostgreSQL database, the laptop's commands in separate processes."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import studies as specs

from bnnctl.orchestrator.store import Store
from bnnctl.orchestrator.submit import AWAITING_STOP

from raynodes import CLI, RayNodes, free_port, run_cli, wait_for

pytestmark = pytest.mark.cluster

def _spec(root):
    doc = specs.study("sub", root, specs.ACTIVATIONS, ablation="acts", execution={"max_parallel": 1},
                      base_fields={"epochs": 40, "train": 64})
    del doc["base"]["loss"]  # the task's default loss
    return doc


@pytest.fixture()
def cluster(tmp_path):
    venv_bin = str(Path(sys.executable).parent)  # the head runs the job's `python -m bnnctl...` from here
    nodes = RayNodes(tmp_path / "ray", extra_env={"PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"})
    port = free_port()
    try:
        nodes.head(cpus=2, dashboard_port=port)
        job_server = f"http://127.0.0.1:{port}"

        def up():
            import urllib.error
            import urllib.request

            try:
                return urllib.request.urlopen(f"{job_server}/api/version", timeout=2).status == 200
            except urllib.error.HTTPError as err:
                return err.code == 401  # up, and asking for the token as it should
            except OSError:
                return False

        wait_for(up, 120, "the Ray job server", every=1)
        yield nodes, job_server
    finally:
        nodes.close()


def test_submit_follow_refuse_cancel_and_resume(tmp_path, cluster, pg_server):
    nodes, job_server = cluster
    db = pg_server.database()
    laptop = tmp_path / "laptop"
    laptop.mkdir()
    spec = specs.write(laptop, _spec(tmp_path / "syn"))
    storage = f"file://{tmp_path / 'shared-runs'}"
    env = nodes.env
    submit = ["study", "submit", str(spec), "--address", job_server, "--db", db, "--storage", storage, "--no-track"]

    # what the cluster could not reach is refused before anything is submitted
    for bad, words in (([], "a sqlite file stays on one machine"), (["--db", db], "every node reaches")):
        out = run_cli(["study", "submit", str(spec), "--address", job_server, "--no-track", *bad], env, laptop)
        assert out.returncode == 1 and words in out.stderr, out.stderr

    out = run_cli(submit, env, laptop)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "submitted as job bnnctl-study-sub-1" in out.stdout and pg_server.password not in out.stdout
    again = run_cli(submit, env, laptop)
    assert again.returncode == 1 and "already running as job bnnctl-study-sub-1" in again.stderr

    store = Store(db)

    def trained_one_epoch():
        s = store.study("sub")
        return s is not None and s.status == "running" and any(
            store.metrics(m.variant_key) for m in store.members(s.id))

    wait_for(trained_one_epoch, 300, "the submitted driver to train an epoch", every=1)
    status = run_cli(["study", "status", "sub", "--db", db], env, laptop)
    assert re.search(r"job bnnctl-study-sub-1 on http://127\.0\.0\.1:\d+: RUNNING", " ".join(status.stdout.split()))
    follower = subprocess.Popen(CLI + ["study", "logs", "sub", "--db", db], env=env, cwd=laptop,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cancel = run_cli(["study", "cancel", "sub", "--db", db], env, laptop, timeout=120)
    assert cancel.returncode == 0 and "job bnnctl-study-sub-1 STOPPED" in cancel.stdout, cancel.stdout + cancel.stderr
    followed = follower.communicate(timeout=120)[0]
    assert re.search(r"job bnnctl-study-sub-1: STOPPED", followed), followed  # cancelled, not failed
    assert "study sub: cancelled" in " ".join(followed.split())  # the driver's own last words, from the cluster
    # the job was stopped only once they were said (under load, a stop right at the lease's release
    # once cut them off)
    said = " ".join(followed.split())
    assert said.index("study sub: cancelled") < said.index(AWAITING_STOP) < said.index("job bnnctl-study-sub-1: STOPPED")
    s = store.study("sub")
    states = [v.status for v in store.variants([m.variant_key for m in store.members(s.id)]).values()]
    assert s.status == "cancelled" and "running" not in states and "pending" in states

    # a later submit resumes: a new job, the finished variants reused, the rest resumed
    done_before = [k for k, v in store.variants([m.variant_key for m in store.members(s.id)]).items()
                   if v.status == "completed"]
    out = run_cli(submit, env, laptop)
    assert out.returncode == 0 and "submitted as job bnnctl-study-sub-2" in out.stdout, out.stdout + out.stderr
    logs = run_cli(["study", "logs", "sub", "--db", db], env, laptop, timeout=600)
    assert "job bnnctl-study-sub-2: SUCCEEDED" in logs.stdout, logs.stdout + logs.stderr
    assert "study sub: completed" in " ".join(logs.stdout.split())
    s = store.study("sub")
    variants = store.variants([m.variant_key for m in store.members(s.id)])
    assert s.status == "completed" and all(v.status == "completed" for v in variants.values())
    for k in done_before:
        assert len(store.attempts(k)) == 1  # not retrained
    assert all(v.result["best_checkpoint"] == f"{k}/best.pt" for k, v in variants.items())
    assert all((tmp_path / "shared-runs" / k / "best.pt").exists() for k in variants)
    # a version (--tag, --set) is submitted as that version: its own study and job; the same
    # configs here, so every variant is reused
    attempts = {k: len(store.attempts(k)) for k in variants}
    tagged = run_cli(submit + ["--tag", "again"], env, laptop)
    assert tagged.returncode == 0 and "study sub@again: submitted as job bnnctl-study-sub@again-1" in tagged.stdout, \
        tagged.stdout + tagged.stderr
    tagged_logs = run_cli(["study", "logs", "sub@again", "--db", db], env, laptop, timeout=600)
    assert "job bnnctl-study-sub@again-1: SUCCEEDED" in tagged_logs.stdout, tagged_logs.stdout + tagged_logs.stderr
    version = store.study("sub@again")
    assert version.status == "completed" and version.layout.version == "again"
    assert {m.variant_key for m in store.members(version.id)} == set(variants)
    assert {k: len(store.attempts(k)) for k in variants} == attempts  # nothing trained again
    assert store.study("sub").status == "completed"  # the spec's own study, untouched
    # nothing the laptop saw shows the database password
    for text in (out.stdout, out.stderr, again.stderr, status.stdout, status.stderr, cancel.stdout, followed,
                 logs.stdout, logs.stderr, tagged.stdout, tagged_logs.stdout):
        assert pg_server.password not in text


def test_tune_submit_refuses_what_the_cluster_cannot_reach(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from bnnctl.orchestrator.cli import app

    monkeypatch.chdir(tmp_path)
    spec = Path(__file__).resolve().parents[2] / "studies" / "tune_lambda.yaml"
    result = CliRunner().invoke(app, ["tune", "submit", str(spec), "--address", "http://127.0.0.1:9", "--no-track",
                                      "--db", "postgresql+psycopg://u:hunter2@db/x"])
    assert result.exit_code == 1 and "needs run storage every node reaches" in result.output
    assert "hunter2" not in result.output
    result = CliRunner().invoke(app, ["tune", "submit", str(spec), "--address", "127.0.0.1:6379", "--no-track",
                                      "--db", "postgresql+psycopg://u:hunter2@db/x", "--storage", "s3://b/r"])
    assert result.exit_code == 1 and "http://HEAD:8265" in result.output
    assert not (tmp_path / ".bnnctl").exists()
