"""Latency you can compare: a study's deployed networks timed again at its end, one at a time on a
quiet worker (a task holding every CPU), one measurement per distinct network; a figure still from
the end of training (a study stopped early) is marked in the tables. Real training and real timing
on the in-process backend."""
import json

import pytest
import studies as specs

from bnnctl.orchestrator.backends.inprocess import InProcessBackend
from bnnctl.orchestrator.formats import format_latency
from bnnctl.orchestrator.report import latency, study_tables
from bnnctl.orchestrator.runcore import RunOptions
from bnnctl.orchestrator.store import Store
from bnnctl.orchestrator.study import run_study

def _spec(folder):
    relu = {"model.activation.kind": "relu"}
    return specs.write(folder, specs.study("quiet", folder / "syn", specs.rows(
        ("relu", relu), ("relu again", {**relu, "optim.lr": 0.001}), ("wide", {"model.width": 16})),
        seeds=(0, 1), base_fields={"latency": True}))


def _run(spec, backend, **kw):
    return run_study(spec, options=RunOptions(track=False, backend_instance=backend, **kw))


@pytest.mark.slow
def test_each_network_is_timed_once_at_the_end_on_a_quiet_worker(workdir):
    spec = _spec(workdir)
    backend = InProcessBackend(capacity=2)
    assert _run(spec, backend, only=("relu",)).status == "stopped"  # a part: no quiet phase yet
    store = Store()
    study = store.study("quiet")
    (table,) = study_tables(store, study)
    relu = table.rows[0]
    assert relu.latency_quiet is False and "*" in format_latency(relu.latency_ms, None, None, relu.latency_quiet)
    assert "* measured at the end of the variant's training" in table.rule
    assert [t.kind for t in backend.submitted] == ["train", "train"]

    backend = InProcessBackend(capacity=2)
    assert _run(spec, backend).status == "completed"
    measured = [t for t in backend.submitted if t.kind == "latency"]
    # two networks (width 8 with ReLU, whatever the learning rate; width 16): two quiet tasks, each
    # holding every CPU of the node, each on a checkpoint of its network
    assert len(measured) == 2 and all(t.cpus == 2 for t in measured)
    assert all(t.fetch == (("checkpoint", f"{t.key}/last.pt"),) for t in measured)
    members = {(m.row, m.seed): m.variant_key for m in store.members(study.id) if m.ablation}
    lat = {k: store.variant(key).result["latency"] for k, key in members.items()}
    assert all(x["quiet"] and len(x["binary_rounds"]) == 7 for x in lat.values())
    narrow = {json.dumps(lat[(r, s)], sort_keys=True) for r in ("relu", "relu again") for s in (0, 1)}
    assert len(narrow) == 1  # one measurement for the four variants of one network
    assert lat[("wide", 0)] == lat[("wide", 1)] != lat[("relu", 0)]
    (table,) = study_tables(Store(), Store().study("quiet"))
    for row in table.rows:
        x = lat[(row.name, 0)]
        assert row.latency_quiet is True and row.latency_ms == x["binary_ms"]
        assert row.latency_spread == (min(x["binary_rounds"]), max(x["binary_rounds"]))
        assert row.latency_spread[0] <= row.latency_ms <= row.latency_spread[1]
    assert "*" not in table.rule and "quiet worker" in table.rule

    backend = InProcessBackend(capacity=2)
    assert _run(spec, backend).trained == 0 and backend.submitted == []  # nothing left to time


def test_a_rows_latency_is_its_seeds_median_with_the_rounds_spread():
    a = {"binary_ms": 2.0, "float_ms": 4.0, "binary_rounds": [1.9, 2.0, 2.4], "quiet": True, "machine": "m"}
    b = {"binary_ms": 3.0, "float_ms": 5.0, "binary_rounds": [2.8, 3.0, 3.1], "quiet": False, "machine": "m"}
    row = latency([{"latency": a}, {"latency": b}, None], ["completed", "completed", "failed"])
    assert row == {"ms": 2.5, "float_ms": 4.5, "spread": (1.9, 3.1), "quiet": False, "machines": {"m"}}
    assert format_latency(row["ms"], row["float_ms"], row["spread"], row["quiet"]) == "2.5 ms* [1.9–3.1] (1.8x)"
    assert format_latency(2.0, 4.0, (1.9, 2.4), True) == "2 ms [1.9–2.4] (2.0x)"
    assert format_latency(2.0, None, (2.0, 2.0), True) == "2 ms"  # no spread to show
    old = {"binary_ms": 2.0, "float_ms": None, "machine": "m"}  # a result from before the rounds were kept
    assert latency([{"latency": old}], ["completed"])["spread"] is None
