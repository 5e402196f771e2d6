"""Tables a reviewer can trust, end to end with real training (in-process backend, no cluster) and a
real MLflow store: provenance, the budget column, one reporting rule from tuning to table."""
import json

import pytest
import studies as specs
import yaml
from typer.testing import CliRunner

from bnnctl.orchestrator.backends.inprocess import InProcessBackend
from bnnctl.orchestrator.cli import app
from bnnctl.orchestrator.runcore import RunOptions
from bnnctl.orchestrator.store import Store
from bnnctl.orchestrator.study import run_study
from bnnctl.orchestrator.tuning import load_tuning, run_tuning, summarize

runner = CliRunner()

PRELU = {"model.activation.kind": "prelu"}


def _study(root):
    return specs.study("prov", root, specs.rows(
        ("prelu", PRELU), {"name": "reverse", "set": PRELU, "stages": "reverse_order"},
        {"name": "distilled", "set": PRELU, "teacher": "real"}, {"name": "standard", "set": PRELU, "stages": "standard"},
    ), ablation="order", teachers=specs.REAL_TEACHER, tracking={"experiment": "prov"},
        base_fields={"epochs": 4, "model": {"binarize": {"quantizer": "tanh"}},
                     "lambda_schedule": {"kind": "linear", "lambda_start": 1.0, "lambda_end": 20.0}})


def _options(**kw):
    return RunOptions(backend_instance=InProcessBackend(capacity=1), **kw)


@pytest.mark.slow
def test_provenance_budgets_and_the_rule_reach_tables_pages_and_mlflow(workdir):
    from mlflow.tracking import MlflowClient

    from bnnctl.dashboard import views

    spec = specs.write(workdir, _study(workdir / "syn"))
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
    from bnnctl.workers.schedules import LambdaSchedule, epoch_values

    assert epoch_values(LambdaSchedule("linear", 1.0, 20.0), 4) == lambdas  # the dashboard's curve is the trainer's

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


def _tuning(root):
    return specs.tuning("rule", root, {"lambda_schedule.lambda_end": {"type": "float", "low": 10, "high": 200, "log": True}},
                        trials=3, sampler={"name": "random", "seed": 1}, pruner={"name": "none"},
                        objective={"metric": "pckh", "value": "best"},
                        base_fields={"epochs": 4, "model": {"binarize": {"quantizer": "tanh"}},
                                     "lambda_schedule": {"kind": "exponential", "lambda_start": 1.0, "lambda_end": 20.0}})


@pytest.mark.slow
def test_a_trials_value_in_tune_show_is_the_value_its_study_table_shows(workdir):
    spec = specs.write(workdir, _tuning(workdir / "syn"))
    assert run_tuning(spec, options=_options()).status == "completed"
    _, _, studies = load_tuning("rule")
    summary = summarize(studies["base"])
    out = workdir / "best.yaml"
    result = runner.invoke(app, ["tune", "best", "rule", "--as-spec", str(out)])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load(out.read_text())
    assert written["report"] == "best"  # the tuning's rule travels with its values
    assert run_study(out, options=_options()).trained == 0  # the trials' own runs, reused
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

    # MLflow: the tuning's parent run holds its spec and its trials table; the study of its best
    # values, which trained nothing, is not an empty parent: each row links to the trial that made it
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / '.bnnctl' / 'mlflow.db'}")
    tuning_parent = store.study("rule").mlflow_run_id
    files = {a.path for a in client.list_artifacts(tuning_parent, "tables")} | \
        {a.path for a in client.list_artifacts(tuning_parent, "spec")}
    assert {"tables/trials.csv", "tables/trials.md", "spec/rule.yaml"} <= files, files
    table = list(__import__("csv").DictReader(open(client.download_artifacts(tuning_parent, "tables/trials.csv",
                                                                             str(workdir / "dl")))))
    assert len(table) == len(studies["base"].trials)
    by_trial = {int(r["trial"]): r for r in table}
    assert by_trial[best["number"]]["variant"] == best["variant"] and by_trial[best["number"]]["state"] == "COMPLETE"
    assert float(by_trial[best["number"]]["objective"]) == float(f"{best['value']:.6g}")
    study = store.study("rule-best")
    links = client.search_runs([client.get_run(study.mlflow_run_id).info.experiment_id],
                               f"tags.mlflow.parentRunId = '{study.mlflow_run_id}'")
    assert sorted(r.data.tags["bnnctl.row"] for r in links) == sorted(rows)  # one run per row, none empty
    link = next(r for r in links if r.data.tags["bnnctl.row"] == f"tuned (trial {best['number']})")
    assert link.data.tags["bnnctl.same_as"] == best["variant"] and link.data.tags["bnnctl.kind"] == "row"
    assert link.data.tags["bnnctl.same_as_run"] == trained.mlflow_run_id
    assert link.data.metrics["pckh"] == trained.result["metrics"]["pckh"]
    assert link.data.params["epochs"] == "4" and link.info.status == "FINISHED"
    assert run_study(out, options=_options()).trained == 0  # run again: the links are kept, not doubled
    again = client.search_runs([link.info.experiment_id], f"tags.mlflow.parentRunId = '{study.mlflow_run_id}'")
    assert sorted(r.info.run_id for r in again) == sorted(r.info.run_id for r in links)


def _links(root):
    real = {"model.binarize.activations": False, "model.binarize.weights": False}
    return specs.study("links", root, specs.rows({"name": "binary"}, {"name": "distilled", "teacher": "real"},
                                                 ("real-valued", real)),
                       teachers=specs.REAL_TEACHER, tracking={"experiment": "links"})


@pytest.mark.slow
def test_every_row_is_a_row_in_mlflow_and_results_and_versions_are_named(workdir):
    """The real-valued row is the teacher's function (one identity, trained once, kind=teacher):
    it is still a row in results() and has a row run in MLflow. A --set version's runs carry its
    name and a version tag, in the same experiment."""
    from mlflow.tracking import MlflowClient

    from bnnctl.orchestrator.results import results

    spec = specs.write(workdir, _links(workdir / "syn"))
    assert run_study(spec, options=_options()).status == "completed"
    df = results("links")
    rows = df[df.kind == "row"]
    assert sorted(rows["row"]) == ["binary", "distilled", "real-valued"]  # the README's example keeps every row
    store = Store()
    teacher = next(v for v in store.study_variants(store.study("links").id).values() if v.kind == "teacher")
    assert rows[rows.row == "real-valued"]["variant"].tolist() == [teacher.key]
    assert df[df.kind == "teacher"]["variant"].tolist() == [teacher.key]  # and it is the teacher too

    client = MlflowClient(f"sqlite:///{workdir / '.bnnctl' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("links").experiment_id
    real = client.search_runs([exp], "tags.`bnnctl.row` = 'real-valued'")
    assert len(real) == 1 and real[0].data.tags["bnnctl.same_as_run"] == teacher.mlflow_run_id
    assert real[0].data.tags["bnnctl.kind"] == "row" and real[0].info.run_name == "t / real-valued / seed 0"
    assert real[0].data.metrics["pckh"] == teacher.result["metrics"]["pckh"]
    assert len(client.search_runs([exp], "tags.`bnnctl.role` = 'link'")) == 1  # the others are their own runs

    version = run_study(spec, options=_options(overrides=(("epochs", 3),)))
    assert (version.study, version.status) == ("links@epochs=3", "completed")
    runs = client.search_runs([exp], "tags.`bnnctl.version` = 'epochs=3'")
    parent = store.study("links@epochs=3").mlflow_run_id
    assert parent in {r.info.run_id for r in runs}
    children = [r for r in runs if r.info.run_id != parent]
    assert len(children) == 4  # the teacher, two rows, and the real-valued row's link to the teacher
    assert all(r.info.run_name.endswith(" @epochs=3") and r.data.tags["bnnctl.study"] == "links@epochs=3"
               and r.data.tags["bnnctl.spec_name"] == "links" for r in children)
    assert all(r.data.params["epochs"] == "3" for r in children)
