"""HQ's store of record on PostgreSQL (psycopg 3): for a chain whose HQ outgrows one file on one box.

Every transaction first takes the advisory lock of each store it writes (``HqStore.tx``), so writers
of one store are serialised as SQLite's BEGIN IMMEDIATE serialises all of them, while receivers apply
different stores' messages side by side: the applier's read-then-write steps (read ``last_seq``,
apply, move it) need no row locks or retries. Migrations take one lock of their own, so two receivers
starting up cannot both migrate. Reads take no lock (autocommit: each sees the last committed state).
A connection lost (a PostgreSQL restart, a network cut) is opened again by the next transaction.

Telemetry's day partitions (``telemetry_dYYYYMMDD``, FOR VALUES FROM (day) TO (day + 1)) are made in the
transaction that first needs one, or ahead by ``ensure_partitions``; the days known to exist are
remembered, and forgotten when a transaction rolls back (its partitions with it). ``expire`` drops the
partitions past the retention: DROP TABLE, so nothing is left to vacuum.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg

from .store import Cursor, HqStore, Tx, Unstorable, store_lock_key
from .telemetry import partition_name

MIGRATION_LOCK = 0x4851_5354_4f52_4500  # pg_advisory_xact_lock key: "HQSTORE\0"
_INSERT_HEAD = re.compile(r"INSERT INTO (\w+)\(([\w, ]+)\)")
_PARTITION = re.compile(r"telemetry_d(\d{8})")
_EPOCH_ORDINAL = datetime(1970, 1, 1, tzinfo=UTC).toordinal()


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
        self._days: set[int] = set()  # telemetry partitions known to exist
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
        except BaseException as e:
            self._days.clear()  # partitions made in it are gone with it
            if isinstance(e, psycopg.DataError):  # out of range, a NUL in text, ...: the value, not the database
                raise Unstorable(str(e)) from e
            raise

    def _tx(self) -> Tx:
        return self._c

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

    def _insert(self, c: Tx, head: str, width: int, rows: list[tuple], tail: str = "") -> None:
        # Many rows as one JSON parameter, typed by the table's own row type: one short statement, where
        # multi-row VALUES is a long text psycopg parses anew each time and executemany a step per row.
        if len(rows) <= 4:
            super()._insert(c, head, width, rows, tail)
            return
        m = _INSERT_HEAD.fullmatch(head)
        assert m is not None, head
        table, cols = m.group(1), [k.strip() for k in m.group(2).split(",")]
        c.execute(f"{head} SELECT {', '.join(cols)} FROM json_populate_recordset(NULL::{table}, ?){tail}",
                  (json.dumps([dict(zip(cols, r, strict=True)) for r in rows]),))

    def _make_partitions(self, c: Tx, days: set[int]) -> None:
        for day in sorted(days - self._days):
            c.execute(f"CREATE TABLE IF NOT EXISTS {partition_name(day)} PARTITION OF telemetry"
                      f" FOR VALUES FROM ({day}) TO ({day + 1})")
            self._days.add(day)

    def _partitions(self, c: Tx) -> dict[int, str]:
        """The day partitions telemetry has: day -> table name."""
        out = {}
        for (name,) in c.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                                 " WHERE i.inhparent = 'telemetry'::regclass"):
            if m := _PARTITION.fullmatch(name):
                out[datetime.strptime(m.group(1), "%Y%m%d").replace(tzinfo=UTC).toordinal() - _EPOCH_ORDINAL] = name
        return out

    def _drop_days(self, c: Tx, before: int) -> tuple[list[int], int | None]:
        names = self._partitions(c)
        days = sorted(d for d in names if d < before)
        for day in days:
            c.execute(f"DROP TABLE {names[day]}")
            self._days.discard(day)
        return days, None

    def _adopt(self, c: Tx) -> None:
        """Nothing to adopt: HQ on PostgreSQL began with versioned migrations."""
