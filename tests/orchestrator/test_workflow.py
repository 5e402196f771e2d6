"""The daily workflow: plan, --set, --only, rerun, delete, --json, the results DataFrame, the progress
lines of a piped run. Real training on the in-process backend (no cluster) and a real sqlite store;
the CLI in-process through Typer's runner."""
import json

import pytest
import studies as specs
from typer.testing import CliRunner

from bnnctl.orchestrator.backends.inprocess import InProcessBackend
from bnnctl.orchestrator.cli import app
from bnnctl.orchestrator.plan import build_plan
from bnnctl.orchestrator.runcore import RunOptions
from bnnctl.orchestrator.spec import load_spec
from bnnctl.orchestrator.store import Store
from bnnctl.orchestrator.study import run_study

runner = CliRunner()

def _flow(root):
    """Four rows of the tiny study, two seeds: a plain row, a two-stage row, a distilled row and
    one whose loss explodes (a variant that fails for its config)."""
    return specs.study("flow", root, specs.rows(
        ("relu", {"model.activation.kind": "relu"}),
        {"name": "reverse", "set": {"model.activation.kind": "prelu"}, "stages": "reverse_order"},
        {"name": "distilled", "teacher": "real"},
        ("exploding", {"optim.lr": 1e30})), seeds=(0, 1), teachers=specs.REAL_TEACHER)


def _spec(workdir):
    return specs.write(workdir, _flow(workdir / "syn"))


def _opts(**kw):
    return RunOptions(track=False, backend_instance=InProcessBackend(capacity=1), **kw)


def _plan_json(f, *extra):
    result = runner.invoke(app, ["study", "plan", str(f), "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_plan_only_set_rerun_and_the_results_dataframe(workdir):
    f = _spec(workdir)
    # the plan of a study never run: every variant to train, stages and teacher shown, nothing written
    plan = _plan_json(f)
    assert not (workdir / ".bnnctl" / "state.db").exists()
    kinds = sorted(v["kind"] for v in plan["variants"])
    assert kinds == ["row"] * 8 + ["stage1"] * 2 + ["teacher"]
    assert {v["action"] for v in plan["variants"]} == {"train"}
    assert plan["summary"] == {"study": "flow", "variants": 11, "to_run": 11, "reused": 0, "skipped": 0,
                               "epochs_to_run": 18, "epochs_total": 18}  # 6 rows x 2, 2 x (1 + 1) two-stage, teacher 2
    stage2 = next(v for v in plan["variants"] if v["stage"] == "stage 2" and v["seed"] == 0)
    stage1 = next(v for v in plan["variants"] if v["kind"] == "stage1" and v["seed"] == 0)
    assert stage2["depends_on"] == [stage1["variant"]] and (stage1["epochs"], stage2["epochs"]) == (1, 1)

    # --only one row: it and what it depends on, nothing else
    out = run_study(f, options=_opts(only=("reverse",)))
    assert out.status == "stopped" and out.trained == 4 and out.not_selected == 7
    assert out.selected_done  # every selected variant completed: the CLI exits 0 (see the pseudo-terminal test)
    assert "selected variants only" in Store().study("flow").spec["stopped_reason"]
    plan = _plan_json(f)
    actions = {(v["row"], v["seed"], v["kind"]): v["action"] for v in plan["variants"]}
    assert actions[("reverse", 0, "row")] == "reuse" and actions[("relu", 0, "row")] == "train"

    # the rest: the exploding row fails (NaN loss); a plain rerun skips it and says so
    out = run_study(f, options=_opts())
    assert out.status == "failed" and out.counts.get("failed") == 2
    again = run_study(f, options=_opts())
    assert again.trained == 0 and again.skipped_failed == 2
    failed = [v for v in _plan_json(f)["variants"] if v["action"] == "skip-failed"]
    assert len(failed) == 2 and all(v["row"] == "exploding" for v in failed)
    assert [v["action"] for v in _plan_json(f, "--rerun-failed")["variants"] if v["row"] == "exploding"] == ["retry"] * 2
    store = Store()
    key = failed[0]["variant"]
    assert [a.status for a in store.attempts(key)] == ["failed"]  # not retried by the plain run
    retried = run_study(f, options=_opts(rerun_failed=True, only=("exploding",)))
    assert retried.trained == 2 and [a.status for a in store.attempts(key)] == ["failed", "failed"]

    # the DataFrame: one row per variant, the values of the store
    import bnnctl

    df = bnnctl.results("flow")
    assert len(df) == 11 and set(df["kind"]) == {"row", "stage1", "teacher"}
    rows = df[df["kind"] == "row"].set_index(["row", "seed"])
    v = store.variant(rows.loc[("relu", 0), "variant"])
    assert rows.loc[("relu", 0), "metric.pckh"] == v.result["metrics"]["pckh"]
    assert rows.loc[("relu", 0), "reported"] == v.result["metrics"]["pckh"] and rows.loc[("relu", 0), "report"] == "last"
    assert rows.loc[("reverse", 0), "epochs"] == 2 and rows.loc[("reverse", 0), "init_from"] == stage1["variant"]
    assert rows.loc[("distilled", 1), "teacher"] is not None and rows.loc[("relu", 1), "config.seed"] == 1
    assert rows.loc[("relu", 0), "env.torch"] and rows.loc[("exploding", 0), "status"] == "failed"
    assert "nan" in rows.loc[("exploding", 0), "error"].lower() or "inf" in rows.loc[("exploding", 0), "error"].lower()

    # the DataFrame's config columns (read at once by pyarrow) are the records' own (flattened in Python)
    import pandas as pd

    from bnnctl.orchestrator.results import records

    slow = pd.DataFrame.from_records(records("flow"))
    assert set(df.columns) == set(slow.columns)
    assert [c for c in slow.columns if not df[c].equals(slow[c])] == []
    assert df.loc[0, "config.optim.lr_steps"] == slow.loc[0, "config.optim.lr_steps"] and isinstance(
        df.loc[0, "config.optim.lr_steps"], tuple)

    # --json of status, show and list parse back and agree with the DataFrame
    status = json.loads(runner.invoke(app, ["study", "status", "flow", "--json"]).output)
    assert {r["variant"] for r in status["variants"]} == set(df["variant"])
    shown = json.loads(runner.invoke(app, ["study", "show", "flow", "--json"]).output)
    (table,) = shown["tables"]
    assert [r["name"] for r in table["rows"]] == ["relu", "reverse", "distilled", "exploding"]
    assert table["rows"][0]["mean"] == df[(df["row"] == "relu")]["reported"].mean()
    for row in table["rows"]:  # each row names the variant behind each seed, with its state
        mine = df[(df["kind"] == "row") & (df["row"] == row["name"])].sort_values("seed")
        assert [(c["seed"], c["key"], c["status"]) for c in row["variants"]] == list(
            zip(mine["seed"], mine["variant"], mine["status"]))
    assert [c["status"] for c in table["rows"][3]["variants"]] == ["failed", "failed"]
    listing = json.loads(runner.invoke(app, ["study", "list", "--json"]).output)
    assert [(s["name"], s["kind"]) for s in listing] == [("flow", "study")]
    text = runner.invoke(app, ["study", "list"]).output
    assert "name" in text and "status" in text and "flow" in text  # a header


def test_set_changes_the_identities_and_applies_to_every_config(workdir):
    f = _spec(workdir)
    plain = build_plan(load_spec(f))
    bigger = build_plan(load_spec(f, {"epochs": 4, "model.width": 16}))
    assert set(plain.variants).isdisjoint(bigger.variants)
    assert {v.config.model.width for v in bigger.order()} == {16}
    stage1 = [v for v in bigger.order() if v.kind == "stage1"]
    assert [v.config.epochs for v in stage1] == [2, 2]  # the row's 4 epochs, split
    plan = _plan_json(f, "--set", "epochs=4", "--set", "model.width=16")
    assert {v["variant"] for v in plan["variants"]} == set(bigger.variants)
    bad = runner.invoke(app, ["study", "plan", str(f), "--set", "model.width=banana"])
    assert bad.exit_code == 1 and "--set model.width" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(app, ["study", "plan", str(f), "--only", "nope"])
    assert bad.exit_code == 1 and "no row 'nope'; rows: t/distilled, t/exploding, t/relu, t/reverse" in bad.output


def test_set_and_tag_runs_are_versions_of_the_study_never_mixed_with_its_own(workdir):
    """A run with --set (or --tag) is a version, NAME@VERSION: listed, shown, tabled and returned by
    results() apart from the spec as written, whose `study show NAME` is unchanged."""
    from bnnctl.orchestrator.results import results

    f = _spec(workdir)
    assert run_study(f, options=_opts(only=("relu",))).trained == 2
    own = json.loads(runner.invoke(app, ["study", "show", "flow", "--json"]).output)
    cli = ["study", "run", str(f), "--only", "relu", "--no-track", "--cpus", "2"]
    r = runner.invoke(app, [*cli, "--set", "epochs=3"])
    assert r.exit_code == 0 and "study flow@epochs=3: stopped" in r.output, r.output
    r = runner.invoke(app, [*cli, "--set", "model.width=16", "--tag", "wide"])
    assert r.exit_code == 0 and "study flow@wide: stopped" in r.output, r.output
    listing = json.loads(runner.invoke(app, ["study", "list", "--json"]).output)
    assert sorted((s["name"], s["version"]) for s in listing) == [
        ("flow", ""), ("flow@epochs=3", "epochs=3"), ("flow@wide", "wide")]

    def relu_keys(shown):
        row = next(r for r in shown["tables"][0]["rows"] if r["name"] == "relu")
        return sorted(c["key"] for c in row["variants"])

    again = json.loads(runner.invoke(app, ["study", "show", "flow", "--json"]).output)
    assert again == own and again["version"] == ""  # the spec's own: not changed by its versions
    one = json.loads(runner.invoke(app, ["study", "show", "flow@epochs=3", "--json"]).output)
    wide = json.loads(runner.invoke(app, ["study", "show", "flow@wide", "--json"]).output)
    assert (one["study"], one["version"], wide["version"]) == ("flow@epochs=3", "epochs=3", "wide")
    keys = [relu_keys(own), relu_keys(one), relu_keys(wide)]
    assert all(len(k) == 2 for k in keys) and len({k for ks in keys for k in ks}) == 6  # three tables, no shared cell
    text = runner.invoke(app, ["study", "show", "flow"]).output
    assert "the spec as written; other versions: flow@epochs=3, flow@wide" in text, text
    text = runner.invoke(app, ["study", "show", "flow@wide"]).output
    assert "version wide of flow: --set model.width=16" in text, text
    assert "version epochs=3 of flow" in runner.invoke(app, ["study", "status", "flow@epochs=3"]).output

    frames = {name: results(name) for name in ("flow", "flow@epochs=3", "flow@wide")}
    for name, df in frames.items():
        assert set(df["study"]) == {name} and set(df["version"]) == {name.partition("@")[2]}
    rows = {name: df[df["row"] == "relu"] for name, df in frames.items()}
    assert set(rows["flow"]["config.epochs"]) == {2} and set(rows["flow@epochs=3"]["config.epochs"]) == {3}
    assert set(rows["flow@wide"]["config.model.width"]) == {16} and set(rows["flow@epochs=3"]["config.model.width"]) == {8}
    # the plan of a version is the version's: its variants, already trained
    plan = _plan_json(f, "--set", "epochs=3", "--only", "relu")
    assert plan["summary"]["study"] == "flow@epochs=3"
    assert {v["action"] for v in plan["variants"] if v["row"] == "relu"} == {"reuse"}


def test_version_names():
    from bnnctl.orchestrator.spec import version_name
    from bnnctl.workers.errors import ConfigError

    assert version_name(()) == ""
    assert version_name((("optim.lr", 0.001), ("epochs", 2))) == "epochs=2,optim.lr=0.001"  # sorted by path
    assert version_name((("epochs", 2), ("optim.lr", 0.001))) == "epochs=2,optim.lr=0.001"
    assert version_name((("model.binarize.weights", False),)) == "model.binarize.weights=false"
    odd = version_name((("data.root", "/data/my set"),))  # a space and '/': not in a name
    assert odd.startswith("set-") and len(odd) == 14 and odd == version_name((("data.root", "/data/my set"),))
    assert odd != version_name((("data.root", "/data/other"),))
    assert version_name((("epochs", 2),), tag="v2") == "v2"
    # a submitted version's overrides travel as --set text that reads back as the same values
    from bnnctl.orchestrator.submit import set_text
    from bnnctl.orchestrator.yamlio import parse_value

    for value in ("prelu", "true", "1e-3", "a b", 0.001, 2, True, None, [1, 2], {"kind": "tanh"}):
        assert parse_value(set_text(value)) == value, value
    assert set_text("prelu") == "prelu" and set_text(16) == "16"
    try:
        version_name((), tag="my run")
        raise AssertionError("a tag with a space was accepted")
    except ConfigError as err:
        assert err.path == "--tag" and "letters, digits" in err.message


def test_delete_removes_a_study_and_keeps_what_another_study_uses(workdir):
    f = _spec(workdir)
    assert run_study(f, options=_opts(only=("relu",))).trained == 2
    other = workdir / "other.yaml"
    other.write_text(f.read_text().replace("name: flow", "name: other"))
    assert run_study(other, options=_opts(only=("relu",))).trained == 0  # the same variants, reused
    runs = workdir / ".bnnctl" / "runs"
    assert len(list(runs.iterdir())) == 2
    refused = runner.invoke(app, ["study", "delete", "flow"], input="n\n")
    assert refused.exit_code == 1 and Store().study("flow") is not None
    done = runner.invoke(app, ["study", "delete", "flow", "--yes", "--files"])
    assert done.exit_code == 0 and "0 variants removed, 11 kept" in done.output, done.output  # all shared
    assert Store().study("flow") is None and Store().study("other") is not None
    done = runner.invoke(app, ["study", "delete", "other", "--yes", "--files"])
    assert "11 variants removed, 0 kept" in done.output and "2 run folders deleted" in done.output
    assert list(runs.iterdir()) == [] and Store().studies() == []


def test_a_piped_run_prints_one_line_per_event(workdir):
    from rich.console import Console

    from bnnctl.orchestrator.cli.progress import StudyProgress

    f = _spec(workdir)
    import io

    buf = io.StringIO()
    with StudyProgress(Console(file=buf), total=4, tty=False) as progress:
        out = run_study(f, events=progress.events(), options=_opts(only=("reverse",)))
    assert out.trained == 4
    lines = [line.split(" ", 1)[1] for line in buf.getvalue().splitlines()]
    assert sum(1 for line in lines if line.startswith("started ")) == 4
    assert sum(1 for line in lines if line.startswith("epoch ")) == 4  # 1 epoch per stage
    done = [line for line in lines if line.startswith("done ")]
    assert len(done) == 4 and done[-1].endswith("[4/4]") and "pckh" in done[0]


@pytest.mark.slow
def test_on_a_terminal_the_study_bar_has_the_real_total(workdir):
    """The CLI in a pseudo-terminal (its own Ray cluster): the bar counts to the variants to run."""
    import re
    import sys

    from terminal import run_in_terminal

    f = _spec(workdir)
    cli = [sys.executable, "-c", "from bnnctl.orchestrator.cli import main; main()", "study", "run", str(f),
           "--only", "reverse", "--no-track", "--cpus", "2"]
    code, screen = run_in_terminal(cli, workdir)
    assert code == 0, screen[-2000:]  # the selected variants all succeeded (the study is not done)
    assert "variants done" in screen and "4/4" in screen and "ETA" in screen, screen[-2000:]
    assert "/None" not in screen and re.search(r"variants done\s.*0/4", screen), screen[-2000:]
    finished = set(re.findall(r"done {5}(t / \w+ / (?:stage 1 / )?seed \d)", screen))
    assert len(finished) == 4, screen[-2000:]  # a line per finished variant, that stays


def test_a_moved_project_folder_keeps_its_results_and_images(workdir, monkeypatch):
    """Everything is stored relative to the project folder or the run storage: after `mv`, the same
    command reuses every result and the dashboard still serves the images."""
    import shutil

    from bnnctl.dashboard import views

    first = workdir / "first"
    first.mkdir()
    monkeypatch.chdir(first)
    spec = specs.write(first, _flow("syn"))  # a data root relative to the project folder
    assert run_study(spec, options=_opts(only=("relu",))).trained == 2
    keys = {m.variant_key for m in Store().members(Store().study("flow").id) if m.row == "relu"}
    moved = workdir / "moved"
    shutil.move(str(first), str(moved))
    monkeypatch.chdir(moved)
    again = run_study(moved / "flow.yaml", options=_opts(only=("relu",)))
    assert again.trained == 0  # the same identities: nothing retrained
    store = Store()
    assert {m.variant_key for m in store.members(store.study("flow").id) if m.row == "relu"} == keys
    key = sorted(keys)[0]
    assert views.variant(store, key, "flow")["predictions"]
    from bnnctl.orchestrator.runstorage import RunStorage, resolve

    image = resolve(RunStorage(), store.variant(key).result["predictions_image"])
    assert image is not None and image.is_relative_to(moved) and image.exists()


def test_study_rerun_through_the_cli_retries_what_a_plain_run_skips(workdir):
    f = _spec(workdir)
    assert run_study(f, options=_opts(only=("exploding",))).counts == {"failed": 2}  # NaN loss: its config
    plain = runner.invoke(app, ["study", "run", str(f), "--only", "exploding", "--no-track", "--cpus", "2"])
    assert plain.exit_code == 1 and "skipped 2 failed variant(s)" in plain.output and "study rerun" in plain.output
    key = next(m.variant_key for m in Store().members(Store().study("flow").id) if m.row == "exploding")
    assert [a.status for a in Store().attempts(key)] == ["failed"]  # nothing was started
    again = runner.invoke(app, ["study", "rerun", str(f), "--only", "exploding", "--no-track", "--cpus", "2"])
    assert again.exit_code == 1 and "2 trained or resumed in this run" in again.output, again.output
    assert [a.status for a in Store().attempts(key)] == ["failed", "failed"]


def test_config_columns_pyarrow_cannot_type_fall_back_to_the_records_flattening():
    """A config value whose type changes between variants (or a string pyarrow would read as a
    time) is not for pyarrow's reader: results() then flattens the configs in Python."""
    from bnnctl.orchestrator.results import _config_frame

    assert _config_frame(['{"a": 1}', '{"a": "x"}']) is None
    assert _config_frame(['{"when": "2026-12-06T10:00:00"}']) is None
    frame = _config_frame(['{"a": {"b": [1, 2]}, "c": null}', None])
    assert list(frame.columns) == ["config.a.b", "config.c"] and frame.loc[0, "config.a.b"] == (1, 2)
    assert frame.loc[1, "config.a.b"] is None
