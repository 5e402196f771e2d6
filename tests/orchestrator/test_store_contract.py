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
