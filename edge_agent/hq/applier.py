"""The HQ apply engine: exactly-once per (store, stream) from at-least-once delivery.

A message is applied only if ``seq == last + 1``; ``seq <= last`` is a duplicate and ignored; a
message from the future is stashed (durably) while a reorder window runs. If the gap has not closed
when the window ends, the inventory stream asks the store for ``inventory.resync`` and rebuilds from
the snapshot; other streams skip ahead and count what was lost.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from ulid import ULID

from ..clock import Clock, rfc3339
from ..contract import MESSAGE_MODELS, STATUS_STREAM, Command, Envelope, command_topic, split_topic
from ..sync.outbox import insert_rows
from .store import HqStore

log = logging.getLogger(__name__)

DELTA = "inventory/delta"
SNAPSHOT = "inventory/snapshot"
LABELS = "esl/state"
MAX_PAYLOAD = 16 * 1024 * 1024


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes


@dataclass
class Applied:
    store: str
    stream: str
    seq: int
    facts: int
    historical: bool
    ts: float
    sent: float
    at: float


@dataclass
class Figures:
    rejected: int = 0
    by_stream: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))


class HqApplier:
    def __init__(
        self,
        store: HqStore,
        clock: Clock,
        *,
        prefix: str,
        reorder_window_s: float = 2.0,
        resync_retry_s: float = 15.0,
        on_applied: Callable[[Applied], None] | None = None,
    ) -> None:
        self.db = store
        self.clock = clock
        self.prefix = prefix
        self.reorder_window_s = reorder_window_s
        self.resync_retry_s = resync_retry_s
        self.on_applied = on_applied
        self.figures = Figures()
        self._gap_since: dict[tuple[str, str], float] = {}
        self._resync_sent: dict[str, float] = {}
        now = clock.now()
        for st, stream in store.read("SELECT DISTINCT store, stream FROM stash"):
            self._gap_since[(st, stream)] = now

    # ------------------------------------------------------------ intake

    def receive(self, topic: str, payload: bytes) -> list[Outgoing]:
        parts = split_topic(self.prefix, topic)
        if parts is not None and parts.stream == "cmd":
            return []
        try:
            if parts is None:
                raise ValueError(f"not a {self.prefix}/<store>/<stream> topic")
            if len(payload) > MAX_PAYLOAD:
                raise ValueError(f"payload of {len(payload)} bytes is over {MAX_PAYLOAD}")
            head = json.loads(payload)
            kind = head.get("type") if isinstance(head, dict) else None
            model = MESSAGE_MODELS.get(kind) if isinstance(kind, str) else None
            if model is None:
                raise ValueError(f"unknown message type {kind!r}")
            env = model.model_validate_json(payload)
            if env.store != parts.store or env.stream != parts.stream:
                raise ValueError(f"envelope says {env.store}/{env.stream}, topic says {parts.store}/{parts.stream}")
        except (ValueError, ValidationError, UnicodeDecodeError, RecursionError) as e:
            self._reject(topic, str(e)[:500], payload)
            return []
        try:
            if env.stream == STATUS_STREAM:
                self._status(env)
                return []
            if env.stream == SNAPSHOT:
                return self._snapshot(env)
            self._sequenced(env, payload)
        except OverflowError as e:
            # A number beyond SQLite's 64-bit integers (seq, qty, ...): its transaction rolled back, nothing applied.
            self._reject(topic, f"number out of range: {e}", payload)
        return []

    def _reject(self, topic: str, reason: str, payload: bytes) -> None:
        self.figures.rejected += 1
        log.warning("rejected message on %s: %s", topic, reason)
        with self.db.tx() as c:
            c.execute(
                "INSERT INTO rejected(at, topic, reason, payload) VALUES (?,?,?,?)",
                (self.clock.now(), topic, reason, payload[:65536]),
            )

    def _status(self, env: Envelope) -> None:
        b = env.body
        with self.db.tx() as c:
            c.execute(
                "INSERT INTO status(store, state, boot_id, connection, at) VALUES (?,?,?,?,?)"
                " ON CONFLICT(store) DO UPDATE SET state=excluded.state, boot_id=excluded.boot_id,"
                " connection=excluded.connection, at=excluded.at",
                (env.store, b.state, b.boot_id, b.connection, self.clock.now()),  # type: ignore[attr-defined]
            )
            c.executemany(
                "INSERT INTO floors(store, stream, floor) VALUES (?,?,?)"
                " ON CONFLICT(store, stream) DO UPDATE SET floor = max(floor, excluded.floor)",
                [(env.store, s, f) for s, f in b.seq_floor.items()],  # type: ignore[attr-defined]
            )

    # ------------------------------------------------------------ sequenced streams

    @staticmethod
    def _last(c: sqlite3.Connection, store: str, stream: str) -> int:
        row = c.execute("SELECT last_seq FROM streams WHERE store = ? AND stream = ?", (store, stream)).fetchone()
        if row is None:
            c.execute("INSERT INTO streams(store, stream) VALUES (?, ?)", (store, stream))
            return 0
        return row[0]

    @staticmethod
    def _missing(c: sqlite3.Connection, store: str, stream: str, last: int, upto: int) -> int:
        """How many numbers in (last, upto] the store sent that never arrived: those below its seq floor
        were never sent (its outbox was rebuilt from a corrupt file and started there)."""
        floor = c.execute("SELECT floor FROM floors WHERE store = ? AND stream = ?", (store, stream)).fetchone()
        return max(0, upto - (max(last, floor[0] - 1) if floor else last))

    def _sequenced(self, env: Envelope, payload: bytes) -> None:
        key = (env.store, env.stream)
        with self.db.tx() as c:
            last = self._last(c, *key)
            if env.seq <= last:
                c.execute("UPDATE streams SET duplicates = duplicates + 1 WHERE store = ? AND stream = ?", key)
                return
            if env.seq > last + 1:
                cur = c.execute(
                    "INSERT OR IGNORE INTO stash(store, stream, seq, payload) VALUES (?,?,?,?)",
                    (*key, env.seq, payload),
                )
                if not cur.rowcount:
                    c.execute("UPDATE streams SET duplicates = duplicates + 1 WHERE store = ? AND stream = ?", key)
                self._gap_since.setdefault(key, self.clock.now())
                return
            applied = [self._apply(c, env)]
            applied += self._drain_stash(c, env.store, env.stream, env.seq)
        self._notify(applied)

    def _drain_stash(self, c: sqlite3.Connection, store: str, stream: str, last: int) -> list[Applied]:
        applied = []
        c.execute("DELETE FROM stash WHERE store = ? AND stream = ? AND seq <= ?", (store, stream, last))
        while True:
            row = c.execute(
                "SELECT payload FROM stash WHERE store = ? AND stream = ? AND seq = ?", (store, stream, last + 1)
            ).fetchone()
            if row is None:
                break
            env = MESSAGE_MODELS[json.loads(row[0])["type"]].model_validate_json(row[0])
            applied.append(self._apply(c, env))
            c.execute("DELETE FROM stash WHERE store = ? AND stream = ? AND seq = ?", (store, stream, env.seq))
            last = env.seq
        if c.execute("SELECT 1 FROM stash WHERE store = ? AND stream = ? LIMIT 1", (store, stream)).fetchone():
            self._gap_since.setdefault((store, stream), self.clock.now())
        else:
            self._gap_since.pop((store, stream), None)
        return applied

    def _apply(self, c: sqlite3.Connection, env: Envelope) -> Applied:
        items = getattr(env.body, "items", None)
        if env.stream == DELTA:
            sums: dict[tuple[str, str], int] = defaultdict(int)
            for it in items or ():
                sums[(it.zone, it.gtin)] += it.delta
            insert_rows(  # one multi-row upsert instead of a step per key (keys are distinct here)
                c,
                "INSERT INTO inventory(store, zone, gtin, qty)",
                4,
                [(env.store, z, g, q) for (z, g), q in sums.items()],
                " ON CONFLICT(store, zone, gtin) DO UPDATE SET qty = qty + excluded.qty",
            )
        else:
            if env.stream == LABELS:  # keep the newest state per label: what HQ's price-integrity view reads
                insert_rows(
                    c, "INSERT INTO labels(store, label, ts, state)", 4,
                    [(env.store, it.label, it.ts.timestamp(), it.model_dump_json()) for it in items or ()],
                    " ON CONFLICT(store, label) DO UPDATE SET ts = excluded.ts, state = excluded.state"
                    " WHERE excluded.ts >= labels.ts",
                )
            c.execute(
                "INSERT OR REPLACE INTO messages(store, stream, seq, ts, historical, body) VALUES (?,?,?,?,?,?)",
                (env.store, env.stream, env.seq, env.ts.timestamp(), int(env.historical),
                 env.body.model_dump_json()),  # type: ignore[attr-defined]
            )
        now = self.clock.now()
        facts = len(items) if items is not None else 1
        c.execute(
            "UPDATE streams SET last_seq = ?, applied = applied + 1, facts = facts + ?, historical = historical + ?,"
            " last_ts = ?, last_sent = ?, last_applied_at = ? WHERE store = ? AND stream = ?",
            (env.seq, facts, int(env.historical), env.ts.timestamp(), env.sent.timestamp(), now, env.store, env.stream),
        )
        return Applied(env.store, env.stream, env.seq, facts, env.historical, env.ts.timestamp(),
                       env.sent.timestamp(), now)

    def _notify(self, applied: list[Applied]) -> None:
        for a in applied:
            self.figures.by_stream[(a.store, a.stream)] += a.facts
            if self.on_applied:
                self.on_applied(a)

    # ------------------------------------------------------------ snapshots

    def _snapshot(self, env: Envelope) -> list[Outgoing]:
        b: Any = env.body
        with self.db.tx() as c:
            self._last(c, env.store, SNAPSHOT)
            c.execute(
                "UPDATE streams SET last_seq = max(last_seq, ?), applied = applied + 1, last_ts = ?, last_sent = ?,"
                " last_applied_at = ? WHERE store = ? AND stream = ?",
                (env.seq, env.ts.timestamp(), env.sent.timestamp(), self.clock.now(), env.store, SNAPSHOT),
            )
            if c.execute("SELECT 1 FROM snapshots WHERE store = ? AND snapshot_id = ?", (env.store, b.snapshot_id)).fetchone():
                return []
            c.execute(
                "INSERT OR IGNORE INTO snapshot_parts(store, snapshot_id, part, parts, as_of_seq, items) VALUES (?,?,?,?,?,?)",
                (env.store, b.snapshot_id, b.part, b.parts, b.as_of_seq,
                 json.dumps([[i.zone, i.gtin, i.qty] for i in b.items])),
            )
            have = c.execute(
                "SELECT count(*) FROM snapshot_parts WHERE store = ? AND snapshot_id = ?", (env.store, b.snapshot_id)
            ).fetchone()[0]
            if have < b.parts:
                return []
            applied = self._install_snapshot(c, env.store, b.snapshot_id, b.as_of_seq)
        self._notify(applied)
        return []

    def _install_snapshot(self, c: sqlite3.Connection, store: str, sid: str, as_of: int) -> list[Applied]:
        levels: dict[tuple[str, str], int] = {}
        for (items,) in c.execute(
            "SELECT items FROM snapshot_parts WHERE store = ? AND snapshot_id = ? ORDER BY part", (store, sid)
        ).fetchall():
            for z, g, q in json.loads(items):
                levels[(z, g)] = q
        c.execute("DELETE FROM snapshot_parts WHERE store = ? AND snapshot_id = ?", (store, sid))
        last = self._last(c, store, DELTA)
        current = {
            (z, g): q
            for z, g, q in c.execute("SELECT zone, gtin, qty FROM inventory WHERE store = ? AND qty != 0", (store,))
        }
        mismatches = sum(1 for k in set(levels) | set(current) if levels.get(k, 0) != current.get(k, 0))
        applied: list[Applied] = []
        if as_of < last:
            outcome = "stale"
        else:
            outcome = "installed" if as_of > last else ("verified" if not mismatches else "corrected")
            if outcome != "verified":
                c.execute("DELETE FROM inventory WHERE store = ?", (store,))
                c.executemany(
                    "INSERT INTO inventory(store, zone, gtin, qty) VALUES (?,?,?,?)",
                    [(store, z, g, q) for (z, g), q in levels.items()],
                )
                if as_of > last:
                    c.execute(
                        "UPDATE streams SET lost = lost + ?, gaps = gaps + 1, last_seq = ? WHERE store = ? AND stream = ?",
                        (self._missing(c, store, DELTA, last, as_of) - c.execute(
                            "SELECT count(*) FROM stash WHERE store = ? AND stream = ? AND seq > ? AND seq <= ?",
                            (store, DELTA, last, as_of)).fetchone()[0], as_of, store, DELTA),
                    )
                applied = self._drain_stash(c, store, DELTA, as_of)
            c.execute("UPDATE resyncs SET done_at = ? WHERE store = ? AND done_at IS NULL", (self.clock.now(), store))
            self._resync_sent.pop(store, None)
        c.execute(
            "INSERT OR IGNORE INTO snapshots(store, snapshot_id, as_of_seq, applied_at, outcome, mismatches) VALUES (?,?,?,?,?,?)",
            (store, sid, as_of, self.clock.now(), outcome, mismatches),
        )
        log.info("snapshot %s for %s as of seq %d (HQ at %d): %s, %d keys differed", sid, store, as_of, last,
                 outcome, mismatches)
        return applied

    # ------------------------------------------------------------ timers

    def tick(self) -> list[Outgoing]:
        """Close gaps whose reorder window has run out."""
        now = self.clock.now()
        out: list[Outgoing] = []
        for (store, stream), since in list(self._gap_since.items()):
            if now - since < self.reorder_window_s:
                continue
            if stream == DELTA:
                sent = self._resync_sent.get(store)
                if sent is None or now - sent >= self.resync_retry_s:
                    out.append(self._resync(store, now))
                continue
            applied: list[Applied] = []
            with self.db.tx() as c:
                last = self._last(c, store, stream)
                row = c.execute(
                    "SELECT min(seq) FROM stash WHERE store = ? AND stream = ? AND seq > ?", (store, stream, last)
                ).fetchone()
                if row[0] is None:
                    self._gap_since.pop((store, stream), None)
                    continue
                skip_to = row[0] - 1
                c.execute(
                    "UPDATE streams SET last_seq = ?, gaps = gaps + 1, lost = lost + ? WHERE store = ? AND stream = ?",
                    (skip_to, self._missing(c, store, stream, last, skip_to), store, stream),
                )
                log.warning("%s %s: seq %d..%d never arrived; skipping ahead", store, stream, last + 1, skip_to)
                applied = self._drain_stash(c, store, stream, skip_to)
            self._notify(applied)
        return out

    def _resync(self, store: str, now: float) -> Outgoing:
        cmd = Command(id=str(ULID()), name="inventory.resync", store=store, ts=rfc3339(now),  # type: ignore[arg-type]
                      args={"reason": "gap in inventory/delta"})
        self._resync_sent[store] = now
        with self.db.tx() as c:
            c.execute("INSERT INTO resyncs(store, cmd_id, requested_at) VALUES (?,?,?)", (store, cmd.id, now))
        log.warning("%s: gap in %s; asking for inventory.resync (%s)", store, DELTA, cmd.id)
        return Outgoing(command_topic(self.prefix, store, cmd.name), cmd.model_dump_json().encode())

    def command(self, store: str, name: str, args: dict[str, Any]) -> Outgoing:
        cmd = Command(id=str(ULID()), name=name, store=store, ts=rfc3339(self.clock.now()), args=args)  # type: ignore[arg-type]
        return Outgoing(command_topic(self.prefix, store, name), cmd.model_dump_json().encode())


def lag_ms(a: Applied) -> float:
    return (a.at - a.ts) * 1000

