"""Hostile input: malformed, malicious and impossible specs are refused by the one YAML reader with
one message naming the file (and line and field where there is one), at once, writing nothing.
YAML 1.2 numbers (1e-3) in every kind of file."""
import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bnnctl.orchestrator.cli import app
from bnnctl.orchestrator.errors import SpecError
from bnnctl.orchestrator.spec import load_spec
from bnnctl.orchestrator.tunespec import load_tune_spec
from bnnctl.orchestrator.yamlio import MAX_BYTES, parse_value, read_yaml

runner = CliRunner()

# line numbers below refer to this text: name 1, base 2, model 3, data 4, epochs 5, batch_size 6,
# loss 7, ablations 8, "- name" 9, mode 10, rows 11, the row 12
STUDY = """name: ok
base:
  model: {width: 8, depth: 2}
  data: {synthetic: {train: 16, valid: 8}, input_size: 32}
  epochs: 1
  batch_size: 8
  loss: mse
ablations:
  - name: acts
    mode: isolated
    rows:
      - {name: relu, set: {model.activation.kind: relu}}
"""

# kind 1, name 2, base 3, model 4, data 5, epochs 6, search 7, the param 8, trials 9, arms 10, the arm 11
TUNING = """kind: tuning
name: tok
base:
  model: {width: 8, depth: 2, binarize: {quantizer: tanh}}
  data: {synthetic: {train: 16, valid: 8}, input_size: 32}
  epochs: 1
search:
  lambda_schedule.lambda_end: {type: float, low: 10, high: 200, log: true}
trials: 2
arms:
  - {name: base}
"""

BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))


def study(old: str, new: str) -> str:
    assert old in STUDY, old
    return STUDY.replace(old, new, 1)


def tuning(old: str, new: str) -> str:
    assert old in TUNING, old
    return TUNING.replace(old, new, 1)


# id -> (content: str | bytes | callable(folder) -> Path, command, words that must be in the message, line)
CASES = {
    # --- bytes and encodings
    "random bytes": (bytes(range(256)) * 4, "study", "NUL bytes", None),
    "png header": (b"\x89PNG\r\n\x1a\n" + bytes(64), "study", "NUL bytes", None),
    "latin-1": ("name: caf\xe9\nbase: {}\n".encode("latin-1"), "study", "not UTF-8 text (byte 0xe9", 1),
    "latin-1 later line": (STUDY.replace("relu}}", "r\xe9lu}}").encode("latin-1"), "study", "not UTF-8", 12),
    "utf-16": (STUDY.encode("utf-16"), "study", "NUL bytes (binary data, or UTF-16)", None),
    "utf-16 without bom": (STUDY.encode("utf-16-le"), "study", "NUL bytes", None),
    "nul in the middle": (STUDY.replace("loss: mse", "loss: m\0se").encode(), "study", "NUL bytes", None),
    "cp1252 quote": ("name: \u201cok\u201d\n".encode("cp1252"), "study", "not UTF-8", 1),
    "empty": ("", "study", "the file is empty", None),
    "only comments": ("# nothing\n# here\n", "study", "the file is empty", None),
    "too large": ("name: ok\n" + "# padding\n" * (MAX_BYTES // 10 + 1), "study", f"at most {MAX_BYTES} bytes", None),
    "a folder": (lambda d: _mkdir(d / "spec.yaml"), "study", "not a regular file", None),
    "symlink to /dev/zero": (lambda d: _symlink(d / "spec.yaml", "/dev/zero"), "study", "not a regular file", None),
    "a fifo": (lambda d: _fifo(d / "spec.yaml"), "study", "not a regular file", None),
    "missing file": (lambda d: d / "absent.yaml", "study", "file not found", None),
    # --- YAML tags, anywhere
    "python tag on a scalar": (study("name: ok", "name: !!python/object/apply:os.system ['touch pwned']"), "study",
                               "YAML tags such as 'tag:yaml.org,2002:python/object/apply:os.system' are not allowed", 1),
    "python tag on a sequence": (study("      - {name: relu", "      - !!python/tuple [a]\n      - {name: relu"),
                                 "study", "YAML tags", 12),
    "python tag on a mapping": (study("  model: {width", "  model: !!python/object:os.Popen {width"), "study",
                                "YAML tags", 3),
    "tag on seeds": (study("ablations:", "seeds: !!python/tuple [0, 1]\nablations:"), "study", "YAML tags", 8),
    "str tag on a key": (study("  epochs: 1", "  !!str epochs: 1"), "study", "YAML tags", 5),
    "custom local tag": (study("  loss: mse", "  loss: !include other.yaml"), "study", "'!include'", 7),
    "binary tag": (study("  loss: mse", "  loss: !!binary aGVsbG8="), "study", "YAML tags", 7),
    "tag in a row": (study("      - {name: relu", "      - !!map {name: relu"), "study", "YAML tags", 12),
    "tag directive": ("%TAG !e! tag:example.com,2000:\n---\nname: !e!thing ok\n", "study", "YAML tags", 3),
    "tag in a tuning": (tuning("trials: 2", "trials: !!int 2"), "tune", "YAML tags", 9),
    "set tag": (study("  epochs: 1", "  epochs: !!set {1: null}"), "study", "YAML tags", 5),
    # --- structure, bombs
    "billion laughs": (BILLION_LAUGHS, "study", "anchors are expanded (an alias bomb?)", None),
    "recursive alias": ("name: &a [*a]\n", "study", "recursive alias", 1),
    "recursive mapping alias": ("base: &b {x: *b}\nname: ok\n", "study", "recursive alias", 1),
    "5000-deep nesting": ("name: " + "[" * 5000 + "]" * 5000 + "\n", "study", "nested more than 64 levels", 1),
    "deep mapping nesting": ("name: ok\nbase: " + "{a: " * 80 + "1" + "}" * 80 + "\n", "study", "nested more than 64", 2),
    "complex sequence key": (study("  epochs: 1", "  ? [a, b]\n  : 1"), "study", "complex keys", 5),
    "complex mapping key": (study("  epochs: 1", "  ? {a: 1}\n  : 2"), "study", "complex keys", 5),
    "undefined alias": (study("  loss: mse", "  loss: *nowhere"), "study", "not valid YAML", 7),
    "unclosed bracket": (study("  model: {width: 8, depth: 2}", "  model: {width: 8, depth: 2"), "study",
                         "not valid YAML", None),
    "tab indentation": (study("  epochs: 1", "\tepochs: 1"), "study", "not valid YAML", 5),
    "top-level list": ("- name: ok\n", "study", "expected a mapping", 1),
    "top-level scalar": ("just words\n", "study", "expected a mapping", 1),
    "duplicate key": (study("  batch_size: 8", "  batch_size: 8\n  epochs: 2"), "study", "duplicate key", 7),
    "merge of a scalar": (study("  epochs: 1", "  <<: 3"), "study", "a merge key `<<` takes a mapping", 5),
    "quoted merge key": (study("  epochs: 1", '  "<<": {epochs: 1}'), "study", "base.<<: unknown key", 5),
    "several documents": (STUDY + "---\nname: other\n", "study", "not valid YAML", None),
    # --- names
    "name with slash": (study("name: ok", "name: a/b"), "study", "'a/b' is not allowed as a study name", 1),
    "name with dots up": (study("name: ok", "name: ../../etc"), "study", "not allowed as a study name", 1),
    "500-character name": (study("name: ok", "name: " + "n" * 500), "study", "1 to 64 characters", 1),
    "name with space": (study("name: ok", "name: my study"), "study", "not allowed as a study name", 1),
    "empty name": (study("name: ok", "name: ''"), "study", "required: the study's name", 1),
    "numeric name": (study("name: ok", "name: 5"), "study", "required: the study's name", 1),
    "unicode name": (study("name: ok", "name: étude"), "study", "not allowed as a study name", 1),
    "hidden name": (study("name: ok", "name: .hidden"), "study", "starting with a letter or digit", 1),
    "ablation name with newline": (study("  - name: acts", '  - name: "a\\nb"'), "study",
                                   "not allowed as a ablation name", 9),
    "row name with tab": (study("{name: relu,", '{name: "re\\tlu",'), "study", "no tabs, newlines", 12),
    "row name of 200": (study("{name: relu,", "{name: " + "r" * 200 + ","), "study", "1 to 80 printable", 12),
    "ablation name leading space": (study("  - name: acts", "  - name: ' acts'"), "study",
                                    "no leading or trailing spaces", 9),
    "teacher name with control": (study("ablations:", 'teachers:\n  "t\\x07": {set: {epochs: 1}}\nablations:'),
                                  "study", "not allowed as a teacher name", 9),
    "tuning name with slash": (tuning("name: tok", "name: t/k"), "tune", "not allowed as a tuning name", 2),
    "arm name with slash": (tuning("{name: base}", "{name: a/b}"), "tune", "not allowed as a arm name", 11),
    # --- bounds
    "epochs beyond reason": (study("  epochs: 1", "  epochs: 100000000000000000000000000000"), "study",
                             "far beyond any meaningful value", 5),
    "epochs above the maximum": (study("  epochs: 1", "  epochs: 20000"), "study", "must be in [1, 10000]", 5),
    "zero epochs": (study("  epochs: 1", "  epochs: 0"), "study", "must be in [1, 10000], got 0", 5),
    "negative epochs": (study("  epochs: 1", "  epochs: -3"), "study", "must be in [1, 10000]", 5),
    "zero batch": (study("  batch_size: 8", "  batch_size: 0"), "study", "must be in [1, 65536]", 6),
    "infinite lr": (study("  loss: mse", "  loss: mse\n  optim: {lr: .inf}"), "study", "not a finite number", 8),
    "nan lr": (study("  loss: mse", "  loss: mse\n  optim: {lr: .nan}"), "study", "not a finite number", 8),
    "lr 1e400": (study("  loss: mse", "  loss: mse\n  optim: {lr: 1e400}"), "study", "'1e400' is not a finite number", 8),
    "negative lr 1e-3": (study("  loss: mse", "  loss: mse\n  optim: {lr: -1e-3}"), "study",
                         "must be a positive number, got -0.001", 8),
    "zero width": (study("{width: 8,", "{width: 0,"), "study", "must be an integer in [1, 8192], got 0", 3),
    "huge input size": (study("input_size: 32}", "input_size: 100000}"), "study", "must be in [16, 4096]", 4),
    "zero synthetic set": (study("train: 16,", "train: 0,"), "study", "must be in [1, 1000000], got 0", 4),
    "zero threads": (study("  loss: mse", "  loss: mse\n  threads: 0"), "study", "must be in [1, 1024]", 8),
    "negative seed": (study("ablations:", "seeds: [-1]\nablations:"), "study", "each from 0 to 4294967295", 8),
    "too many seeds": (study("ablations:", f"seeds: {list(range(101))}\nablations:"), "study", "at most 100 seeds", 8),
    "negative cpus": (study("ablations:", "resources: {cpus: -1}\nablations:"), "study", "cpus must be in (0, 1024]", 8),
    "cpus 1e400": (study("ablations:", "resources: {cpus: 1e400}\nablations:"), "study", "not a finite number", 8),
    "gpus with device cpu": (study("  loss: mse", "  loss: mse\n  device: cpu\nresources: {gpus: 1}"), "study",
                             "1 GPUs requested but base.device is cpu", 9),
    "zero max_parallel": (study("ablations:", "execution: {max_parallel: 0}\nablations:"), "study",
                          "max_parallel (variants at once) must be in [1, 1024]", 8),
    "retries beyond reason": (study("ablations:", "execution: {retries: 1000}\nablations:"), "study",
                              "retries in [0, 100]", 8),
    "lambda_end infinite": (tuning("  epochs: 1", "  epochs: 1\n  lambda_schedule: {lambda_end: .inf}"), "tune",
                            "not a finite number", 7),
    "zero trials": (tuning("trials: 2", "trials: 0"), "tune", "an integer in [1, 100000]", 9),
    "a million trials": (tuning("trials: 2", "trials: 1000000"), "tune", "an integer in [1, 100000]", 9),
    "tuning seed too big": (tuning("trials: 2", "trials: 2\nseed: 99999999999"), "tune", "integer in [0, 4294967295]", 10),
    "5000-digit integer": (study("  epochs: 1", "  epochs: " + "9" * 5000), "study",
                           "an integer of 5000 digits is far beyond any setting's range", 5),
    "negative 100000-digit seed": (study("ablations:", "seeds: [-" + "1" * 100_000 + "]\nablations:"), "study",
                                   "an integer of 100000 digits", 8),
    "huge integer in a tuning": (tuning("trials: 2", "trials: " + "7" * 4301), "tune", "an integer of 4301 digits", 9),
    # --- names that look like others, or hide bytes
    "lookalike row name": (study("{name: relu,", "{name: R\u0435LU,"), "study",
                           "the word 'R\u0435LU' mixes scripts (U+0435 CYRILLIC SMALL LETTER IE among Latin letters)", 12),
    "lookalike ablation name": (study("  - name: acts", "  - name: \u0430cts"), "study", "mixes scripts", 9),
    "lookalike teacher": (study("ablations:", "teachers:\n  r\u0435al: {set: {epochs: 1}}\nablations:"), "study",
                          "U+0435 CYRILLIC SMALL LETTER IE", 9),
    "lookalike arm": (tuning("{name: base}", "{name: b\u0430se}"), "tune", "U+0430 CYRILLIC SMALL LETTER A", 11),
    "rows differing in case": (study("      - {name: relu, set: {model.activation.kind: relu}}",
                                     "      - {name: relu, set: {model.activation.kind: relu}}\n"
                                     "      - {name: ReLU, set: {model.activation.kind: prelu}}"), "study",
                               "duplicate row name 'ReLU' in ablation 'acts' (names are compared ignoring case", 9),
    "composed and decomposed": (study("      - {name: relu, set: {model.activation.kind: relu}}",
                                      "      - {name: caf\u00e9, set: {model.activation.kind: relu}}\n"
                                      "      - {name: cafe\u0301, set: {model.activation.kind: prelu}}"), "study",
                                "duplicate row name 'caf\u00e9'", 9),
    "nul in the study name": (study("name: ok", 'name: "o\\0k"'), "study", "not allowed as a study name", 1),
    "nul in a row name": (study("{name: relu,", '{name: "re\\0lu",'), "study", "not allowed as a row name", 12),
    "nul in an ablation name": (study("  - name: acts", '  - name: "a\\0cts"'), "study", "not allowed as a ablation", 9),
    "nul in a teacher name": (study("ablations:", 'teachers:\n  "t\\0": {set: {epochs: 1}}\nablations:'), "study",
                              "not allowed as a teacher name", 9),
    "nul in an arm name": (tuning("{name: base}", '{name: "b\\0"}'), "tune", "not allowed as a arm name", 11),
    "nul in an experiment name": (study("ablations:", 'tracking: {experiment: "e\\0x"}\nablations:'), "study",
                                  "not allowed as a MLflow experiment name", 8),
    "experiment name climbing up": (study("ablations:", "tracking: {experiment: ../../x}\nablations:"), "study",
                                    "'../../x' is not allowed as a MLflow experiment name", 8),
    "tuning experiment with nul": (tuning("trials: 2", 'trials: 2\ntracking: {experiment: "t\\0"}'), "tune",
                                   "not allowed as a MLflow experiment name", 10),
    # --- pre-flight: what the driver can check before anything starts
    "missing init_from checkpoint": (study("  loss: mse", "  loss: mse\n  init_from: nowhere.pt"), "study",
                                     "base.init_from: the checkpoint", 8),
    "missing teacher checkpoint": (study("  loss: mse", "  loss: mse\n  distill: {teacher: /nonexistent/t.pt}"),
                                   "study", "base.distill.teacher: the checkpoint /nonexistent/t.pt does not exist", 8),
    "a row's missing checkpoint": (study("{model.activation.kind: relu}", "{model.activation.kind: relu, init_from: x.pt}"),
                                   "study", "ablations[0].rows[0].set.init_from: the checkpoint", 12),
    "a folder as checkpoint": (study("  loss: mse", "  loss: mse\n  init_from: /tmp"), "study",
                               "the checkpoint /tmp is not a file", 8),
    "tuning's missing checkpoint": (tuning("  epochs: 1", "  epochs: 1\n  init_from: gone.pt"), "tune",
                                    "base.init_from: the checkpoint", 7),
    "storage not writable": (study("ablations:", "storage: /proc/self/runs\nablations:"), "study",
                             "storage: the run storage cannot be written from this machine", 8),
    "storage under a file": (study("ablations:", "storage: /etc/hostname/runs\nablations:"), "study",
                             "the run storage cannot be written", 8),
    "tuning storage not writable": (tuning("trials: 2", "trials: 2\nstorage: /proc/self/x"), "tune",
                                    "the run storage cannot be written", 10),
    "missing data root": (study("  data: {synthetic: {train: 16, valid: 8}, input_size: 32}",
                                "  data: {dataset: mpii, root: nowhere, input_size: 32}"), "study", "nowhere", None),
    "a network no block accepts": (study("{width: 8,", "{width: 4,"), "study",
                                   "base.model: this network cannot be built: hpm block needs at least 4 output", 3),
}


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


def _symlink(p: Path, target: str) -> Path:
    p.symlink_to(target)
    return p


def _fifo(p: Path) -> Path:
    os.mkfifo(p)
    return p


def _write(folder: Path, content) -> Path:
    if callable(content):
        return content(folder)
    f = folder / "spec.yaml"
    if isinstance(content, bytes):
        f.write_bytes(content)
    else:
        f.write_text(content)
    return f


def test_the_base_texts_are_valid(tmp_path):
    """The cases are small edits of two valid specs: any refusal is the edit's."""
    f = tmp_path / "ok.yaml"
    f.write_text(STUDY)
    assert load_spec(f).name == "ok"
    f.write_text(TUNING)
    assert load_tune_spec(f).name == "tok"


def test_there_are_at_least_sixty_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_refused_at_once_with_one_message_and_nothing_written(tmp_path, monkeypatch, case):
    content, command, words, line = CASES[case]
    monkeypatch.chdir(tmp_path)
    f = _write(tmp_path, content)
    args = ["study", "run", str(f), "--no-track"] if command == "study" else ["tune", "run", str(f), "--no-track"]
    args += ["--address", "127.0.0.1:9"]  # were a case accepted by mistake, nothing could train
    t0 = time.monotonic()
    result = runner.invoke(app, args)
    elapsed = time.monotonic() - t0
    out = result.output
    assert result.exit_code == 1, out
    assert elapsed < 5, f"took {elapsed:.1f} s"
    assert "Traceback" not in out and "Error:" not in out.replace("error:", ""), out
    assert out.startswith("error: ") and out.count("error:") == 1 and len(out.strip().splitlines()) <= 3, out
    assert str(f) in out and words in out, out
    if line is not None:
        assert f"line {line}" in out, out
    assert not (tmp_path / ".bnnctl").exists() and not (tmp_path / "pwned").exists()  # nothing written or run


# --------------------------------------------------------------------------- YAML 1.2 numbers

NUMBERS = {"1e-3": 0.001, "1E5": 100000.0, ".5": 0.5, "-2e-4": -0.0002, "2.5e-4": 0.00025, "+1e2": 100.0,
           "1.": 1.0, "3": 3, "0x10": 16, "0o17": 15, "true": True, "False": False, "yes": "yes", "off": "off",
           "null": None, "~": None, "1:20": "1:20", "0b101": "0b101", "1_000": "1_000"}


@pytest.mark.parametrize("text", list(NUMBERS))
def test_scalars_resolve_as_yaml_1_2(tmp_path, text):
    f = tmp_path / "v.yaml"
    f.write_text(f"v: {text}\n")
    value = read_yaml(f)[0]["v"]
    assert value == NUMBERS[text] and type(value) is type(NUMBERS[text])
    assert parse_value(text) == NUMBERS[text]  # --set KEY=VALUE reads values the same way


def test_1e_3_numbers_load_as_floats_in_every_kind_of_file(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(study("  loss: mse", "  loss: mse\n  optim: {lr: 1e-3, weight_decay: 5E-5}"))
    spec = load_spec(f)
    assert spec.base.optim.lr == 0.001 and spec.base.optim.weight_decay == 5e-5
    t = tmp_path / "t.yaml"
    t.write_text(tuning("{type: float, low: 10, high: 200, log: true}", "{type: float, low: 1e1, high: 2E2, log: true}")
                 .replace("  epochs: 1", "  epochs: 1\n  optim: {lr: 2e-3}"))
    tspec = load_tune_spec(t)
    assert tspec.base.optim.lr == 0.002 and (tspec.params[0].low, tspec.params[0].high) == (10.0, 200.0)
    cfg = tmp_path / "train.yaml"
    cfg.write_text("model: {width: 8, depth: 2}\ndata: {synthetic: {train: 8, valid: 4}, input_size: 32}\n"
                   "optim: {lr: 1e-3}\nepochs: 1\nloss: mse\n")
    from bnnctl.orchestrator.cli.train import load_train_config

    assert load_train_config(cfg, ["optim.weight_decay=1e-4"]).optim.lr == 0.001
    assert load_train_config(cfg, ["optim.weight_decay=1e-4"]).optim.weight_decay == 0.0001
    model = tmp_path / "model.yaml"
    model.write_text("arch: hourglass\nwidth: 16\ndepth: 2\nbinarize: {lambda_init: 1e0}\n")
    result = runner.invoke(app, ["models", "summary", "--json", "--config", str(model), "--input-size", "32"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["config"]["width"] == 16


def test_error_lines_stay_right_around_1e_3_numbers_anchors_and_merges(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(study("  loss: mse", "  loss: mse\n  optim: {lr: 1e-3}\n  sigma_typo: 2e-1"))
    with pytest.raises(SpecError, match=r"line 9, base.sigma_typo: unknown key"):
        load_spec(f)
    f.write_text(study("  loss: mse", "  loss: mse\n  optim: {lr: 1e-3, momentum: 1e0}"))
    with pytest.raises(SpecError, match=r"line 8, base.optim.momentum: must be in \[0, 1\), got 1.0"):
        load_spec(f)


def test_anchors_and_merge_keys_work_and_written_keys_win(tmp_path):
    g = tmp_path / "g.yaml"
    g.write_text(study("      - {name: relu, set: {model.activation.kind: relu}}",
                       "      - {name: prelu, set: &p {model.activation.kind: prelu, optim.lr: 1e-3}}\n"
                       "      - {name: leaky, set: &l {model.activation.kind: leaky_relu, optim.momentum: 0.5}}\n"
                       "      - name: prelu fast\n        set:\n          <<: *p\n          optim.lr: 2e-3\n"
                       "      - name: both\n        set:\n          <<: [*l, *p]"))
    rows = load_spec(g).ablations[0].rows
    assert [(r.name, r.config.model.activation.kind, r.config.optim.lr, r.config.optim.momentum) for r in rows] == [
        ("prelu", "prelu", 0.001, 0.0), ("leaky", "leaky_relu", 2.5e-4, 0.5), ("prelu fast", "prelu", 0.002, 0.0),
        ("both", "leaky_relu", 0.001, 0.5)]  # the first mapping of a merged list wins


# --------------------------------------------------------------------------- pre-flight: resources, paths

def _cli(args: list[str], cwd: Path, env: dict | None = None):
    import subprocess
    import sys

    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", "from bnnctl.orchestrator.cli import main; main()", *args], cwd=cwd,
                         env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120)
    return out, time.monotonic() - t0


def test_resources_beyond_this_machine_are_refused_before_the_private_cluster_starts(tmp_path):
    """The private local cluster would get this machine's CPUs (or --cpus) and the GPUs Ray finds: a
    request beyond them is refused from those figures, without starting Ray, writing nothing."""
    env = {"RAY_TMPDIR": str(tmp_path / "raytmp")}  # where a Ray start would make its session folder
    for cpus, args in ((3, ["--cpus", "2"]), (os.cpu_count() + 1, [])):
        (tmp_path / "spec.yaml").write_text(study("ablations:", f"resources: {{cpus: {cpus}}}\nablations:"))
        out, elapsed = _cli(["study", "run", "spec.yaml", "--no-track", *args], tmp_path, env)
        text = " ".join(out.stderr.split())
        assert out.returncode == 1 and text.startswith("error: spec.yaml, line 8, resources: no node of a private local "
                                                       "Ray cluster"), out.stderr
        assert "CPUs and 0 GPUs" in text and "(this machine, node local): " in text and "Traceback" not in text
        assert not (tmp_path / "raytmp").exists() and not (tmp_path / ".bnnctl").exists()  # Ray never started
        assert elapsed < 5, f"took {elapsed:.1f} s"


def test_resources_beyond_a_joined_cluster_are_refused_before_anything_is_written(workdir):
    """A cluster to join (here: the one this process runs, 4 CPUs) is read without starting a worker."""
    (workdir / "spec.yaml").write_text(study("ablations:", "resources: {cpus: 5}\nablations:"))
    result = runner.invoke(app, ["study", "run", "spec.yaml", "--no-track"])
    out = " ".join(result.output.split())
    assert result.exit_code == 1 and "resources: no node of the running Ray session can run a variant that needs 5 " \
        "CPUs and 0 GPUs" in out, out
    assert not (workdir / ".bnnctl").exists()


def test_relative_paths_are_relative_to_the_folder_the_command_runs_in(tmp_path):
    """One rule for every path in a spec (data roots, checkpoints, storage): relative to the folder the
    command runs in, the project folder that holds .bnnctl/ (as `studies/x.yaml` with `data/...`).
    Run from another folder, a relative checkpoint beside the spec is not found, and the message says
    why and where it is."""
    project = tmp_path / "project"
    (project / "studies").mkdir(parents=True)
    (project / "studies" / "init.pt").write_bytes(b"not really a checkpoint")
    spec = project / "studies" / "spec.yaml"
    spec.write_text(study("  loss: mse", "  loss: mse\n  init_from: init.pt"))
    out, _ = _cli(["study", "run", str(spec), "--no-track", "--address", "127.0.0.1:9"], project)
    text = " ".join(out.stderr.split())
    assert out.returncode == 1 and f"base.init_from: the checkpoint {project / 'init.pt'} does not exist" in text, text
    assert f"relative to the folder the command runs in, the project folder, not the spec's folder: " \
        f"{project / 'studies' / 'init.pt'} is there" in text, text
    # the storage and data roots follow the same rule
    os.chdir(project)
    try:
        spec.write_text(study("  data: {synthetic: {train: 16, valid: 8}, input_size: 32}",
                              "  data: {root: data/syn, synthetic: {train: 16, valid: 8}, input_size: 32}")
                        + "storage: runs\n")
        loaded = load_spec(spec)
        assert loaded.base.data.root == str(project / "data" / "syn") and loaded.storage == str(project / "runs")
    finally:
        os.chdir(tmp_path)
