"""Results as data: one record per variant of a study (or trial of a tuning), for notebooks
(:func:`results` gives a pandas DataFrame) and for the CLI's ``--json`` (the same records).

Columns: ``study``, ``ablation``, ``row``, ``seed``, ``variant`` (identity), ``label``, ``kind``,
``status``, ``error``, ``epochs`` (the row's budget over its stages), ``reported`` (the study's
metric by its reporting rule), ``report`` (that rule), ``metric.<name>`` (last epoch),
``best.<name>`` (best epoch), ``accounting.<name>``, ``env.<name>`` (where it trained),
``latency.<name>`` (the deployed model's measured CPU latency: ``binary_ms``, ``float_ms``, ...),
``init_from`` and ``teacher`` (the variants it started from and learned from), ``mlflow_run_id``,
and ``config.<dotted path>`` for every config value. A tuning adds ``trial``, ``arm``, ``state``
(Optuna's) and ``objective``.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Any

from .report import budget, reported, sources
from .store import Store
from .tracking import CREATING, flatten_values


def _variant_record(v, variants: dict) -> dict[str, Any]:
    result = v.result or {}
    roles: dict = {}
    for role, key in sources(v, variants):
        roles.setdefault(role, key)
    out: dict[str, Any] = {
        "variant": v.key, "label": v.label, "kind": v.kind, "status": v.status, "error": v.error,
        "epochs": budget(v.key, variants), "mlflow_run_id": None if v.mlflow_run_id == CREATING else v.mlflow_run_id,
        "init_from": roles.get("init"), "teacher": roles.get("teacher"),
    }
    for prefix, values in (("metric", result.get("metrics")), ("best", result.get("best_metrics")),
                           ("accounting", result.get("accounting")), ("env", result.get("environment")),
                           ("latency", result.get("latency"))):
        for name, value in (values or {}).items():
            out[f"{prefix}.{name}"] = value
    out.update(flatten_values(v.config, "config"))
    return out


def _stored_variants(store: Store, keys: list[str]) -> dict:
    """The variants and, transitively, their dependencies (the budget counts stage 1)."""
    variants = store.variants(keys)
    missing = {d for v in variants.values() for d in v.deps or () if d not in variants}
    while missing:
        found = store.variants(sorted(missing))
        variants.update(found)
        missing = {d for v in found.values() for d in v.deps or () if d not in variants} - set(found)
    return variants


@contextmanager
def _collector_paused():
    """No cyclic garbage collection while a large result is built: it makes only acyclic dicts and
    tuples, and a collection pass per allocation burst walks every live object (a notebook's heap
    included), which made building 10,000 records up to twice as slow."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def records(study: str, db: str | None = None, store: Store | None = None) -> list[dict[str, Any]]:
    """One dict per member of ``study`` (rows and prerequisites), or per trial of a tuning."""
    with _collector_paused():
        return _records(study, db, store)


def _records(study: str, db: str | None, store: Store | None) -> list[dict[str, Any]]:
    from bnnctl.workers.errors import ConfigError

    store = store or Store(db, readonly=True)
    s = store.study(study)
    if s is None:
        raise ConfigError("study", f"no study or tuning named {study!r} in {store.display_url}")
    if s.kind == "tuning":
        return _trial_records(store, s)
    members = store.members(s.id)
    variants = _stored_variants(store, [m.variant_key for m in members])
    metric, rule = s.layout.metric, s.layout.report
    out = []
    for m in members:
        v = variants.get(m.variant_key)
        if v is None:
            continue
        rec = {"study": s.name, "ablation": m.ablation, "row": m.row, "seed": m.seed}
        rec.update(_variant_record(v, variants))
        rec["report"] = rule
        rec["reported"] = reported(v.result, metric, rule) if v.result and v.status == "completed" and metric else None
        out.append(rec)
    return out


def _trial_records(store: Store, s) -> list[dict[str, Any]]:
    from .tuneresults import arm_studies, optuna_storage
    from .store import readonly_url

    studies = arm_studies(s.layout, optuna_storage(readonly_url(store.url), readonly=True))
    keys = [t.user_attrs.get("bnnctl.variant") for st in studies.values() for t in st.get_trials(deepcopy=False)]
    variants = _stored_variants(store, [k for k in keys if k])
    out = []
    for arm, st in studies.items():
        for t in st.get_trials(deepcopy=False):
            rec: dict[str, Any] = {"study": s.name, "arm": arm, "trial": t.number, "state": t.state.name,
                                   "objective": t.value, "seed": s.layout.data.get("seed", 0)}
            rec.update({f"param.{k}": v for k, v in t.params.items()})
            v = variants.get(t.user_attrs.get("bnnctl.variant"))
            if v is not None:
                rec.update(_variant_record(v, variants))
            out.append(rec)
    return out


def results(study: str, db: str | None = None):
    """A study's (or tuning's) results as a pandas DataFrame: one row per variant (or trial); see
    the module docstring for the columns. ``db``: the state database URL (default: the working
    folder's ``.bnnctl/state.db`` or ``$BNNCTL_DB``)."""
    import pandas as pd

    with _collector_paused():
        return pd.DataFrame.from_records(records(study, db))
