"""HQ's store of record on PostgreSQL (psycopg 3): for a chain whose HQ outgrows one file on one box.

Every transaction first takes one advisory lock, so writers are serialised as SQLite's BEGIN IMMEDIATE
serialises them: the applier's read-then-write steps (read ``last_seq``, apply, move it) need no row
locks or retries, and two HQ processes pointed at one database (or two starting up and migrating it)
cannot interleave. Reads take no lock (autocommit: each sees the last committed state).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg

from .store import Cursor, HqStore, Tx, Unstorable

WRITER_LOCK = 0x4851_5354_4f52_4500  # pg_advisory_xact_lock key: "HQSTORE\0"


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

    def __init__(self, url: str) -> None:
        super().__init__()
        self.conn = psycopg.connect(url, autocommit=True)
        self._c = _PgTx(self.conn)
        self.migrate()

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        with self.lock:
            try:
                with self.conn.transaction():
                    self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITER_LOCK,))
                    yield self._c
            except psycopg.DataError as e:  # out of range, a NUL in text, ...: the value, not the database
                raise Unstorable(str(e)) from e

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self.lock:
            return self._c.execute(sql, params).fetchall()

    def _script(self, c: Tx, sql: str) -> None:
        c.execute(sql)

    def _adopt(self, c: Tx) -> None:
        """Nothing to adopt: HQ on PostgreSQL began with versioned migrations."""
