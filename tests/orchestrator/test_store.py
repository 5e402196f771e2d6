"""The state store's schema: versioning and the migration from schema 1 (unprefixed tables)."""
import sqlite3

import pytest

from bnnctl.orchestrator.errors import StoreError
from bnnctl.orchestrator.store import SCHEMA_VERSION, Store

# The DDL bnnctl 0.1 (schema 1) wrote, with one study, one completed variant, its attempt and a metric.
V1 = """
CREATE TABLE schema_info (id INTEGER NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (id));
CREATE TABLE studies (id INTEGER NOT NULL, name VARCHAR(200) NOT NULL, spec_file TEXT NOT NULL,
  spec_hash VARCHAR(64) NOT NULL, spec JSON NOT NULL, status VARCHAR(20) NOT NULL, mlflow_run_id VARCHAR(64),
  created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL, PRIMARY KEY (id), UNIQUE (name));
CREATE TABLE variants ("key" VARCHAR(64) NOT NULL, label TEXT NOT NULL, kind VARCHAR(20) NOT NULL,
  config JSON NOT NULL, deps JSON NOT NULL, status VARCHAR(20) NOT NULL, result JSON, error TEXT,
  checkpoint_dir TEXT, mlflow_run_id VARCHAR(64), created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL,
  PRIMARY KEY ("key"));
CREATE TABLE study_variants (id INTEGER NOT NULL, study_id INTEGER NOT NULL, variant_key VARCHAR(64) NOT NULL,
  ablation TEXT, "row" TEXT, seed INTEGER NOT NULL, PRIMARY KEY (id), UNIQUE (study_id, ablation, "row", seed),
  FOREIGN KEY(study_id) REFERENCES studies (id) ON DELETE CASCADE, FOREIGN KEY(variant_key) REFERENCES variants ("key"));
CREATE TABLE attempts (id INTEGER NOT NULL, variant_key VARCHAR(64) NOT NULL, number INTEGER NOT NULL,
  status VARCHAR(20) NOT NULL, node VARCHAR(200), error TEXT, started_at DATETIME NOT NULL, ended_at DATETIME,
  PRIMARY KEY (id), FOREIGN KEY(variant_key) REFERENCES variants ("key"));
CREATE TABLE metrics (id INTEGER NOT NULL, variant_key VARCHAR(64) NOT NULL, epoch INTEGER NOT NULL,
  name VARCHAR(100) NOT NULL, value FLOAT NOT NULL, PRIMARY KEY (id), UNIQUE (variant_key, epoch, name),
  FOREIGN KEY(variant_key) REFERENCES variants ("key"));
INSERT INTO schema_info VALUES (1, 1);
INSERT INTO studies VALUES (1, 'old', 'studies/old.yaml', 'abc', '{"seeds": [0]}', 'completed', NULL,
  '2026-11-01 10:00:00', '2026-11-01 11:00:00');
INSERT INTO variants VALUES ('k1', 'old / row / seed 0', 'row', '{"epochs": 2}', '[]', 'completed',
  '{"metric": "pckh", "metrics": {"pckh": 41.5}}', NULL, '/tmp/k1', NULL, '2026-11-01 10:00:00', '2026-11-01 11:00:00');
INSERT INTO study_variants VALUES (1, 1, 'k1', 'ab', 'row', 0);
INSERT INTO attempts VALUES (1, 'k1', 1, 'completed', 'host', NULL, '2026-11-01 10:00:00', '2026-11-01 11:00:00');
INSERT INTO metrics VALUES (1, 'k1', 1, 'pckh', 41.5);
"""


def _tables(path):
    with sqlite3.connect(path) as c:
        return {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_schema_1_database_is_migrated_in_place_keeping_everything(tmp_path):
    db = tmp_path / "state.db"
    with sqlite3.connect(db) as c:
        c.executescript(V1)
    store = Store(f"sqlite:///{db}")
    assert {"bnnctl_studies", "bnnctl_variants", "bnnctl_schema_info"} <= _tables(db)
    assert not {"studies", "variants", "schema_info"} & _tables(db)  # free for Optuna's tables
    study = store.study("old")
    assert (study.status, study.spec) == ("completed", {"seeds": [0]})
    v = store.variant("k1")
    assert (v.status, v.result["metrics"]["pckh"]) == ("completed", 41.5)
    assert [m.variant_key for m in store.members(study.id)] == ["k1"]
    assert store.metrics("k1") == {"pckh": [(1, 41.5)]}
    assert [a.status for a in store.attempts("k1")] == ["completed"]
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT version FROM bnnctl_schema_info").fetchone()[0] == SCHEMA_VERSION == 4
        assert "node_id" in {r[1] for r in c.execute("PRAGMA table_info(bnnctl_attempts)")}  # schema 3
        # foreign keys follow the renamed tables
        fks = {r[2] for r in c.execute("PRAGMA foreign_key_list(bnnctl_study_variants)")}
    assert fks == {"bnnctl_studies", "bnnctl_variants"}
    Store(f"sqlite:///{db}")  # opening again is a no-op


def test_a_database_from_a_newer_bnnctl_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    Store(url)
    with sqlite3.connect(tmp_path / "state.db") as c:
        c.execute("UPDATE bnnctl_schema_info SET version = 99")
    with pytest.raises(StoreError, match="newer bnnctl"):
        Store(url)


def test_optuna_tables_share_the_database(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'state.db'}"
    store = Store(url)
    store.upsert_study("s", "s.yaml", "h", {})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s", storage=url)
    study.enqueue_trial({"x": 1.0})
    assert {"studies", "trials", "bnnctl_studies"} <= _tables(tmp_path / "state.db")
    assert Store(url).study("s").name == "s" and len(study.trials) == 1
