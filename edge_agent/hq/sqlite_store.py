"""HQ's store of record on SQLite: one file, for a single HQ process (the default, and the tests')."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..sync.outbox import add_missing_columns
from .store import HqStore, Tx, Unstorable

# Columns the releases before versioned migrations added in place (CREATE TABLE IF NOT EXISTS, then
# these): a database they made may lack any of them, and gets them when it is adopted as version 1.
UNVERSIONED_COLUMNS = (
    ("streams", "last_id", "TEXT NOT NULL DEFAULT ''"),
    ("streams", "hwm", "INTEGER NOT NULL DEFAULT 0"),
    ("streams", "rewinds", "INTEGER NOT NULL DEFAULT 0"),
    ("streams", "replays", "INTEGER NOT NULL DEFAULT 0"),
    ("status", "instance", "TEXT NOT NULL DEFAULT ''"),
    ("status", "identity_conflicts", "INTEGER NOT NULL DEFAULT 0"),
    ("snapshot_parts", "as_of_id", "TEXT NOT NULL DEFAULT ''"),
)


class SqliteStore(HqStore):
    dialect = "sqlite"
    outage = (sqlite3.OperationalError,)  # disk full, I/O error, locked past the timeout

    def __init__(self, path: Path | str, synchronous: str = "FULL") -> None:
        super().__init__()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={synchronous}")
        # PostgreSQL's name for the two-argument max, so the applier's SQL is one text for both.
        self.conn.create_function("greatest", 2, max, deterministic=True)
        self.migrate()

    @contextmanager
    def _transaction(self, nested: bool) -> Iterator[Tx]:
        self.conn.execute("SAVEPOINT tx" if nested else "BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException as e:
            self.conn.execute("ROLLBACK TO tx" if nested else "ROLLBACK")
            if nested:
                self.conn.execute("RELEASE tx")
            if isinstance(e, OverflowError):  # a Python int past SQLite's 64 bits
                raise Unstorable(str(e)) from e
            raise
        self.conn.execute("RELEASE tx" if nested else "COMMIT")

    def _tx(self) -> Tx:
        return self.conn

    def _lock_stores(self, c: Tx, stores: list[str]) -> None:
        """Nothing: BEGIN IMMEDIATE already holds the whole file against other writers."""

    def _lock_all(self, c: Tx) -> None:
        """Nothing: as above."""

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self.lock:
            return self.conn.execute(sql, params).fetchall()

    def _script(self, c: Tx, sql: str) -> None:
        # Statement by statement: executescript would commit the open transaction first.
        stmt = ""
        for line in sql.splitlines(keepends=True):
            stmt += line
            if sqlite3.complete_statement(stmt):
                c.execute(stmt)
                stmt = ""
        if stmt.strip():
            c.execute(stmt)  # a last statement without its ";" (or a trailing comment)

    def _make_partitions(self, c: Tx, days: set[int]) -> None:
        """SQLite has no partitioning: one table, indexed by day."""

    def _drop_days(self, c: Tx, before: int) -> tuple[list[int], int | None]:
        days = [d for (d,) in c.execute("SELECT DISTINCT day FROM telemetry WHERE day < ? ORDER BY day", (before,))]
        return days, c.execute("DELETE FROM telemetry WHERE day < ?", (before,)).rowcount

    def _adopt(self, c: Tx) -> None:
        add_missing_columns(self.conn, UNVERSIONED_COLUMNS)  # the connection c is
