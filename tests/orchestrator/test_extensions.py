"""Seams that are open: an executor backend and a quantizer added from a test module alone (no
project file edited), a backend found through the ``bnnctl.backends`` entry point of an installed
package, and the one rule that picks a run's storage and backend. Real training, in this process."""
from __future__ import annotations

import queue
import textwrap
import threading

import pytest
import studies
import torch
from typer.testing import CliRunner

from bnnctl.orchestrator.backends import (
    BACKENDS,
    Backend,
    Channel,
    Finished,
    Started,
    backend_class,
    backend_names,
    execute,
    register,
)
from bnnctl.orchestrator.cli import app
from bnnctl.orchestrator.errors import SpecError
from bnnctl.orchestrator.runcore import RunOptions
from bnnctl.orchestrator.spec import load_spec
from bnnctl.orchestrator.store import Store
from bnnctl.orchestrator.study import run_study

ROWS = studies.rows(("relu", {"model.activation.kind": "relu"}), ("prelu", {"model.activation.kind": "prelu"}))


def _spec(folder, name="ext", execution=None, rows=ROWS, model=None):
    top = {"execution": execution} if execution else {}
    return studies.write(folder, studies.study(name, folder / "syn", rows, base_fields={"model": model or {}}, **top))


class ToyBackend(Backend):
    """A backend written in a test module: one worker thread runs the tasks to the end, in the
    order submitted, through the same task body as every backend (``execute``); the message
    channel is a list the driver drains."""

    runs: list["ToyBackend"] = []

    def __init__(self) -> None:
        self.tasks: queue.Queue = queue.Queue()
        self.finished: queue.Queue = queue.Queue()
        self.inbox: list = []
        self.lock = threading.Lock()
        self.submitted: list[tuple[str, str]] = []
        self.cancelled: set[str] = set()
        ToyBackend.runs.append(self)

    def start(self, workers, cpus, gpus, ranks=1):
        threading.Thread(target=self._worker, daemon=True).start()

    def _send(self, message) -> None:
        with self.lock:
            self.inbox.append(message)

    def _worker(self) -> None:
        while (task := self.tasks.get()) is not None:
            channel = Channel(self._send, None, cancelled=lambda key=task.key: key in self.cancelled)
            self._send(Started(task.key, "toy-node", "toy-0"))
            self.finished.put(execute(task, channel, "toy-node", node_id="toy-0"))

    def submit(self, task, verdicts=False):
        self.submitted.append((task.kind, task.key))
        self.tasks.put(task)

    def wait(self, timeout):
        out: list[Finished] = []
        try:
            out.append(self.finished.get(timeout=timeout))
            while True:
                out.append(self.finished.get_nowait())
        except queue.Empty:
            pass
        return [f for f in out if f.key not in self.cancelled]

    def messages(self):
        with self.lock:
            out, self.inbox = self.inbox, []
        return out

    def decide(self, key, epoch, stop):
        pass

    def cancel(self, key):
        self.cancelled.add(key)

    def close(self):
        self.tasks.put(None)


@pytest.fixture()
def toy():
    register("toy")(ToyBackend)
    ToyBackend.runs.clear()
    yield ToyBackend
    BACKENDS.pop("toy", None)


def _metrics(name, db=None):
    store = Store(db)
    study = store.study(name)
    results = {m.row: store.variant(m.variant_key).result["metrics"] for m in store.members(study.id) if m.row}
    return {row: {k: v for k, v in metrics.items() if "time" not in k} for row, metrics in results.items()}


def test_a_backend_registered_from_a_test_module_runs_a_study(workdir, toy):
    """Named in the spec (`execution.backend: toy`), the toy backend trains every variant; the
    results are those of the built-in in-process backend, bit for bit."""
    spec = _spec(workdir, execution={"backend": "toy"})
    assert "toy" in backend_names() and load_spec(spec).execution.backend == "toy"
    out = run_study(spec, track=False)
    assert out.status == "completed" and out.counts == {"completed": 2}
    (run,) = toy.runs
    assert sorted(k for k, _ in run.submitted) == ["train", "train"]
    toy_metrics = _metrics("ext")
    assert set(toy_metrics) == {"relu", "prelu"} and all(m["pckh"] >= 0 for m in toy_metrics.values())

    # the same study trained again from scratch (another store and run storage) on `inprocess`, one
    # variant at a time (its threads share the process's global torch RNG, as the toy's one thread does)
    db = f"sqlite:///{workdir / 'other.db'}"
    result = CliRunner().invoke(app, ["study", "run", str(spec), "--backend", "inprocess", "--db", db,
                                      "--storage", str(workdir / "other-runs"), "--max-parallel", "1", "--no-track"])
    assert result.exit_code == 0, result.output
    assert len(toy.runs) == 1  # nothing ran on the toy backend this time
    assert _metrics("ext", db) == toy_metrics


def test_the_command_line_picks_a_registered_backend_over_the_spec(workdir, toy):
    spec = _spec(workdir, execution={"backend": "inprocess"})
    result = CliRunner().invoke(app, ["study", "run", str(spec), "--backend", "toy", "--no-track"])
    assert result.exit_code == 0, result.output
    assert len(toy.runs) == 1 and len(toy.runs[0].submitted) == 2


def test_a_backend_from_an_installed_packages_entry_point(workdir, monkeypatch):
    """A package that declares `[project.entry-points."bnnctl.backends"] plugged = ...` is found by
    name, with nothing registered in the project: importlib.metadata reads its dist-info."""
    site = workdir / "site"
    (site / "bnnctl_plugin_demo-0.1.dist-info").mkdir(parents=True)
    (site / "bnnctl_plugin_demo-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: bnnctl-plugin-demo\nVersion: 0.1\n")
    (site / "bnnctl_plugin_demo-0.1.dist-info" / "entry_points.txt").write_text(
        "[bnnctl.backends]\nplugged = bnnctl_plugin_demo:PluggedBackend\n")
    (site / "bnnctl_plugin_demo.py").write_text(textwrap.dedent("""
        from bnnctl.orchestrator.backends.inprocess import InProcessBackend

        class PluggedBackend(InProcessBackend):
            built = 0

            def __init__(self):
                super().__init__(capacity=2)
                PluggedBackend.built += 1
    """))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(BACKENDS, "plugged", raising=False)
    try:
        assert "plugged" in backend_names()
        cls = backend_class("plugged")
        assert cls.__name__ == "PluggedBackend" and cls.name == "plugged"
        spec = _spec(workdir, execution={"backend": "plugged"})
        result = CliRunner().invoke(app, ["study", "run", str(spec), "--no-track"])
        assert result.exit_code == 0, result.output
        assert cls.built == 1  # built once: the preflight's instance runs the study
        assert Store().study("ext").status == "completed" and set(_metrics("ext")) == {"relu", "prelu"}
    finally:
        BACKENDS.pop("plugged", None)


def test_an_unknown_backend_is_refused_where_it_was_named(workdir, monkeypatch):
    spec = _spec(workdir, execution={"backend": "slurm"})
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    text = str(err.value)
    line = next(i for i, t in enumerate(spec.read_text().splitlines(), 1) if t.startswith("execution:"))
    assert f"{spec}, line {line}, execution.backend: " in text
    assert "unknown backend 'slurm'; valid names: inprocess, ray" in text
    plain = _spec(workdir, name="plain")
    result = CliRunner().invoke(app, ["study", "run", str(plain), "--backend", "dask", "--no-track"])
    assert result.exit_code == 1 and "--backend: unknown backend 'dask'; valid names: inprocess, ray" in result.output
    assert "Traceback" not in result.output and Store().study("plain") is None  # nothing written
    monkeypatch.setenv("BNNCTL_BACKEND", "celery")
    result = CliRunner().invoke(app, ["study", "run", str(plain), "--no-track"])
    assert result.exit_code == 1 and "$BNNCTL_BACKEND: unknown backend 'celery'" in result.output


def test_options_are_resolved_once_by_one_rule(workdir):
    """Command line, then spec, then environment, then default -- for storage and backend alike."""
    bare = load_spec(_spec(workdir, name="bare"))
    spec = load_spec(studies.write(workdir, studies.study(
        "full", workdir / "syn", ROWS, execution={"backend": "inprocess", "max_parallel": 3},
        storage=str(workdir / "from-spec"))))
    env = {"BNNCTL_STORAGE": str(workdir / "from-env"), "BNNCTL_BACKEND": "ray"}
    cli = RunOptions(storage=str(workdir / "from-cli"), backend="ray", max_parallel=5)
    got = RunOptions.resolve(spec, cli, env)
    assert (got.storage, got.storage_source, got.backend, got.backend_source, got.max_parallel) == \
        (str(workdir / "from-cli"), "--storage", "ray", "--backend", 5)
    got = RunOptions.resolve(spec, RunOptions(), env)
    assert (got.storage, got.storage_source, got.backend, got.backend_source, got.max_parallel) == \
        (str(workdir / "from-spec"), "storage", "inprocess", "execution.backend", 3)
    got = RunOptions.resolve(bare, RunOptions(), env)
    assert (got.storage, got.storage_source, got.backend, got.backend_source, got.max_parallel) == \
        (str(workdir / "from-env"), "$BNNCTL_STORAGE", "ray", "$BNNCTL_BACKEND", 2)
    got = RunOptions.resolve(bare, RunOptions(), {})
    assert (got.storage, got.backend, got.backend_source) == (None, "ray", "the default backend")
    assert got.storage_source.startswith("the default run storage")
    assert RunOptions.resolve(spec, got, env) is got  # resolved once: the run does not decide again


# ------------------------------------------------------------------ a quantizer from a test module


def approx_sign_backward(grad, x, lam):
    """Bi-Real Net's ApproxSign (Liu et al., ECCV 2018, Eq. 6): "ApproxSign(x) = -1 if x < -1;
    2x + x^2 if -1 <= x < 0; 2x - x^2 if 0 <= x < 1; 1 otherwise", used for the backward pass only
    while the forward is sign: d/dx = 2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere."""
    BACKWARD_CALLS.append(tuple(x.shape))
    return grad * (2 - 2 * x.abs()).clamp_min(0)


BACKWARD_CALLS: list[tuple] = []


@pytest.fixture()
def approx_sign(monkeypatch):
    from bnnctl.workers.binarize import QUANTIZERS, QuantizerKind

    monkeypatch.setattr(QUANTIZERS, "_items", dict(QUANTIZERS._items))  # undone after the test
    QUANTIZERS.register("approx_sign")(QuantizerKind(backward=approx_sign_backward))
    return QUANTIZERS.get("approx_sign")


def test_approx_sign_is_exact_and_its_backward_is_its_own(approx_sign, monkeypatch):
    from bnnctl import kernels
    from bnnctl.workers.binarize import BinarizeConfig, Quantizer
    from bnnctl.workers.layers import BinaryConv2d

    assert approx_sign.exact and not approx_sign.reads_lambda
    q = Quantizer("approx_sign").train()
    assert q.exact and not q.approximating and not q.reads_lambda
    x = torch.tensor([-2.0, -1.0, -0.75, -0.25, 0.0, 0.25, 0.5, 1.0, 1.5], requires_grad=True)
    y = q(x)
    assert y.tolist() == [-1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # exactly sign, sign(0) = +1
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 0.5, 1.5, 2.0, 1.5, 1.0, 0.0, 0.0]  # 2 - 2|x| inside [-1, 1]
    # in training the layer's operands are exactly +-1, so the XNOR backend runs its kernel
    if not kernels.available("cpu"):
        pytest.skip("no C compiler for the CPU kernel")
    calls = []
    real = kernels.xnor_conv2d
    monkeypatch.setattr(kernels, "xnor_conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = BinarizeConfig(quantizer="approx_sign", weight_quantizer="approx_sign")
    torch.manual_seed(0)
    fast = BinaryConv2d(8, 8, binarize=cfg, backend="xnor").train()
    torch.manual_seed(0)
    ref = BinaryConv2d(8, 8, binarize=cfg).train()
    assert fast.exact_binary()
    x = torch.randn(2, 8, 6, 6)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = fast(a), ref(b)
    assert calls == [1] and torch.equal(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    assert torch.equal(a.grad, b.grad)
    assert torch.equal(fast.weight_source.weight.grad, ref.weight_source.weight.grad)


def test_approx_sign_trains_end_to_end_in_the_kernel(workdir, approx_sign, monkeypatch):
    """A study with a row per quantizer on the XNOR backend: ApproxSign's rows train with the kernel
    in the training forward (operands exactly +-1), and its gradient, not the STE's, trains them."""
    from bnnctl import kernels

    if not kernels.available("cpu"):
        pytest.skip("no C compiler for the CPU kernel")
    quantized_inputs = []  # the training forward hands the kernel sign(x); inference, the raw x
    real = kernels.xnor_conv2d
    monkeypatch.setattr(kernels, "xnor_conv2d",
                        lambda x, *a, **k: quantized_inputs.append(bool(x.abs().eq(1).all())) or real(x, *a, **k))
    rows = studies.rows(("ste", {"model.binarize.quantizer": "sign"}),
                        ("approx", {"model.binarize.quantizer": "approx_sign"}))
    spec = _spec(workdir, name="approx", rows=rows, model={"backend": "xnor"})
    BACKWARD_CALLS.clear()
    out = run_study(spec, backend="inprocess", track=False, only=("approx",))
    assert out.status == "stopped" and out.counts == {"completed": 1}  # the other row is not run yet
    assert any(quantized_inputs)  # the kernel ran on quantized operands: in training, not only in evaluation
    assert len(BACKWARD_CALLS) >= 2 * 4  # its own backward: every step, activations and weights
    out = run_study(spec, backend="inprocess", track=False)  # the STE row beside it
    assert out.status == "completed" and out.counts == {"completed": 2}
    metrics = _metrics("approx")
    assert metrics["ste"]["train_loss"] != metrics["approx"]["train_loss"]  # another gradient, another run
