"""Tables a reviewer can trust, end to end with real training (in-process backend, no cluster) and a
real MLflow store: provenance, the budget column, one reporting rule from tuning to table."""
import json

import yaml
from typer.testing import CliRunner

from bnnctl.orchestrator.backends.inprocess import InProcessBackend
from bnnctl.orchestrator.cli import app
from bnnctl.orchestrator.runcore import RunOptions
from bnnctl.orchestrator.store import Store
from bnnctl.orchestrator.study import run_study
from bnnctl.orchestrator.tuning import load_tuning, run_tuning, summarize

runner = CliRunner()

STUDY = """
name: prov
base:
  model: {{width: 8, depth: 2, binarize: {{quantizer: tanh}}}}
  data: {{root: {root}, synthetic: {{train: 32, valid: 16}}, input_size: 32}}
  epochs: 4
  batch_size: 16
  loss: mse
  threads: 1
  latency: false
  lambda_schedule: {{kind: linear, lambda_start: 1.0, lambda_end: 20.0}}
teachers:
  real: {{set: {{model.binarize.activations: false, model.binarize.weights: false}}}}
ablations:
  - name: order
    mode: isolated
    rows:
      - {{name: prelu, set: {{model.activation.kind: prelu}}}}
      - {{name: reverse, set: {{model.activation.kind: prelu}}, stages: reverse_order}}
      - {{name: distilled, set: {{model.activation.kind: prelu}}, teacher: real}}
      - {{name: standard, set: {{model.activation.kind: prelu}}, stages: standard}}
tracking: {{experiment: prov}}
"""


def _options(**kw):
    return RunOptions(backend_instance=InProcessBackend(capacity=1), **kw)


def test_provenance_budgets_and_the_rule_reach_tables_pages_and_mlflow(workdir):
    from mlflow.tracking import MlflowClient

    from bnnctl.dashboard import views

    spec = workdir / "prov.yaml"
    spec.write_text(STUDY.format(root=workdir / "syn"))
    assert run_study(spec, options=_options()).status == "completed"
    store = Store()
    study = store.study("prov")
    members = {(m.row, m.seed): m for m in store.members(study.id) if m.ablation}
    reverse = store.variant(members[("reverse", 0)].variant_key)
    distilled = store.variant(members[("distilled", 0)].variant_key)
    stage1 = store.variant(next(d for d in reverse.deps))
    teacher = store.variant(distilled.deps[0])
    assert stage1.kind == "stage1" and teacher.kind == "teacher"
    # lambda over the row's whole budget: stage 1 runs epochs 0-1, stage 2 epochs 2-3 and ends at lambda_end
    lambdas = [v for _, v in store.metrics(stage1.key)["lambda"]] + [v for _, v in store.metrics(reverse.key)["lambda"]]
    assert lambdas == [1.0, 1.0 + 19 / 3, 1.0 + 38 / 3, 20.0]

    # the tables: an epochs column (equal budgets), the rule under each table
    result = runner.invoke(app, ["study", "show", "prov", "--format", "csv"])
    rows = {r["row"]: r for r in __import__("csv").DictReader(__import__("io").StringIO(result.output))}
    assert {r: rows[r]["epochs"] for r in rows} == {"prelu": "4", "reverse": "4", "distilled": "4", "standard": "4"}
    assert rows["standard"]["status"] == "done"  # the usual order: a real network, then all binary from it
    assert rows["reverse"]["report"] == "last" and rows["reverse"]["std"] == ""  # one seed: no spread
    md = runner.invoke(app, ["study", "show", "prov", "--format", "md"]).output
    assert "pckh at each run's last epoch" in md and "+" in md and "(n=1)" in md

    # status and the variant page say what each variant started from and learned from
    from bnnctl.orchestrator.cli.study import provenance

    variants = store.variants([stage1.key, reverse.key, teacher.key, distilled.key])
    assert provenance(reverse, variants) == f"init: {stage1.label} ({stage1.key[:8]})"
    assert provenance(distilled, variants) == f"teacher: {teacher.label} ({teacher.key[:8]})"
    status = runner.invoke(app, ["study", "status", "prov"]).output
    assert "init:" in status and stage1.key[:8] in status and teacher.key[:8] in status
    page = views.variant(store, reverse.key, "prov")
    assert [(s["role"], s["key"]) for s in page["sources"]] == [("initialized from", stage1.key)]
    assert page["config"]["init_from"] == f"last checkpoint of {stage1.label} ({stage1.key})"
    assert page["report"] == "last" and page["reported"] == reverse.result["metrics"]["pckh"]
    page = views.variant(store, distilled.key, "prov")
    assert [(s["role"], s["key"]) for s in page["sources"]] == [("teacher", teacher.key)]
    assert page["config"]["distill.teacher"].startswith(f"best checkpoint of {teacher.label}")

    # MLflow: tags to group and compare runs, links to the runs a run came from, the tables on the parent
    client = MlflowClient(f"sqlite:///{workdir / '.bnnctl' / 'mlflow.db'}")
    run = client.get_run(reverse.mlflow_run_id).data.tags
    assert (run["bnnctl.ablation"], run["bnnctl.row"], run["bnnctl.seed"], run["bnnctl.kind"], run["bnnctl.stage"]) == (
        "order", "reverse", "0", "row", "2")
    assert run["bnnctl.init_from"] == stage1.key and run["bnnctl.init_from_run"] == stage1.mlflow_run_id
    first = client.get_run(stage1.mlflow_run_id).data.tags  # stage 1 is placed under its row too
    assert (first["bnnctl.ablation"], first["bnnctl.row"], first["bnnctl.seed"], first["bnnctl.stage"]) == (
        "order", "reverse", "0", "1")
    run = client.get_run(distilled.mlflow_run_id).data.tags
    assert run["bnnctl.teacher"] == teacher.key and run["bnnctl.teacher_run"] == teacher.mlflow_run_id
    parent = study.mlflow_run_id
    files = {a.path for a in client.list_artifacts(parent, "tables")} | {a.path for a in client.list_artifacts(parent, "spec")}
    assert files == {"tables/tables.md", "tables/tables.csv", "tables/tables.html", "spec/prov.yaml"}
    local = client.download_artifacts(parent, "tables/tables.csv", str(workdir / "dl"))
    assert "reverse" in open(local).read()


TUNING = """
kind: tuning
name: rule
base:
  model: {{width: 8, depth: 2, binarize: {{quantizer: tanh}}}}
  data: {{root: {root}, synthetic: {{train: 32, valid: 16}}, input_size: 32}}
  epochs: 4
  batch_size: 16
  loss: mse
  threads: 1
  latency: false
  lambda_schedule: {{kind: exponential, lambda_start: 1.0, lambda_end: 20.0}}
search:
  lambda_schedule.lambda_end: {{type: float, low: 10, high: 200, log: true}}
objective: {{metric: pckh, value: best}}
trials: 3
sampler: {{name: random, seed: 1}}
pruner: {{name: none}}
"""


def test_a_trials_value_in_tune_show_is_the_value_its_study_table_shows(workdir):
    spec = workdir / "rule.yaml"
    spec.write_text(TUNING.format(root=workdir / "syn"))
    assert run_tuning(spec, options=_options(track=False)).status == "completed"
    _, _, studies = load_tuning("rule")
    summary = summarize(studies["base"])
    out = workdir / "best.yaml"
    result = runner.invoke(app, ["tune", "best", "rule", "--as-spec", str(out)])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load(out.read_text())
    assert written["report"] == "best"  # the tuning's rule travels with its values
    assert run_study(out, options=_options(track=False)).trained == 0  # the trials' own runs, reused
    csv_out = runner.invoke(app, ["study", "show", "rule-best", "--format", "csv"]).output
    rows = {r["row"]: r for r in __import__("csv").DictReader(__import__("io").StringIO(csv_out))}
    default, best = summary["default"], summary["best"]
    assert float(rows["default"]["mean"]) == round(default["value"], 4)
    assert float(rows[f"tuned (trial {best['number']})"]["mean"]) == round(best["value"], 4)
    store = Store()
    trained = store.variant(best["variant"])
    history = [v for _, v in store.metrics(best["variant"])["pckh"]]
    assert best["value"] == max(history) == trained.result["best_metrics"]["pckh"]
    assert json.loads(json.dumps(written))["ablations"][0]["rows"][0]["name"] == "default"
