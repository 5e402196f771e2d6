"""A study on a real autoscaling Ray cluster: Ray's autoscaler (v2, and v1) with its fake multi-node
provider, which starts real raylets on this machine as a cloud provider would start machines. The
head has no GPU; the autoscaler's config has a node type with one. A variant that asks for a GPU is
not refused, waits ("waiting for nodes"), runs on the node the autoscaler adds and completes; a
request no node type can hold fails in one message, from the autoscaler's own verdict."""
import json
import subprocess
import sys

import pytest

from bnnctl.orchestrator.store import Store
from bnnctl.orchestrator.study import transient

from raynodes import RayNodes, free_port, run_cli, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Ray's fake multi-node provider: Linux")]

#: the fake provider's ids: the head's, then fff…00001, fff…00002 for the nodes it adds
HEAD_ID = "f" * 51 + "00000"

SPEC = """
name: scaled
base:
  model: {{width: 8, depth: 2}}
  data: {{root: data/syn, synthetic: {{train: 64, valid: 16}}, input_size: 32}}
  epochs: 1
  batch_size: 16
  loss: mse
  threads: 1
  latency: false
seeds: [0]
resources: {{cpus: 1, gpus: {gpus}}}
ablations:
  - name: ab
    mode: isolated
    rows:
      - {{name: relu, set: {{model.activation.kind: relu}}}}
execution: {{max_parallel: 1, retries: 0, wait_warning_s: 1}}
"""


def _config(gcs: str) -> dict:
    """Ray's autoscaler config for its fake multi-node provider (the format of a cluster YAML)."""
    return {
        "cluster_name": "bnnctl-test", "max_workers": 1, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "provider": {"type": "external", "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs, "launch_multiple": True,
                     "head_node_id": HEAD_ID},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu1": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 100_000_000}, "node_config": {},
                     "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def _reported(address: str, env: dict) -> bool:
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "from bnnctl.orchestrator.backends.ray_cluster import autoscaler_verdict; print(autoscaler_verdict())")
    out = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True, timeout=120)
    return out.stdout.strip().startswith("{")


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_a_gpu_variant_waits_for_the_autoscaler_and_runs_on_the_node_it_adds(tmp_path, version):
    project = tmp_path / "project"
    project.mkdir()
    nodes = RayNodes(tmp_path / "ray")
    port = free_port()
    config = tmp_path / "autoscaler.json"
    config.write_text(json.dumps(_config(f"127.0.0.1:{port}")))
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_enable_autoscaler_v2": "1" if version == "v2" else "0",
           "RAY_CLOUD_INSTANCE_ID": HEAD_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": HEAD_ID,
           "RAY_NODE_TYPE_NAME": "ray.head.default"}  # what `ray up` gives the head it starts
    try:
        head, address = nodes.head(cpus=1, port=port, extra=[f"--autoscaling-config={config}"], env=env)
        wait_for(lambda: _reported(address, nodes.env), 120, "the autoscaler's first report to the GCS", every=1)
        # one GPU: no alive node has one; the autoscaler's gpu1 type does
        (project / "gpu.yaml").write_text(SPEC.format(gpus=1))
        # the nodes an autoscaler adds are other machines: the driver's default folder is no storage
        out = run_cli(["study", "run", "gpu.yaml", "--address", address, "--no-track"], nodes.env, project, timeout=120)
        assert out.returncode == 1 and f"the Ray cluster at {address} has an autoscaler (the nodes it adds are other " \
            "machines), but the run storage is the default folder" in " ".join(out.stderr.split()), out.stderr
        assert not (project / ".bnnctl" / "runs").exists() or not any((project / ".bnnctl" / "runs").iterdir())
        # a folder every node mounts at the same path (all nodes are on this machine)
        storage = ["--storage", str(tmp_path / "shared")]
        out = run_cli(["study", "run", "gpu.yaml", "--address", address, "--no-track", *storage], nodes.env, project,
                      timeout=400)
        assert out.returncode == 0, out.stdout + out.stderr
        text = " ".join(out.stdout.split())
        assert "waiting for nodes: " in text and "the cluster's autoscaler may add one" in text, text
        store = Store(f"sqlite:///{project / '.bnnctl' / 'state.db'}")
        (key,) = [m.variant_key for m in store.members(store.study("scaled").id)]
        (attempt,) = store.attempts(key)
        assert attempt.status == "completed" and attempt.node_id == "f" * 51 + "00001", attempt
        assert "Traceback" not in out.stdout + out.stderr
        if version == "v1":
            return  # v1 reports no infeasible requests: such a variant waits, shown as waiting for nodes
        # two GPUs: no node type of the config has them; the autoscaler says so, the variant fails
        (project / "two.yaml").write_text(SPEC.format(gpus=2).replace("name: scaled", "name: two").replace("seeds: [0]", "seeds: [1]"))
        out = run_cli(["study", "run", "two.yaml", "--address", address, "--no-track", *storage], nodes.env, project,
                      timeout=300)
        assert out.returncode == 1, out.stdout + out.stderr
        text = " ".join((out.stdout + out.stderr).split())
        assert f"failed ab / relu / seed 1: the autoscaler of the Ray cluster at {address} reports that none of its node types can hold 1 CPUs and 2 GPUs" \
            in text, text
        assert "Traceback" not in out.stdout + out.stderr
        # a machine's verdict, not the config's: the next plain run asks the autoscaler again
        store = Store(f"sqlite:///{project / '.bnnctl' / 'state.db'}")
        (key,) = [m.variant_key for m in store.members(store.study("two").id)]
        assert transient(store.variant(key).error)
    finally:
        nodes.close()  # the nodes the autoscaler started are the head's descendants: they go with it
