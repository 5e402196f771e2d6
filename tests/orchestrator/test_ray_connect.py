"""Where a study runs: a private local Ray cluster by default, whatever `ray start` left on the
machine; the machine's cluster only with `--address auto`; one clear message for a cluster that
cannot be reached or refuses the token. Real `ray start` nodes, stopped by process group."""
import time

import pytest

from bnnctl.orchestrator.store import Store

from raynodes import RECORD, RayNodes, run_cli, wait_for

pytestmark = pytest.mark.cluster

SPEC = """
name: {name}
base:
  model: {{width: 8, depth: 2}}
  data: {{root: {root}, synthetic: {{train: 32, valid: 16}}, input_size: 32}}
  epochs: 1
  batch_size: 16
  loss: mse
  threads: 1
  latency: false
seeds: [{seed}]
ablations:
  - name: acts
    mode: isolated
    rows:
      - {{name: relu, set: {{model.activation.kind: relu}}}}
      - {{name: prelu, set: {{model.activation.kind: prelu}}}}
execution: {{max_parallel: 2}}
"""


@pytest.fixture()
def nodes(tmp_path):
    import ray

    # `--address auto` looks for the machine's clusters: the one the other tests share in this
    # process must not be among them
    ray.shutdown()
    n = RayNodes(tmp_path / "ray")
    yield n
    n.close()


def _spec(tmp_path, name):
    """A tiny study; each name gets its own seed, so no study reuses another's runs."""
    f = tmp_path / f"{name}.yaml"
    f.write_text(SPEC.format(name=name, root=tmp_path / "syn", seed=sum(map(ord, name))))
    return f


def _attempt_nodes(tmp_path, name):
    store = Store(f"sqlite:///{tmp_path / '.bnnctl' / 'state.db'}")
    s = store.study(name)
    keys = [m.variant_key for m in store.members(s.id)]
    return {a.node_id for k in keys for a in store.attempts(k)}


def _one_message(proc):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.stderr.strip()


def test_a_stale_cluster_record_does_not_stop_the_default_local_cluster(tmp_path, nodes):
    head, address = nodes.head()
    wait_for(lambda: RECORD.exists() and RECORD.read_text().strip().endswith(address.split(":")[1]), 60,
             "the current-cluster record")
    nodes.kill(head)  # gone without `ray stop`: its record stays behind
    assert RECORD.read_text().strip().endswith(address.split(":")[1])
    out = run_cli(["study", "run", str(_spec(tmp_path, "stale")), "--cpus", "2", "--no-track"], nodes.env, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "study stale: completed" in out.stdout
    assert len(_attempt_nodes(tmp_path, "stale") - {None}) == 1  # the private cluster's one node
    # joining "the machine's cluster" explicitly names the dead address, in seconds
    t0 = time.monotonic()
    err = _one_message(run_cli(["study", "run", str(_spec(tmp_path, "stale-auto")), "--address", "auto", "--no-track"],
                               nodes.env, tmp_path))
    assert time.monotonic() - t0 < 60
    assert "the Ray cluster at auto" in err and address.split(":")[1] in err  # names the recorded address
    # (normally "cannot reach"; should another process have taken the dead head's port meanwhile, it
    # answers and refuses us, which is reported naming the same address)


def test_with_a_live_cluster_the_default_is_private_and_auto_joins_it(tmp_path, nodes):
    head, address = nodes.head(cpus=2)
    (live,) = nodes.node_ids(address)
    out = run_cli(["study", "run", str(_spec(tmp_path, "private")), "--cpus", "2", "--no-track"], nodes.env, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    private = _attempt_nodes(tmp_path, "private")
    assert len(private) == 1 and live not in private  # its own cluster, not the live one
    out = run_cli(["study", "run", str(_spec(tmp_path, "joined")), "--address", "auto", "--no-track"], nodes.env, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert _attempt_nodes(tmp_path, "joined") == {live}
    out = run_cli(["study", "status", "joined"], nodes.env, tmp_path)
    assert f"(node {live[:8]})" in out.stdout  # where each attempt ran
    # a wrong token: one message that says what to do
    bad = {**nodes.env, "RAY_AUTH_TOKEN": "0" * 64}
    bad.pop("RAY_AUTH_TOKEN_PATH")
    err = _one_message(run_cli(["study", "run", str(_spec(tmp_path, "badtoken")), "--address", address, "--no-track"],
                               bad, tmp_path, timeout=120))
    assert f"the Ray cluster at {address} refused the connection: token authentication failed" in err
    assert "RAY_AUTH_TOKEN_PATH" in err


def test_an_unreachable_address_is_one_message_naming_it(tmp_path, nodes):
    t0 = time.monotonic()
    err = _one_message(run_cli(["study", "run", str(_spec(tmp_path, "nowhere")), "--address", "127.0.0.1:9",
                                "--no-track"], nodes.env, tmp_path))
    assert time.monotonic() - t0 < 60
    assert "cannot reach the Ray cluster at 127.0.0.1:9" in err and "Connection refused" in err
    err = _one_message(run_cli(["tune", "run", str(tmp_path / "missing.yaml"), "--address", "127.0.0.1:9"],
                               nodes.env, tmp_path))
    assert "missing.yaml" in err  # a bad spec is reported before any connection is tried
    err = _one_message(run_cli(["study", "run", str(_spec(tmp_path, "http")), "--address", "http://127.0.0.1:8265",
                                "--no-track"], nodes.env, tmp_path))
    assert "study submit" in err and "GCS address" in err


def test_a_request_no_node_can_hold_is_refused_in_seconds_with_the_cluster_resources(tmp_path, nodes):
    for resources, needs in (("{cpus: 64}", "needs 64 CPUs and 0 GPUs"), ("{cpus: 1, gpus: 0.5}", "needs 1 CPUs and 0.5 GPUs")):
        spec = _spec(tmp_path, "huge")
        spec.write_text(spec.read_text() + f"resources: {resources}\n")
        t0 = time.monotonic()
        err = _one_message(run_cli(["study", "run", str(spec), "--cpus", "2", "--no-track"], nodes.env, tmp_path))
        assert time.monotonic() - t0 < 60
        assert needs in err and "the cluster's nodes:" in err and ": 2 CPUs, 0 GPUs" in err, err
        assert f"{spec}, line " in err and ", resources: no node of a private local Ray cluster" in err, err
        assert not (tmp_path / ".bnnctl").exists()  # refused before anything was written (pre-flight)
