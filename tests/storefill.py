"""A study written straight through the state store's API (no training): for the tests of what
reads a large store (CLI status, dashboard pages)."""
from bnnctl.orchestrator.layouts import AblationLayout, RowLayout, StudyLayout
from bnnctl.orchestrator.store import Member, Store


def fill(store: Store, name: str, rows: int, seeds: int = 2) -> list[str]:
    """A study of ``rows`` x ``seeds`` variants written through the store's API: every variant
    finished with 3 epochs of metrics, but the last one running (2 epochs so far)."""
    layout = StudyLayout(name=name, seeds=tuple(range(seeds)), metric="pckh", ablations=(AblationLayout(
        "ab", "isolated", "r0", tuple(RowLayout(f"r{i}", reference=50.0) for i in range(rows))),))
    study = store.upsert_study(name, f"{name}.yaml", "h", layout.to_dict())
    keys = [f"{name}-{i}-{s}" for i in range(rows) for s in range(seeds)]
    store.ensure_variants([(k, k, "row", {"epochs": 3, "schedule_offset": 0}, []) for k in keys])
    store.set_members(study.id, [Member(f"{name}-{i}-{s}", "ab", f"r{i}", s) for i in range(rows) for s in range(seeds)])
    for n, k in enumerate(keys):
        store.start_attempt(k, "host", f"/runs/{k}")
        for epoch in (1, 2, 3)[:2 if k == keys[-1] else 3]:
            store.log_metrics(k, epoch, {"pckh": 40.0 + n % 7 + epoch, "loss": 1.0 / epoch})
        if k != keys[-1]:
            store.finish(k, {"metric": "pckh", "metrics": {"pckh": 43.0 + n % 7}, "best_metrics": {"pckh": 43.0 + n % 7},
                             "accounting": {"params": 10}})
    store.set_study_status(study.id, "running")
    return keys
