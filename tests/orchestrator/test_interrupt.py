"""Ctrl-C in a terminal: a real pseudo-terminal runs `bnnctl study run`, and SIGINT goes to its whole
process group as a terminal sends it (the driver and its private Ray cluster's workers). One line,
exit 130, no traceback; the variants show `interrupted`; the same command resumes them."""
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from bnnctl.orchestrator.store import Store

pytestmark = pytest.mark.slow

SPEC = """
name: sig
base:
  model: {width: 8, depth: 2}
  data: {root: syn, synthetic: {train: 64, valid: 16}, input_size: 32}
  epochs: 60
  batch_size: 16
  loss: mse
  threads: 1
  latency: false
seeds: [0]
ablations:
  - name: acts
    mode: isolated
    rows:
      - {name: relu, set: {model.activation.kind: relu}}
      - {name: prelu, set: {model.activation.kind: prelu}}
execution: {max_parallel: 2}
"""
CLI = [sys.executable, "-c", "from bnnctl.orchestrator.cli import main; main()"]


def _epochs(folder) -> int:
    """The fewest epochs recorded by either variant (0 before both started)."""
    if not (folder / ".bnnctl" / "state.db").exists():
        return 0
    try:
        store = Store(readonly=True)
        study = store.study("sig")
        members = store.members(study.id) if study else []
        return min((len(store.metric_epochs(m.variant_key)) for m in members), default=0) if len(members) == 2 else 0
    except Exception:  # noqa: BLE001 - created meanwhile
        return 0


def test_ctrl_c_in_a_terminal_prints_one_line_exits_130_and_the_same_command_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text(SPEC)
    args = [*CLI, "study", "run", "spec.yaml", "--no-track", "--cpus", "2"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: the driver, on the terminal, leader of its process group
        os.execv(args[0], args)
    output, sent, deadline = b"", None, time.monotonic() + 240
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the terminal closed: the driver exited
                break
            if not chunk:
                break
            output += chunk
        if sent is None and _epochs(tmp_path) >= 1:  # both variants trained an epoch
            os.killpg(os.getpgid(pid), signal.SIGINT)  # what the terminal does on Ctrl-C
            sent = time.monotonic()
    _, status = os.waitpid(pid, 0)
    text = output.decode(errors="replace")
    assert sent is not None, text[-2000:]
    assert os.waitstatus_to_exitcode(status) == 130, text[-2000:]
    tail = text[text.rfind("\x1b[?25h"):] if "\x1b[?25h" in text else text  # after the live progress display
    assert "interrupted: 2 variant(s) were running (each resumes from its last checkpoint); run the same command " \
        "again to resume" in tail, tail
    assert "Traceback" not in text and "Error" not in tail and "died" not in tail, tail
    store = Store()
    study = store.study("sig")
    keys = [m.variant_key for m in store.members(study.id)]
    assert study.status == "stopped" and {store.variant(k).status for k in keys} == {"interrupted"}
    assert {a.status for k in keys for a in store.attempts(k)} == {"interrupted"}
    done_before = {k: max(store.metric_epochs(k)) for k in keys}
    # the same command, run again, resumes both from their checkpoints and completes them
    out = subprocess.run(args, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    store = Store()
    for k in keys:
        v, attempts = store.variant(k), store.attempts(k)
        assert v.status == "completed" and [a.status for a in attempts] == ["interrupted", "completed"]
        assert store.metric_epochs(k) == set(range(1, 61))
    resumed = [line for line in out.stdout.splitlines() if line.split()[1:2] == ["resumed"]]
    assert len(resumed) == 2, out.stdout  # "HH:MM:SS resumed  acts / relu / seed 0 after epoch N/60"
    for line in resumed:
        label = line.split("resumed", 1)[1].split(" after epoch ")[0].strip()
        (key,) = [k for k in keys if store.variant(k).label == label]
        assert int(line.split(" after epoch ")[1].split("/")[0]) >= done_before[key] - 1, line
