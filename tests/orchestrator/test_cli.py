import json
import subprocess
import sys

from typer.testing import CliRunner

from bnnctl.orchestrator.cli import app
from bnnctl.workers.accounting import account
from bnnctl.workers.models import ModelConfig, build_model

runner = CliRunner()


def test_summary_reports_the_accounting_of_the_default_model():
    result = runner.invoke(app, ["models", "summary", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    expected = account(build_model(ModelConfig()), 256)
    assert out["params"] == expected.params and out["bops"] == expected.bops
    assert out["config"]["arch"] == "hourglass" and out["config"]["block"] == "hpm"
    assert out["config"]["width"] == 256 and out["input_size"] == 256


def test_summary_table_and_options():
    result = runner.invoke(app, ["models", "summary", "--arch", "resnet18", "--width", "8", "--real",
                                 "--input-size", "32", "--layers"])
    assert result.exit_code == 0, result.output
    assert "resnet18 · real-valued" in result.output and "layers.3.1.conv2" in result.output


def test_summary_measures_the_latency_on_request():
    result = runner.invoke(app, ["models", "summary", "--json", "--arch", "resnet18", "--width", "8",
                                 "--input-size", "32", "--latency"])
    assert result.exit_code == 0, result.output
    lat = json.loads(result.output)["latency"]
    assert lat["binary_ms"] > 0 and lat["float_ms"] > 0 and lat["speedup"] == round(lat["float_ms"] / lat["binary_ms"], 2)
    assert (lat["batch"], lat["threads"], lat["input"]) == (1, 1, 32)
    table = runner.invoke(app, ["models", "summary", "--arch", "resnet18", "--width", "8", "--input-size", "32",
                                "--real", "--latency"])
    assert table.exit_code == 0 and "latency (CPU)" in table.output and "x)" not in table.output  # no speed-up: real


def test_set_overrides_any_field(tmp_path):
    spec = tmp_path / "model.yaml"
    spec.write_text("arch: hourglass\nwidth: 16\ndepth: 2\nstacks: 2\n")
    result = runner.invoke(app, ["models", "summary", "--json", "--config", str(spec), "--input-size", "32",
                                 "--set", "activation.kind=leaky_relu", "--set", "decomposition.kind=svd"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["config"]["activation"]["kind"] == "leaky_relu" and out["config"]["stacks"] == 2
    assert out["trained_params"] != out["params"]  # factors are trained, not deployed


def _fails(args, *phrases):
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in result.output, result.output


def test_bad_input_gives_one_clear_error(tmp_path):
    _fails(["models", "summary", "--arch", "vgg"], "model.arch", "valid names: alexnet, hourglass")
    _fails(["models", "summary", "--set", "activation.kind=gelu"], "model.activation.kind", "leaky_relu, none")
    _fails(["models", "summary", "--set", "activation"], "--set", "KEY=VALUE")
    _fails(["models", "summary", "--set", "colour=red"], "model.colour", "unknown key")
    _fails(["models", "summary", "--config", str(tmp_path / "missing.yaml")], "missing.yaml: file not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("arch: [unclosed\n")
    _fails(["models", "summary", "--config", str(bad)], "not valid YAML")
    bad.write_text("- a list\n")
    _fails(["models", "summary", "--config", str(bad)], "must hold a mapping")


def test_list_names():
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0
    assert "holistic_tucker" in result.output and "unet_hourglass" in result.output


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from bnnctl.orchestrator.cli import app; "
            "heavy = [m for m in ('torch', 'tensorly', 'ray', 'mlflow', 'optuna', 'sqlalchemy', 'cupy') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_data_synth_writes_the_mpii_layout(tmp_path):
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "syn"), "--train", "5", "--valid", "2"])
    assert result.exit_code == 0, result.output
    from bnnctl.workers.data.pose import read_mpii

    assert len(read_mpii(tmp_path / "syn", "train")) == 5 and len(read_mpii(tmp_path / "syn", "valid")) == 2
    _fails(["data", "synth", str(tmp_path / "x"), "--train", "0"], "synthetic.train", "must be in [1, 1000000], got 0")
    assert not (tmp_path / "x").exists()  # nothing written on bad input


def test_train_run_trains_and_resumes(tmp_path):
    spec = tmp_path / "train.yaml"
    spec.write_text(f"""
model: {{width: 16, depth: 2}}
data: {{root: {tmp_path / 'syn'}, synthetic: {{train: 16, valid: 8}}, input_size: 32}}
epochs: 2
batch_size: 8
loss: mse
threads: 1
""")
    ck = tmp_path / "ck"
    result = runner.invoke(app, ["train", "run", str(spec), "--checkpoints", str(ck)])
    assert result.exit_code == 0, result.output
    assert "epoch    2" in result.output and "completed: pckh" in result.output and (ck / "last.pt").exists()
    again = runner.invoke(app, ["train", "run", str(spec), "--checkpoints", str(ck)])
    assert again.exit_code == 0 and "epoch    1" not in again.output  # nothing retrained
    _fails(["train", "run", str(spec), "--set", "epochs=0"], "epochs", "must be in [1, 10000], got 0")
    _fails(["train", "run", str(spec), "--set", "data.dataset=mpii", "--set", f"data.root={tmp_path / 'none'}"],
           "MPII dataset not found", "bnnctl data synth")


def test_dashboard_prints_its_url_serves_and_refuses_what_it_cannot_do(tmp_path):
    import os
    import socket
    import time
    import urllib.request

    _fails(["dashboard", "--db", f"sqlite:///{tmp_path / 'none.db'}"], "no state database", "run a study first")
    from bnnctl.orchestrator.store import Store

    Store(f"sqlite:///{tmp_path / 'state.db'}").upsert_study("s", "s.yaml", "h", {"metric": "pckh", "seeds": [0],
                                                                                  "ablations": []})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        busy = runner.invoke(app, ["dashboard", "--db", f"sqlite:///{tmp_path / 'state.db'}", "--port", str(port)])
        assert busy.exit_code == 1 and "cannot listen on 127.0.0.1" in busy.output
    cli = [sys.executable, "-c", "from bnnctl.orchestrator.cli import main; main()", "dashboard",
           "--db", f"sqlite:///{tmp_path / 'state.db'}", "--port", str(port)]
    proc = subprocess.Popen(cli, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout.readline().startswith(f"bnnctl dashboard: http://127.0.0.1:{port}/")
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/") as r:
                    page = r.read().decode()
                break
            except OSError:
                time.sleep(0.1)
        assert 'href="/study/s"' in page
    finally:
        proc.terminate()
        proc.wait(10)


def test_help_of_every_command_group():
    for group in ("study", "tune", "models", "data", "train"):
        result = runner.invoke(app, [group, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output
    result = runner.invoke(app, ["dashboard", "--help"])
    assert "127.0.0.1" in result.output and "--mlflow-url" in result.output
