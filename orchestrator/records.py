"""The state store's schema (SQLAlchemy 2 ORM rows, every table prefixed ``bnnctl_``), how a database
is opened and migrated to it, and the frozen snapshots its reads return (:class:`Study`,
:class:`Variant`, :class:`Attempt`, :class:`Lease`, :class:`Member`). The contract that writes
them is :class:`~bnnctl.orchestrator.store.Store`'s."""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (JSON, DateTime, Engine, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint,
                        create_engine, event, inspect)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .errors import StoreError
from .urls import mask_text

SCHEMA_VERSION = 4
#: Every table is prefixed, so that Optuna's tables (``studies``, ``trials``...) can live in the same
#: database. Schema 1 had unprefixed names; opening such a database renames its tables in place.
#: Schema 3 added ``bnnctl_attempts.node_id`` (the backend's node id beside the host name) and the
#: ``bnnctl_leases`` table (one driver per study). Schema 4 added the indexes of every read path
#: (:data:`INDEXES`): attempts by variant, memberships by variant, a covering index of the variants'
#: states and change times (status counts, last activity, a study's change stamp).
PREFIX = "bnnctl_"
V1_TABLES = ("schema_info", "studies", "variants", "study_variants", "attempts", "metrics")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


#: the indexes of schema 4, by table (the unique constraints index members by study, and metrics by
#: variant and epoch, since schema 1); created by :func:`migrate` on an existing database too
INDEXES = {
    "bnnctl_attempts": [("ix_bnnctl_attempts_variant", ("variant_key", "number"))],
    "bnnctl_study_variants": [("ix_bnnctl_study_variants_variant", ("variant_key",))],
    "bnnctl_variants": [("ix_bnnctl_variants_state", ("key", "status", "updated_at"))],
    "bnnctl_metrics": [("ix_bnnctl_metrics_name", ("variant_key", "name", "epoch"))],
}


def _indexes(table: str) -> tuple:
    return tuple(Index(name, *columns) for name, columns in INDEXES.get(table, ()))


class SchemaInfo(Base):
    __tablename__ = "bnnctl_schema_info"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


class StudyRow(Base):
    __tablename__ = "bnnctl_studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    spec_file: Mapped[str] = mapped_column(Text)
    spec_hash: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict] = mapped_column(JSON)  # the table layout: ablations, rows, references, seeds
    status: Mapped[str] = mapped_column(String(20), default="pending")
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class VariantRow(Base):
    __tablename__ = "bnnctl_variants"
    __table_args__ = _indexes("bnnctl_variants")
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
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class StudyVariantRow(Base):
    __tablename__ = "bnnctl_study_variants"
    __table_args__ = (UniqueConstraint("study_id", "ablation", "row", "seed"), *_indexes("bnnctl_study_variants"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("bnnctl_studies.id", ondelete="CASCADE"))
    variant_key: Mapped[str] = mapped_column(ForeignKey("bnnctl_variants.key"))
    ablation: Mapped[str | None] = mapped_column(Text, nullable=True)  # None for prerequisites
    row: Mapped[str | None] = mapped_column(Text, nullable=True)
    seed: Mapped[int] = mapped_column(Integer)


class AttemptRow(Base):
    __tablename__ = "bnnctl_attempts"
    __table_args__ = _indexes("bnnctl_attempts")
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    variant_key: Mapped[str] = mapped_column(ForeignKey("bnnctl_variants.key"))
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20))
    node: Mapped[str | None] = mapped_column(String(200), nullable=True)  # host name
    node_id: Mapped[str | None] = mapped_column(String(100), nullable=True)  # e.g. Ray's node id
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class LeaseRow(Base):
    """Which driver runs a study or tuning now (one row per name while a driver holds it)."""

    __tablename__ = "bnnctl_leases"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    holder: Mapped[str] = mapped_column(String(300))  # host:pid of the driver
    token: Mapped[str] = mapped_column(String(64))
    acquired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MetricRow(Base):
    __tablename__ = "bnnctl_metrics"
    __table_args__ = (UniqueConstraint("variant_key", "epoch", "name"), *_indexes("bnnctl_metrics"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    variant_key: Mapped[str] = mapped_column(ForeignKey("bnnctl_variants.key"))
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
    spec: dict  # its layout as stored (see layouts.py), with the driver's annotations
    status: str
    mlflow_run_id: str | None
    created_at: datetime
    updated_at: datetime

    @property
    def layout(self):
        """The typed :class:`~bnnctl.orchestrator.layouts.StudyLayout` or ``TuningLayout``."""
        from .layouts import parse

        return parse(self.spec)

    @property
    def kind(self) -> str:
        return "tuning" if (self.spec or {}).get("kind") == "tuning" else "study"


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

    @property
    def shown(self) -> str:
        """The state as a user reads it: a trial the pruner stopped is "pruned" (:func:`shown_state`)."""
        return shown_state(self.kind, self.status)


def shown_state(kind: str, status: str) -> str:
    """A variant's state in what a user reads (CLI, dashboard, MLflow): a trial stopped early is one
    its pruner stopped, so it reads "pruned" as in Optuna; the store keeps "stopped" for both."""
    return "pruned" if kind == "trial" and status == "stopped" else status


def shown_counts(study_kind: str, counts: dict[str, int]) -> dict[str, int]:
    """A study's variants by state as a user reads them: a tuning's stopped variants are its pruned
    trials (its teachers are never stopped early)."""
    if study_kind != "tuning" or "stopped" not in counts:
        return counts
    out = {k: n for k, n in counts.items() if k != "stopped"}
    out["pruned"] = out.get("pruned", 0) + counts["stopped"]
    return out


@dataclass(frozen=True)
class Attempt:
    variant_key: str
    number: int
    status: str
    node: str | None
    error: str | None
    started_at: datetime
    ended_at: datetime | None
    node_id: str | None = None


@dataclass(frozen=True)
class Lease:
    name: str
    holder: str
    token: str
    acquired_at: datetime
    heartbeat_at: datetime


@dataclass(frozen=True)
class Member:
    """A variant's place in a study's tables."""

    variant_key: str
    ablation: str | None
    row: str | None
    seed: int


def study_of(r: StudyRow) -> Study:
    return Study(r.id, r.name, r.spec_file, r.spec_hash, dict(r.spec), r.status, r.mlflow_run_id, r.created_at, r.updated_at)


def attempt_of(a: AttemptRow) -> Attempt:
    return Attempt(a.variant_key, a.number, a.status, a.node, a.error, a.started_at, a.ended_at, a.node_id)


def variant_of(r: VariantRow) -> Variant:
    return Variant(r.key, r.label, r.kind, dict(r.config), list(r.deps), r.status, r.result, r.error,
                   r.checkpoint_dir, r.mlflow_run_id, r.updated_at)


# --------------------------------------------------------------------------- opening and migrating

def open_engine(url: str, engine_url: str, readonly: bool, display_url: str) -> Engine:
    """The engine of the state database at ``url`` (``engine_url``: how to open it, e.g. sqlite
    read-only). sqlite gets WAL (the dashboard reads while the orchestrator writes), a busy timeout
    and foreign keys; a read-only engine on a server makes every transaction read-only."""
    try:
        engine = create_engine(engine_url, connect_args={"timeout": 30} if url.startswith("sqlite") else {})
    except (SQLAlchemyError, ImportError) as err:
        raise StoreError(mask_text(f"cannot open the state database {display_url}: {err}")) from None
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record) -> None:
            cur = conn.cursor()
            if not readonly:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    elif readonly:
        @event.listens_for(engine, "begin")
        def _readonly(conn) -> None:
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
    return engine


def _rename_v1_tables(engine: Engine) -> None:
    """Schema 1 -> 2: prefix the table names (foreign keys follow the renames on SQLite >= 3.26 and
    PostgreSQL), in one transaction."""
    names = set(inspect(engine).get_table_names())
    if "schema_info" not in names or PREFIX + "schema_info" in names:
        return
    with engine.begin() as conn:
        for table in V1_TABLES:
            if table in names:
                conn.exec_driver_sql(f"ALTER TABLE {table} RENAME TO {PREFIX}{table}")
        conn.exec_driver_sql(f"UPDATE {PREFIX}schema_info SET version = 2 WHERE id = 1 AND version = 1")


def _add_v3_columns(engine: Engine) -> None:
    """Schema 2 -> 3: ``bnnctl_attempts.node_id`` (create_all creates tables, never columns)."""
    insp = inspect(engine)
    if PREFIX + "attempts" not in insp.get_table_names():
        return
    if "node_id" not in {c["name"] for c in insp.get_columns(PREFIX + "attempts")}:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"ALTER TABLE {PREFIX}attempts ADD COLUMN node_id VARCHAR(100)")


def _add_v4_indexes(engine: Engine) -> None:
    """Schema 3 -> 4: the read paths' indexes on existing tables (create_all creates indexes only
    with their tables); ``IF NOT EXISTS`` on sqlite and PostgreSQL, so two openers may both run it."""
    from sqlalchemy.schema import CreateIndex

    tables = set(inspect(engine).get_table_names())
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            if table.name in tables:
                for index in table.indexes:
                    conn.execute(CreateIndex(index, if_not_exists=True))


def check_version(session: Callable[[], AbstractContextManager[Session]], display_url: str) -> None:
    """Refuse (StoreError) a database of another schema version; for readers, which never migrate."""
    try:
        with session() as s:
            info = s.get(SchemaInfo, 1)
    except StoreError as err:
        raise StoreError(f"{display_url} is not a bnnctl state database of this version (schema "
                         f"{SCHEMA_VERSION}); open it once with `bnnctl study list` to migrate it ({err})") from None
    if info is None or info.version != SCHEMA_VERSION:
        raise StoreError(f"{display_url} has schema {info.version if info else 'none'}, this bnnctl reads "
                         f"{SCHEMA_VERSION}; `bnnctl study list` migrates an older one")


def migrate(engine: Engine, session: Callable[[], AbstractContextManager[Session]], display_url: str) -> None:
    """Create the tables of a new database, or bring an older one to :data:`SCHEMA_VERSION`;
    refuse one written by a newer bnnctl."""
    # Two processes may open a new database at once (a driver and `bnnctl study status`): the
    # loser of the CREATE TABLE race sees "already exists"; trying again finds the tables there.
    for attempt in range(3):
        try:
            _rename_v1_tables(engine)
            _add_v3_columns(engine)
            Base.metadata.create_all(engine)
            _add_v4_indexes(engine)
            break
        except SQLAlchemyError as err:
            if attempt == 2:
                raise StoreError(f"cannot create the state tables in {display_url}: {err}") from None
            time.sleep(0.2)
    try:
        with session() as s:
            if s.get(SchemaInfo, 1) is None:
                s.add(SchemaInfo(id=1, version=SCHEMA_VERSION))
    except StoreError:  # another opener inserted the row first: fine, it is read below
        pass
    with session() as s:
        info = s.get(SchemaInfo, 1)
        if info is None:
            raise StoreError(f"cannot record the schema version in {display_url}")
        if info.version > SCHEMA_VERSION:
            raise StoreError(f"{display_url} was written by a newer bnnctl (schema {info.version} > "
                             f"{SCHEMA_VERSION}); upgrade bnnctl to read it")
        if info.version < SCHEMA_VERSION:  # the columns were added above; record the new version
            info.version = SCHEMA_VERSION
