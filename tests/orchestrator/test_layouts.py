"""Typed layouts of stored studies and tunings: round trips, older stored forms, annotations."""
import dataclasses

from bnnctl.orchestrator.layouts import (AblationLayout, ArmLayout, ParamLayout, RowLayout, StudyLayout, TuningLayout,
                                         parse)
from bnnctl.orchestrator.spec import load_spec
from bnnctl.orchestrator.study import table_layout

STUDY = StudyLayout(name="s", description="d", seeds=(0, 3), metric="pckh", report="best", alpha=0.01,
                    correction="holm", ablations=(AblationLayout("T1", "incremental", "base",
                                                                 (RowLayout("base", 76.3), RowLayout("+ a"))),))
TUNING = TuningLayout(name="t", seed=2, metric="val_loss", direction="minimize", value="last", trials=8,
                      sampler="tpe", pruner="median", space_hash="abc", arms=(ArmLayout("base", "t/base"),
                                                                              ArmLayout("kd", "t/kd", "teacher")),
                      params=(ParamLayout("optim.lr", "float", "[1e-4, 1e-2] log", True),), data={"name": "t"})


def test_study_and_tuning_layouts_round_trip_through_plain_data():
    for layout in (STUDY, TUNING):
        data = layout.to_dict()
        assert isinstance(data["arms" if layout.kind == "tuning" else "ablations"], list)  # JSON-ready
        assert parse(data) == layout and type(parse(data)) is type(layout)
        assert "stopped_reason" not in data  # annotations only where set


def test_annotations_are_kept_and_unknown_keys_ignored():
    data = {**STUDY.to_dict(), "stopped_reason": "disk full", "mlflow_experiment_id": "7",
            "job": {"id": "raysubmit_1"}, "something_newer": 1}
    layout = parse(data)
    assert (layout.stopped_reason, layout.mlflow_experiment_id, layout.job) == ("disk full", "7", {"id": "raysubmit_1"})
    assert dataclasses.replace(layout, stopped_reason=None, mlflow_experiment_id=None, job=None) == STUDY


def test_a_layout_stored_before_the_reporting_rule_gets_the_defaults():
    old = {"name": "s", "seeds": [0], "metric": "pckh",
           "ablations": [{"name": "T", "mode": "isolated", "baseline": "a", "rows": [{"name": "a"}]}]}
    layout = parse(old)
    assert (layout.report, layout.alpha, layout.correction, layout.kind) == ("last", 0.05, "none", "study")
    assert layout.ablation("T").rows == (RowLayout("a", None),)


def test_the_stored_layout_of_a_spec_is_what_the_tables_read(tmp_path):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("""
name: lay
task: pose
base: {data: {dataset: synthetic}}
seeds: [0, 1]
report: best
statistics: {alpha: 0.1, correction: holm}
ablations:
  - name: T
    mode: incremental
    baseline: relu
    rows:
      - {name: relu, set: {model.activation.kind: relu}, reference: 76.3}
      - {name: prelu, set: {model.activation.kind: prelu}}
""")
    layout = parse(table_layout(load_spec(spec_file)))
    assert layout.base["model.activation.kind"] == "prelu" and layout.base["epochs"] == str(load_spec(spec_file).base.epochs)
    assert layout.version == "" and layout.overrides == {}
    layout = dataclasses.replace(layout, base={})  # the base config (the dashboard's columns) aside
    assert layout == StudyLayout(name="lay", seeds=(0, 1), metric="pckh", report="best", alpha=0.1, correction="holm",
                                 ablations=(AblationLayout("T", "incremental", "relu",
                                                           (RowLayout("relu", 76.3), RowLayout("prelu"))),))
