"""HQ's store of record: applied state and, per (store, stream), the last applied seq.

State and ``last_seq`` change in the same transaction, so a message is applied exactly once however
often the broker redelivers it and wherever the receiver is killed.

One applier runs on either backend (SQLite: ``sqlite_store.py``, PostgreSQL: ``pg_store.py``) through
``HqStore``: a transaction, a read, and SQL in the one dialect both run: ``?`` placeholders, ``ON
CONFLICT`` upserts, ``greatest(a, b)`` (PostgreSQL's own, a registered function in SQLite), target
columns qualified in ``DO UPDATE`` (PostgreSQL reads a bare name as ambiguous with ``excluded``).
A value the backend cannot hold raises ``Unstorable`` and rolls its transaction back, on both.

The schema is versioned: ``migrations/<dialect>/NNNN_name.sql``, applied in order in one transaction
that also records them in ``schema_version``.

Telemetry does not grow for ever (rules in ``telemetry.py``): its raw rows live in day partitions on
PostgreSQL (``telemetry``, PARTITION BY RANGE of the day), made ahead by ``ensure_partitions`` and
dropped whole by ``expire``; SQLite has no partitioning, so there it is one table indexed by day and
``expire`` deletes. Hourly roll-ups, written with each apply, outlive the raw rows. Every other stream's
bodies (EPCIS events, command results, ESL alerts, counts) stay in ``messages`` for good.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ..clock import parse_rfc3339, rfc3339
from ..contract import STREAMS
from ..sync.outbox import insert_rows
from .telemetry import PARTITIONS_AHEAD, TELEMETRY, Retention, Rollup, day_of, keep_day

if TYPE_CHECKING:
    from ..config import HqConfig

_MIGRATION = re.compile(r"(\d{4})_\w+\.sql")


def store_lock_key(store: str) -> int:
    """A store's lock as a signed 64-bit number (PostgreSQL's advisory lock keys): the same in every
    process, and the order in which a transaction takes several."""
    return int.from_bytes(hashlib.blake2b(store.encode(), digest_size=8).digest(), "big", signed=True)


class Unstorable(ValueError):
    """A value the database cannot hold: a number past 64 bits (both), a NUL in text (PostgreSQL)."""


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Tx(Protocol):
    """A connection inside one transaction (sqlite3.Connection itself, or PgStore's thin wrapper)."""

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> object: ...


@dataclass(frozen=True)
class Expired:
    """What one ``expire`` removed: the days of raw telemetry (partitions dropped on PostgreSQL), their
    rows where counted (SQLite deletes them; PostgreSQL drops tables unread: None), and roll-up rows."""

    days: list[int]
    rows: int | None
    rollups: int


class HqStore(ABC):
    dialect: str  # the migrations/ folder of this backend
    outage: tuple[type[Exception], ...]  # the database failing (not one statement): a batch waits and retries
    conn: Any  # the backend's one connection (sqlite3 or psycopg), closed by close()
    retention = Retention()  # open_store sets the configured one

    def __init__(self) -> None:
        # One connection per process, so one transaction at a time within it.
        self.lock = threading.RLock()
        self._depth = 0  # transactions open in this thread: 1 a transaction, 2 a savepoint in it, more join it
        self._held: set[str] = set()  # the stores locked by the open transaction

    @contextmanager
    def tx(self, *stores: str) -> Iterator[Tx]:
        """One transaction that holds the lock of each of ``stores`` until it ends, against every
        other writer of those stores (other receivers too): the applier's read-then-write steps on a
        store (read ``last_seq``, apply, move it) need nothing else. Locks are taken in one global
        order, so two batches of stores cannot deadlock.

        Inside another transaction of this thread (a receiver's batch), it is a savepoint of that
        one: its failure undoes only itself, and its work commits with the batch. Deeper still, it
        joins the savepoint it is in (a failure there unwinds to that savepoint anyway), which saves
        two round trips per message."""
        with self.lock:
            depth = self._depth
            if depth == 0:
                self._held = set()
            self._depth += 1
            try:
                with self._transaction(nested=depth == 1) if depth < 2 else nullcontext(self._tx()) as c:
                    new = sorted(set(stores) - self._held, key=store_lock_key)
                    if new:
                        self._lock_stores(c, new)
                    yield c
                self._held |= set(new)  # held until the outer one ends
            finally:
                self._depth -= 1

    @abstractmethod
    def _transaction(self, nested: bool) -> AbstractContextManager[Tx]:
        """A transaction (``nested``: a savepoint in the open one) that rolls back on any exception and
        raises ``Unstorable`` for a value the backend cannot hold."""

    @abstractmethod
    def _tx(self) -> Tx:
        """The open transaction's connection, to run more statements in it."""

    @abstractmethod
    def _lock_stores(self, c: Tx, stores: list[str]) -> None:
        """Lock these stores (in this order) until the transaction ends."""

    @abstractmethod
    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]: ...

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    @abstractmethod
    def _lock_all(self, c: Tx) -> None:
        """Exclude every other process that migrates the database."""

    @abstractmethod
    def _script(self, c: Tx, sql: str) -> None:
        """Run a migration file (several statements, no parameters) inside the transaction ``c``."""

    @abstractmethod
    def _adopt(self, c: Tx) -> None:
        """Bring a database made before versioned migrations to version 1 (just after version 1 ran)."""

    def migrate(self) -> int:
        """Apply the migrations the database lacks, all in one transaction (a crash leaves it as it
        was); returns the schema version. A database newer than this code is refused, not guessed at."""
        files = sorted(
            (int(m.group(1)), f.name, f.read_text(encoding="utf-8"))
            for f in resources.files("edge_agent.hq").joinpath("migrations", self.dialect).iterdir()
            if (m := _MIGRATION.fullmatch(f.name))
        )
        with self.tx() as c:
            self._lock_all(c)
            c.execute("CREATE TABLE IF NOT EXISTS schema_version("
                      "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)")
            current = c.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
            if current > files[-1][0]:
                raise RuntimeError(f"the HQ database is at schema version {current}; this edge-agent knows"
                                   f" up to {files[-1][0]} (a newer release made it)")
            for version, name, sql in files:
                if version <= current:
                    continue
                self._script(c, sql)
                if version == 1:
                    self._adopt(c)
                if version == 4:
                    self._move_telemetry(c)
                c.execute("INSERT INTO schema_version(version, name, applied_at) VALUES (?,?,?)",
                          (version, name, time.time()))
                current = version
        return current

    def _move_telemetry(self, c: Tx) -> None:
        """Version 4: the telemetry rows of ``messages`` into ``telemetry`` in the day of their ts, whatever
        their age (the next ``expire`` applies the retention), with their roll-ups."""
        marks = ",".join("?" * len(TELEMETRY))
        rows = c.execute(f"SELECT store, stream, seq, ts, historical, body FROM messages WHERE stream IN ({marks})",
                         tuple(TELEMETRY)).fetchall()
        roll = Rollup()
        kept = []
        for store, stream, seq, ts, historical, body in rows:
            roll.add(store, stream, ts, STREAMS[stream].body.model_validate_json(body), len(body), False)
            kept.append((store, stream, seq, day_of(ts), ts, historical, body))
        self._keep(c, kept, roll)
        c.execute(f"DELETE FROM messages WHERE stream IN ({marks})", tuple(TELEMETRY))

    # ------------------------------------------------------------ applied bodies, telemetry retention

    def record_messages(self, c: Tx, rows: Iterable[tuple[str, str, int, float, bool, Any]], now: float) -> int:
        """Keep applied messages' bodies, in the transaction ``c`` that applies them: rows of (store,
        stream, seq, ts, historical, typed body). Telemetry goes to its day (``telemetry.py``) and its
        roll-ups; any other stream to ``messages``. Returns how many were kept in HQ's today, their own day
        being past the retention or too far ahead."""
        kept, others, roll, rehomed = [], [], Rollup(), 0
        for store, stream, seq, ts, historical, body in rows:
            text = body.model_dump_json()
            if stream not in TELEMETRY:
                others.append((store, stream, seq, ts, int(historical), text))
                continue
            day = keep_day(ts, now, self.retention)
            moved = day != day_of(ts)
            rehomed += moved
            roll.add(store, stream, ts, body, len(text), moved)
            kept.append((store, stream, seq, day, ts, int(historical), text))
        if others:
            self._insert(c, "INSERT INTO messages(store, stream, seq, ts, historical, body)", 6, others,
                         " ON CONFLICT(store, stream, seq) DO UPDATE SET ts = excluded.ts,"
                         " historical = excluded.historical, body = excluded.body")
        self._keep(c, kept, roll)
        return rehomed

    def _keep(self, c: Tx, rows: list[tuple], roll: Rollup) -> None:
        if rows:
            self._make_partitions(c, {r[3] for r in rows})
            self._insert(c, "INSERT INTO telemetry(store, stream, seq, day, ts, historical, body)", 7, rows,
                         " ON CONFLICT(store, stream, seq, day) DO UPDATE SET ts = excluded.ts,"
                         " historical = excluded.historical, body = excluded.body")
        self._insert(c, "INSERT INTO telemetry_hourly(store, stream, hour, messages, items, bytes, rehomed, max_backlog)",
                     8, [(*k, *v) for k, v in roll.streams.items()],
                     " ON CONFLICT(store, stream, hour) DO UPDATE SET"
                     " messages = telemetry_hourly.messages + excluded.messages,"
                     " items = telemetry_hourly.items + excluded.items, bytes = telemetry_hourly.bytes + excluded.bytes,"
                     " rehomed = telemetry_hourly.rehomed + excluded.rehomed,"
                     " max_backlog = greatest(telemetry_hourly.max_backlog, excluded.max_backlog)")
        self._insert(c, "INSERT INTO traffic_hourly(store, camera, hour, entries, exits, visits, person_s)",
                     7, [(*k, *v) for k, v in roll.traffic.items()],
                     " ON CONFLICT(store, camera, hour) DO UPDATE SET entries = traffic_hourly.entries + excluded.entries,"
                     " exits = traffic_hourly.exits + excluded.exits, visits = traffic_hourly.visits + excluded.visits,"
                     " person_s = traffic_hourly.person_s + excluded.person_s")

    def _insert(self, c: Tx, head: str, width: int, rows: list[tuple], tail: str = "") -> None:
        """``c.executemany(f"{head} VALUES (?,...){tail}", rows)``, the backend's fastest way."""
        insert_rows(c, head, width, rows, tail)  # type: ignore[arg-type]

    def ensure_partitions(self, now: float) -> None:
        """The day partitions from today to ``PARTITIONS_AHEAD`` days ahead (PostgreSQL); idempotent."""
        today = day_of(now)
        with self.tx() as c:
            self._make_partitions(c, set(range(today, today + PARTITIONS_AHEAD + 1)))

    def expire(self, now: float) -> Expired:
        """Drop the raw telemetry of the days past the retention, and the roll-ups past theirs."""
        with self.tx() as c:
            days, rows = self._drop_days(c, self.retention.horizon(now))
            cut = self.retention.rollup_horizon(now)
            rollups = sum(c.execute(f"DELETE FROM {t} WHERE hour < ?", (cut,)).rowcount
                          for t in ("telemetry_hourly", "traffic_hourly"))
        return Expired(days, rows, rollups)

    @abstractmethod
    def _make_partitions(self, c: Tx, days: set[int]) -> None:
        """Make sure telemetry rows of these days have a place (PostgreSQL: their partitions)."""

    @abstractmethod
    def _drop_days(self, c: Tx, before: int) -> tuple[list[int], int | None]:
        """Remove the raw telemetry of every day before ``before``: (the days, the rows if counted)."""

    def bodies(self, stream: str, store: str | None = None) -> list[str]:
        """The kept bodies of one stream (of one store, or all), in store and seq order: from ``telemetry``
        or ``messages``, wherever the stream is kept."""
        table = "telemetry" if stream in TELEMETRY else "messages"
        where, params = ("stream = ?", (stream,)) if store is None else ("store = ? AND stream = ?", (store, stream))
        return [b for (b,) in self.read(f"SELECT body FROM {table} WHERE {where} ORDER BY store, seq", params)]

    def inventory(self, store: str) -> dict[tuple[str, str], int]:
        return {
            (z, g): q
            for z, g, q in self.read("SELECT zone, gtin, qty FROM inventory WHERE store = ? AND qty != 0", (store,))
        }

    def labels(self, store: str) -> list[dict]:
        """The newest reported state of every label of a store."""
        return [json.loads(s) for (s,) in self.read("SELECT state FROM labels WHERE store = ? ORDER BY label", (store,))]

    def traffic(self, store: str, messages: int = 200) -> dict:
        """The newest traffic/stats items (oldest first) and the floor heatmap summed over the newest
        heatmap messages: store-wide ("*") cells where a store sends them, else its first camera's."""
        def newest(stream: str) -> list[list[dict]]:  # the items of each message, newest message first
            return [json.loads(b)["items"] for (b,) in self.read(
                "SELECT body FROM telemetry WHERE store = ? AND stream = ? ORDER BY seq DESC LIMIT ?",
                (store, stream, messages))]

        stats = sorted((it for items in reversed(newest("traffic/stats")) for it in items),
                       key=lambda it: it["bucket_start"])
        heat = [it for items in newest("traffic/heatmap") for it in items]
        wide = [h for h in heat if h["camera"] == "*"] or [h for h in heat if h["camera"] == heat[0]["camera"]]
        grid = None
        for h in wide:
            if grid is None:
                grid = {k: h[k] for k in ("camera", "cell_m", "cols", "rows")} | {
                    "cells": [0.0] * len(h["cells"]), "origin": h.get("origin"), "doors": h.get("doors", [])}
            if (h["cols"], h["rows"]) == (grid["cols"], grid["rows"]):
                grid["cells"] = [a + b for a, b in zip(grid["cells"], h["cells"], strict=True)]
        return {"stats": stats, "heatmap": grid}

    def epcis_events(self, store: str, since: float, until: float, *, after: tuple[int, int] = (0, -1),
                     limit: int | None = None) -> tuple[list[dict], tuple[int, int] | None]:
        """A store's EPCIS events with eventTime in [since, until), in the order HQ applied them, from the
        event after ``after`` (message seq, index in it) on, at most ``limit``; and the position of the
        last one returned when there may be more (None at the end). HQ keeps every EPCIS message it
        applies for good, outside the telemetry retention (the store forgets its own once acked): the
        business record an export reads. Messages are read a chunk at a time, so a page costs a page."""
        out: list[dict] = []
        seq, idx = after
        while True:
            chunk = self.read("SELECT seq, body FROM messages WHERE store = ? AND stream = 'epcis/events' AND seq >= ?"
                              " ORDER BY seq LIMIT 200", (store, seq))
            for seq, body in chunk:
                for i, it in enumerate(json.loads(body)["items"]):
                    if (seq, i) <= after or not since <= parse_rfc3339(it["eventTime"]) < until:
                        continue
                    out.append(it)
                    if limit is not None and len(out) == limit:
                        return out, (seq, i)
            if len(chunk) < 200:
                return out, None
            seq += 1

    def hourly(self, table: Literal["traffic", "telemetry"], store: str, since: float, until: float, *,
               after: tuple[int, str] = (-1, ""), limit: int = 100) -> list[dict]:
        """A store's hourly roll-ups (``traffic_hourly`` per camera, ``telemetry_hourly`` per stream) with
        the hour's start in [since, until), in (hour, camera or stream) order after ``after``; they outlive
        the raw telemetry (hq.rollup_retention_days against hq.retention_days)."""
        key, cols = {"traffic": ("camera", ("entries", "exits", "visits", "person_s")),
                     "telemetry": ("stream", ("messages", "items", "bytes", "rehomed", "max_backlog"))}[table]
        hour, name = after
        rows = self.read(f"SELECT hour, {key}, {', '.join(cols)} FROM {table}_hourly WHERE store = ? AND hour >= ?"
                         f" AND hour < ? AND (hour > ? OR (hour = ? AND {key} > ?)) ORDER BY hour, {key} LIMIT ?",
                         (store, math.ceil(since) if math.isfinite(since) else -1,
                          math.ceil(until) if math.isfinite(until) else 2**62, hour, hour, name, limit))
        return [{"hour": rfc3339(float(r[0])), key: r[1], **dict(zip(cols, r[2:], strict=True))} for r in rows]

    def stream_stats(self) -> list[dict]:
        cols = ("store", "stream", "last_seq", "hwm", "applied", "facts", "historical", "duplicates", "gaps", "lost",
                "rewinds", "replays", "last_ts", "last_sent", "last_applied_at")
        return [dict(zip(cols, r, strict=True)) for r in self.read(f"SELECT {', '.join(cols)} FROM streams ORDER BY 1, 2")]

    def alerts(self, limit: int = 100) -> list[dict]:
        cols = ("at", "store", "kind", "message")
        return [dict(zip(cols, r, strict=True)) for r in self.read(
            f"SELECT {', '.join(cols)} FROM alerts ORDER BY id DESC LIMIT ?", (limit,))]

    def audit(self, *, before: int | None = None, limit: int = 100, request: str | None = None) -> list[dict]:
        """Audit rows, newest first, with ids below ``before`` (a cursor that new rows never shift);
        ``request``: only the commands of one HTTP request (a POST /prices)."""
        cols = ("id", "at", "who", "request", "store", "cmd_id", "name", "args", "result", "result_at")
        one_request = "" if request is None else " AND request = ?"
        rows = self.read(
            f"SELECT {', '.join(cols)} FROM audit WHERE id < ?{one_request} ORDER BY id DESC LIMIT ?",
            (before if before is not None else 2**63 - 1, *(() if request is None else (request,)), limit))
        out = [dict(zip(cols, r, strict=True)) for r in rows]
        for a in out:
            a["args"] = json.loads(a["args"])
            a["result"] = json.loads(a["result"]) if a["result"] else None
        return out

    def store_ids(self, *, after: str = "", limit: int = 100) -> list[str]:
        """The stores HQ has heard of, in id order, from just after ``after``."""
        return [r[0] for r in self.read(
            "SELECT store FROM streams WHERE store > ? UNION SELECT store FROM status WHERE store > ? ORDER BY 1 LIMIT ?",
            (after, after, limit))]


def open_store(hq: HqConfig) -> HqStore:
    """The configured backend: PostgreSQL when ``hq.database`` names one, else SQLite at ``hq.db_path``."""
    # Imported here: both backends import this module for HqStore.
    store: HqStore
    if hq.database:
        from .pg_store import PgStore

        store = PgStore(hq.database)
    else:
        from .sqlite_store import SqliteStore

        store = SqliteStore(hq.db_path)
    store.retention = Retention(hq.retention_days, hq.rollup_retention_days)
    return store
