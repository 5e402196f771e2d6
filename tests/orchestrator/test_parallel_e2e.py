"""Data-parallel variants (Ray Train) and resources held for real, on real local Ray clusters."""
import dataclasses
import json

import pytest

from bnnctl.orchestrator.plan import build_plan
from bnnctl.orchestrator.spec import load_spec
from bnnctl.orchestrator.store import Store
from bnnctl.orchestrator.study import run_study
from bnnctl.workers.train import LocalReporter, run_variant

pytestmark = pytest.mark.cluster

SPEC = """
name: dp
base:
  model: {{width: 8, depth: 2, binarize: {{activations: false, weights: false}}}}
  data: {{root: {root}, synthetic: {{train: 45, valid: 16}}, input_size: 32}}
  optim: {{name: sgd, lr: 0.05, momentum: 0.9}}
  epochs: 2
  batch_size: 7
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
execution: {{max_parallel: 2, retries: 0}}
"""


def _spec(folder, workers):
    f = folder / f"dp{workers}.yaml"
    f.write_text(SPEC.format(root=folder / "syn", workers=workers))
    return f


def test_a_two_worker_variant_trains_on_two_ranks_what_one_worker_trains(workdir, tmp_path):
    spec2 = _spec(workdir, 2)
    plan2, plan1 = build_plan(load_spec(spec2)), build_plan(load_spec(_spec(workdir, 1)))
    (v2,), (v1,) = plan2.order(), plan1.order()
    assert v2.key == v1.key  # synchronised BatchNorm: the math of one worker, the same identity
    assert v2.config.ranks == 2 and v2.resources.workers == 2
    out = run_study(spec2, cpus=4)
    assert out.status == "completed" and out.trained == 1
    store = Store(f"sqlite:///{workdir / '.bnnctl' / 'state.db'}")
    (attempt,) = store.attempts(v2.key)
    # both ranks ran, on this node: "host (node 1a2b3c4d, ranks 0-1)"
    assert attempt.status == "completed" and attempt.node.endswith("ranks 0-1)"), attempt.node
    assert attempt.node_id.startswith("group:") and "," not in attempt.node_id
    stored = store.metrics(v2.key)
    # one worker, the same global batch (7 items: ranks of 4 and 3; the last batch of 3: 2 and 1)
    one = LocalReporter(tmp_path / "one")
    run_variant(dataclasses.replace(v1.config, threads=1), one)
    diffs = {name: max(abs(stored[name][e - 1][1] - m[name]) for e, m in one.history)
             for name in ("train_loss", "val_loss", "pckh")}
    print("2 workers vs 1 worker, largest per-epoch difference:", json.dumps(diffs))
    assert diffs["train_loss"] < 1e-5 and diffs["val_loss"] < 1e-5 and diffs["pckh"] <= 1.0
    result = store.variant(v2.key).result
    assert result["epochs_done"] == 2 and result["environment"]["cuda_visible_devices"] == ""


HELD = """
name: held
base:
  model: {{width: 8, depth: 2}}
  data: {{root: syn, synthetic: {{train: 48, valid: 16}}, input_size: 32}}
  epochs: 4
  batch_size: 16
  loss: mse
  threads: 1
  latency: false
seeds: [0]
resources: {resources}
ablations:
  - name: ab
    mode: isolated
    rows:
      - {{name: relu, set: {{model.activation.kind: relu}}}}
      - {{name: prelu, set: {{model.activation.kind: prelu}}}}
      - {{name: leaky, set: {{model.activation.kind: leaky_relu}}}}
execution: {{max_parallel: 4, retries: 0}}
"""


def _windows(folder, name):
    store = Store(f"sqlite:///{folder / '.bnnctl' / 'state.db'}")
    study = store.study(name)
    variants = store.variants([m.variant_key for m in store.members(study.id)])
    return [(v.result["timings"]["started_at"], v.result["timings"]["ended_at"],
             v.result["environment"]["cuda_visible_devices"]) for v in variants.values()]


def test_variants_hold_their_cpus_and_gpus_on_a_node_that_declares_gpus(tmp_path):
    """A node of 1 CPU and 2 GPUs whose processes see both GPUs (CUDA_VISIBLE_DEVICES=0,1, as on a
    GPU machine). ``cpus: 1`` variants, max_parallel above what the node holds: one at a time, never
    overlapping (they send metrics every epoch and wait for nothing), each seeing no GPU. Then
    ``gpus: 0.5`` variants: three at once on the two GPUs, two of them sharing one (Ray's fractional
    GPUs; torch sees no CUDA on this machine, so they train on its CPU)."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
    from raynodes import RayNodes, run_cli

    nodes = RayNodes(tmp_path / "ray", extra_env={"CUDA_VISIBLE_DEVICES": "0,1"})
    try:
        _, address = nodes.head(cpus=1, gpus=2)
        project = tmp_path / "project"
        project.mkdir()
        (project / "held.yaml").write_text(HELD.format(resources="{cpus: 1, gpus: 0}"))
        done = run_cli(["study", "run", "held.yaml", "--address", address], nodes.env, project, timeout=400)
        assert done.returncode == 0, done.stdout + done.stderr
        windows = sorted(_windows(project, "held"))
        assert len(windows) == 3 and all(env == "" for _, _, env in windows)  # no GPU for a task that holds none
        for (_, end, _), (start, _, _) in zip(windows, windows[1:]):
            assert start >= end, windows  # one CPU: one variant at a time
        (project / "half.yaml").write_text(HELD.format(resources="{cpus: 0.3, gpus: 0.5}")
                                         .replace("held", "half").replace("seeds: [0]", "seeds: [1]"))  # not reused
        done = run_cli(["study", "run", "half.yaml", "--address", address], nodes.env, project, timeout=400)
        assert done.returncode == 0, done.stdout + done.stderr
        half = sorted(_windows(project, "half"))
        # three variants of half a GPU at once on the node's two GPUs: two of them share one
        assert sorted(env for _, _, env in half) in (["0", "0", "1"], ["0", "1", "1"]), half
        assert max(start for start, _, _ in half) < min(end for _, end, _ in half), half  # all at the same time
    finally:
        nodes.close()


def test_a_groups_node_names_each_node_and_its_ranks():
    from bnnctl.orchestrator.backends.ray_cluster import group_nodes

    a, b = "a" * 56, "b" * 56
    assert group_nodes([("h", a)]) == "h (node aaaaaaaa, rank 0)"
    # two nodes of one host (as in the tests) are told apart by their ids
    assert group_nodes([("h", a), ("h", a), ("h", b)]) == "h (node aaaaaaaa, ranks 0-1), h (node bbbbbbbb, rank 2)"
    many = group_nodes([(f"host-{i:03d}", f"{i:056x}") for i in range(16)])
    assert len(many) == 200 and many.endswith("...")  # the store's column


def test_a_dead_rank_is_a_lost_group_in_one_line_naming_the_rank_and_a_bug_is_a_crash():
    from ray.exceptions import ActorDiedError

    from bnnctl.orchestrator.backends.ray_cluster import _group_error

    class TrainingFailed(Exception):  # the shape of Ray Train's error: the text, and each rank's failure
        def __init__(self, text, failures):
            super().__init__(text)
            self.worker_failures = failures

    err = TrainingFailed("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent call "
                         "last):\n  File \"loop.py\", line 1\nRuntimeError: Connection closed by peer",
                         {0: RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:4242"), 1: ActorDiedError()})
    out = _group_error("k", err)
    assert (out.status, out.error) == ("lost", "rank 1 of the data-parallel group was lost: ActorDiedError: The actor "
                                               "died unexpectedly before finishing this task.")
    bug = _group_error("k", TrainingFailed("Training failed:\n[Rank 0 Error Snippet]:\nZeroDivisionError: x",
                                           {0: ZeroDivisionError("x")}))
    assert bug.status == "failed" and bug.error.startswith("crashed: TrainingFailed: Training failed")


STAGED = """
name: staged
base:
  model: {{width: 8, depth: 2}}
  data: {{root: {root}, synthetic: {{train: 45, valid: 16}}, input_size: 32}}
  optim: {{name: sgd, lr: 0.05, momentum: 0.9}}
  epochs: 2
  batch_size: 7
  loss: mse
  threads: 1
  latency: false
seeds: [0]
resources: {{workers: {workers}, cpus: 1}}
teachers:
  real:
    set: {{model.binarize.activations: false, model.binarize.weights: false}}
ablations:
  - name: ab
    mode: isolated
    rows:
      - {{name: reverse, stages: reverse_order}}
      - {{name: distill, set: {{distill.weight: 0.5}}, teacher: real}}
execution: {{max_parallel: 1, retries: 0}}
"""


def _histories(folder, name):
    store = Store(f"sqlite:///{folder / '.bnnctl' / 'state.db'}")
    variants = store.variants([m.variant_key for m in store.members(store.study(name).id)])
    return store, {k: v for k, v in variants.items()}, {k: store.metrics(k) for k in variants}


def test_reverse_order_stages_and_a_teacher_on_two_workers_train_what_one_worker_trains(workdir, monkeypatch):
    """Everything one worker does, two do: a reverse-order row (stage 2 starts from stage 1's
    checkpoint, written by rank 0 and read by both ranks) and a distilled row (the teacher, itself
    trained on two ranks, runs on each rank). Same identities as one worker's; every epoch's losses
    within the float-summation noise of one worker's (binary nets amplify it: see test_parallel)."""
    one = workdir / "one"
    one.mkdir()
    monkeypatch.chdir(one)  # the 1-worker reference in a project of its own (same keys: nothing reused)
    assert run_study(_write_staged(one, 1), cpus=4).counts == {"completed": 4}
    monkeypatch.chdir(workdir)
    out = run_study(_write_staged(workdir, 2), cpus=4)
    assert out.status == "completed" and out.counts == {"completed": 4} and out.trained == 4
    store, variants, two = _histories(workdir, "staged")
    _, variants1, ref = _histories(one, "staged")
    assert set(variants) == set(variants1)  # sync_batchnorm: the 1-worker math, the same identities
    for key in variants:
        (attempt,) = store.attempts(key)
        assert attempt.node.endswith("ranks 0-1)"), attempt.node  # both ranks ran every variant
    plan = build_plan(load_spec(workdir / "staged.yaml"))
    stage2 = [v for v in plan.variants.values() if v.init_dep]  # starts from stage 1's checkpoint
    student = [v for v in plan.variants.values() if v.teacher_dep]  # learns from the teacher
    assert len(stage2) == 1 and len(student) == 1 and set(plan.variants) == set(variants)
    assert {stage2[0].init_dep, student[0].teacher_dep} < set(variants)
    assert all(variants[k].status == "completed" for k in variants)
    worst = max(abs(a - b) for k in variants for name in ("train_loss", "val_loss")
                for (_, a), (_, b) in zip(two[k][name], ref[k][name], strict=True))
    print(f"reverse order + distillation, 2 workers vs 1: largest per-epoch loss difference {worst:.2e}")
    # measured 7.5e-9 (2 epochs of SGD); the bound leaves room for sign flips that float-summation
    # noise can cause in the binary stage, as in test_parallel's 3-epoch RMSprop case (4e-3)
    assert worst < 1e-2


def _write_staged(folder, workers):
    f = folder / "staged.yaml"
    f.write_text(STAGED.format(root=folder / "syn", workers=workers))
    return f


TUNED = """
kind: tuning
name: dptune
base:
  model: {{width: 8, depth: 2, binarize: {{activations: false, weights: false}}}}
  data: {{root: {root}, synthetic: {{train: 45, valid: 16}}, input_size: 32}}
  optim: {{name: sgd, lr: 0.05, momentum: 0.9}}
  epochs: 3
  batch_size: 7
  loss: mse
  threads: 1
  latency: false
search:
  optim.lr: {{type: float, low: 0.01, high: 0.1, log: true}}
objective: {{metric: val_loss, direction: minimize, value: last}}
trials: 3
sampler: {{name: random, seed: 5}}
pruner: {{name: median, startup_trials: 1, warmup_epochs: 0}}
resources: {{workers: {workers}, cpus: 1}}
execution: {{max_parallel: 1, retries: 0}}
"""


def test_a_tuning_on_two_worker_trials_finds_what_one_worker_finds(workdir, monkeypatch):
    """Trials of 2 ranks each, with a pruner: rank 0 reports each epoch and waits for the driver's
    verdict, the whole group stops on it. The same sampled values, pruning decisions and (within
    float-summation noise, real nets) objective values as 1-worker trials."""
    from bnnctl.orchestrator.tuning import run_tuning

    found = {}
    for workers in (1, 2):
        folder = workdir / f"w{workers}"
        folder.mkdir()
        monkeypatch.chdir(folder)
        spec = folder / "tune.yaml"
        spec.write_text(TUNED.format(root=folder / "syn", workers=workers))
        out = run_tuning(spec, cpus=4, track=False)
        assert out.status == "completed" and out.finished == {"base": 3}
        store = Store(f"sqlite:///{folder / '.bnnctl' / 'state.db'}")
        import optuna

        storage = optuna.storages.RDBStorage(f"sqlite:///{folder / '.bnnctl' / 'state.db'}")
        trials = optuna.load_study(study_name="dptune/base", storage=storage).trials
        found[workers] = [(t.params["optim.lr"], t.state.name, t.value) for t in trials]
        for t in trials:
            (attempt,) = store.attempts(t.user_attrs["bnnctl.variant"])
            assert attempt.node.endswith("ranks 0-1)") == (workers == 2), attempt.node
    print("trials (lr, state, value), 1 worker:", found[1], "2 workers:", found[2])
    assert [(lr, state) for lr, state, _ in found[2]] == [(lr, state) for lr, state, _ in found[1]]
    assert all(abs(a[2] - b[2]) < 1e-5 for a, b in zip(found[1], found[2]))
