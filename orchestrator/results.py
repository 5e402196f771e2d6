"""Results as data: one record per variant of a study (or trial of a tuning), for notebooks
(:func:`results` gives a pandas DataFrame) and for the CLI's ``--json`` (the same records).

Columns: ``study``, ``version`` (a study run with ``--set`` or ``--tag`` is a version of its spec,
stored as ``NAME@VERSION``; ``""``: the spec as written), ``ablation``, ``row``, ``seed``, ``variant`` (identity), ``label``, ``kind``,
``status``, ``error`` (``kind``: ``row`` for every row of a table, also one whose variant is a
teacher's, the same function; ``teacher``, ``stage1``, ``pretrain`` for the others), ``epochs`` (the row's budget over its stages), ``reported`` (the study's
metric by its reporting rule), ``report`` (that rule), ``metric.<name>`` (last epoch),
``best.<name>`` (best epoch), ``accounting.<name>``, ``env.<name>`` (where it trained),
``latency.<name>`` (the deployed model's measured CPU latency: ``binary_ms``, ``float_ms``, ...),
``init_from`` and ``teacher`` (the variants it started from and learned from), ``mlflow_run_id``,
and ``config.<dotted path>`` for every config value. A tuning adds ``trial``, ``arm``, ``state``
(Optuna's) and ``objective``.
"""
from __future__ import annotations

import json
from typing import Any

from .report import TABLE_CONFIG, budget, reported, sources
from .store import Store, collector_paused
from .layouts import split_name
from .tracking import CREATING, flatten_values


def _variant_record(v, variants: dict, config: bool = True) -> dict[str, Any]:
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
    if config:
        out.update(flatten_values(v.config, "config"))
    return out


def _stored_variants(store: Store, keys: list[str], study_id: int | None = None,
                     config: tuple[str, ...] | None = None) -> dict:
    """The variants ``keys`` (or the study ``study_id``'s, in one query, ``config``: only these
    config values) and, transitively, their dependencies (the budget counts stage 1)."""
    variants = store.study_variants(study_id, config) if study_id is not None else store.variants(keys)
    missing = {d for v in variants.values() for d in v.deps or () if d not in variants}
    while missing:
        found = store.variants(sorted(missing))
        variants.update(found)
        missing = {d for v in found.values() for d in v.deps or () if d not in variants} - set(found)
    return variants


def records(study: str, db: str | None = None, store: Store | None = None) -> list[dict[str, Any]]:
    """One dict per member of ``study`` (rows and prerequisites), or per trial of a tuning."""
    with collector_paused():
        return _records(study, db, store)


def _records(study: str, db: str | None, store: Store | None, texts: list | None = None) -> list[dict[str, Any]]:
    """The records; ``texts``: a list that receives each record's config as JSON text, the records
    then have no ``config.*`` (:func:`results` reads them all at once)."""
    from bnnctl.workers.errors import ConfigError

    store = store or Store(db, readonly=True)
    s = store.study(study)
    if s is None:
        raise ConfigError("study", f"no study or tuning named {study!r} in {store.display_url}")
    if s.kind == "tuning":
        return _trial_records(store, s, texts)
    members = store.members(s.id)
    if texts is None:
        variants = _stored_variants(store, [], s.id)
    else:  # the configs undecoded (their epochs only, for the budget); their text for results()
        variants = _stored_variants(store, [], s.id, config=TABLE_CONFIG)
        configs = store.config_texts(s.id)
    metric, rule = s.layout.metric, s.layout.report
    version = split_name(s.name)[1]  # "": the spec as written
    out = []
    for m in members:
        v = variants.get(m.variant_key)
        if v is None:
            continue
        rec = {"study": s.name, "version": version, "ablation": m.ablation, "row": m.row, "seed": m.seed}
        rec.update(_variant_record(v, variants, config=texts is None))
        if m.ablation is not None:  # a row, even when its variant is also a teacher (the same function)
            rec["kind"] = "row"
        rec["report"] = rule
        rec["reported"] = reported(v.result, metric, rule) if v.result and v.status == "completed" and metric else None
        out.append(rec)
        if texts is not None:
            texts.append(configs.get(v.key))
    return out


def _trial_records(store: Store, s, texts: list | None = None) -> list[dict[str, Any]]:
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
                rec.update(_variant_record(v, variants, config=texts is None))
            out.append(rec)
            if texts is not None:
                texts.append(json.dumps(v.config) if v is not None else None)
    return out


def results(study: str, db: str | None = None):
    """A study's (or tuning's) results as a pandas DataFrame: one row per variant (or trial); see
    the module docstring for the columns. ``db``: the state database URL (default: the working
    folder's ``.bnnctl/state.db`` or ``$BNNCTL_DB``)."""
    import pandas as pd

    with collector_paused():
        texts: list[str | None] = []
        frame = pd.DataFrame.from_records(_records(study, db, None, texts))
        if not len(frame):
            return frame
        configs = _config_frame(texts)
        if configs is None:  # a config pyarrow cannot type: the records' own flattening
            configs = pd.DataFrame.from_records([flatten_values(json.loads(t), "config") if t else {} for t in texts])
        return pd.concat([frame, configs], axis=1)


def _config_frame(texts: list[str | None]):
    """The ``config.*`` columns of :func:`results`, read by pyarrow's JSON reader (C++: a tenth of
    decoding and flattening 10,000 configs in Python) and flattened to dotted paths; lists become
    tuples as in the records. None when pyarrow cannot give the records' columns (a value whose type
    changes between variants, a string it would read as a time): the caller flattens in Python."""
    import io

    try:
        import pyarrow as pa
        import pyarrow.json as pj
    except ImportError:  # pragma: no cover - mlflow requires pyarrow
        return None
    data = "\n".join(t if t else "{}" for t in texts).encode()
    try:  # one block: types inferred over every variant at once
        table = pj.read_json(io.BytesIO(data), read_options=pj.ReadOptions(block_size=max(len(data) + 1, 1 << 20)))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    while any(pa.types.is_struct(f.type) for f in table.schema):
        table = table.flatten()
    if any(pa.types.is_temporal(f.type) or pa.types.is_large_list(f.type) for f in table.schema):
        return None
    lists = [f.name for f in table.schema if pa.types.is_list(f.type)]
    frame = table.to_pandas()
    for name in lists:  # arrays as tuples of plain values (hashable, as the records' tuples)
        frame[name] = [None if x is None else tuple(x.tolist()) for x in frame[name]]
    frame.columns = [f"config.{c}" for c in frame.columns]
    return frame
