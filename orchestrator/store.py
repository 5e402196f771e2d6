"""The orchestrator's state: studies, variants, attempts and per-epoch metrics (SQLAlchemy 2).

Contract of :class:`Store` (the orchestrator is its only writer; the dashboard only reads):

- A *variant* is one training run identified by its identity hash; it may belong to several studies
  (through ``study_variants``, one row per (study, ablation, row, seed)).
- Variant states: ``pending -> running -> completed | failed | stopped``; ``running -> pending`` when
  its worker was lost (the next attempt resumes from the checkpoint); ``failed -> pending`` and
  ``stopped -> pending`` only when a study or tuning asks for the variant again (a stopped variant,
  e.g. a pruned trial, resumes from its checkpoint). ``completed`` is final: a completed variant is
  never trained again.
- Every state change of a variant is an *attempt* row (number, node, start, end, outcome, error).
- Every write goes through :meth:`Store.session`, which commits, rolls back on error and maps
  database errors to :class:`StoreError`. Reads return plain frozen snapshots, never live ORM objects.
- Default database: sqlite under ``.bnnctl/`` (WAL, busy timeout); any SQLAlchemy URL works
  (PostgreSQL on a cluster). The schema is versioned (``bnnctl_schema_info``): a database written by a newer
  bnnctl is refused rather than misread.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Text, cast, func, insert, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from .errors import LeaseHeld, StoreError
from .records import (  # noqa: F401 - the snapshots are the store's vocabulary: importable from here too
    SCHEMA_VERSION,
    Attempt,
    AttemptRow,
    Lease,
    LeaseRow,
    Member,
    MetricRow,
    SchemaInfo,
    Study,
    StudyRow,
    StudyVariantRow,
    Variant,
    VariantRow,
    attempt_of,
    check_version,
    migrate,
    open_engine,
    study_of,
    utcnow,
    variant_of,
)
from .urls import mask_text, mask_url

DEFAULT_DIR = Path(".bnnctl")
#: annotations of a study that survive a new run of its spec (its MLflow experiment, its submitted job)
KEPT_ANNOTATIONS = ("mlflow_experiment_id", "job")
#: allowed state changes of a variant (see the module docstring); anything else raises StoreError
TRANSITIONS = {
    "pending": {"running"},
    "running": {"completed", "failed", "stopped", "pending", "interrupted"},
    "failed": {"pending"},
    "stopped": {"pending"},
    "interrupted": {"pending"},  # its driver was interrupted (Ctrl-C): the next run resumes it
    "completed": set(),
}
STUDY_STATES = ("pending", "running", "completed", "failed", "cancelled", "stopped")
#: what a Variant snapshot reads (plain rows: no ORM objects built for a read of thousands), its JSON
#: columns as their text, decoded by :func:`_snapshot` (SQLAlchemy's per-row JSON processing took
#: twice json.loads' own time: 0.4 s of 10,000 variants' configs)
_JSON_COLUMNS = ("config", "deps", "result")
_VARIANT_COLUMNS = tuple(cast(c, Text).label(c.key) if c.key in _JSON_COLUMNS else c for c in (
    VariantRow.key, VariantRow.label, VariantRow.kind, VariantRow.config, VariantRow.deps, VariantRow.status,
    VariantRow.result, VariantRow.error, VariantRow.checkpoint_dir, VariantRow.mlflow_run_id, VariantRow.updated_at))


@contextmanager
def collector_paused():
    """No cyclic garbage collection while a large read is turned into objects: it makes only
    acyclic dicts, lists and snapshots, and a collection pass per allocation burst walks every live
    object (a notebook's heap included), which made decoding 10,000 variants up to twice as slow."""
    import gc

    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _json(text: str | None):
    return None if text is None else json.loads(text)


def _snapshot(r, config: dict | None = None) -> Variant:
    """A Variant of a row of :data:`_VARIANT_COLUMNS` (``config``: given, for a row read without it)."""
    return Variant(r.key, r.label, r.kind, _json(r.config) if config is None else config, _json(r.deps) or [],
                   r.status, _json(r.result), r.error, r.checkpoint_dir, r.mlflow_run_id, r.updated_at)


#: keys per query of reads and writes by key list (sqlite's bound-parameter limit, and one
#: transaction per batch of a study's up-front write)
BATCH = 500


def _chunks(keys: list, size: int = BATCH) -> Iterator[list]:
    for i in range(0, len(keys), size):
        yield keys[i:i + size]


def readonly_url(url: str) -> str:
    """``url`` for a reader that must not write: sqlite opened with ``mode=ro`` (writes fail); other
    URLs unchanged (the Store makes their transactions read-only)."""
    if url.startswith("sqlite:///") and "mode=ro" not in url:
        return f"sqlite:///file:{Path(url.removeprefix('sqlite:///')).resolve()}?mode=ro&uri=true"
    return url


def default_url() -> str:
    return os.environ.get("BNNCTL_DB") or f"sqlite:///{(DEFAULT_DIR / 'state.db').resolve()}"


class Store:
    """The SQL implementation of the state store (see the module docstring for the contract)."""

    def __init__(self, url: str | None = None, readonly: bool = False) -> None:
        """Open (and create or migrate) the store at ``url``. ``readonly`` (the dashboard): never
        create, migrate or write anything; sqlite is opened read-only, so a write would fail."""
        self.url = url or default_url()
        self.display_url = mask_url(self.url)  # what messages show: never the password
        self.readonly = readonly
        engine_url = self.url
        if self.url.startswith("sqlite:///"):
            path = Path(self.url.removeprefix("sqlite:///"))
            if readonly:
                if not path.exists():
                    raise StoreError(f"no state database at {path}; run a study first (bnnctl study run FILE) "
                                     "or pass --db")
                engine_url = readonly_url(self.url)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = open_engine(self.url, engine_url, readonly, self.display_url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if readonly:
            check_version(self.session, self.display_url)
        else:
            migrate(self.engine, self.session, self.display_url)

    def file_identity(self) -> tuple[int, int] | None:
        """(device, inode) of a sqlite database file, None when it is missing (deleted); None for
        a server database too (see ``is_file``)."""
        if not self.is_file:
            return None
        try:
            st = os.stat(self.url.removeprefix("sqlite:///"))
        except OSError:
            return None
        return st.st_dev, st.st_ino

    @property
    def is_file(self) -> bool:
        return self.url.startswith("sqlite:///") and ":memory:" not in self.url

    @contextmanager
    def session(self) -> Iterator[Session]:
        """The one way to touch the database: commit on success, roll back and raise StoreError on a
        database error."""
        s = self._sessions()
        try:
            yield s
            s.commit()
        except SQLAlchemyError as err:
            s.rollback()
            raise StoreError(mask_text(f"state database error ({self.display_url}): {err.__class__.__name__}: {err}")) from None
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    # -- studies ----------------------------------------------------------------------------------
    def upsert_study(self, name: str, spec_file: str, spec_hash: str, spec: dict) -> Study:
        with self.session() as s:
            row = s.scalar(select(StudyRow).where(StudyRow.name == name))
            if row is None:
                row = StudyRow(name=name, spec_file=spec_file, spec_hash=spec_hash, spec=spec, status="pending")
                s.add(row)
            else:
                kept = {k: v for k, v in row.spec.items() if k in KEPT_ANNOTATIONS}
                row.spec_file, row.spec_hash, row.spec, row.updated_at = spec_file, spec_hash, {**spec, **kept}, utcnow()
            s.flush()
            return study_of(row)

    def study(self, name_or_id: str | int) -> Study | None:
        with self.session() as s:
            q = select(StudyRow).where(StudyRow.id == int(name_or_id)) if str(name_or_id).isdigit() \
                else select(StudyRow).where(StudyRow.name == str(name_or_id))
            row = s.scalar(q)
            return study_of(row) if row else None

    def studies(self) -> list[Study]:
        with self.session() as s:
            return [study_of(r) for r in s.scalars(select(StudyRow).order_by(StudyRow.id))]

    def set_study_status(self, study_id: int, status: str, mlflow_run_id: str | None = None) -> None:
        assert status in STUDY_STATES, status
        with self.session() as s:
            row = s.get(StudyRow, study_id)
            row.status, row.updated_at = status, utcnow()
            if mlflow_run_id:
                row.mlflow_run_id = mlflow_run_id

    def annotate_study(self, study_id: int, **info) -> None:
        """Merge ``info`` into the study's stored layout (e.g. its MLflow experiment id)."""
        with self.session() as s:
            row = s.get(StudyRow, study_id)
            row.spec, row.updated_at = {**row.spec, **info}, utcnow()

    def set_members(self, study_id: int, members: list[Member]) -> None:
        """Make the study's table membership exactly ``members`` (a changed spec adds and removes rows)."""
        with self.session() as s:
            existing = {(m.ablation, m.row, m.seed, m.variant_key): m
                        for m in s.scalars(select(StudyVariantRow).where(StudyVariantRow.study_id == study_id))}
            wanted = {(m.ablation, m.row, m.seed, m.variant_key) for m in members}
            for key, row in existing.items():
                if key not in wanted:
                    s.delete(row)
            s.flush()
            new = [{"study_id": study_id, "variant_key": m.variant_key, "ablation": m.ablation, "row": m.row,
                    "seed": m.seed} for m in members if (m.ablation, m.row, m.seed, m.variant_key) not in existing]
            for chunk in _chunks(new):  # executemany in batches (ORM objects, one by one: 4 s at 50,000)
                s.execute(insert(StudyVariantRow), chunk)

    def delete_study(self, name: str) -> tuple[list[Variant], int]:
        """Remove a study or tuning from the store: its rows, its membership, and the variants no
        other study uses (with their attempts and metrics). Returns (the removed variants, how many of
        its variants other studies keep). Refused while a driver runs it."""
        from sqlalchemy import delete

        with self.session() as s:
            row = s.scalar(select(StudyRow).where(StudyRow.name == name))
            if row is None:
                raise StoreError(f"no study or tuning named {name!r} in {self.display_url}")
            if row.status == "running" or s.get(LeaseRow, name) is not None:
                raise StoreError(f"{name!r} is running; stop it first (bnnctl study cancel {name})")
            mine = set(s.scalars(select(StudyVariantRow.variant_key).where(StudyVariantRow.study_id == row.id)))
            shared = set(s.scalars(select(StudyVariantRow.variant_key).where(
                StudyVariantRow.study_id != row.id, StudyVariantRow.variant_key.in_(mine))))
            gone = sorted(mine - shared)
            removed = [variant_of(v) for v in s.scalars(select(VariantRow).where(VariantRow.key.in_(gone)))]
            s.execute(delete(StudyVariantRow).where(StudyVariantRow.study_id == row.id))
            s.execute(delete(MetricRow).where(MetricRow.variant_key.in_(gone)))
            s.execute(delete(AttemptRow).where(AttemptRow.variant_key.in_(gone)))
            s.execute(delete(VariantRow).where(VariantRow.key.in_(gone)))
            s.delete(row)
            return removed, len(shared)

    def add_member(self, study_id: int, member: Member) -> None:
        """Add one variant to a study (a tuning adds its trials one by one); no-op if present."""
        with self.session() as s:
            found = s.scalar(select(StudyVariantRow).where(
                StudyVariantRow.study_id == study_id, StudyVariantRow.ablation == member.ablation,
                StudyVariantRow.row == member.row, StudyVariantRow.seed == member.seed))
            if found is None:
                s.add(StudyVariantRow(study_id=study_id, variant_key=member.variant_key, ablation=member.ablation,
                                      row=member.row, seed=member.seed))
            elif found.variant_key != member.variant_key:
                found.variant_key = member.variant_key

    def members(self, study_id: int) -> list[Member]:
        with self.session() as s:
            return [Member(*r) for r in s.execute(
                select(StudyVariantRow.variant_key, StudyVariantRow.ablation, StudyVariantRow.row, StudyVariantRow.seed)
                .where(StudyVariantRow.study_id == study_id).order_by(StudyVariantRow.id))]

    # -- variants ---------------------------------------------------------------------------------
    def ensure_variant(self, key: str, label: str, kind: str, config: dict, deps: list[str]) -> Variant:
        with self.session() as s:
            row = s.get(VariantRow, key)
            if row is None:
                row = VariantRow(key=key, label=label, kind=kind, config=config, deps=deps, status="pending")
                s.add(row)
            else:
                self._asked_again(s, row)
            s.flush()
            return variant_of(row)

    def _asked_again(self, s: Session, row: VariantRow) -> None:
        """A variant a run asks for again: a failed, stopped or interrupted one is retried or resumed;
        a running one's driver died, so its run resumes from its checkpoint."""
        if row.status in ("failed", "stopped", "interrupted"):
            self._move(row, "pending")
            row.error = None
        elif row.status == "running":
            self._move(row, "pending")
            self._end_attempt(s, row.key, "lost", "driver stopped")

    def ensure_variants(self, wanted: list[tuple[str, str, str, dict, list[str]]]) -> None:
        """:meth:`ensure_variant` for many (key, label, kind, config, deps) at once: one transaction
        and two statements per :data:`BATCH` variants (a study's up-front write)."""
        for chunk in _chunks(wanted):
            with self.session() as s:
                found = {r.key: r for r in s.scalars(select(VariantRow).where(VariantRow.key.in_([w[0] for w in chunk])))}
                new = [{"key": key, "label": label, "kind": kind, "config": config, "deps": deps, "status": "pending",
                        "created_at": utcnow(), "updated_at": utcnow()}
                       for key, label, kind, config, deps in chunk if key not in found]
                if new:
                    s.execute(insert(VariantRow), new)
                for row in found.values():
                    self._asked_again(s, row)

    def variant(self, key: str) -> Variant | None:
        with self.session() as s:
            row = s.get(VariantRow, key)
            return variant_of(row) if row else None

    def variants(self, keys: list[str]) -> dict[str, Variant]:
        keys = list(dict.fromkeys(keys))
        with self.session() as s:
            c = s.connection()  # Core rows: the ORM's row processing cost a third of 10,000 variants' read
            return {r.key: _snapshot(r) for chunk in _chunks(keys)
                    for r in c.execute(select(*_VARIANT_COLUMNS).where(VariantRow.key.in_(chunk))).all()}

    @staticmethod
    def _of_study(study_id: int):
        """The keys of a study's variants, as a subquery (reads by study are one query, any size)."""
        return select(StudyVariantRow.variant_key).where(StudyVariantRow.study_id == study_id).scalar_subquery()

    def study_variants(self, study_id: int, config: tuple[str, ...] | None = None) -> dict[str, Variant]:
        """Every variant of a study, in one query. ``config``: only these top-level config values
        are read (in the database: a page that needs two of a config's hundred values does not
        decode the rest); their ``Variant.config`` holds only those."""
        where = VariantRow.key.in_(self._of_study(study_id))
        with self.session() as s:
            c = s.connection()  # Core rows (see variants)
            if config is None:
                return {r.key: _snapshot(r) for r in c.execute(select(*_VARIANT_COLUMNS).where(where)).all()}
            columns = [col for col in _VARIANT_COLUMNS if col.key != "config"]
            parts = [VariantRow.config[name].label(f"config_{i}") for i, name in enumerate(config)]
            out = {}
            for r in c.execute(select(*columns, *parts).where(where)).all():  # one fetch, not one per row
                values = dict(zip(config, r[len(columns):]))
                out[r.key] = _snapshot(r, {k: v for k, v in values.items() if v is not None})
            return out

    def config_texts(self, study_id: int) -> dict[str, str]:
        """The study's variants' configs as JSON text, undecoded (``bnnctl.results()`` reads them
        all at once with pyarrow)."""
        with self.session() as s:
            return dict(s.connection().execute(select(VariantRow.key, cast(VariantRow.config, Text)).where(
                VariantRow.key.in_(self._of_study(study_id)))).all())

    def _of(self, column, keys: list[str] | None, study_id: int | None) -> list:
        """Conditions on a variant-key ``column``: the study ``study_id``'s variants (one condition,
        one query), else the variants ``keys`` (one condition per :data:`BATCH` keys)."""
        if study_id is not None:
            return [column.in_(self._of_study(study_id))]
        return [column.in_(chunk) for chunk in _chunks(list(dict.fromkeys(keys or [])))]

    def attempts_of(self, keys: list[str] | None = None, study_id: int | None = None) -> dict[str, list[Attempt]]:
        """The attempts by variant (in order) of ``keys`` or of the study ``study_id`` (see :meth:`_of`)."""
        out: dict[str, list[Attempt]] = {}
        with self.session() as s:
            for where in self._of(AttemptRow.variant_key, keys, study_id):
                for a in s.scalars(select(AttemptRow).where(where).order_by(AttemptRow.variant_key, AttemptRow.number)):
                    out.setdefault(a.variant_key, []).append(attempt_of(a))
        return out

    def attempt_counts(self, keys: list[str] | None = None, study_id: int | None = None) -> dict[str, int]:
        """How many attempts each variant has had (absent: none), of ``keys`` or of the study
        ``study_id`` (see :meth:`_of`)."""
        with self.session() as s:
            return {k: n for where in self._of(AttemptRow.variant_key, keys, study_id) for k, n in s.execute(
                select(AttemptRow.variant_key, func.count()).where(where).group_by(AttemptRow.variant_key))}

    def study_states(self, study_id: int) -> dict[str, str]:
        """Each variant of a study and its state, in one query that reads an index only."""
        with self.session() as s:
            return dict(s.execute(select(VariantRow.key, VariantRow.status).where(
                VariantRow.key.in_(self._of_study(study_id)))).all())

    def study_counts(self) -> dict[int, tuple[dict[str, int], object]]:
        """Per study id: its variants by state, and the last change of any of them; one aggregated
        query over every study (the index page and `study list` count, never load)."""
        out: dict[int, tuple[dict[str, int], object]] = {}
        with self.session() as s:
            q = (select(StudyVariantRow.study_id, VariantRow.status, func.count(func.distinct(VariantRow.key)),
                        func.max(VariantRow.updated_at))
                 .join(VariantRow, VariantRow.key == StudyVariantRow.variant_key)
                 .group_by(StudyVariantRow.study_id, VariantRow.status))
            for study_id, status, n, last in s.execute(q):
                counts, before = out.get(study_id, ({}, None))
                counts[status] = n
                out[study_id] = (counts, last if before is None or (last is not None and last > before) else before)
        return out

    def stamp(self, study_id: int) -> tuple | None:
        """The study's last-change stamp: it changes whenever anything its pages show changes (its
        row, its membership, a variant's state, result or metrics); one aggregated query. None when
        the study is gone."""
        with self.session() as s:
            study = s.get(StudyRow, study_id)
            if study is None:
                return None
            members = s.execute(select(func.count(), func.max(StudyVariantRow.id))
                                .where(StudyVariantRow.study_id == study_id)).one()
            last = s.scalar(select(func.max(VariantRow.updated_at)).where(VariantRow.key.in_(self._of_study(study_id))))
            return (study.id, study.status, str(study.updated_at), *members, str(last))

    @staticmethod
    def _move(row: VariantRow, new: str) -> None:
        """Change a variant's state, enforcing TRANSITIONS."""
        if new not in TRANSITIONS[row.status]:
            if row.status == "completed":
                raise StoreError(f"variant {row.key} is completed; it is never trained again")
            raise StoreError(f"variant {row.key}: forbidden state change {row.status} -> {new} "
                             f"(allowed from {row.status}: {', '.join(sorted(TRANSITIONS[row.status])) or 'none'})")
        row.status, row.updated_at = new, utcnow()

    def _get(self, s: Session, key: str) -> VariantRow:
        row = s.get(VariantRow, key)
        if row is None:
            raise StoreError(f"no variant {key} in {self.display_url}")
        return row

    def start_attempt(self, key: str, node: str | None, checkpoint_dir: str) -> int:
        """pending -> running, with a new attempt row; returns the attempt's number."""
        with self.session() as s:
            row = self._get(s, key)
            self._move(row, "running")
            number = (s.scalar(select(func.max(AttemptRow.number)).where(AttemptRow.variant_key == key)) or 0) + 1
            s.add(AttemptRow(variant_key=key, number=number, status="running", node=node))
            row.checkpoint_dir = checkpoint_dir
            return number

    def _end_attempt(self, s: Session, key: str, status: str, error: str | None) -> None:
        attempt = s.scalar(select(AttemptRow).where(AttemptRow.variant_key == key, AttemptRow.status == "running")
                           .order_by(AttemptRow.number.desc()))
        if attempt is not None:
            attempt.status, attempt.error, attempt.ended_at = status, error, utcnow()

    def finish(self, key: str, result: dict) -> None:
        """running -> completed with its result (final)."""
        with self.session() as s:
            row = self._get(s, key)
            self._move(row, "completed")
            row.result, row.error = result, None
            self._end_attempt(s, key, "completed", None)

    def fail(self, key: str, error: str) -> None:
        """running -> failed with the reason."""
        with self.session() as s:
            row = self._get(s, key)
            self._move(row, "failed")
            row.error = error
            self._end_attempt(s, key, "failed", error)

    def stop(self, key: str, result: dict) -> None:
        """running -> stopped: the run was stopped early on request (a pruned trial); its partial
        result is kept."""
        with self.session() as s:
            row = self._get(s, key)
            self._move(row, "stopped")
            row.result, row.error = result, None
            self._end_attempt(s, key, "stopped", None)

    def requeue(self, key: str, error: str) -> None:
        """running -> pending: the worker was lost (or the study cancelled); the attempt ends 'lost'
        and the variant resumes from its checkpoint later."""
        with self.session() as s:
            row = self._get(s, key)
            self._move(row, "pending")
            self._end_attempt(s, key, "lost", error)

    def interrupt(self, key: str, reason: str) -> None:
        """running -> interrupted: its driver was interrupted (Ctrl-C, SIGTERM) and stopped it; the
        attempt ends 'interrupted' and the next run resumes the variant from its checkpoint."""
        with self.session() as s:
            row = self._get(s, key)
            if row.status == "running":
                self._move(row, "interrupted")
                self._end_attempt(s, key, "interrupted", reason)

    def set_attempt_node(self, key: str, node: str, node_id: str | None = None) -> None:
        """Record where the variant's running attempt runs (its worker announced itself)."""
        from sqlalchemy import update
        from sqlalchemy.orm import aliased

        other = aliased(AttemptRow)  # the subquery reads the table on its own (not correlated to the update)
        latest = select(func.max(other.number)).where(other.variant_key == key, other.status == "running")
        with self.session() as s:  # one statement: the latest running attempt
            s.execute(update(AttemptRow).where(AttemptRow.variant_key == key, AttemptRow.status == "running",
                                               AttemptRow.number == latest.scalar_subquery())
                      .values(node=node, node_id=node_id))

    def set_latency(self, keys: list[str], latency: dict) -> None:
        """The one change a completed variant's result may get: its deployed model's latency,
        measured again at the end of a study on a quiet worker (``latency["quiet"]``); the rest of
        the result is as its training wrote it."""
        with self.session() as s:
            for chunk in _chunks(list(keys)):
                for row in s.scalars(select(VariantRow).where(VariantRow.key.in_(chunk),
                                                              VariantRow.status == "completed")).all():
                    row.result = {**(row.result or {}), "latency": dict(latency)}
                    row.updated_at = utcnow()

    def set_mlflow_run(self, key: str, run_id: str) -> None:
        with self.session() as s:
            s.get(VariantRow, key).mlflow_run_id = run_id

    def attempts(self, key: str) -> list[Attempt]:
        with self.session() as s:
            return [attempt_of(a) for a in s.scalars(select(AttemptRow).where(AttemptRow.variant_key == key)
                                                    .order_by(AttemptRow.number))]

    # -- leases: one driver per study or tuning -----------------------------------------------------
    def acquire_lease(self, name: str, holder: str, token: str, timeout_s: float, takeover: bool = False,
                      replace: str | None = None) -> Lease:
        """Take the lease of ``name`` for ``holder``: free, already ours (same token), expired (no
        heartbeat for ``timeout_s``), still held under the token ``replace`` (a holder known to be
        dead), or forced (``takeover``). Atomic on sqlite and PostgreSQL (an insert, else one
        conditional update). Raises LeaseHeld naming the live holder."""
        from sqlalchemy import or_, update
        from sqlalchemy.exc import IntegrityError

        now = utcnow()
        try:
            with self._sessions() as s, s.begin():
                s.add(LeaseRow(name=name, holder=holder, token=token, acquired_at=now, heartbeat_at=now))
            return Lease(name, holder, token, now, now)
        except IntegrityError:
            pass  # someone holds (or held) it: take it over only if allowed
        except SQLAlchemyError as err:
            raise StoreError(mask_text(f"state database error ({self.display_url}): {err}")) from None
        with self.session() as s:
            stale = now - timedelta(seconds=timeout_s)
            cond = [LeaseRow.name == name]
            if not takeover:
                cond.append(or_(LeaseRow.token == token, LeaseRow.heartbeat_at < stale,
                                LeaseRow.token == (replace or token)))
            taken = s.execute(update(LeaseRow).where(*cond).values(holder=holder, token=token, acquired_at=now,
                                                                    heartbeat_at=now)).rowcount
            if taken:
                return Lease(name, holder, token, now, now)
            row = s.get(LeaseRow, name)
            held = Lease(row.name, row.holder, row.token, row.acquired_at, row.heartbeat_at)
        raise LeaseHeld(held, timeout_s)

    def renew_lease(self, name: str, token: str) -> bool:
        """Heartbeat; False when the lease is no longer ours (another driver took it over)."""
        from sqlalchemy import update

        with self.session() as s:
            return bool(s.execute(update(LeaseRow).where(LeaseRow.name == name, LeaseRow.token == token)
                                  .values(heartbeat_at=utcnow())).rowcount)

    def release_lease(self, name: str, token: str) -> None:
        from sqlalchemy import delete

        with self.session() as s:
            s.execute(delete(LeaseRow).where(LeaseRow.name == name, LeaseRow.token == token))

    def lease(self, name: str) -> Lease | None:
        with self.session() as s:
            row = s.get(LeaseRow, name)
            return Lease(row.name, row.holder, row.token, row.acquired_at, row.heartbeat_at) if row else None

    # -- metrics ----------------------------------------------------------------------------------
    def log_metrics(self, key: str, epoch: int, metrics: dict[str, float]) -> None:
        """An epoch's metrics of a variant (statements, not ORM objects: one per epoch of every
        variant goes through the driver's loop)."""
        from sqlalchemy import update

        this = (MetricRow.variant_key == key, MetricRow.epoch == epoch)
        with self.session() as s:
            existing = set(s.scalars(select(MetricRow.name).where(*this)))
            new = [{"variant_key": key, "epoch": epoch, "name": name, "value": float(value)}
                   for name, value in metrics.items() if name not in existing]
            if new:
                s.execute(insert(MetricRow), new)
            for name in existing.intersection(metrics):  # an epoch re-run after a resume: keep the latest value
                s.execute(update(MetricRow).where(*this, MetricRow.name == name).values(value=float(metrics[name])))
            # its pages changed: the study's stamp moves (see `stamp`)
            s.execute(update(VariantRow).where(VariantRow.key == key).values(updated_at=utcnow()))

    def metric_epochs(self, key: str) -> set[int]:
        """The epochs of a variant that have metrics recorded."""
        with self.session() as s:
            return set(s.scalars(select(MetricRow.epoch).where(MetricRow.variant_key == key).distinct()))

    def metrics(self, key: str) -> dict[str, list[tuple[int, float]]]:
        return self.metrics_of([key]).get(key, {})

    def metrics_of(self, keys: list[str], names: list[str] | None = None, study_id: int | None = None,
                   state: str | None = None) -> dict[str, dict[str, list[tuple[int, float]]]]:
        """Per variant, its metrics' histories ({name: [(epoch, value)]}), only ``names`` when
        given; the variants of ``keys``, or of the study ``study_id`` (those in ``state`` when
        given), in one query at any size."""
        out: dict[str, dict[str, list[tuple[int, float]]]] = {}
        columns = (MetricRow.variant_key, MetricRow.name, MetricRow.epoch, MetricRow.value)
        where = [] if names is None else [MetricRow.name.in_(names)]
        if study_id is not None and state is not None:
            where.append(MetricRow.variant_key.in_(select(VariantRow.key).where(
                VariantRow.key.in_(self._of_study(study_id)), VariantRow.status == state).scalar_subquery()))
        with self.session() as s:
            for batch in self._of(MetricRow.variant_key, keys, study_id):
                for key, name, epoch, value in s.connection().execute(select(*columns).where(batch, *where).order_by(
                        MetricRow.variant_key, MetricRow.epoch)).all():
                    out.setdefault(key, {}).setdefault(name, []).append((epoch, value))
        return out

