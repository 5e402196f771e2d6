"""The MLflow writer process (``orchestrator/mlwriter.py``): what it writes, how it reports an
error, and that it never outlives its driver. Real MLflow (a sqlite store), a real state store."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from bnnctl.orchestrator.mlwriter import Writer
from bnnctl.orchestrator.store import Store
from bnnctl.orchestrator.tracking import Tracker, TrackingError

CONFIG = {"model": {"name": "hourglass", "width": 8}, "train": {"epochs": 3, "lr": 0.001}}


def _result(root, key: str) -> dict:
    folder = root / key
    folder.mkdir(parents=True)
    (folder / "predictions.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    return {"metrics": {"pckh": 0.5}, "accounting": {"params": 3300}, "latency": {}, "metric": "pckh",
            "best_metric": 0.5, "epochs_done": 3, "best_checkpoint": f"{key}/best.pt",
            "last_checkpoint": f"{key}/last.pt", "predictions_image": f"{key}/predictions.png",
            "per_joint": {"head": 0.75, "ankle": None}}


@pytest.fixture
def setting(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    root = tmp_path / "runs"
    root.mkdir()
    tracker = Tracker(uri, "w", None)
    return uri, store, root, tracker


def test_the_writer_creates_fills_and_ends_each_variants_run(setting):
    uri, store, root, tracker = setting
    parent = tracker.study_run("w", None, "w.yaml")
    for key in ("aaaa", "bbbb"):
        store.ensure_variant(key, f"row {key}", "row", CONFIG, [])
    writer = Writer()
    try:
        writer.open(uri, "w", str(root), store.url, every_s=0.0)
        writer.variant_run("aaaa", parent, None, "row aaaa", "row", 0, CONFIG, "w", {"bnnctl.row": "A"}, {})
        writer.variant_run("bbbb", parent, None, "row bbbb", "row", 1, CONFIG, "w", {},
                           {"bnnctl.teacher_run": "aaaa"})
        for epoch in (1, 2, 3):
            writer.log_metrics("aaaa", epoch, {"val.pckh": 0.1 * epoch, "train.loss": 1.0 / epoch})
        writer.finish("aaaa", _result(root, "aaaa"))
        writer.finish("bbbb", None, error="worker lost")
        writer.flush()
    finally:
        writer.close()
    assert writer.cpu_s > 0
    runs = {k: store.variant(k).mlflow_run_id for k in ("aaaa", "bbbb")}
    a, b = (tracker.client.get_run(runs[k]) for k in ("aaaa", "bbbb"))
    assert (a.info.status, b.info.status) == ("FINISHED", "FAILED")
    assert a.data.tags["bnnctl.row"] == "A" and a.data.tags["mlflow.parentRunId"] == parent
    assert b.data.tags["bnnctl.teacher_run"] == runs["aaaa"]  # the link resolved to the run made just before
    assert b.data.tags["bnnctl.error"] == "worker lost"
    assert a.data.params["model.width"] == "8" and b.data.params["train.epochs"] == "3"
    history = tracker.client.get_metric_history(runs["aaaa"], "val.pckh")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert a.data.metrics["final.pckh"] == 0.5
    assert a.data.tags["bnnctl.checkpoint"] == str(root / "aaaa" / "best.pt")
    files = {f.path for f in tracker.client.list_artifacts(runs["aaaa"])}
    assert files == {"result.json", "per_joint.csv", "predictions.png"}
    local = tracker.client.download_artifacts(runs["aaaa"], "result.json")
    assert json.loads(open(local).read())["best_metric"] == 0.5


def test_an_error_is_raised_by_the_next_flush_and_the_work_after_it_is_still_done(setting):
    uri, store, root, tracker = setting
    parent = tracker.study_run("w", None, "w.yaml")
    store.ensure_variant("cccc", "row c", "row", CONFIG, [])
    writer = Writer()
    try:
        writer.open(uri, "w", str(root), store.url, every_s=0.0)
        writer.variant_run("cccc", parent, None, "row c", "row", 0, CONFIG, "w", {}, {})
        writer.finish("cccc", {"metrics": {}})  # a result without its accounting: an error in the writer
        writer.finish("cccc", None, error="boom")
        with pytest.raises(TrackingError, match="MLflow: KeyError: 'accounting'"):
            writer.flush()
        writer.flush()  # the error was reported once
    finally:
        writer.close()
    run = tracker.client.get_run(store.variant("cccc").mlflow_run_id)
    assert run.info.status == "FAILED" and run.data.tags["bnnctl.error"] == "boom"


DRIVER = textwrap.dedent("""
    import os, sys, time
    from bnnctl.orchestrator.mlwriter import Writer
    w = Writer()
    print(w._proc.pid, flush=True)
    time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_writer_dies_with_its_driver_and_ignores_the_terminals_interrupt():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    try:
        child = int(driver.stdout.readline())
        time.sleep(1.0)
        os.kill(child, signal.SIGINT)  # Ctrl-C reaches the whole group: the driver decides, not the writer
        time.sleep(0.5)
        assert _alive(child)
        driver.kill()  # SIGKILL: no clean-up of any kind in the driver
        driver.wait()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child)
    finally:
        if driver.poll() is None:
            driver.kill()
