"""HQ's store of record on PostgreSQL (psycopg 3): for a chain whose HQ outgrows one file on one box.

Every transaction first takes the advisory lock of each store it writes (``HqStore.tx``), so writers
of one store are serialised as SQLite's BEGIN IMMEDIATE serialises all of them, while receivers apply
different stores' messages side by side: the applier's read-then-write steps (read ``last_seq``,
apply, move it) need no row locks or retries. Migrations take one lock of their own, so two receivers
starting up cannot both migrate. Reads take no lock (autocommit: each sees the last committed state).
A connection lost (a PostgreSQL restart, a network cut) is opened again by the next transaction.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg

from .store import Cursor, HqStore, Tx, Unstorable, store_lock_key

MIGRATION_LOCK = 0x4851_5354_4f52_4500  # pg_advisory_xact_lock key: "HQSTORE\0"


@functools.lru_cache(maxsize=1024)
def _placeholders(sql: str) -> str:
    """The store's ``?`` placeholders as psycopg's ``%s`` (and a literal ``%`` as ``%%``). HQ's SQL has
    no ``?`` inside a string literal."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PgTx:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Cursor:
        # Without parameters psycopg reads no placeholders, and runs several statements (a migration) at once.
        return self._conn.execute(_placeholders(sql), params) if params else self._conn.execute(sql)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(_placeholders(sql), rows)


class PgStore(HqStore):
    dialect = "postgres"
    outage = (psycopg.OperationalError, psycopg.InterfaceError)  # connection lost, server gone, disk full

    def __init__(self, url: str) -> None:
        super().__init__()
        self._url = url
        self._connect()
        self.migrate()

    def _connect(self) -> None:
        self.conn = psycopg.connect(self._url, autocommit=True)
        self._c = _PgTx(self.conn)

    def _alive(self) -> None:
        if self.conn.broken or self.conn.closed:
            self._connect()

    @contextmanager
    def _transaction(self, nested: bool) -> Iterator[Tx]:
        if not nested:
            self._alive()
        try:
            with self.conn.transaction():  # a savepoint when nested
                yield self._c
        except psycopg.DataError as e:  # out of range, a NUL in text, ...: the value, not the database
            raise Unstorable(str(e)) from e

    def _lock_stores(self, c: Tx, stores: list[str]) -> None:
        # One statement: its select list is evaluated left to right, in the order given.
        c.execute("SELECT " + ", ".join(["pg_advisory_xact_lock(?)"] * len(stores)),
                  [store_lock_key(s) for s in stores])

    def _lock_all(self, c: Tx) -> None:
        c.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self.lock:
            self._alive()
            return self._c.execute(sql, params).fetchall()

    def _script(self, c: Tx, sql: str) -> None:
        c.execute(sql)

    def _adopt(self, c: Tx) -> None:
        """Nothing to adopt: HQ on PostgreSQL began with versioned migrations."""
