"""HQ's store of record: versioned migrations on both backends, and SQLite databases made before them."""

from __future__ import annotations

import sqlite3
from importlib import resources
from pathlib import Path

import pytest

from edge_agent.clock import VirtualClock
from edge_agent.config import ConfigError, HqFileConfig, load_config
from edge_agent.hq.applier import HqApplier
from edge_agent.hq.sqlite_store import SqliteStore
from edge_agent.inventory.book import Delta, InventoryBook
from edge_agent.sync.outbox import Outbox

from .helpers import HqBackend

T0 = 1_767_225_600.0
# The first release's tables that later releases widened in place (they lacked the columns of
# sqlite_store.UNVERSIONED_COLUMNS); its other tables are as version 1 has them, and some did not exist yet.
FIRST_RELEASE = """
CREATE TABLE streams(
  store TEXT NOT NULL, stream TEXT NOT NULL, last_seq INTEGER NOT NULL DEFAULT 0,
  applied INTEGER NOT NULL DEFAULT 0, facts INTEGER NOT NULL DEFAULT 0, historical INTEGER NOT NULL DEFAULT 0,
  duplicates INTEGER NOT NULL DEFAULT 0, gaps INTEGER NOT NULL DEFAULT 0, lost INTEGER NOT NULL DEFAULT 0,
  last_ts REAL, last_sent REAL, last_applied_at REAL, PRIMARY KEY(store, stream)) WITHOUT ROWID;
CREATE TABLE status(store TEXT PRIMARY KEY, state TEXT NOT NULL, boot_id TEXT, connection INTEGER, at REAL NOT NULL);
CREATE TABLE inventory(
  store TEXT NOT NULL, zone TEXT NOT NULL, gtin TEXT NOT NULL, qty INTEGER NOT NULL,
  PRIMARY KEY(store, zone, gtin)) WITHOUT ROWID;
INSERT INTO streams(store, stream, last_seq, applied) VALUES ('S001', 'inventory/delta', 0, 0);
INSERT INTO inventory VALUES ('S002', 'salesfloor', '04000000000006', 7);
"""
LAST_UNVERSIONED = resources.files("edge_agent.hq").joinpath("migrations/sqlite/0001_initial.sql").read_text() + """
INSERT INTO streams(store, stream) VALUES ('S001', 'inventory/delta');
INSERT INTO inventory VALUES ('S002', 'salesfloor', '04000000000006', 7);
"""

# Every migration this release ships, in order (both dialects have the same numbers).
VERSIONS = sorted(int(f.name[:4]) for f in (Path(__file__).parents[1] / "edge_agent/hq/migrations/sqlite").glob("*.sql"))


@pytest.mark.parametrize("schema", [FIRST_RELEASE, LAST_UNVERSIONED], ids=["first-release", "last-unversioned"])
def test_a_database_made_before_versioned_migrations_is_adopted_and_keeps_its_rows(tmp_path: Path, schema: str) -> None:
    with sqlite3.connect(tmp_path / "hq.db") as old:
        old.executescript(schema)
    old.close()
    store = SqliteStore(tmp_path / "hq.db")
    assert [v for v, _ in store.read("SELECT version, name FROM schema_version")] == VERSIONS
    assert store.inventory("S002") == {("salesfloor", "04000000000006"): 7}
    # The applier runs on it: columns added in place, tables created, and the old row of S001 taken up.
    clock = VirtualClock(T0)
    ob = Outbox(tmp_path / "agent.db", clock)
    InventoryBook(ob, clock).apply([Delta(T0, "salesfloor", "04000000000006", 3)])
    m = ob.seal("inventory/delta")
    assert m is not None
    hq = HqApplier(store, clock, prefix="retail/v1")
    hq.receive("retail/v1/S001/inventory/delta", m.payload("S001", T0, False))
    assert store.read("SELECT last_seq, last_id, hwm FROM streams WHERE store = 'S001'") == [(1, m.id, 1)]
    assert store.inventory("S001") == {("salesfloor", "04000000000006"): 3}
    store.close()
    ob.close()


def test_migrations_run_once_and_a_newer_database_is_refused(hq_backend: HqBackend) -> None:
    store = hq_backend.store()
    assert store.migrate() == VERSIONS[-1]  # again: nothing left to apply
    assert [v for (v,) in store.read("SELECT version FROM schema_version")] == VERSIONS
    future = VERSIONS[-1] + 1
    with store.tx() as c:
        c.execute("INSERT INTO schema_version(version, name, applied_at) VALUES (?,?,?)",
                  (future, f"{future:04d}_future.sql", T0))
    store.close()
    with pytest.raises(RuntimeError, match=f"schema version {future}"):
        hq_backend.store()


def test_a_value_the_database_cannot_hold_rolls_back_the_whole_transaction(hq_backend: HqBackend) -> None:
    store = hq_backend.store()
    with pytest.raises(ValueError), store.tx() as c:
        c.execute("INSERT INTO streams(store, stream, last_seq) VALUES (?,?,?)", ("S001", "health", 5))
        c.execute("UPDATE streams SET last_seq = ? WHERE store = ?", (2**63, "S001"))
    assert store.read("SELECT count(*) FROM streams") == [(0,)]


def test_hq_database_must_be_a_postgresql_uri_and_not_beside_db_path(tmp_path: Path) -> None:
    cfg = tmp_path / "hq.toml"
    cfg.write_text('[hq]\nclient_id = "x"\ndatabase = "hq.db"\n')
    with pytest.raises(ConfigError, match=r"hq.toml:3: hq.database: .*PostgreSQL URI"):
        load_config(cfg, env={}, model=HqFileConfig)
    cfg.write_text('[hq]\ndb_path = "hq.db"\ndatabase = "postgresql://hq@localhost/hq"\n')
    with pytest.raises(ConfigError, match=r"hq.database \(PostgreSQL\) or hq.db_path \(SQLite\), not both"):
        load_config(cfg, env={}, model=HqFileConfig)
    cfg.write_text('[hq]\ndatabase = "postgresql://hq@localhost/hq"\n')
    assert load_config(cfg, env={}, model=HqFileConfig).hq.database == "postgresql://hq@localhost/hq"
