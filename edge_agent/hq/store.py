"""HQ's store of record (SQLite): applied state and, per (store, stream), the last applied seq.

State and ``last_seq`` change in the same transaction, so a message is applied exactly once however
often the broker redelivers it and wherever the receiver is killed.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..clock import parse_rfc3339
from ..sync.outbox import add_missing_columns

SCHEMA = """
CREATE TABLE IF NOT EXISTS streams(
  store TEXT NOT NULL, stream TEXT NOT NULL,
  last_seq INTEGER NOT NULL DEFAULT 0,
  applied INTEGER NOT NULL DEFAULT 0,
  facts INTEGER NOT NULL DEFAULT 0,
  historical INTEGER NOT NULL DEFAULT 0,
  duplicates INTEGER NOT NULL DEFAULT 0,
  gaps INTEGER NOT NULL DEFAULT 0,
  lost INTEGER NOT NULL DEFAULT 0,
  last_ts REAL, last_sent REAL, last_applied_at REAL,
  last_id TEXT NOT NULL DEFAULT '',
  hwm INTEGER NOT NULL DEFAULT 0,
  rewinds INTEGER NOT NULL DEFAULT 0,
  replays INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY(store, stream)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS commands_out(
  store TEXT NOT NULL, cmd_id TEXT NOT NULL, payload BLOB NOT NULL, issued_at REAL NOT NULL, answered_at REAL,
  PRIMARY KEY(store, cmd_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS commands_unanswered ON commands_out(answered_at) WHERE answered_at IS NULL;
CREATE TABLE IF NOT EXISTS inv_journal(
  store TEXT NOT NULL, seq INTEGER NOT NULL, sums TEXT NOT NULL, id TEXT NOT NULL DEFAULT '',
  PRIMARY KEY(store, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alerts(
  id INTEGER PRIMARY KEY, at REAL NOT NULL, store TEXT NOT NULL, kind TEXT NOT NULL, message TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inventory(
  store TEXT NOT NULL, zone TEXT NOT NULL, gtin TEXT NOT NULL, qty INTEGER NOT NULL,
  PRIMARY KEY(store, zone, gtin)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stash(
  store TEXT NOT NULL, stream TEXT NOT NULL, seq INTEGER NOT NULL, payload BLOB NOT NULL,
  PRIMARY KEY(store, stream, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshot_parts(
  store TEXT NOT NULL, snapshot_id TEXT NOT NULL, part INTEGER NOT NULL, parts INTEGER NOT NULL,
  as_of_seq INTEGER NOT NULL, items TEXT NOT NULL, as_of_id TEXT NOT NULL DEFAULT '',
  PRIMARY KEY(store, snapshot_id, part)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots(
  store TEXT NOT NULL, snapshot_id TEXT NOT NULL, as_of_seq INTEGER NOT NULL, applied_at REAL NOT NULL,
  outcome TEXT NOT NULL, mismatches INTEGER NOT NULL, PRIMARY KEY(store, snapshot_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages(
  store TEXT NOT NULL, stream TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL,
  historical INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY(store, stream, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS status(
  store TEXT PRIMARY KEY, state TEXT NOT NULL, boot_id TEXT, connection INTEGER, at REAL NOT NULL,
  instance TEXT NOT NULL DEFAULT '', identity_conflicts INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS resyncs(
  store TEXT NOT NULL, cmd_id TEXT NOT NULL, requested_at REAL NOT NULL, done_at REAL,
  PRIMARY KEY(store, cmd_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS floors(
  store TEXT NOT NULL, stream TEXT NOT NULL, floor INTEGER NOT NULL, PRIMARY KEY(store, stream)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS labels(
  store TEXT NOT NULL, label TEXT NOT NULL, ts REAL NOT NULL, state TEXT NOT NULL,
  PRIMARY KEY(store, label)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rejected(
  id INTEGER PRIMARY KEY, at REAL NOT NULL, topic TEXT NOT NULL, reason TEXT NOT NULL, payload BLOB);
CREATE TABLE IF NOT EXISTS audit(
  id INTEGER PRIMARY KEY, at REAL NOT NULL, who TEXT NOT NULL, request TEXT NOT NULL, store TEXT NOT NULL,
  cmd_id TEXT NOT NULL, name TEXT NOT NULL, args TEXT NOT NULL, result TEXT, result_at REAL,
  UNIQUE(store, cmd_id));
CREATE INDEX IF NOT EXISTS audit_request ON audit(request);
"""
# Columns added since the first release, for HQ databases made before them.
MIGRATIONS = (
    ("streams", "last_id", "TEXT NOT NULL DEFAULT ''"),
    ("streams", "hwm", "INTEGER NOT NULL DEFAULT 0"),
    ("streams", "rewinds", "INTEGER NOT NULL DEFAULT 0"),
    ("streams", "replays", "INTEGER NOT NULL DEFAULT 0"),
    ("status", "instance", "TEXT NOT NULL DEFAULT ''"),
    ("status", "identity_conflicts", "INTEGER NOT NULL DEFAULT 0"),
    ("snapshot_parts", "as_of_id", "TEXT NOT NULL DEFAULT ''"),
)


class HqStore:
    def __init__(self, path: Path | str, synchronous: str = "FULL") -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={synchronous}")
        self.conn.executescript(SCHEMA)
        add_missing_columns(self.conn, MIGRATIONS)
        self.lock = threading.RLock()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def read(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self.lock:
            return self.conn.execute(sql, params).fetchall()

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
                "SELECT body FROM messages WHERE store = ? AND stream = ? ORDER BY seq DESC LIMIT ?",
                (store, stream, messages))]

        stats = sorted((it for items in reversed(newest("traffic/stats")) for it in items),
                       key=lambda it: it["bucket_start"])
        heat = [it for items in newest("traffic/heatmap") for it in items]
        wide = [h for h in heat if h["camera"] == "*"] or [h for h in heat if h["camera"] == heat[0]["camera"]]
        grid = None
        for h in wide:
            if grid is None:
                grid = {k: h[k] for k in ("camera", "cell_m", "cols", "rows")} | {"cells": [0.0] * len(h["cells"])}
            if (h["cols"], h["rows"]) == (grid["cols"], grid["rows"]):
                grid["cells"] = [a + b for a, b in zip(grid["cells"], h["cells"], strict=True)]
        return {"stats": stats, "heatmap": grid}

    def epcis_events(self, store: str, since: float, until: float) -> list[dict]:
        """A store's EPCIS events with eventTime in [since, until), in the order HQ applied them. HQ keeps
        every message it applies (the store forgets its own once acked): the record an export reads."""
        out = []
        for (body,) in self.read("SELECT body FROM messages WHERE store = ? AND stream = 'epcis/events' ORDER BY seq",
                                 (store,)):
            out += [it for it in json.loads(body)["items"] if since <= parse_rfc3339(it["eventTime"]) < until]
        return out

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
        rows = self.read(
            f"SELECT {', '.join(cols)} FROM audit WHERE id < ? AND (? IS NULL OR request = ?) ORDER BY id DESC LIMIT ?",
            (before if before is not None else 2**63 - 1, request, request, limit))
        out = [dict(zip(cols, r, strict=True)) for r in rows]
        for a in out:
            a["args"] = json.loads(a["args"])
            a["result"] = json.loads(a["result"]) if a["result"] else None
        return out

    def store_ids(self, *, after: str = "", limit: int = 100) -> list[str]:
        """The stores HQ has heard of, in id order, from just after ``after``."""
        return [r[0] for r in self.read(
            "SELECT store FROM streams WHERE store > ?1 UNION SELECT store FROM status WHERE store > ?1 ORDER BY 1 LIMIT ?2",
            (after, limit))]

    def close(self) -> None:
        with self.lock:
            self.conn.close()
