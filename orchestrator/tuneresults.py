"""Reading a tuning back: Optuna's storage in the orchestrator's database, a tuning's trials as plain
data (summaries, importances), and ``tune best --as-spec``. Used by the CLI, the dashboard and
``bnnctl.results``; ``tuning.py`` runs tunings."""
from __future__ import annotations

import time
from typing import Any

from bnnctl.workers.errors import ConfigError

from .errors import StoreError
from .layouts import TuningLayout
from .store import Store, readonly_url


def optuna_storage(url: str, readonly: bool = False):
    """Optuna's RDB storage in the orchestrator's database (sqlite: a 30 s busy timeout).
    ``readonly``: creates no table and checks no version (a reader such as the dashboard)."""
    import optuna

    from sqlalchemy.exc import SQLAlchemyError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
    for attempt in range(4):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, skip_table_creation=readonly,
                                              skip_compatibility_check=readonly)
        except SQLAlchemyError:
            # another process (a second driver, `tune show`) created Optuna's tables at the same
            # moment: the loser's CREATE or version INSERT fails; the next try finds them there
            if attempt == 3 or readonly:
                raise
            time.sleep(0.5)


def summarize(study) -> dict:
    """A study's trials as plain data: best and default trial, every trial, importances."""
    trials = []
    for t in study.get_trials(deepcopy=False):
        trials.append({
            "number": t.number, "state": t.state.name, "value": t.value, "params": dict(t.params),
            "epochs": len(t.intermediate_values), "default": bool(t.user_attrs.get("bnnctl.default")),
            "variant": t.user_attrs.get("bnnctl.variant"), "reason": t.user_attrs.get("fail_reason"),
            "intermediate": dict(t.intermediate_values),
            "duration_s": (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start else None,
        })
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    best = None
    if complete:
        pick = max if study.direction.name == "MAXIMIZE" else min
        best = pick(complete, key=lambda t: t["value"])
    default = next((t for t in trials if t["default"]), None)
    return {"trials": trials, "best": best, "default": default, "importances": importances(study)}


def importances(study) -> dict[str, float] | None:
    """Parameter importances (Optuna's fANOVA); None when there are too few completed trials."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 3 or len({tuple(sorted(t.params.items())) for t in complete}) < 2:
        return None
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)  # deterministic across calls
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study, evaluator=evaluator).items()}
    except (RuntimeError, ValueError):
        return None


def load_tuning(name: str, db: str | None = None) -> tuple[Store, Any, dict[str, Any]]:
    """The stored tuning ``name``: (store, its study row, {arm: optuna.Study}), opened read-only."""
    store = Store(db, readonly=True)
    row = store.study(name)
    if row is None or row.kind != "tuning":
        known = ", ".join(s.name for s in store.studies() if s.kind == "tuning") or "none yet"
        raise ConfigError("tuning", f"no tuning {name!r} in {store.display_url}; known tunings: {known}")
    return store, row, arm_studies(row.layout, optuna_storage(readonly_url(store.url), readonly=True))


def arm_studies(layout: TuningLayout, storage) -> dict[str, Any]:
    """{arm: optuna.Study} of a stored tuning layout, loaded from ``storage``."""
    import optuna

    studies = {}
    for arm in layout.arms:
        try:
            studies[arm.name] = optuna.load_study(study_name=arm.optuna_study, storage=storage)
        except KeyError:
            raise StoreError(f"the Optuna study {arm.optuna_study!r} is missing from the state database") from None
    return studies


def best_as_spec(layout: TuningLayout, studies: dict[str, Any]) -> dict:
    """A study spec (plain data) comparing each arm's default with its best trial, ready for
    ``bnnctl study run``."""
    data = layout.data  # the tuning spec as written
    rows = []
    for arm in layout.arms:
        summary = summarize(studies[arm.name])
        if summary["best"] is None:
            raise ConfigError("tuning", f"arm {arm.name!r} has no completed trial yet; run the tuning first")
        arm_set = next((dict(a.get("set") or {}) for a in data.get("arms") or [] if a.get("name") == arm.name), {})
        prefix = "" if arm.name == "base" and not data.get("arms") else f"{arm.name}: "
        default_row: dict[str, Any] = {"name": f"{prefix}default"}
        tuned_row: dict[str, Any] = {"name": f"{prefix}tuned (trial {summary['best']['number']})"}
        if arm_set:
            default_row["set"] = dict(arm_set)
        tuned_row["set"] = {**arm_set, **summary["best"]["params"]}
        if arm.teacher:
            default_row["teacher"] = tuned_row["teacher"] = arm.teacher
        rows += [default_row, tuned_row]
    spec: dict[str, Any] = {
        "name": f"{data['name']}-best",
        "description": f"Best values of the tuning {data['name']} against the defaults.",
        "base": data.get("base") or {},
        "seeds": [data.get("seed", 0)],
    }
    for key in ("task", "resources", "teachers", "execution"):
        if data.get(key) is not None:
            spec[key] = data[key]
    from bnnctl.workers.metrics import ALL_TABLE_METRICS

    spec["metric"] = layout.metric if layout.metric in ALL_TABLE_METRICS else None
    if spec["metric"] is None:
        del spec["metric"]
    # the tuning's reporting rule: the table then shows each trial's objective as `tune show` does
    spec["report"] = (data.get("objective") or {}).get("value", "best")
    spec["ablations"] = [{"name": "tuned vs default", "mode": "isolated", "rows": rows}]
    return spec
