"""No password ever printed: every command's output on a password-protected PostgreSQL state
database, its errors and hints, and what reaches MLflow."""
import re

import pytest
import studies as specs
from typer.testing import CliRunner

from bnnctl.orchestrator.cli import app
from bnnctl.orchestrator.urls import mask_text, mask_url

runner = CliRunner()

def _study(root):
    doc = specs.study("creds", root, specs.rows(("relu", {"model.activation.kind": "relu"})), ablation="a",
                      base_fields={"epochs": 1})
    del doc["base"]["loss"]  # the task's default loss
    return doc


def _tuning(root):
    doc = specs.tuning("creds-tune", root, {"lambda_schedule.lambda_end": {"type": "float", "low": 10, "high": 200, "log": True}},
                       trials=2, sampler={"name": "random", "seed": 0}, pruner={"name": "none"},
                       base_fields={"epochs": 1, "model": {"binarize": {"quantizer": "tanh"}}})
    del doc["base"]["loss"]
    return doc


def test_masking_rules():
    assert mask_url("postgresql+psycopg://u:s3cr%40t@db:5432/x") == "postgresql+psycopg://u:***@db:5432/x"
    assert mask_url("http://alice:pw@mlflow:5000") == "http://alice:***@mlflow:5000"
    assert mask_url("sqlite:////tmp/state.db") == "sqlite:////tmp/state.db"
    assert mask_url("postgresql://u@db/x") == "postgresql://u@db/x"  # no password: unchanged
    assert mask_text("cannot open 'postgresql://u:pw@h/x' (and s3://k:sec@b)") == \
        "cannot open 'postgresql://u:***@h/x' (and s3://k:***@b)"
    # signed URLs (a storage error may print one): the credential's query values
    assert mask_text("GET https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab12&part=2 failed") == \
        "GET https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&part=2 failed"
    assert mask_text("gs://b/x?token=zz&sig=yy") == "gs://b/x?token=***&sig=***"


@pytest.mark.slow
def test_no_output_shows_the_database_password(workdir, pg_server):
    db = pg_server.database()
    password = pg_server.password
    specs.write(workdir, _study(workdir / "syn"), "s.yaml")
    specs.write(workdir, _tuning(workdir / "syn"), "t.yaml")
    outputs = {}
    for name, args in {
        "study run": ["study", "run", "s.yaml", "--db", db, "--cpus", "2"],
        "study list": ["study", "list", "--db", db],
        "study status": ["study", "status", "creds", "--db", db],
        "study show": ["study", "show", "creds", "--db", db, "--format", "md"],
        "tune run": ["tune", "run", "t.yaml", "--db", db, "--cpus", "2"],
        "tune show": ["tune", "show", "creds-tune", "--db", db],
        "unknown study": ["study", "show", "nope", "--db", db],
        "unknown tuning": ["tune", "show", "nope", "--db", db],
        "unreachable db": ["study", "list", "--db", db.replace(str(pg_server.port), "1")],
    }.items():
        result = runner.invoke(app, args)
        outputs[name] = (result.exit_code, re.sub(r"\s+", " ", result.output))  # rich wraps long lines
    for name, (code, text) in outputs.items():
        assert password not in text, name
    assert outputs["study run"][0] == 0 and outputs["tune run"][0] == 0
    assert "optuna-dashboard postgresql+psycopg://bnnctl:***@127.0.0.1" in outputs["tune run"][1]
    for name in ("unknown study", "unknown tuning", "unreachable db"):
        assert outputs[name][0] == 1 and re.search(r"postgresql\+psycopg://bnnctl:\*\*\*@127\.0\.0\.1", outputs[name][1]), name
    # nothing of the URL reaches MLflow either (params, tags of the parent and child runs)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / '.bnnctl' / 'mlflow.db'}")
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            blob = repr(run.data.params) + repr(run.data.tags)
            assert password not in blob and "postgresql" not in blob
