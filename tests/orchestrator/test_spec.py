"""Study specs: every file in studies/ loads and plans; malformed specs fail clearly, before anything is written."""
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import yaml
from typer.testing import CliRunner

from bnnctl.orchestrator.cli import app
from bnnctl.orchestrator.plan import build_plan
from bnnctl.orchestrator.spec import SpecError, load_spec
from bnnctl.workers.config import to_dict

SPECS = sorted((Path(__file__).resolve().parents[2] / "studies").glob("*.yaml"))
STUDIES = [p for p in SPECS if yaml.safe_load(p.read_text()).get("kind") != "tuning"]  # tunings: test_tune.py
runner = CliRunner()

GOOD = """
name: tiny
base:
  model: {width: 16, depth: 2}
  data: {synthetic: {train: 8, valid: 4}, input_size: 32}
  epochs: 2
  loss: mse
seeds: [0, 1]
teachers:
  real: {set: {model.binarize.activations: false, model.binarize.weights: false}}
ablations:
  - name: chain
    mode: incremental
    rows:
      - {name: relu, set: {model.activation.kind: relu}, reference: 76.3}
      - {name: + prelu, set: {model.activation.kind: prelu}}
      - {name: + reverse, stages: reverse_order}
      - {name: + distil, teacher: real}
  - name: alone
    mode: isolated
    rows:
      - {name: real, set: {model.binarize.activations: false, model.binarize.weights: false}}
  - name: grid
    mode: grid
    axes:
      dec: {none: {model.decomposition.kind: none}, svd: {model.decomposition.kind: svd}}
      alpha: {analytic: {model.binarize.alpha: analytic}, learned: {model.binarize.alpha: learned}}
    references: {none/analytic: 78.4}
"""


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_every_study_file_loads_and_plans(path):
    spec = load_spec(path)
    plan = build_plan(spec)
    assert spec.rows and plan.variants
    for v in plan.order():  # topological: dependencies come first
        seen = list(plan.variants)
        assert all(seen.index(d) < seen.index(v.key) for d in v.deps)
    assert set(plan.rows) == {(r.ablation, r.name, s) for r in spec.rows for s in spec.seeds}


def test_incremental_isolated_grid_and_dependencies(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(GOOD)
    spec = load_spec(f)
    chain, alone, grid = spec.ablations
    assert [r.config.model.activation.kind for r in chain.rows] == ["relu", "prelu", "prelu", "prelu"]
    assert [r.stages for r in chain.rows] == ["single", "single", "reverse_order", "reverse_order"]
    assert chain.rows[3].teacher == "real" and chain.rows[0].reference == 76.3
    assert [r.name for r in grid.rows] == ["none/analytic", "none/learned", "svd/analytic", "svd/learned"]
    assert grid.rows[3].config.model.decomposition.kind == "svd" and grid.rows[3].config.model.binarize.alpha == "learned"
    plan = build_plan(spec)
    distil = plan.variants[plan.rows[("chain", "+ distil", 1)]]
    stage1 = plan.variants[distil.init_dep]
    assert stage1.kind == "stage1" and not stage1.config.model.binarize.weights
    # equal budgets: the two stages share the row's 2 epochs, the schedule spans both
    assert (stage1.config.epochs, stage1.config.schedule_offset, stage1.config.schedule_epochs) == (1, 0, 2)
    assert (distil.config.epochs, distil.config.schedule_offset, distil.config.schedule_epochs) == (1, 1, 2)
    teacher = plan.variants[distil.teacher_dep]
    assert teacher.kind == "teacher" and teacher.seed == 0  # one teacher, shared by both seeds
    assert plan.variants[plan.rows[("chain", "+ distil", 0)]].teacher_dep == teacher.key
    # the real-valued row is the teacher's run: trained once
    assert plan.rows[("alone", "real", 0)] == teacher.key
    # grid "none/analytic" equals the chain's "+ prelu" row only if configs match: identities follow configs
    assert plan.rows[("chain", "+ prelu", 0)] != plan.rows[("chain", "+ prelu", 1)]


BAD = {
    "unknown key": ("name: x\nbase: {}\nablations: []\ncolour: red\n", "unknown key 'colour'", 4),
    "unknown base key": ("name: x\nbase: {epochs: 1, modle: {}}\nablations: [{name: a, rows: [{name: r}]}]\n", "base.modle", 2),
    "wrong type": ("name: x\nbase: {epochs: many}\nablations: [{name: a, rows: [{name: r}]}]\n", "expected an integer", 2),
    "unknown technique": ("name: x\nablations:\n  - name: a\n    rows:\n      - {name: r, set: {model.activation.kind: gelu}}\n",
                          "valid names: leaky_relu, none, prelu, relu", 5),
    "negative lr": ("name: x\nablations:\n  - name: a\n    rows:\n      - {name: r, set: {optim.lr: -0.1}}\n",
                    "must be a positive number", 5),
    "lambda end < start": ("name: x\nablations:\n  - name: a\n    rows:\n      - name: r\n        set:\n          "
                           "lambda_schedule: {kind: linear, lambda_start: 10, lambda_end: 1}\n", "lambda_end", 7),
    "missing teacher": ("name: x\nablations:\n  - name: a\n    rows:\n      - {name: r, teacher: ghost}\n",
                        "unknown teacher 'ghost'", 5),
    "cyclic teachers": ("name: x\nteachers:\n  a: {teacher: b}\n  b: {teacher: a}\nablations: [{name: a, rows: [{name: r}]}]\n",
                        "cycle", 3),
    "duplicate rows": ("name: x\nablations:\n  - name: a\n    rows: [{name: r}, {name: r}]\n", "duplicate row name 'r'", 3),
    "duplicate key": ("name: x\nname: y\nablations: [{name: a, rows: [{name: r}]}]\n", "duplicate key", 2),
    "not yaml": ("name: [unclosed\n", "not valid YAML", None),
    "empty": ("", "empty", None),
    "no ablations": ("name: x\n", "ablations", None),
    "unknown mode": ("name: x\nablations: [{name: a, mode: zigzag, rows: [{name: r}]}]\n", "unknown mode 'zigzag'", 2),
    "unknown stages": ("name: x\nablations:\n  - name: a\n    rows: [{name: r, stages: backwards}]\n", "unknown stages", 4),
    "bad seeds": ("name: x\nseeds: [0, 0]\nablations: [{name: a, rows: [{name: r}]}]\n", "distinct", 2),
    "task mismatch": ("name: x\nbase: {model: {arch: resnet18}}\nablations: [{name: a, rows: [{name: r}]}]\n",
                      "is a pose dataset but model 'resnet18'", 2),
    "bad baseline": ("name: x\nablations: [{name: a, baseline: zz, rows: [{name: r}]}]\n", "no row named 'zz'", 2),
    "missing name": ("ablations: [{name: a, rows: [{name: r}]}]\n", "name", None),
    "task mismatch declared": ("name: x\ntask: classification\nablations: [{name: a, rows: [{name: r}]}]\n",
                               "is a pose dataset", 2),
    "reference of an unknown metric": ("name: x\nablations:\n  - name: a\n    rows:\n      - {name: r, reference: "
                                       "{pckh: 1, top5: 2}}\n", "unknown metric 'top5' for a reference; allowed: pckh", 5),
    "reference not a number": ("name: x\nablations:\n  - name: a\n    rows:\n      - {name: r, reference: high}\n",
                               "expected the paper's value (a number), got 'high'", 5),
    "unknown pretrained run": ("name: x\nablations:\n  - name: a\n    rows:\n      - {name: r, init: mpii}\n",
                               "unknown pretrained run 'mpii'", 5),
    "pretrained two-stage row": ("name: x\npretrained: {p: {set: {epochs: 2}}}\nablations:\n  - name: a\n    rows:\n"
                                 "      - {name: r, init: p, stages: reverse_order}\n", "needs a single-stage row", 6),
    "mpii16 layout on mpii": ("name: x\nbase: {data: {pose_layout: mpii16}}\nablations: [{name: a, rows: [{name: r}]}]\n",
                              "'mpii16' maps LSP's joints", 2),
    "adaptive max below min": ("name: x\nstatistics:\n  adaptive: {min_seeds: 5, max_seeds: 3}\n"
                               "ablations: [{name: a, rows: [{name: r}]}]\n", "max_seeds: must be in [min_seeds, 100]", 3),
    "adaptive one seed": ("name: x\nstatistics:\n  adaptive: {min_seeds: 1}\nablations: [{name: a, rows: [{name: r}]}]\n",
                          "a paired test needs 2", 3),
    "adaptive unknown key": ("name: x\nstatistics:\n  adaptive: {seeds: 4}\nablations: [{name: a, rows: [{name: r}]}]\n",
                             "adaptive.seeds", 3),
    "adaptive margin": ("name: x\nstatistics:\n  adaptive: {margin: 0}\nablations: [{name: a, rows: [{name: r}]}]\n",
                        "margin: must be a positive number", 3),
    "gate range on a scalar gate": ("name: x\nablations:\n  - name: a\n    rows:\n      - {name: r, set: {model.gate: "
                                    "{kind: scalar, init_range: [0, 1]}}}\n", "needs kind: channel", 5),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_malformed_specs_fail_clearly_and_write_nothing(tmp_path, monkeypatch, case):
    text, words, line = BAD[case]
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as err:
        load_spec(f)
    assert words in str(err.value) and str(f) in str(err.value)
    if line is not None:
        assert f"line {line}" in str(err.value)
    result = runner.invoke(app, ["study", "run", str(f), "--no-track"])
    assert result.exit_code == 1 and "Traceback" not in result.output and words in result.output
    assert not (tmp_path / ".bnnctl").exists()  # nothing started, nothing written


def test_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["study", "run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1 and "file not found" in result.output and not (tmp_path / ".bnnctl").exists()


@pytest.mark.parametrize("name", ["mpii.yaml", "imagenet.yaml", "imagenet_mt.yaml", "mpii_decomposition.yaml",
                                  "mpii_soft_gates.yaml", "lsp.yaml"])
def test_real_data_studies_stop_before_training_without_data(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["study", "run", str(STUDIES[0].parent / name), "--no-track"])
    # relative data roots are resolved once, at load, against the working directory
    assert result.exit_code == 1 and f"not found at {tmp_path.resolve() / 'data'}/" in result.output
    assert "bnnctl data" in result.output  # says how to get the data
    assert not (tmp_path / ".bnnctl").exists()


def test_a_lambda_group_the_model_lacks_fails_at_load(tmp_path):
    """A typo in a per-group lambda schedule fails before anything starts, not when every variant trains."""
    good = GOOD.replace("  loss: mse\n", "  loss: mse\n  model_q: {}\n").replace("  model_q: {}\n", "")
    ok = tmp_path / "ok.yaml"
    ok.write_text(good.replace("  loss: mse\n", "  loss: mse\n  lambda_groups: [{group: stacks.0, kind: linear}]\n", 1))
    assert load_spec(ok).base.lambda_groups[0].group == "stacks.0"
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.replace("  loss: mse\n", "  loss: mse\n  lambda_groups: [{group: stak.0, kind: linear}]\n", 1))
    with pytest.raises(SpecError) as err:
        load_spec(bad)
    msg = str(err.value)
    assert "bad.yaml" in msg and "base.lambda_groups[0].group" in msg and "'stak.0'" in msg and "stacks.0" in msg
    result = runner.invoke(app, ["study", "run", str(bad), "--no-track"])
    assert result.exit_code == 1 and "stak.0" in result.output and not (tmp_path / ".bnnctl").exists()


TWO_STAGE = """
name: budgets
base:
  model: {{width: 8, depth: 2}}
  data: {{synthetic: {{train: 8, valid: 4}}, input_size: 32}}
  epochs: {epochs}
  loss: mse
ablations:
  - name: order
    mode: isolated
    rows:
      - {{name: prelu, set: {{model.activation.kind: prelu}}}}
      - {{name: reverse, set: {{model.activation.kind: prelu}}, stages: reverse_order}}
      - {{name: standard, set: {{model.activation.kind: prelu}}, stages: standard}}
      - {{name: doubled, set: {{model.activation.kind: prelu}}, stages: {{kind: reverse_order, stage1_epochs: {epochs}, stage2_epochs: {epochs}}}}}
      - {{name: short first, set: {{model.activation.kind: prelu}}, stages: {{kind: reverse_order, stage1_epochs: 2}}}}
"""


def test_two_stage_rows_train_the_same_budget_as_one_stage_rows_unless_told(tmp_path):
    from bnnctl.orchestrator.report import budget

    f = tmp_path / "b.yaml"
    f.write_text(TWO_STAGE.format(epochs=9))
    plan = build_plan(load_spec(f))
    row = {r: plan.variants[plan.rows[("order", r, 0)]] for r in ("prelu", "reverse", "standard", "doubled", "short first")}
    stored = {k: NS(config=to_dict(v.config), deps=list(v.deps), kind=v.kind) for k, v in plan.variants.items()}
    assert {r: budget(v.key, stored) for r, v in row.items()} == {
        "prelu": 9, "reverse": 9, "standard": 9, "doubled": 18, "short first": 9}
    s1 = {r: plan.variants[v.init_dep].config for r, v in row.items() if v.init_dep}
    assert (s1["reverse"].epochs, row["reverse"].config.epochs) == (4, 5)  # the smaller half first
    assert (s1["short first"].epochs, row["short first"].config.epochs) == (2, 7)
    assert s1["reverse"].model.binarize.activations and not s1["reverse"].model.binarize.weights
    assert not s1["standard"].model.binarize.activations and not s1["standard"].model.binarize.weights
    assert row["reverse"].config.model.binarize.weights and row["reverse"].config.schedule_offset == 4
    f.write_text(TWO_STAGE.format(epochs=1).replace("      - {name: doubled", "      # - {name: doubled")
                 .replace("      - {name: short", "      # - {name: short"))
    with pytest.raises(SpecError, match=r"rows\[1\].stages: a two-stage row splits its 1 epoch"):
        load_spec(f)
    f.write_text(TWO_STAGE.format(epochs=2).replace("stage1_epochs: 2}", "stage1_epochs: 5}"))
    with pytest.raises(SpecError, match=r"rows\[4\].stages: 5 epochs leave none of the row's 2"):
        load_spec(f)


def test_a_new_ablation_mode_is_one_registration(tmp_path, monkeypatch):
    """Ablation modes are a registry like every other axis: registering one function makes it a valid
    `mode`, and unknown modes list the registered ones."""
    from bnnctl.orchestrator import ablations

    monkeypatch.setattr(ablations, "ABLATION_MODES", dict(ablations.ABLATION_MODES))  # undone after the test

    @ablations.ablation_mode("isolated_backwards")
    def backwards(p, body, path, name, base_data, teachers):
        return list(reversed(ablations.ABLATION_MODES["isolated"](p, body, path, name, base_data, teachers)))

    f = tmp_path / "s.yaml"
    f.write_text(GOOD.replace("mode: incremental", "mode: isolated_backwards"))
    (ablation, *_) = load_spec(f).ablations
    forward = yaml.safe_load(GOOD)["ablations"][0]["rows"]
    assert [r.name for r in ablation.rows] == [r["name"] for r in reversed(forward)]
    f.write_text(GOOD.replace("mode: incremental", "mode: sideways"))
    with pytest.raises(SpecError, match="unknown mode 'sideways'; allowed: incremental, isolated, grid, isolated_backwards"):
        load_spec(f)
