"""The state store's contract, run against every backend: sqlite, and a real PostgreSQL server."""
import pytest

from bnnctl.orchestrator.errors import StoreError
from bnnctl.orchestrator.store import SCHEMA_VERSION, Member, SchemaInfo, Store


def _variant(store, key="k1", deps=()):
    return store.ensure_variant(key, f"label {key}", "row", {"epochs": 2, "seed": 0}, list(deps))


def test_studies_members_and_annotations(db_url):
    store = Store(db_url)
    with store.session() as s:
        assert s.get(SchemaInfo, 1).version == SCHEMA_VERSION
    study = store.upsert_study("s", "s.yaml", "h1", {"seeds": [0]})
    assert (study.name, study.status, study.spec) == ("s", "pending", {"seeds": [0]})
    store.annotate_study(study.id, mlflow_experiment_id="7")
    again = store.upsert_study("s", "s2.yaml", "h2", {"seeds": [0, 1]})
    assert again.id == study.id and again.spec == {"seeds": [0, 1], "mlflow_experiment_id": "7"}
    store.set_study_status(study.id, "running", "run-1")
    assert (store.study("s").status, store.study(study.id).mlflow_run_id) == ("running", "run-1")
    for k in ("a", "b", "c"):
        _variant(store, k)
    store.set_members(study.id, [Member("a", "ab", "r1", 0), Member("b", "ab", "r2", 0)])
    store.set_members(study.id, [Member("b", "ab", "r2", 0), Member("c", None, None, 0)])  # a removed, c added
    assert [m.variant_key for m in store.members(study.id)] == ["b", "c"]
    store.add_member(study.id, Member("a", "arm", "trial 0", 0))
    store.add_member(study.id, Member("a", "arm", "trial 0", 0))  # idempotent
    assert [m.variant_key for m in store.members(study.id)] == ["b", "c", "a"]
    assert [s.name for s in store.studies()] == ["s"] and store.study("nope") is None


def test_a_variant_lives_through_its_allowed_states(db_url):
    store = Store(db_url)
    v = _variant(store)
    assert (v.status, v.deps) == ("pending", [])
    assert store.start_attempt("k1", None, "/runs/k1") == 1
    store.set_attempt_node("k1", "host-a", "node-a")
    store.log_metrics("k1", 1, {"pckh": 10.0, "loss": 0.5})
    store.requeue("k1", "worker lost: NodeDiedError")  # running -> pending
    assert store.start_attempt("k1", None, "/runs/k1") == 2
    store.log_metrics("k1", 1, {"pckh": 11.0})  # an epoch re-run after a resume keeps the latest value
    store.log_metrics("k1", 2, {"pckh": 12.0})
    store.fail("k1", "loss became NaN")
    assert (store.variant("k1").status, store.variant("k1").error) == ("failed", "loss became NaN")
    assert _variant(store).status == "pending" and store.variant("k1").error is None  # asked for again
    store.start_attempt("k1", None, "/runs/k1")
    store.stop("k1", {"epochs_done": 2})
    _variant(store)  # a stopped (pruned) variant resumes when asked again
    store.start_attempt("k1", None, "/runs/k1")
    store.finish("k1", {"metric": "pckh", "metrics": {"pckh": 12.0}})
    v = store.variant("k1")
    assert (v.status, v.result["metrics"]["pckh"], v.checkpoint_dir) == ("completed", 12.0, "/runs/k1")
    assert [(a.number, a.status) for a in store.attempts("k1")] == [
        (1, "lost"), (2, "failed"), (3, "stopped"), (4, "completed")]
    first = store.attempts("k1")[0]
    assert (first.node, first.node_id, first.error) == ("host-a", "node-a", "worker lost: NodeDiedError")
    assert all(a.ended_at is not None for a in store.attempts("k1"))
    assert store.metrics("k1") == {"pckh": [(1, 11.0), (2, 12.0)], "loss": [(1, 0.5)]}
    assert _variant(store).status == "completed"  # completed is final: asking again changes nothing


@pytest.mark.parametrize("forbidden", ["finish", "fail", "stop", "requeue"])
def test_forbidden_transitions_raise(db_url, forbidden):
    store = Store(db_url)
    _variant(store)  # pending: nothing may end it before it started
    args = {"finish": ({},), "fail": ("x",), "stop": ({},), "requeue": ("x",)}[forbidden]
    with pytest.raises(StoreError, match="forbidden state change pending -> "):
        getattr(store, forbidden)("k1", *args)
    store.start_attempt("k1", None, "/r")
    store.finish("k1", {})
    with pytest.raises(StoreError, match="is completed; it is never trained again"):
        getattr(store, forbidden)("k1", *args)
    with pytest.raises(StoreError, match="never trained again"):
        store.start_attempt("k1", None, "/r")
    with pytest.raises(StoreError, match="no variant nope"):
        store.fail("nope", "x")


def test_a_dead_drivers_running_variant_is_requeued_with_its_attempt_closed(db_url):
    store = Store(db_url)
    _variant(store)
    store.start_attempt("k1", "host", "/r")
    assert _variant(store).status == "pending"  # the next driver asks for it again
    (attempt,) = store.attempts("k1")
    assert (attempt.status, attempt.error) == ("lost", "driver stopped") and attempt.ended_at is not None


def test_the_read_only_store_reads_and_cannot_write(db_url):
    store = Store(db_url)
    store.upsert_study("s", "s.yaml", "h", {})
    ro = Store(db_url, readonly=True)
    assert ro.study("s").name == "s"
    with pytest.raises(StoreError):
        ro.upsert_study("t", "t.yaml", "h", {})
    assert [s.name for s in Store(db_url).studies()] == ["s"]


def test_messages_never_show_the_password(db_url):
    store = Store(db_url)
    if "@" in db_url:
        password = db_url.split(":")[2].split("@")[0]
        assert password not in store.display_url and "***" in store.display_url
        bad = db_url.rsplit("/", 1)[0] + "/no_such_database"
        with pytest.raises(StoreError) as err:
            Store(bad)
        assert password not in str(err.value) and "no_such_database" in str(err.value)
    else:
        assert store.display_url == db_url


def test_one_driver_holds_the_lease(db_url):
    import time

    from bnnctl.orchestrator.errors import LeaseHeld

    store, other = Store(db_url), Store(db_url)  # two drivers, two connections
    first = store.acquire_lease("s", "host-a:1", "tok-a", timeout_s=60)
    assert (first.holder, store.lease("s").token) == ("host-a:1", "tok-a")
    with pytest.raises(LeaseHeld) as err:
        other.acquire_lease("s", "host-b:2", "tok-b", timeout_s=60)
    assert "'s' is being run by another driver: host-a:1, since" in str(err.value) and "--takeover" in str(err.value)
    assert store.acquire_lease("s", "host-a:1", "tok-a", timeout_s=60).token == "tok-a"  # ours again: fine
    assert store.renew_lease("s", "tok-a") and not store.renew_lease("s", "tok-b")
    time.sleep(1.2)  # no heartbeat for longer than the timeout: a crashed driver's lease is taken over
    assert other.acquire_lease("s", "host-b:2", "tok-b", timeout_s=1).holder == "host-b:2"
    assert not store.renew_lease("s", "tok-a")  # the old driver learns that it lost it
    forced = store.acquire_lease("s", "host-c:3", "tok-c", timeout_s=60, takeover=True)
    assert forced.holder == store.lease("s").holder == "host-c:3"
    with pytest.raises(LeaseHeld):  # replacing a token that no longer holds it: refused
        other.acquire_lease("s", "host-d:4", "tok-d", timeout_s=60, replace="tok-b")
    other.release_lease("s", "tok-b")  # not the holder: nothing happens
    assert store.lease("s").holder == "host-c:3"
    store.release_lease("s", "tok-c")
    assert store.lease("s") is None
    assert other.acquire_lease("t", "host-b:2", "tok-b", timeout_s=60).name == "t"  # names are independent


def _study_of(store, name, keys, statuses=None):
    """A study whose members are ``keys`` (one row each, seed 0), written with the batch API."""
    study = store.upsert_study(name, f"{name}.yaml", "h", {"seeds": [0]})
    store.ensure_variants([(k, f"label {k}", "row", {"epochs": 3, "schedule_offset": 0, "lr": 0.1}, [])
                           for k in keys])
    store.set_members(study.id, [Member(k, "ab", f"row {k}", 0) for k in keys])
    return study


def test_batch_reads_answer_what_the_per_variant_reads_answer(db_url):
    store = Store(db_url)
    a = _study_of(store, "a", [f"a{i}" for i in range(7)])
    b = _study_of(store, "b", ["a0", "b1"])  # a0 is shared by two studies
    store.start_attempt("a0", "host", "/r")
    store.requeue("a0", "worker lost")
    store.start_attempt("a0", "host", "/r")
    store.log_metrics("a0", 1, {"pckh": 10.0, "loss": 0.5})
    store.log_metrics("a0", 2, {"pckh": 12.0, "loss": 0.4})
    store.finish("a0", {"metric": "pckh", "metrics": {"pckh": 12.0}})
    store.start_attempt("a1", "host", "/r")
    store.log_metrics("a1", 1, {"pckh": 5.0})
    store.start_attempt("b1", "host", "/r")
    store.fail("b1", "NaN")
    keys = [f"a{i}" for i in range(7)]
    assert store.study_variants(a.id) == store.variants(keys) and set(store.variants(keys)) == set(keys)
    light = store.study_variants(a.id, config=("epochs", "schedule_offset", "missing"))
    assert light["a0"].config == {"epochs": 3, "schedule_offset": 0} and light["a0"].result == store.variant("a0").result
    assert store.attempts_of(study_id=a.id) == {k: store.attempts(k) for k in ("a0", "a1")}
    assert store.attempts_of(["a0", "b1", "a5"]) == {"a0": store.attempts("a0"), "b1": store.attempts("b1")}
    assert store.attempt_counts(keys) == store.attempt_counts(study_id=a.id) == {"a0": 2, "a1": 1}
    assert store.study_states(b.id) == {"a0": "completed", "b1": "failed"}
    assert store.metrics_of([], ["pckh"], study_id=a.id) == {"a0": {"pckh": [(1, 10.0), (2, 12.0)]},
                                                            "a1": {"pckh": [(1, 5.0)]}}
    assert store.metrics_of([], study_id=a.id, state="running") == {"a1": store.metrics("a1")}
    assert store.metrics_of(["a0", "b1"]) == {"a0": store.metrics("a0")}
    counts = store.study_counts()
    assert counts[a.id][0] == {"completed": 1, "running": 1, "pending": 5}
    assert counts[b.id][0] == {"completed": 1, "failed": 1}
    assert counts[a.id][1] is not None


def test_a_studys_stamp_moves_with_everything_its_pages_show(db_url):
    store = Store(db_url)
    s = _study_of(store, "s", ["k1", "k2"])
    other = _study_of(store, "other", ["o1"])
    stamps = [store.stamp(s.id)]

    def moved() -> bool:
        stamps.append(store.stamp(s.id))
        return stamps[-1] != stamps[-2]

    store.start_attempt("k1", "host", "/r")
    assert moved()  # a state
    store.log_metrics("k1", 1, {"pckh": 3.0})
    assert moved()  # a metric
    store.log_metrics("o1", 1, {"pckh": 3.0})
    assert not moved()  # another study's variant
    store.finish("k1", {"metric": "pckh", "metrics": {"pckh": 3.0}})
    assert moved()  # a result
    store.set_members(s.id, [Member("k1", "ab", "row k1", 0)])
    assert moved()  # the membership
    store.annotate_study(s.id, stopped_reason="x")
    assert moved()  # the study's layout
    store.set_study_status(s.id, "completed")
    assert moved()
    assert store.stamp(other.id) != store.stamp(s.id) and store.stamp(10_000) is None


def test_ensure_variants_requeues_as_ensure_variant_does(db_url):
    store = Store(db_url)
    _study_of(store, "s", ["done", "failed", "running", "new"])
    store.start_attempt("done", None, "/r")
    store.finish("done", {"metric": "pckh", "metrics": {"pckh": 1.0}})
    store.start_attempt("failed", None, "/r")
    store.fail("failed", "boom")
    store.start_attempt("running", "host", "/r")
    many = [(f"k{i}", f"label {i}", "row", {"epochs": 1}, []) for i in range(1203)]  # three batches
    store.ensure_variants([(k, k, "row", {"epochs": 3}, []) for k in ("done", "failed", "running", "new")] + many)
    v = store.variants(["done", "failed", "running", "new", "k0", "k1202"])
    assert {k: x.status for k, x in v.items()} == {"done": "completed", "failed": "pending", "running": "pending",
                                                    "new": "pending", "k0": "pending", "k1202": "pending"}
    assert v["failed"].error is None and v["k1202"].config == {"epochs": 1} and v["k0"].label == "label 0"
    assert [(a.status, a.error) for a in store.attempts("running")] == [("lost", "driver stopped")]
    assert len(store.variants([f"k{i}" for i in range(1203)])) == 1203  # reads by key lists are batched too


def test_a_schema_3_database_gets_the_read_indexes_keeping_every_row(db_url):
    """Schema 3 -> 4: the read paths' indexes are added to an existing database in place."""
    from sqlalchemy import inspect, text

    from bnnctl.orchestrator.records import INDEXES

    store = Store(db_url)
    s = _study_of(store, "s", ["k1", "k2"])
    store.start_attempt("k1", "host", "/r")
    store.log_metrics("k1", 1, {"pckh": 7.0})
    store.finish("k1", {"metric": "pckh", "metrics": {"pckh": 7.0}})
    with store.engine.begin() as conn:  # what a schema-3 database is: the same tables, without them
        for indexes in INDEXES.values():
            for name, _ in indexes:
                conn.execute(text(f"DROP INDEX {name}"))
        conn.execute(text("UPDATE bnnctl_schema_info SET version = 3"))
    store.engine.dispose()

    def names(engine) -> set[str]:
        insp = inspect(engine)
        return {i["name"] for table in INDEXES for i in insp.get_indexes(table)}

    wanted = {name for indexes in INDEXES.values() for name, _ in indexes}
    assert not wanted & names(store.engine)
    with pytest.raises(StoreError, match="has schema 3"):
        Store(db_url, readonly=True)  # a reader never migrates
    again = Store(db_url)
    assert wanted <= names(again.engine)
    with again.session() as session:
        assert session.get(SchemaInfo, 1).version == SCHEMA_VERSION == 4
    assert [m.variant_key for m in again.members(s.id)] == ["k1", "k2"]
    assert again.variant("k1").result["metrics"]["pckh"] == 7.0 and again.metrics("k1") == {"pckh": [(1, 7.0)]}
    assert [a.status for a in again.attempts("k1")] == ["completed"]
    if db_url.startswith("sqlite"):  # the attempts of a variant are found through the index, not a scan
        with again.engine.connect() as conn:
            plan = " ".join(str(r[-1]) for r in conn.execute(text(
                "EXPLAIN QUERY PLAN SELECT * FROM bnnctl_attempts WHERE variant_key = 'k1'")))
        assert "ix_bnnctl_attempts_variant" in plan and "SCAN" not in plan
