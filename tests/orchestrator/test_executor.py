"""The scheduling loop against the in-process backend: no cluster starts, task bodies are scripted.

The Ray backend runs the same loop in tests/orchestrator/test_study_e2e.py and tests/orchestrator/test_cluster.py.
"""
import dataclasses
import socket
import threading
import time
from pathlib import Path

import pytest

from bnnctl.orchestrator.backends import ChannelReporter, Finished, ResourceError, Task
from bnnctl.orchestrator.backends.inprocess import InProcessBackend, WorkerLost
from bnnctl.orchestrator.backends.ray_cluster import check_resources
from bnnctl.orchestrator.executor import Events, Executor, Hooks
from bnnctl.orchestrator.plan import Plan, Variant
from bnnctl.orchestrator.runstorage import RunStorage
from bnnctl.orchestrator.spec import Resources
from bnnctl.orchestrator.store import Store
from bnnctl.workers.config import to_dict
from bnnctl.workers.train import TrainConfig

ONE = Resources(cpus=1.0)


TINY_STUDY = """
name: {name}
base:
  model: {{width: {width}, depth: 2}}
  data: {{root: {root}, synthetic: {{train: 32, valid: 16}}, input_size: 32}}
  epochs: 2
  batch_size: 16
  threads: 1
  latency: false
ablations:
  - {{name: a, mode: isolated, rows: [{row}]}}
"""
RELU = "{name: relu, set: {model.activation.kind: relu}}"


def _tiny_study(workdir, name, root, row=RELU, width=8):
    """A one-row study of 2 epochs on a tiny synthetic set, written to workdir/s.yaml."""
    spec = workdir / "s.yaml"
    spec.write_text(TINY_STUDY.format(name=name, root=root, row=row, width=width))
    return spec


def _variant(name, seed=0, init_dep=None, teacher_dep=None, kind="row", resources=ONE):
    cfg = TrainConfig(epochs=3, seed=seed)
    return Variant(name, f"label {name}", kind, cfg, resources, seed, "ab", name, init_dep, teacher_dep)


def _setup(tmp_path, variants):
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    for v in variants:
        store.ensure_variant(v.key, v.label, v.kind, to_dict(v.config), list(v.deps))
    return store, Plan({v.key: v for v in variants}, {})


class Script:
    """Task bodies by key: each reports its epochs, then does what the test asked (records timing)."""

    def __init__(self, epochs=3, delay=0.02, lose=None, fail=None, crash=None, resume=None):
        self.epochs, self.delay = epochs, delay
        self.resume = dict(resume or {})  # key -> the epoch its checkpoint holds (a resumed run)
        self.lose = dict(lose or {})  # key -> how many times its worker dies first
        self.fail, self.crash = set(fail or ()), set(crash or ())
        self.calls: list[tuple[str, float, float]] = []  # key, start, end
        self.lock = threading.Lock()

    def __call__(self, task: Task, channel, node: str) -> Finished:
        start = time.monotonic()
        reporter = ChannelReporter(task.key, Path(task.storage) / task.key, channel)
        try:
            if self.lose.get(task.key, 0) > 0:
                self.lose[task.key] -= 1
                raise WorkerLost("killed by the test")
            if task.key in self.crash:
                raise ZeroDivisionError("a bug in the task")
            done = self.resume.get(task.key, 0)
            if done:  # what a resumed run says first: the history its checkpoint holds
                reporter.restored([(e, {"pckh": 10.0 * e}) for e in range(1, done + 1)])
            for epoch in range(done + 1, self.epochs + 1):
                time.sleep(self.delay)
                reporter.report(epoch, {"pckh": 10.0 * epoch})
                done = epoch
                if epoch < self.epochs and reporter.should_stop():
                    return Finished(task.key, "stopped", {"status": "stopped", "epochs_done": done}, node=node)
            if task.key in self.fail:
                return Finished(task.key, "failed", error="loss became NaN", node=node)
            return Finished(task.key, "completed", {"status": "completed", "epochs_done": done,
                                                    "config": task.config}, node=node)
        finally:
            with self.lock:
                self.calls.append((task.key, start, time.monotonic()))


def _executor(store, backend, tmp_path, **kw):
    backend.start(kw.pop("workers", 2), 1.0, 0.0)
    return Executor(store, None, backend, RunStorage(tmp_path / "runs"), **kw)


def test_the_dag_runs_in_order_within_the_parallelism_limit_and_records_where(tmp_path):
    vs = [_variant("teacher", kind="teacher"), _variant("s1", kind="stage1"),
          _variant("a"), _variant("b"), _variant("c", init_dep="s1"), _variant("d", teacher_dep="teacher")]
    store, plan = _setup(tmp_path, vs)
    script = Script()
    backend = InProcessBackend(capacity=8, run=script)
    status = _executor(store, backend, tmp_path, max_parallel=2).run(plan, "s", None)
    assert status == {k: "completed" for k in plan.variants}
    spans = {k: (s, e) for k, s, e in script.calls}
    assert spans["s1"][1] <= spans["c"][0] and spans["teacher"][1] <= spans["d"][0]  # dependencies first
    events = sorted([(s, 1) for s, _ in spans.values()] + [(e, -1) for _, e in spans.values()])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    assert peak == 2  # the limit is reached and never passed
    # a dependency's checkpoint reaches its dependant's config
    tasks = {t.key: t for t in backend.submitted}
    assert tasks["c"].fetch == (("init_from", "s1/last.pt"),)
    assert tasks["d"].fetch == (("distill.teacher", "teacher/best.pt"),)
    assert tasks["a"].fetch == () and tasks["a"].storage == str((tmp_path / "runs").resolve())
    for k in plan.variants:
        (attempt,) = store.attempts(k)
        assert (attempt.status, attempt.node, attempt.node_id) == ("completed", socket.gethostname(), "in-process")
        assert store.variant(k).checkpoint_dir == str((tmp_path / "runs" / k).resolve())
        assert [v for _, v in store.metrics(k)["pckh"]] == [10.0, 20.0, 30.0]
        assert store.variant(k).result["epochs_done"] == 3


def test_a_resumed_run_records_the_epochs_a_crashed_driver_never_got(tmp_path):
    store, plan = _setup(tmp_path, [_variant("r")])
    store.log_metrics("r", 1, {"pckh": 10.0})  # the crashed driver recorded epoch 1, not epoch 2
    seen = []
    events = Events(epoch=lambda v, e, m: seen.append(e))
    status = _executor(store, InProcessBackend(run=Script(resume={"r": 2})), tmp_path, events=events).run(plan, "s", None)
    assert status == {"r": "completed"}
    assert store.metrics("r")["pckh"] == [(1, 10.0), (2, 20.0), (3, 30.0)]
    assert seen == [3]  # the restored epochs are recorded, not shown as new ones


def test_a_lost_worker_is_retried_then_the_variant_fails_with_the_reason(tmp_path):
    store, plan = _setup(tmp_path, [_variant("once"), _variant("always")])
    script = Script(lose={"once": 1, "always": 99})
    seen = []
    events = Events(finished=lambda v, status, error: seen.append((v.key, status)))
    status = _executor(store, InProcessBackend(run=script), tmp_path, retries=2, events=events).run(plan, "s", None)
    assert status == {"once": "completed", "always": "failed"}
    assert [a.status for a in store.attempts("once")] == ["lost", "completed"]
    assert [a.status for a in store.attempts("always")] == ["lost", "lost", "failed"]
    assert store.variant("always").error == "worker lost 3 times: WorkerLost: killed by the test"
    assert seen.count(("always", "retrying")) == 2 and ("once", "retrying") in seen


def test_an_application_error_fails_the_variant_and_its_dependants_the_rest_goes_on(tmp_path):
    vs = [_variant("bad"), _variant("child", init_dep="bad"), _variant("bug"), _variant("fine")]
    store, plan = _setup(tmp_path, vs)
    status = _executor(store, InProcessBackend(run=Script(fail={"bad"}, crash={"bug"})), tmp_path).run(plan, "s", None)
    assert status == {"bad": "failed", "child": "failed", "bug": "failed", "fine": "completed"}
    assert store.variant("bad").error == "loss became NaN"
    assert store.variant("child").error == "dependency label bad failed"
    assert store.variant("bug").error.startswith("crashed: Traceback") and "ZeroDivisionError" in store.variant("bug").error
    assert [a.status for a in store.attempts("bad")] == ["failed"]  # never retried


def test_cancel_puts_running_variants_back_to_pending_and_starts_nothing_new(tmp_path):
    store, plan = _setup(tmp_path, [_variant("a"), _variant("b"), _variant("c")])
    script = Script(epochs=50, delay=0.05)
    flag = {"cancel": False}
    started = []

    def on_start(v):
        started.append(v.key)
        if len(started) == 2:
            threading.Timer(0.3, lambda: flag.update(cancel=True)).start()

    ex = _executor(store, InProcessBackend(run=script), tmp_path, max_parallel=2, events=Events(started=on_start))
    status = ex.run(plan, "s", None, cancelled=lambda: flag["cancel"])
    assert status == {"a": "pending", "b": "pending", "c": "pending"}
    assert started == ["a", "b"]
    assert [a.status for a in store.attempts("a")] == ["lost"] and store.attempts("a")[0].error == "study cancelled"
    assert {store.variant(k).status for k in "abc"} == {"pending"}


def test_a_variant_waiting_for_resources_is_reported(tmp_path):
    store, plan = _setup(tmp_path, [_variant("first"), _variant("second")])
    waiting = []
    # the first variant holds the only CPU for ~1.8 s, longer than one turn of the loop (0.5 s)
    backend = InProcessBackend(capacity=1, run=Script(epochs=6, delay=0.3))
    ex = _executor(store, backend, tmp_path, max_parallel=2, wait_warning_s=0.15,
                   events=Events(waiting=lambda v, s: waiting.append((v.key, s))))
    assert ex.run(plan, "s", None) == {"first": "completed", "second": "completed"}
    assert [k for k, _ in waiting] == ["second"] and waiting[0][1] >= 0.15


def test_an_impossible_resource_request_is_refused_at_start_with_the_cluster_resources():
    with pytest.raises(ResourceError, match="needs 4 CPUs and 0 GPUs; this process has 2 CPUs"):
        InProcessBackend(capacity=2).start(1, 4.0, 0.0)
    nodes = [{"host": "head", "address": "10.0.0.1", "node_id": "a" * 56, "cpus": 2.0, "gpus": 0.0},
             {"host": "gpu1", "address": "10.0.0.2", "node_id": "b" * 56, "cpus": 8.0, "gpus": 1.0}]
    check_resources(8, 0.5, nodes, "the cluster")  # fits on gpu1
    with pytest.raises(ResourceError) as err:
        check_resources(2, 2, nodes, "the Ray cluster at head:6379")
    msg = str(err.value)
    assert "needs 2 CPUs and 2 GPUs" in msg and "head (10.0.0.1, node aaaaaaaa): 2 CPUs, 0 GPUs" in msg \
        and "gpu1 (10.0.0.2, node bbbbbbbb): 8 CPUs, 1 GPUs" in msg
    # an autoscaler that may add up to 2 nodes of 8 GPUs: allowed, flagged as waiting for nodes
    types = [{"name": "gpu8", "cpus": 32.0, "gpus": 8.0, "count": 2}]
    assert check_resources(2, 2, nodes, "c", 1, types) is True
    assert check_resources(4, 8, nodes, "c", 2, types) is True  # 2 workers of 8 GPUs: both nodes
    assert check_resources(8, 0.5, nodes, "c", 1, types) is False  # fits a node alive now
    with pytest.raises(ResourceError, match=r"autoscaler may add: gpu8 \(32 CPUs, 8 GPUs, up to 2\)"):
        check_resources(4, 8, nodes, "c", 3, types)  # 3 such workers: more than it can ever add


class _Pruner(Hooks):
    """A tuning in miniature: feeds 4 variants one by one, stops 'p' after epoch 1."""

    def __init__(self):
        self.pending = [_variant(k) for k in ("p", "q", "r", "s")]
        self.judged, self.settled_ = [], []

    @property
    def prunes(self):
        return True

    def feed(self, free):
        out, self.pending = self.pending[:free], self.pending[free:]
        return out

    def judge(self, variant, epoch, metrics):
        self.judged.append((variant.key, epoch))
        return variant.key == "p"

    def settled(self, variant, status, result, error):
        self.settled_.append((variant.key, status))


def test_hooks_feed_variants_and_a_stop_verdict_ends_a_run_after_that_epoch(tmp_path):
    store, plan = _setup(tmp_path, [])
    hooks = _Pruner()
    for v in hooks.pending:
        store.ensure_variant(v.key, v.label, v.kind, to_dict(v.config), [])
    status = _executor(store, InProcessBackend(run=Script()), tmp_path, max_parallel=2).run(plan, "t", None, hooks=hooks)
    assert status == {"p": "stopped", "q": "completed", "r": "completed", "s": "completed"}
    assert [e for k, e in hooks.judged if k == "p"] == [1]  # never trained epoch 2
    assert sorted(hooks.settled_) == [("p", "stopped"), ("q", "completed"), ("r", "completed"), ("s", "completed")]
    assert store.variant("p").status == "stopped" and store.variant("p").result["epochs_done"] == 1


class _LosesItsQueue(InProcessBackend):
    """A backend whose message channel breaks after the first epoch report (a lost driver-side actor)."""

    def messages(self):
        out = super().messages()
        if any(type(m).__name__ == "EpochMetrics" for m in out):
            from bnnctl.orchestrator.backends import BackendError

            raise BackendError("the driver's message queue was lost (test)")
        return out


def test_a_broken_backend_leaves_the_study_stopped_with_the_reason(workdir):
    from bnnctl.orchestrator.backends import BackendError
    from bnnctl.orchestrator.runcore import RunOptions
    from bnnctl.orchestrator.study import run_study

    spec = _tiny_study(workdir, "broken", workdir / "syn")
    with pytest.raises(BackendError, match="message queue was lost"):
        run_study(spec, options=RunOptions(track=False, backend_instance=_LosesItsQueue()))
    study = Store().study("broken")
    assert study.status == "stopped"  # never "running" with no driver
    assert study.spec["stopped_reason"] == "BackendError: the driver's message queue was lost (test)"


def test_real_training_on_the_in_process_backend_matches_the_trainer(workdir, monkeypatch):
    """The task body (fetch, train, record) as every backend runs it, without a cluster. Its tasks
    are threads of the driver: a variant without GPUs trains on the CPU and leaves the driver's
    environment as it was (hiding the GPUs is for a worker process of its own)."""
    import os

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    from bnnctl.orchestrator.runcore import RunOptions
    from bnnctl.orchestrator.study import run_study
    from bnnctl.workers.config import from_dict
    from bnnctl.workers.train import LocalReporter, run_variant

    spec = _tiny_study(workdir, "local", "syn",
                       row="{name: rev, set: {model.activation.kind: prelu}, stages: reverse_order}")
    out = run_study(spec, options=RunOptions(track=False, backend_instance=InProcessBackend(capacity=1)))
    assert out.status == "completed" and out.trained == 2
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    store = Store()
    (member,) = [m for m in store.members(store.study("local").id) if m.ablation]
    v = store.variant(member.variant_key)
    assert v.result["environment"]["cuda_visible_devices"] == "0" and v.result["environment"]["device"] == "cpu"
    assert v.config["data"]["root"] == str(workdir / "syn")  # resolved at load, against the working folder
    assert v.result["best_checkpoint"] == f"{v.key}/best.pt"  # relative to the storage root
    assert (workdir / ".bnnctl" / "runs" / v.key / "best.pt").exists()
    stage1 = store.variant(v.deps[0])
    cfg = from_dict(TrainConfig, {**v.config, "init_from": str(workdir / ".bnnctl" / "runs" / stage1.key / "last.pt")})
    reference = run_variant(cfg, LocalReporter(workdir / "ref"))
    assert v.result["metrics"]["pckh"] == reference.metrics["pckh"]
    assert v.result["metrics"]["val_loss"] == reference.metrics["val_loss"]


def test_a_full_disk_fails_the_variant_and_nothing_new_starts_until_there_is_room(workdir):
    """Run storage on a tiny tmpfs: the first checkpoint fills it; the second variant waits."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    from bnnctl.orchestrator.runcore import RunOptions
    from bnnctl.orchestrator.study import run_study

    full = workdir / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(full)], check=True)
    try:
        two = RELU + ", {name: prelu, set: {model.activation.kind: prelu}}"
        spec = _tiny_study(workdir, "full", workdir / "syn", row=two, width=16)
        opts = RunOptions(track=False, storage=str(full), max_parallel=1, backend_instance=InProcessBackend())
        out = run_study(spec, options=opts)
        assert out.status == "stopped" and out.counts == {"failed": 1, "pending": 1}
        store = Store()
        study = store.study("full")
        variants = store.variants([m.variant_key for m in store.members(study.id)])
        (failed,) = [v for v in variants.values() if v.status == "failed"]
        (waiting,) = [v for v in variants.values() if v.status == "pending"]
        assert failed.error.startswith(f"no space left on device at {full / failed.key}/") and "last.pt" in failed.error
        assert "Traceback" not in failed.error and "unexpected pos" not in failed.error
        assert store.attempts(waiting.key) == []  # never started on the full disk
        assert study.spec["stopped_reason"].startswith(f"no space left on device at {full / failed.key}/")
        assert "free some space and run it again" in study.spec["stopped_reason"]
        # room again: the same command finishes the study (the failed variant is retried)
        subprocess.run(["mount", "-o", "remount,size=8m", str(full)], check=True)
        again = run_study(spec, options=dataclasses.replace(opts, backend_instance=InProcessBackend()))
        assert again.status == "completed" and again.trained == 2
        assert [a.status for a in store.attempts(failed.key)] == ["failed", "completed"]
        assert not list(full.glob(".room-*"))  # the probe files are gone
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_the_driver_writes_the_embedded_data_once_before_any_task_starts(workdir):
    """Tasks (scripted here: they train nothing) find the synthetic set already there."""
    from bnnctl.orchestrator.runcore import RunOptions
    from bnnctl.orchestrator.study import run_study
    from bnnctl.workers.data.synthetic import MANIFEST

    seen = []

    class Looks(Script):
        def __call__(self, task, channel, node):
            seen.append((workdir / "syn" / MANIFEST).exists())
            return super().__call__(task, channel, node)

    two = RELU + ", {name: prelu, set: {model.activation.kind: prelu}}"
    spec = _tiny_study(workdir, "data-first", workdir / "syn", row=two)
    out = run_study(spec, options=RunOptions(track=False, backend_instance=InProcessBackend(run=Looks())))
    assert out.status == "completed" and seen == [True, True]
    assert len(list((workdir / "syn" / "images").iterdir())) == 32 + 16


def test_a_task_without_threads_uses_its_cpus_not_the_previous_tasks_count(workdir):
    """A reused worker process: the last task left 2 threads; this one asks for 1 CPU."""
    import torch

    from bnnctl.orchestrator.backends import Channel, execute

    cfg = TrainConfig(epochs=1, batch_size=8, loss="mse", seed=0)
    data = to_dict(cfg)
    data["model"].update(width=8, depth=2)
    data["data"].update(root=str(workdir / "syn"), synthetic={**data["data"]["synthetic"], "train": 8, "valid": 4},
                        input_size=32)
    assert data["threads"] is None
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = execute(Task("t", data, str(workdir / "runs"), 1.0, 0.0), Channel(lambda m: None), "here")
    finally:
        torch.set_num_threads(before)
    assert out.status == "completed", out.error
    env = out.result["environment"]
    assert env["threads"] == 1 and env["device"] == "cpu" and env["torch"] == torch.__version__.split("+")[0]
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["deterministic"] is False


def test_a_storage_failure_is_the_nodes_retried_and_a_plain_run_finishes_it_later(workdir, s3, monkeypatch):
    """Run storage on an S3 server this process has no credentials for (botocore's
    NoCredentialsError, not an OSError): each attempt ends as lost with one line naming the node and
    the storage URL, the variant is retried, then failed as a machine failure; the next plain run,
    with credentials, retries and finishes it."""
    import s3fs

    from conftest import BUCKET

    from bnnctl.orchestrator.runcore import RunOptions
    from bnnctl.orchestrator.study import run_study, transient

    env, _ = s3
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probing either
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(workdir / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(workdir / "none"))
    import fsspec.config  # read $FSSPEC_S3_ENDPOINT_URL at import: this process set it later

    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": env["FSSPEC_S3_ENDPOINT_URL"]})
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    spec = _tiny_study(workdir, "s3", workdir / "syn")
    opts = RunOptions(track=False, storage=f"s3://{BUCKET}/runs", backend_instance=InProcessBackend())
    # the driver itself has no credentials: refused before anything is written (one message)
    from bnnctl.orchestrator import preflight
    from bnnctl.orchestrator.errors import SpecError

    with pytest.raises(SpecError) as refused:
        run_study(spec, options=opts)
    assert str(refused.value) == (f"{spec}, --storage: the run storage cannot be written from this machine: "
                                  f"s3://{BUCKET}/runs: Unable to locate credentials (NoCredentialsError). Give a folder "
                                  "or URL this machine (and every node) can write, with its credentials")
    assert not (workdir / ".bnnctl" / "state.db").exists()
    # a node without credentials while the driver has them: here one process is both, so the
    # driver's probe is skipped to reach the worker's side
    monkeypatch.setattr(preflight, "check_storage", lambda *a: None)
    out = run_study(spec, options=opts)
    assert out.counts == {"failed": 1}
    store = Store()
    (v,) = store.variants([m.variant_key for m in store.members(store.study("s3").id)]).values()
    attempts = store.attempts(v.key)
    assert [a.status for a in attempts] == ["lost", "lost", "failed"]  # retries: 2, then it fails
    first = attempts[0].error
    assert first.startswith(f"worker lost: storage failure on node {socket.gethostname()}: run storage "
                            f"s3://{BUCKET}/runs/{v.key}/"), first
    assert first.endswith("NoCredentialsError: Unable to locate credentials") and "\n" not in first, first
    assert v.error.startswith("worker lost 3 times: storage failure on node") and transient(v.error)
    # the machine gets its credentials: the same command trains the variant (not skipped as the config's failure)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    s3fs.S3FileSystem.clear_instance_cache()
    again = run_study(spec, options=dataclasses.replace(opts, backend_instance=InProcessBackend()))
    assert again.status == "completed" and again.trained == 1, [a.error for a in store.attempts(v.key)]
    assert store.attempts(v.key)[-1].status == "completed"


def test_a_dependency_missing_from_storage_stays_the_configs_failure(tmp_path):
    """Not the machine's: a stage-1 checkpoint that is not in storage fails the variant (no retry)."""
    from bnnctl.orchestrator.backends import Channel, execute

    task = Task("k1", to_dict(TrainConfig(epochs=1)), "memory://bnnctl-test/runs",  # fsspec's in-memory store
                fetch=(("init_from", "k0/last.pt"),))
    out = execute(task, Channel(lambda m: None), "n1", node_id="f" * 56)
    assert (out.status, out.error) == ("failed", "memory://bnnctl-test/runs/k0/last.pt is missing (needed for "
                                                 "init_from) (node n1)")
