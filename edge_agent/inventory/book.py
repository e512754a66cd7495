"""The store's inventory book: on-hand per (zone, GTIN), kept in the outbox database.

A change to the book and the delta facts that describe it commit in one transaction (a
transactional outbox), so after a crash the book and what HQ will receive always agree. That is what
makes a snapshot exact: the book minus the still-pending deltas is the state as of the last sealed
``seq`` of the inventory/delta stream.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_str

from ulid import ULID

from ..clock import Clock, rfc3339
from ..sync.outbox import ENVELOPE_OVERHEAD, Fact, Outbox, OutboxTx, insert_rows

DELTA_STREAM = "inventory/delta"
SNAPSHOT_STREAM = "inventory/snapshot"


@dataclass(frozen=True, slots=True)
class Delta:
    ts: float
    zone: str
    gtin: str
    delta: int
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.zone}|{self.gtin}"

    def to_json(self) -> str:
        if (not self.added and not self.removed and type(self.delta) is int
                and type(self.zone) is str and type(self.gtin) is str):
            # The common case, byte for byte what json.dumps below gives (same string escaper, int repr),
            # without building a dict and an encoder per fact: this runs once for every delta.
            return (f'{{"ts":{_json_str(rfc3339(self.ts))},"zone":{_json_str(self.zone)},'
                    f'"gtin":{_json_str(self.gtin)},"delta":{self.delta}}}')
        item: dict[str, object] = {"ts": rfc3339(self.ts), "zone": self.zone, "gtin": self.gtin, "delta": self.delta}
        if self.added:
            item["added"] = list(self.added)
        if self.removed:
            item["removed"] = list(self.removed)
        return json.dumps(item, separators=(",", ":"))


@dataclass(frozen=True)
class SnapshotInfo:
    snapshot_id: str
    as_of_seq: int
    parts: int
    keys: int


class InventoryBook:
    def __init__(self, outbox: Outbox, clock: Clock) -> None:
        self.outbox = outbox
        self.clock = clock
        with outbox.transaction() as tx:
            tx.conn.execute(
                "CREATE TABLE IF NOT EXISTS stock(zone TEXT NOT NULL, gtin TEXT NOT NULL, qty INTEGER NOT NULL,"
                " PRIMARY KEY(zone, gtin)) WITHOUT ROWID"
            )
            tx.conn.execute(
                "CREATE TABLE IF NOT EXISTS source_cursors(source TEXT PRIMARY KEY, position INTEGER NOT NULL)"
            )

    def apply(self, deltas: Sequence[Delta], *, cursor: tuple[str, int] | None = None) -> None:
        """Change the book and enqueue the deltas atomically; ``cursor`` records how far a source got."""
        prepared = self._prepare(deltas)  # built before taking the outbox's write lock, not while holding it
        with self.outbox.transaction() as tx:
            self._write(tx, prepared)
            if cursor is not None:
                tx.conn.execute(
                    "INSERT INTO source_cursors(source, position) VALUES (?, ?)"
                    " ON CONFLICT(source) DO UPDATE SET position = excluded.position",
                    cursor,
                )

    def apply_in(self, tx: OutboxTx, deltas: Sequence[Delta]) -> None:
        self._write(tx, self._prepare(deltas))

    @staticmethod
    def _prepare(deltas: Sequence[Delta]) -> tuple[list[tuple[str, str, int]], list[Fact]]:
        deltas = [d for d in deltas if d.delta or d.added or d.removed]
        return [(d.zone, d.gtin, d.delta) for d in deltas], [Fact(ts=d.ts, body=d.to_json(), key=d.key) for d in deltas]

    @staticmethod
    def _write(tx: OutboxTx, prepared: tuple[list[tuple[str, str, int]], list[Fact]]) -> None:
        stock, facts = prepared
        if not facts:
            return
        # Rows with the same key in one multi-row upsert are added one after the other, as executemany would.
        insert_rows(
            tx.conn,
            "INSERT INTO stock(zone, gtin, qty)",
            3,
            stock,
            " ON CONFLICT(zone, gtin) DO UPDATE SET qty = qty + excluded.qty",
        )
        tx.enqueue(DELTA_STREAM, facts)

    def cursor(self, source: str) -> int:
        rows = self.outbox.read("SELECT position FROM source_cursors WHERE source = ?", (source,))
        return rows[0][0] if rows else 0

    def levels(self) -> dict[tuple[str, str], int]:
        return {(z, g): q for z, g, q in self.outbox.read("SELECT zone, gtin, qty FROM stock")}

    def snapshot(self, reason: str) -> SnapshotInfo:
        """Enqueue the book as of the last sealed inventory/delta seq, in parts that fit the byte bound."""
        with self.outbox.transaction() as tx:
            as_of, as_of_id = self.outbox.last_mark(DELTA_STREAM, tx.conn)
            levels = {(z, g): q for z, g, q in tx.conn.execute("SELECT zone, gtin, qty FROM stock")}
            for (body,) in tx.conn.execute("SELECT body FROM pending WHERE stream = ?", (DELTA_STREAM,)):
                item = json.loads(body)
                key = (item["zone"], item["gtin"])
                levels[key] = levels.get(key, 0) - item["delta"]
            items = [
                json.dumps({"zone": z, "gtin": g, "qty": q}, separators=(",", ":"))
                for (z, g), q in sorted(levels.items())
                if q != 0
            ]
            chunks = list(_chunks(items, self.outbox.max_body_bytes - ENVELOPE_OVERHEAD))
            sid = str(ULID())
            now = self.clock.now()
            facts = [
                Fact(
                    ts=now,
                    body=(
                        f'{{"snapshot_id":"{sid}","as_of_seq":{as_of},"as_of_id":"{as_of_id}","part":{i},"parts":{len(chunks)},'
                        f'"reason":{json.dumps(reason)},"items":[{",".join(chunk)}]}}'
                    ),
                )
                for i, chunk in enumerate(chunks, start=1)
            ]
            tx.enqueue(SNAPSHOT_STREAM, facts)
        return SnapshotInfo(sid, as_of, len(chunks), len(items))


def _chunks(items: Iterable[str], budget: int) -> Iterable[list[str]]:
    chunk: list[str] = []
    size = 0
    for it in items:
        if chunk and size + len(it) + 1 > budget:
            yield chunk
            chunk, size = [], 0
        chunk.append(it)
        size += len(it) + 1
    yield chunk  # an empty book is still one (empty) part
