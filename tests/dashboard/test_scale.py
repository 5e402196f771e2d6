"""The dashboard at scale: a page costs a bounded number of queries whatever the study's size, and
its cache (keyed by the study's change stamp) never serves a page older than the store."""
import json
import urllib.request

import pytest
from sqlalchemy import Engine, event

from bnnctl.dashboard import views
from bnnctl.orchestrator.store import Store
from dashserver import Server
from storefill import fill as _fill


@pytest.fixture()
def two_sizes(tmp_path):
    """Two databases, alike but for the size of their study: 3 rows and 150 rows (300 variants)."""
    out = {}
    for size in (3, 150):
        url = f"sqlite:///{tmp_path / f'state-{size}.db'}"
        store = Store(url)
        keys = _fill(store, "s", size)
        _fill(store, "beside", 2)  # another study in the same database
        out[size] = (url, store, keys)
    return out


class Queries:
    """Counts the SQL statements every engine of this process runs while active."""

    def __init__(self) -> None:
        self.count = 0

    def _seen(self, *args) -> None:
        self.count += 1

    def __enter__(self):
        event.listen(Engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *exc) -> None:
        event.remove(Engine, "before_cursor_execute", self._seen)


def _get(server: Server, path: str) -> str:
    with urllib.request.urlopen(server.url + path, timeout=60) as r:
        assert r.status == 200
        return r.read().decode()


def test_a_page_costs_the_same_number_of_queries_at_any_size(two_sizes, tmp_path):
    counts: dict[int, dict[str, int]] = {}
    for size, (url, _, _) in two_sizes.items():
        server = Server(url, tmp_path / "runs")
        try:
            counts[size] = {}
            for label, path in (("index", "/"), ("study", "/study/s"), ("study again", "/study/s"),
                                ("api", "/api/study/s"), ("studies api", "/api/studies")):
                with Queries() as q:
                    _get(server, path)
                counts[size][label] = q.count
        finally:
            server.stop()
    assert counts[3] == counts[150], counts
    assert counts[150]["study again"] < counts[150]["study"]  # served from the cache: the stamp's queries only
    assert counts[150]["study again"] <= 5 and counts[150]["index"] <= 3 and counts[150]["study"] <= 15, counts


def test_the_cached_page_follows_every_change_of_the_store(two_sizes, tmp_path):
    url, writer, keys = two_sizes[150]
    server = Server(url, tmp_path / "runs")
    try:
        def page() -> dict:
            return json.loads(_get(server, "/api/study/s"))

        first = page()
        assert first["counts"] == {"completed": 299, "running": 1}
        assert [p["epoch"] for p in first["progress"]] == [2]
        assert page() == first  # nothing changed: the same page
        writer.log_metrics(keys[-1], 3, {"pckh": 60.0, "loss": 0.2})  # an epoch of the running variant
        assert [p["epoch"] for p in page()["progress"]] == [3]
        writer.finish(keys[-1], {"metric": "pckh", "metrics": {"pckh": 99.0}, "best_metrics": {"pckh": 99.0}})
        after = page()
        assert after["counts"] == {"completed": 300} and after["progress"] == []
        last_row = next(r for t in after["tables"] for r in t["rows"] if r["name"] == "r149")
        assert last_row["mean"] == (43.0 + 298 % 7 + 99.0) / 2  # its seed 0's value and the new 99
        writer.set_study_status(writer.study("s").id, "completed")
        assert page()["status"] == "completed"
        fresh = views.study(Store(url, readonly=True), "s")  # what an uncached read computes
        assert page() == json.loads(json.dumps(fresh))
        html = _get(server, "/study/s")
        assert "r149" in html and html == _get(server, "/study/s")
    finally:
        server.stop()


def test_the_index_counts_what_the_variants_say(two_sizes, tmp_path):
    url, store, _ = two_sizes[150]
    listed = {s["name"]: s for s in views.studies(Store(url, readonly=True))}
    for name in ("s", "beside"):
        study = store.study(name)
        variants = store.variants([m.variant_key for m in store.members(study.id)])
        by_state: dict[str, int] = {}
        for v in variants.values():
            by_state[v.status] = by_state.get(v.status, 0) + 1
        assert listed[name]["counts"] == by_state and listed[name]["total"] == len(variants)
        last = max(v.updated_at for v in variants.values()).strftime("%Y-%m-%d %H:%M:%S")
        assert listed[name]["last_activity"] >= last
