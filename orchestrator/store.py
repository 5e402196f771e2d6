"""The orchestrator's state: studies, variants, attempts and per-epoch metrics (SQLAlchemy 2).

Contract of :class:`Store` (the orchestrator is its only writer; the dashboard only reads):

- A *variant* is one training run identified by its identity hash; it may belong to several studies
  (through ``study_variants``, one row per (study, ablation, row, seed)).
- Variant states: ``pending -> running -> completed | failed``; ``running -> pending`` when its
  worker was lost (the next attempt resumes from the checkpoint); ``failed -> pending`` only when a
  study is run again. ``completed`` is final: a completed variant is never trained again.
- Every state change of a variant is an *attempt* row (number, node, start, end, outcome, error).
- Every write goes through :meth:`Store.session`, which commits, rolls back on error and maps
  database errors to :class:`StoreError`. Reads return plain frozen snapshots, never live ORM objects.
- Default database: sqlite under ``.bnnctl/`` (WAL, busy timeout); any SQLAlchemy URL works
  (PostgreSQL on a cluster). The schema is versioned (``schema_info``): a database written by a newer
  bnnctl is refused rather than misread.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from sqlalchemy import (JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine,
                        event, select)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from .errors import StoreError

SCHEMA_VERSION = 1
DEFAULT_DIR = Path(".bnnctl")
VARIANT_STATES = ("pending", "running", "completed", "failed")
STUDY_STATES = ("pending", "running", "completed", "failed", "cancelled")


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class SchemaInfo(Base):
    __tablename__ = "schema_info"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


class StudyRow(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    spec_file: Mapped[str] = mapped_column(Text)
    spec_hash: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict] = mapped_column(JSON)  # the table layout: ablations, rows, references, seeds
    status: Mapped[str] = mapped_column(String(20), default="pending")
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class VariantRow(Base):
    __tablename__ = "variants"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    label: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(20))
    config: Mapped[dict] = mapped_column(JSON)
    deps: Mapped[list] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    checkpoint_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class StudyVariantRow(Base):
    __tablename__ = "study_variants"
    __table_args__ = (UniqueConstraint("study_id", "ablation", "row", "seed"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    variant_key: Mapped[str] = mapped_column(ForeignKey("variants.key"))
    ablation: Mapped[str | None] = mapped_column(Text, nullable=True)  # None for prerequisites
    row: Mapped[str | None] = mapped_column(Text, nullable=True)
    seed: Mapped[int] = mapped_column(Integer)


class AttemptRow(Base):
    __tablename__ = "attempts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    variant_key: Mapped[str] = mapped_column(ForeignKey("variants.key"))
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20))
    node: Mapped[str | None] = mapped_column(String(200), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class MetricRow(Base):
    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("variant_key", "epoch", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    variant_key: Mapped[str] = mapped_column(ForeignKey("variants.key"))
    epoch: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(100))
    value: Mapped[float] = mapped_column(Float)


# --------------------------------------------------------------------------- snapshots

@dataclass(frozen=True)
class Study:
    id: int
    name: str
    spec_file: str
    spec_hash: str
    spec: dict
    status: str
    mlflow_run_id: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    kind: str
    config: dict
    deps: list
    status: str
    result: dict | None
    error: str | None
    checkpoint_dir: str | None
    mlflow_run_id: str | None
    updated_at: datetime


@dataclass(frozen=True)
class Attempt:
    variant_key: str
    number: int
    status: str
    node: str | None
    error: str | None
    started_at: datetime
    ended_at: datetime | None


@dataclass(frozen=True)
class Member:
    """A variant's place in a study's tables."""

    variant_key: str
    ablation: str | None
    row: str | None
    seed: int


def _study(r: StudyRow) -> Study:
    return Study(r.id, r.name, r.spec_file, r.spec_hash, dict(r.spec), r.status, r.mlflow_run_id, r.created_at, r.updated_at)


def _variant(r: VariantRow) -> Variant:
    return Variant(r.key, r.label, r.kind, dict(r.config), list(r.deps), r.status, r.result, r.error,
                   r.checkpoint_dir, r.mlflow_run_id, r.updated_at)


def default_url() -> str:
    return os.environ.get("BNNCTL_DB") or f"sqlite:///{(DEFAULT_DIR / 'state.db').resolve()}"


class Store:
    """The SQL implementation of the state store (see the module docstring for the contract)."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url or default_url()
        if self.url.startswith("sqlite:///"):
            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine = create_engine(self.url, connect_args={"timeout": 30} if self.url.startswith("sqlite") else {})
        except (SQLAlchemyError, ImportError) as err:
            raise StoreError(f"cannot open the state database {self.url}: {err}") from None
        if self.url.startswith("sqlite"):
            @event.listens_for(self.engine, "connect")
            def _pragmas(conn, _record) -> None:  # WAL lets the dashboard read while the orchestrator writes
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._migrate()

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
            raise StoreError(f"state database error ({self.url}): {err.__class__.__name__}: {err}") from None
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def _migrate(self) -> None:
        # Two processes may open a new database at once (a driver and `bnnctl study status`): the
        # loser of the CREATE TABLE race sees "already exists"; trying again finds the tables there.
        for attempt in range(3):
            try:
                Base.metadata.create_all(self.engine)
                break
            except SQLAlchemyError as err:
                if attempt == 2:
                    raise StoreError(f"cannot create the state tables in {self.url}: {err}") from None
                time.sleep(0.2)
        try:
            with self.session() as s:
                if s.get(SchemaInfo, 1) is None:
                    s.add(SchemaInfo(id=1, version=SCHEMA_VERSION))
        except StoreError:  # another opener inserted the row first: fine, it is read below
            pass
        with self.session() as s:
            info = s.get(SchemaInfo, 1)
            if info is None:
                raise StoreError(f"cannot record the schema version in {self.url}")
            if info.version > SCHEMA_VERSION:
                raise StoreError(f"{self.url} was written by a newer bnnctl (schema {info.version} > "
                                 f"{SCHEMA_VERSION}); upgrade bnnctl to read it")
            # future versions: migrate from info.version step by step here

    # -- studies ----------------------------------------------------------------------------------
    def upsert_study(self, name: str, spec_file: str, spec_hash: str, spec: dict) -> Study:
        with self.session() as s:
            row = s.scalar(select(StudyRow).where(StudyRow.name == name))
            if row is None:
                row = StudyRow(name=name, spec_file=spec_file, spec_hash=spec_hash, spec=spec, status="pending")
                s.add(row)
            else:
                row.spec_file, row.spec_hash, row.spec, row.updated_at = spec_file, spec_hash, spec, _now()
            s.flush()
            return _study(row)

    def study(self, name_or_id: str | int) -> Study | None:
        with self.session() as s:
            q = select(StudyRow).where(StudyRow.id == int(name_or_id)) if str(name_or_id).isdigit() \
                else select(StudyRow).where(StudyRow.name == str(name_or_id))
            row = s.scalar(q)
            return _study(row) if row else None

    def studies(self) -> list[Study]:
        with self.session() as s:
            return [_study(r) for r in s.scalars(select(StudyRow).order_by(StudyRow.id))]

    def set_study_status(self, study_id: int, status: str, mlflow_run_id: str | None = None) -> None:
        assert status in STUDY_STATES, status
        with self.session() as s:
            row = s.get(StudyRow, study_id)
            row.status, row.updated_at = status, _now()
            if mlflow_run_id:
                row.mlflow_run_id = mlflow_run_id

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
            for m in members:
                if (m.ablation, m.row, m.seed, m.variant_key) not in existing:
                    s.add(StudyVariantRow(study_id=study_id, variant_key=m.variant_key, ablation=m.ablation,
                                          row=m.row, seed=m.seed))

    def members(self, study_id: int) -> list[Member]:
        with self.session() as s:
            return [Member(r.variant_key, r.ablation, r.row, r.seed)
                    for r in s.scalars(select(StudyVariantRow).where(StudyVariantRow.study_id == study_id)
                                       .order_by(StudyVariantRow.id))]

    # -- variants ---------------------------------------------------------------------------------
    def ensure_variant(self, key: str, label: str, kind: str, config: dict, deps: list[str]) -> Variant:
        with self.session() as s:
            row = s.get(VariantRow, key)
            if row is None:
                row = VariantRow(key=key, label=label, kind=kind, config=config, deps=deps, status="pending")
                s.add(row)
            elif row.status == "failed":  # a new run of the study retries failed variants
                row.status, row.error, row.updated_at = "pending", None, _now()
            elif row.status == "running":  # the previous driver died: the run resumes from its checkpoint
                row.status, row.updated_at = "pending", _now()
            s.flush()
            return _variant(row)

    def variant(self, key: str) -> Variant | None:
        with self.session() as s:
            row = s.get(VariantRow, key)
            return _variant(row) if row else None

    def variants(self, keys: list[str]) -> dict[str, Variant]:
        with self.session() as s:
            return {r.key: _variant(r) for r in s.scalars(select(VariantRow).where(VariantRow.key.in_(keys)))}

    def start_attempt(self, key: str, node: str | None, checkpoint_dir: str) -> int:
        with self.session() as s:
            row = s.get(VariantRow, key)
            if row.status == "completed":
                raise StoreError(f"variant {key} is completed; it is never trained again")
            number = len(s.scalars(select(AttemptRow).where(AttemptRow.variant_key == key)).all()) + 1
            s.add(AttemptRow(variant_key=key, number=number, status="running", node=node))
            row.status, row.checkpoint_dir, row.updated_at = "running", checkpoint_dir, _now()
            return number

    def _end_attempt(self, s: Session, key: str, status: str, error: str | None) -> None:
        attempt = s.scalar(select(AttemptRow).where(AttemptRow.variant_key == key, AttemptRow.status == "running")
                           .order_by(AttemptRow.number.desc()))
        if attempt is not None:
            attempt.status, attempt.error, attempt.ended_at = status, error, _now()

    def finish(self, key: str, result: dict) -> None:
        with self.session() as s:
            row = s.get(VariantRow, key)
            row.status, row.result, row.error, row.updated_at = "completed", result, None, _now()
            self._end_attempt(s, key, "completed", None)

    def fail(self, key: str, error: str) -> None:
        with self.session() as s:
            row = s.get(VariantRow, key)
            row.status, row.error, row.updated_at = "failed", error, _now()
            self._end_attempt(s, key, "failed", error)

    def requeue(self, key: str, error: str) -> None:
        """The worker was lost: the attempt failed, the variant goes back to pending (it will resume)."""
        with self.session() as s:
            row = s.get(VariantRow, key)
            row.status, row.updated_at = "pending", _now()
            self._end_attempt(s, key, "lost", error)

    def set_mlflow_run(self, key: str, run_id: str) -> None:
        with self.session() as s:
            s.get(VariantRow, key).mlflow_run_id = run_id

    def attempts(self, key: str) -> list[Attempt]:
        with self.session() as s:
            return [Attempt(a.variant_key, a.number, a.status, a.node, a.error, a.started_at, a.ended_at)
                    for a in s.scalars(select(AttemptRow).where(AttemptRow.variant_key == key).order_by(AttemptRow.number))]

    # -- metrics ----------------------------------------------------------------------------------
    def log_metrics(self, key: str, epoch: int, metrics: dict[str, float]) -> None:
        with self.session() as s:
            existing = {m.name: m for m in s.scalars(select(MetricRow).where(MetricRow.variant_key == key,
                                                                             MetricRow.epoch == epoch))}
            for name, value in metrics.items():
                if name in existing:  # an epoch re-run after a resume: keep the latest value
                    existing[name].value = float(value)
                else:
                    s.add(MetricRow(variant_key=key, epoch=epoch, name=name, value=float(value)))

    def metrics(self, key: str) -> dict[str, list[tuple[int, float]]]:
        with self.session() as s:
            out: dict[str, list[tuple[int, float]]] = {}
            for m in s.scalars(select(MetricRow).where(MetricRow.variant_key == key).order_by(MetricRow.epoch)):
                out.setdefault(m.name, []).append((m.epoch, m.value))
            return out

