import pytest
import torch
from typer.testing import CliRunner

from bnnctl.orchestrator.cli import app
from bnnctl.workers.binarize import BinarizeConfig
from bnnctl.workers.errors import ConfigError, TrainingError
from bnnctl.workers.export import export_model, load_exported
from bnnctl.workers.layers import BinaryConv2d
from bnnctl.workers.models import ModelConfig, build_model
from bnnctl.workers.reparam import DecompositionConfig


def _trained(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):  # move weights, alphas and BatchNorm statistics away from initialization
        out = model(torch.randn(4, 3, 32, 32))
        (out[-1] if isinstance(out, list) else out).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_export_reload_gives_identical_outputs_and_is_30x_smaller(tmp_path):
    cfg = ModelConfig(width=128, depth=2, num_outputs=5, binarize=BinarizeConfig(alpha="learned"),
                      decomposition=DecompositionConfig("holistic_tucker"))
    model = _trained(cfg)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)[-1]
    report = export_model(model, cfg, tmp_path / "m.bnn")
    loaded = load_exported(tmp_path / "m.bnn")
    with torch.no_grad():
        assert torch.equal(loaded(x)[-1], expected)
    assert report.binary_ratio >= 30.0
    assert report.binary_packed_bytes * 30 <= report.binary_fp32_bytes
    trained_bytes = sum(p.numel() * 4 for p in build_model(cfg).parameters())
    assert report.file_bytes < trained_bytes / 10  # factors are gone too


def test_classification_model_round_trip(tmp_path):
    cfg = ModelConfig(arch="resnet18", width=8, num_outputs=7)
    model = _trained(cfg)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    export_model(model, cfg, tmp_path / "r.bnn")
    with torch.no_grad():
        assert torch.equal(load_exported(tmp_path / "r.bnn")(x), expected)


def test_exported_model_runs_the_fused_kernel_with_the_same_outputs(tmp_path, monkeypatch):
    from bnnctl.kernels import cpu

    if not cpu.available():
        pytest.skip("no C compiler for the CPU kernel")
    cfg = ModelConfig(width=32, depth=2, num_outputs=4)  # trained with the float emulation
    model = _trained(cfg)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)[-1]
    export_model(model, cfg, tmp_path / "m.bnn")
    calls = []
    real = cpu.ConvPlan.run
    monkeypatch.setattr(cpu.ConvPlan, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        assert torch.equal(load_exported(tmp_path / "m.bnn", backend="xnor")(x)[-1], expected)
        convs = sum(isinstance(m, BinaryConv2d) for m in model.modules())
        assert len(calls) == convs == 36, "every binary conv of the exported model runs fused, once"
        assert torch.equal(load_exported(tmp_path / "m.bnn", backend=None)(x)[-1], expected)
    with pytest.raises(ConfigError, match="backend"):
        load_exported(tmp_path / "m.bnn", backend="xnor9")


def test_not_an_export_is_refused(tmp_path):
    bad = tmp_path / "x.bnn"
    torch.save({"hello": 1}, bad)
    try:
        load_exported(bad)
    except TrainingError as err:
        assert "not a bnnctl exported model" in str(err)
    else:
        raise AssertionError("expected TrainingError")


def test_cli_export_from_a_training_checkpoint(tmp_path):
    spec = tmp_path / "t.yaml"
    spec.write_text(f"model: {{width: 16, depth: 2}}\ndata: {{root: {tmp_path / 'syn'}, synthetic: {{train: 8, valid: 4}}, "
                    "input_size: 32}\nepochs: 1\nbatch_size: 4\nloss: mse\nthreads: 1\n")
    runner = CliRunner()
    assert runner.invoke(app, ["train", "run", str(spec), "--checkpoints", str(tmp_path / "ck")]).exit_code == 0
    result = runner.invoke(app, ["export", str(tmp_path / "ck" / "best.pt"), str(tmp_path / "m.bnn")])
    assert result.exit_code == 0, result.output
    assert "smaller" in result.output and (tmp_path / "m.bnn").exists()
    missing = runner.invoke(app, ["export", str(tmp_path / "nope.pt"), str(tmp_path / "n.bnn")])
    assert missing.exit_code == 1 and "checkpoint not found" in missing.output
