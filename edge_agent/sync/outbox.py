"""The SQLite outbox: the only path upstream.

Two stages. Facts are enqueued as *pending* rows. The uplink *seals* pending facts into a message:
one transaction takes them out of pending, assigns the stream's next ``seq``, chains the message to
the one before it (``prev``, the previous message's id) and stores the sealed message, so seq has no
gaps and survives restarts. A sealed message is never altered and is deleted only when **HQ's ack**
covers it: a PUBACK only says the broker has it, and a broker killed before it saved its store loses
it. An ack names the seq *and the id* HQ applied; one that names another id at a seq this outbox
holds, or a seq beyond the last it sealed, means this outbox went back in time (a lost WAL, a
restored backup, a copied box): its unacknowledged messages go back to pending, its numbering moves
past HQ's, and nothing is ever sent under a seq HQ already applied. Only a window of messages per
stream is sealed and unacknowledged at a time, so while offline the backlog stays pending and the
disk cap can still compact it, coarsen it, or (lowest classes only) drop it, counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import shutil
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ulid import ULID

from ..clock import Clock, parse_rfc3339, rfc3339
from ..contract import CONTRACT_VERSION, STREAMS
from . import compaction
from .diskstate import DiskState, WriteFailed, refusal_kind

log = logging.getLogger(__name__)

# Envelope bytes around the body: keys, store, stream, ids and two timestamps, with room to spare.
ENVELOPE_OVERHEAD = 512

SCHEMA = """
CREATE TABLE IF NOT EXISTS pending(
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  stream TEXT NOT NULL,
  key TEXT,
  ts REAL NOT NULL,
  created REAL NOT NULL,
  body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS pending_by_stream ON pending(stream, id);
CREATE TABLE IF NOT EXISTS sealed(
  stream TEXT NOT NULL,
  seq INTEGER NOT NULL,
  id TEXT NOT NULL,
  type TEXT NOT NULL,
  ts REAL NOT NULL,
  oldest_created REAL NOT NULL,
  facts INTEGER NOT NULL,
  body TEXT NOT NULL,
  prev TEXT NOT NULL DEFAULT '',
  sig TEXT,
  PRIMARY KEY(stream, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seqs(stream TEXT PRIMARY KEY, last INTEGER NOT NULL, last_id TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS counters(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS alerts(
  id INTEGER PRIMARY KEY, ts REAL NOT NULL, kind TEXT NOT NULL, message TEXT NOT NULL,
  reported INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS quarantine(
  id INTEGER PRIMARY KEY, at REAL NOT NULL, source TEXT NOT NULL, reason TEXT NOT NULL, raw BLOB);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

QUARANTINE_RAW_MAX = 64 * 1024


def _quarantine_raw(raw: bytes | str | None) -> bytes | None:
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "replace")
    return raw[:QUARANTINE_RAW_MAX] if raw is not None else None


# Columns added since the first release, for outboxes created before them: (table, column, definition).
MIGRATIONS = (
    ("sealed", "prev", "TEXT NOT NULL DEFAULT ''"),
    ("sealed", "sig", "TEXT"),
    ("seqs", "last_id", "TEXT NOT NULL DEFAULT ''"),
)
SEALED_COLS = "stream, seq, id, type, ts, oldest_created, facts, body, prev, sig"


def utf8_len(s: str) -> int:
    """Bytes of ``s`` on the wire: the message bound is in bytes, and a non-ASCII character is several."""
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))


@functools.lru_cache(maxsize=64)
def _values_sql(head: str, width: int, rows: int, tail: str) -> str:
    one = "(" + ",".join("?" * width) + ")"
    return f"{head} VALUES {','.join([one] * rows)}{tail}"


def insert_rows(conn: sqlite3.Connection, head: str, width: int, rows: Sequence[tuple], tail: str = "") -> None:
    """Same effect as ``conn.executemany(f"{head} VALUES (?,...){tail}", rows)``, rows in order, but as a
    few multi-row INSERTs: executemany steps SQLite (and drops and retakes the GIL) once per row, which
    costs about as much again as the insert itself. Chunks of 128, 64, ..., 1 rows keep the statement
    texts few (cached) and the parameters under SQLite's oldest limit of 999."""
    i, n, size = 0, len(rows), 128
    while i < n:
        while size > n - i:
            size //= 2
        conn.execute(_values_sql(head, width, size, tail), list(itertools.chain.from_iterable(rows[i : i + size])))
        i += size


class FactTooLarge(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Fact:
    ts: float  # when it happened, epoch seconds
    body: str  # JSON: one item (batched streams) or a whole body
    key: str | None = None  # compaction / coarsening key


@dataclass(frozen=True, slots=True)
class SealedMessage:
    stream: str
    seq: int
    id: str
    type: str
    ts: float
    oldest_created: float
    facts: int
    body: str
    prev: str = ""
    sig: str | None = None

    def payload(self, store: str, sent: float, historical: bool) -> bytes:
        # Composed as text so the stored body is never re-parsed on the hot path; "body" comes last, so
        # a verifier finds the signed body bytes as they are (edge_agent.signing.split_uplink).
        sig = f'"sig":"{self.sig}",' if self.sig else ""
        return (
            f'{{"v":{CONTRACT_VERSION},"type":"{self.type}","store":{json.dumps(store)},'
            f'"stream":"{self.stream}","seq":{self.seq},"id":"{self.id}","prev":"{self.prev}",'
            f'"ts":"{rfc3339(self.ts)}","sent":"{rfc3339(sent)}","historical":{"true" if historical else "false"},'
            f'{sig}"body":{self.body}}}'
        ).encode()


@dataclass(frozen=True, slots=True)
class AckResult:
    """What an ack from HQ did: ``deleted`` messages forgotten; or, when HQ's position shows this outbox
    went back in time, ``rewind`` and the ``repended`` facts put back to pending."""

    deleted: int = 0
    rewind: bool = False
    repended: int = 0


# The cap budgets what waits to be sent: the rows of these tables. Everything else in the file (the
# inventory book, tag presence, source cursors, the price book, commands, quarantine) is "the book":
# the store's state, not a backlog. No cap could drop it, so it is reported beside the cap, not in it.
QUEUE_TABLES = ("pending", "sealed")
# A round past the cap brings what waits down to this share of it, so the next rounds have room.
CAP_TARGET = 0.85

# Bytes in the pages of the queue's b-trees, indexes included (?1 = 1), or of the book's (?1 = 0,
# with the schema's own b-tree, which dbstat names sqlite_schema or, before SQLite 3.33, sqlite_master).
_BTREE_BYTES = f"""
SELECT coalesce(sum(pgsize), 0) FROM dbstat WHERE aggregate = 1 AND name IN (
  SELECT name FROM sqlite_master WHERE rootpage > 0 AND (tbl_name IN {QUEUE_TABLES}) = ?1
  UNION ALL SELECT 'sqlite_schema' WHERE ?1 = 0 UNION ALL SELECT 'sqlite_master' WHERE ?1 = 0)"""


def wal_limit(cap_bytes: int) -> int:
    """The WAL's size limit: a small share of the cap, since it is disk the cap has to cover too."""
    return max(256 * 1024, min(8 * 1024 * 1024, cap_bytes // 8))


def _incremental_vacuum(conn: sqlite3.Connection) -> bool:
    return conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # 0 NONE, 1 FULL, 2 INCREMENTAL


def _has_dbstat(conn: sqlite3.Connection) -> bool:
    try:
        conn.execute("SELECT 1 FROM dbstat LIMIT 0")
    except sqlite3.OperationalError:  # built without SQLITE_ENABLE_DBSTAT_VTAB
        return False
    return True


@dataclass(frozen=True, slots=True)
class DiskUse:
    used: int  # bytes in the file's pages in use (not free)
    queued: int  # of which what waits to be sent: pending facts and sealed messages not yet acknowledged
    book: int  # of which everything else


@dataclass
class CapReport:
    """One round past the cap."""

    queued_before: int
    queued_after: int
    compacted: int = 0
    coarsened: int = 0
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass
class CapEpisode:
    """Rounds past the cap, from the first until what waits is back under the target."""

    started: float
    rounds: int = 0
    compacted: int = 0
    coarsened: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    alerted: bool = False  # undroppable facts alone exceeded the cap


class OutboxTx:
    """An open write transaction; other tables of the same database (e.g. the inventory book) can be
    changed in it so that state and the facts describing it commit together."""

    def __init__(self, outbox: Outbox, conn: sqlite3.Connection) -> None:
        self._outbox = outbox
        self.conn = conn
        self.enqueued = 0

    def enqueue(self, stream: str, facts: Sequence[Fact]) -> None:
        if stream not in STREAMS:
            raise ValueError(f"unknown stream {stream!r}")
        limit = self._outbox.max_body_bytes
        for f in facts:
            if (n := utf8_len(f.body)) > limit:
                raise FactTooLarge(f"a {stream} fact of {n} bytes exceeds the {limit}-byte message bound")
        now = self._outbox.clock.now()
        insert_rows(
            self.conn,
            "INSERT INTO pending(stream, key, ts, created, body)",
            5,
            [(stream, f.key, f.ts, now, f.body) for f in facts],
        )
        self.enqueued += len(facts)
        self._outbox._dirty.add(stream)

    def bump(self, name: str, by: int = 1) -> None:
        self._outbox._bump(self.conn, name, by)

    def alert(self, kind: str, message: str) -> None:
        self.conn.execute(
            "INSERT INTO alerts(ts, kind, message) VALUES (?,?,?)", (self._outbox.clock.now(), kind, message)
        )
        # The kind in the template: the log coalesces repeats by template, and two kinds are not repeats.
        log.warning(f"alert {kind}: %s", message)


class Outbox:
    def __init__(
        self,
        path: Path,
        clock: Clock,
        *,
        cap_bytes: int = 256 * 1024 * 1024,
        max_message_bytes: int = 128 * 1024,
        synchronous: str = "FULL",
        quarantine_keep: int = 10_000,
        sign: Callable[[SealedMessage], str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.clock = clock
        self.cap_bytes = cap_bytes
        self.max_message_bytes = max_message_bytes
        self.max_body_bytes = max_message_bytes - ENVELOPE_OVERHEAD
        self.quarantine_keep = quarantine_keep
        self._synchronous = synchronous
        self._lock = threading.RLock()
        self._listeners: list[Callable[[], None]] = []
        self._over_cap: CapEpisode | None = None
        self._dbstat = False  # set by _connect
        self._last_use = DiskUse(0, 0, 0)  # disk_use() walks the side that was smaller last time
        self._dirty: set[str] = set()  # streams enqueued to since the uplink last looked
        self._sign = sign
        self.disk = DiskState()
        # Since this process started, committed (for /metrics: Prometheus takes a restart's reset to 0 in its stride).
        self.facts_enqueued = 0
        self.facts_sealed = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = self._open_checked()
        self.instance = self._instance_id()
        # Sealed messages HQ has not acknowledged, per stream: the window the uplink seals up to.
        self._unacked: dict[str, int] = dict(self.conn.execute("SELECT stream, count(*) FROM sealed GROUP BY stream"))

    # ------------------------------------------------------------ opening and corruption

    def _connect(self, path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        # So that housekeeping can give drained pages back (_reclaim). A new file takes the mode only
        # before anything writes its header, journal_mode included. Set only if missing: setting it
        # again would write a transaction, and a corrupt file must be moved aside exactly as it was.
        incremental = _incremental_vacuum(conn)
        if not incremental:
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        wal_bytes = wal_limit(self.cap_bytes)
        conn.execute(f"PRAGMA journal_size_limit={wal_bytes}")
        conn.execute(f"PRAGMA wal_autocheckpoint={max(64, wal_bytes // 4096)}")
        if not incremental:
            self._convert_to_incremental_vacuum(conn, path)
        self._dbstat = _has_dbstat(conn)
        return conn

    @staticmethod
    def _convert_to_incremental_vacuum(conn: sqlite3.Connection, path: Path) -> None:
        """A file made before incremental vacuum keeps the size of its largest backlog for ever; VACUUM
        rewrites it once in the new mode. That needs as much free disk again as the file: if it cannot
        run now (disk full, I/O error) the file works as before without shrinking, and the next start
        tries again. VACUUM reads every row, so a corrupt file fails it with a DatabaseError, which
        the caller handles as corruption."""
        if _incremental_vacuum(conn):  # a new file, which took the mode at once
            return
        size = path.stat().st_size if path.exists() else 0
        try:
            conn.execute("VACUUM")
        except sqlite3.OperationalError as e:
            log.warning("outbox %s could not be converted to incremental vacuum (%s); it will not shrink after"
                        " a drain until it is (next start)", path, e)
            return
        log.info("outbox %s converted to incremental vacuum (%d bytes rewritten)", path, size)

    def _open_checked(self) -> sqlite3.Connection:
        try:
            conn = self._connect(self.path)
            row = conn.execute("PRAGMA quick_check").fetchone()
            if row is None or row[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {row[0] if row else 'no answer'}")
            conn.executescript(SCHEMA)
            add_missing_columns(conn, MIGRATIONS)
            return conn
        except sqlite3.DatabaseError as e:
            with contextlib.suppress(Exception):
                conn.close()
            if (kind := refusal_kind(e)) is not None:
                # Not corruption: on a full disk SQLite cannot even create the WAL. Moved aside, the file would be
                # replaced by an empty outbox (no book, no sequence numbers) as soon as there is room.
                raise WriteFailed(kind, e) from e
            return self._replace_corrupt(str(e))

    def _replace_corrupt(self, reason: str) -> sqlite3.Connection:
        stamp = rfc3339(self.clock.now()).replace(":", "").replace("-", "")
        moved = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while moved.exists():  # same clock reading as an earlier move (a box without RTC): never overwrite it
            n += 1
            moved = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                shutil.move(src, Path(str(moved) + suffix))
        conn = self._connect(self.path)
        conn.executescript(SCHEMA)
        salvaged, failed = _salvage(moved, conn)
        if failed or "seqs" not in salvaged:
            # The last sequence numbers (or the book they describe) are lost: jump far ahead so HQ sees a gap and resyncs,
            # instead of discarding the new messages as duplicates of old ones.
            base = int(self.clock.now() * 1000)

            def jump(c: sqlite3.Connection) -> None:
                c.executemany(
                    "INSERT INTO seqs(stream, last) VALUES (?, ?)"
                    " ON CONFLICT(stream) DO UPDATE SET last = max(last, excluded.last)",
                    [(s, base) for s in STREAMS],
                )
                floors = {s: last + 1 for s, last in c.execute("SELECT stream, last FROM seqs")}
                c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('seq_floor', ?)", (json.dumps(floors),))

            self._lock_free_tx(conn, jump)
        self._lock_free_tx(
            conn,
            lambda c: c.execute(
                "INSERT INTO alerts(ts, kind, message) VALUES (?,?,?)",
                (
                    self.clock.now(),
                    "outbox.corrupt",
                    f"outbox database was corrupt ({reason}); moved to {moved.name}; salvaged {salvaged}"
                    + (f"; unreadable: {', '.join(failed)} (sequence numbers restarted ahead so HQ resyncs)"
                       if failed or "seqs" not in salvaged else ""),
                ),
            ),
        )
        log.error("outbox %s was corrupt (%s): moved to %s, salvaged %s", self.path, reason, moved, salvaged)
        return conn

    @staticmethod
    def _lock_free_tx(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], object]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _instance_id(self) -> str:
        """This outbox file's own id, made when it is first opened: a copy of the file (a restored backup,
        a cloned box) carries the same id, which is how HQ tells a copy from a new box."""
        with self.transaction() as tx:
            tx.conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('instance', ?)", (str(ULID()),))
            return tx.conn.execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.conn.close()

    # ------------------------------------------------------------ writing

    def on_enqueue(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    @property
    def write_failing(self) -> bool:
        """The disk refused the last write (full, I/O error) and none has committed since."""
        return self.disk.failing

    @contextlib.contextmanager
    def transaction(self) -> Iterator[OutboxTx]:
        """One write transaction. If the disk refuses it, nothing of it is kept and the caller gets
        ``WriteFailed`` (see diskstate.py); the next one to commit carries the episode's alert."""
        with self._lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                tx = OutboxTx(self, self.conn)
                try:
                    now = self.clock.now()
                    closing = self.disk.closing_alert(now)
                    if closing is not None:
                        # First, so that a health report in this transaction carries it. Not tx.alert: that logs
                        # at once, and this insert is undone for as long as the disk refuses the commit.
                        self.conn.execute("INSERT INTO alerts(ts, kind, message) VALUES (?,?,?)", (now, *closing))
                    yield tx
                    self.conn.execute("COMMIT")
                except BaseException:
                    if self.conn.in_transaction:  # a COMMIT refused for SQLITE_FULL has been rolled back already
                        self.conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                kind = None if isinstance(e, WriteFailed) else refusal_kind(e)
                if kind is None:
                    raise
                if self.disk.refused(kind, self.clock.now(), str(e)):
                    log.error("outbox write refused (%s): sources hold their input and retry until one commits",
                              e)
                raise WriteFailed(kind, e) from e
            self.disk.committed()
            self.facts_enqueued += tx.enqueued
        if closing is not None:
            log.warning(f"alert {closing[0]}: %s", closing[1])
        if tx.enqueued:
            for fn in self._listeners:
                fn()

    def enqueue(self, stream: str, facts: Sequence[Fact]) -> None:
        if facts:
            with self.transaction() as tx:
                tx.enqueue(stream, facts)

    def alert(self, kind: str, message: str) -> None:
        with self.transaction() as tx:
            tx.alert(kind, message)

    def quarantine(self, source: str, reason: str, raw: bytes | str | None) -> None:
        """Keep a bad input with its reason; the table keeps the newest ``quarantine_keep`` rows."""
        self.quarantine_many(source, [(reason, raw)], 1)

    def quarantine_many(self, source: str, bad: Sequence[tuple[str, bytes | str | None]], keep: int) -> None:
        """Quarantine a batch of (reason, raw) in one transaction and one log line: the first ``keep`` are
        stored, the rest only counted, so a flood of garbage is counted in full but cannot crowd out the
        rest of the table (nor cost a synced commit per record)."""
        if not bad:
            return
        now = self.clock.now()
        rows = [(now, source, reason[:2000], _quarantine_raw(raw)) for reason, raw in bad[:keep]]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        log.warning(f"quarantined input from {source}: %s%s", bad[0][0], more)  # coalesced per source
        with self.transaction() as tx:
            tx.conn.executemany("INSERT INTO quarantine(at, source, reason, raw) VALUES (?,?,?,?)", rows)
            last = tx.conn.execute("SELECT max(id) FROM quarantine").fetchone()[0] or 0
            tx.conn.execute("DELETE FROM quarantine WHERE id <= ?", (last - self.quarantine_keep,))
            tx.bump(f"quarantined.{source}", len(bad))

    @staticmethod
    def _bump(conn: sqlite3.Connection, name: str, by: int) -> None:
        conn.execute(
            "INSERT INTO counters(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

    # ------------------------------------------------------------ sealing and acks

    def max_pending_id(self) -> int:
        with self._lock:
            return self.conn.execute("SELECT coalesce(max(id), 0) FROM pending").fetchone()[0]

    def take_dirty(self) -> set[str]:
        """Streams that have had facts enqueued since the last call (a hint: may include rolled-back ones)."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        return dirty

    def streams_with_pending(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self.conn.execute("SELECT DISTINCT stream FROM pending")]

    def seal(self, stream: str, *, after_id: int = -(2**62), up_to_id: int | None = None) -> SealedMessage | None:
        """Seal the oldest pending facts of ``stream`` with ``after_id < id <= up_to_id`` into one message."""
        spec = STREAMS[stream]
        hi = up_to_id if up_to_id is not None else 2**62
        limit = self.max_body_bytes // 24 + 1 if spec.batched else 1
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                cur = self.conn.execute(
                    "SELECT id, ts, created, body FROM pending WHERE stream = ? AND id > ? AND id <= ? ORDER BY id LIMIT ?",
                    (stream, after_id, hi, limit),
                )
                if spec.batched:
                    # Step only through the rows that fit the byte bound (``limit`` assumes tiny facts).
                    rows, size = [], 11
                    for row in cur:
                        n = utf8_len(row[3])
                        if rows and size + n + 1 > self.max_body_bytes:
                            break
                        size += n + 1
                        rows.append(row)
                    cur.close()
                else:
                    rows = cur.fetchall()
                if not rows:
                    self.conn.execute("ROLLBACK")
                    return None
                if spec.batched:
                    body = '{"items":[' + ",".join(r[3] for r in rows) + "]}"
                else:
                    body = rows[0][3]
                msg_id = str(ULID())
                last, prev = self.last_mark(stream)
                seq = last + 1
                self.conn.execute(
                    "INSERT OR REPLACE INTO seqs(stream, last, last_id) VALUES (?,?,?)", (stream, seq, msg_id)
                )
                msg = SealedMessage(
                    stream=stream,
                    seq=seq,
                    id=msg_id,
                    type=spec.type,
                    ts=min(r[1] for r in rows),
                    oldest_created=min(r[2] for r in rows),
                    facts=len(rows),
                    body=body,
                    prev=prev,
                )
                if self._sign is not None:
                    msg = dataclasses.replace(msg, sig=self._sign(msg))
                self.conn.execute(
                    f"INSERT INTO sealed({SEALED_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (msg.stream, msg.seq, msg.id, msg.type, msg.ts, msg.oldest_created, msg.facts, msg.body,
                     msg.prev, msg.sig),
                )
                self.conn.execute(
                    "DELETE FROM pending WHERE stream = ? AND id >= ? AND id <= ?", (stream, rows[0][0], rows[-1][0])
                )
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
            self._unacked[stream] = self._unacked.get(stream, 0) + 1
            self.facts_sealed += msg.facts
            return msg

    def sealed_after(self, stream: str, after_seq: int, limit: int) -> list[SealedMessage]:
        with self._lock:
            rows = self.conn.execute(
                f"SELECT {SEALED_COLS} FROM sealed WHERE stream = ? AND seq > ? ORDER BY seq LIMIT ?",
                (stream, after_seq, limit),
            ).fetchall()
        return [SealedMessage(*r) for r in rows]

    def sealed_streams(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self.conn.execute("SELECT DISTINCT stream FROM sealed")]

    def ack_through(self, stream: str, seq: int, msg_id: str) -> AckResult:
        """HQ has applied ``stream`` up to ``seq``, whose message had id ``msg_id``: forget what it covers.

        If HQ names a seq this outbox never sealed, or another id at a seq it holds (or last sealed),
        this outbox went back in time: see :meth:`_rewind`. An ack for what was already forgotten is
        harmless (a late or repeated ack)."""
        with self._lock:
            # No fsync of its own: if power loss undoes it, the message is still sealed, is resent, and
            # HQ drops it as a duplicate. The next durable commit (or checkpoint) syncs it.
            relax = self._synchronous != "NORMAL"
            if relax:
                self.conn.execute("PRAGMA synchronous=NORMAL")
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                last, last_id = self.last_mark(stream)
                held = self.conn.execute(
                    "SELECT id FROM sealed WHERE stream = ? AND seq = ?", (stream, seq)
                ).fetchone()
                if seq > last:
                    result = self._rewind(stream, seq, msg_id, f"HQ has applied seq {seq}, beyond the last sealed ({last})")
                elif held is not None and msg_id and held[0] != msg_id:  # "" : HQ does not know the id
                    result = self._rewind(stream, seq, msg_id, f"seq {seq} is {held[0]} here, {msg_id or '?'} at HQ")
                elif held is None and seq == last and last_id and msg_id and last_id != msg_id:
                    result = self._rewind(stream, seq, msg_id, f"seq {seq} was {last_id} here, {msg_id} at HQ")
                else:
                    n = self.conn.execute("DELETE FROM sealed WHERE stream = ? AND seq <= ?", (stream, seq)).rowcount
                    result = AckResult(deleted=n)
                self.conn.execute("COMMIT")
            finally:
                if self.conn.in_transaction:  # failed: keep the rows (they are resent), free the connection
                    self.conn.execute("ROLLBACK")
                if relax:
                    self.conn.execute(f"PRAGMA synchronous={self._synchronous}")
            if result.rewind:
                self._unacked[stream] = 0
                self._dirty.add(stream)
            else:
                self._unacked[stream] = max(0, self._unacked.get(stream, 0) - result.deleted)
            return result

    def _rewind(self, stream: str, hq_seq: int, hq_id: str, why: str) -> AckResult:
        """Inside an open transaction: HQ applied messages this outbox no longer has (or has other ones
        under the same numbers). Every sealed message of the stream goes back to pending, ahead of the
        facts already pending, so nothing is lost; the numbering continues from HQ's position and chains
        on to HQ's last id, so no seq is ever sent with two contents. The caller snapshots the book."""
        spec = STREAMS[stream]
        rows = self.conn.execute(
            "SELECT body, oldest_created FROM sealed WHERE stream = ? ORDER BY seq", (stream,)
        ).fetchall()
        facts: list[tuple[str | None, float, float, str]] = []
        for body, created in rows:
            if spec.batched:
                for item in json.loads(body)["items"]:
                    text = json.dumps(item, separators=(",", ":"))
                    facts.append((compaction.fact_key(stream, item), _item_ts(item) or created, created, text))
            else:
                facts.append((None, _item_ts(json.loads(body)) or created, created, body))
        lowest = self.conn.execute("SELECT coalesce(min(id), 1) FROM pending").fetchone()[0]
        first = min(lowest, 1) - len(facts)
        self.conn.execute("DELETE FROM sealed WHERE stream = ?", (stream,))
        insert_rows(
            self.conn,
            "INSERT INTO pending(id, stream, key, ts, created, body)",
            6,
            [(first + i, stream, k, ts, created, b) for i, (k, ts, created, b) in enumerate(facts)],
        )
        self.conn.execute("INSERT OR REPLACE INTO seqs(stream, last, last_id) VALUES (?,?,?)", (stream, hq_seq, hq_id))
        message = (f"{stream}: {why}; this outbox went back in time (lost WAL, restored backup or copied box): "
                   f"{len(rows)} unacknowledged messages ({len(facts)} facts) back to pending, numbering moved to {hq_seq}")
        self.conn.execute(
            "INSERT INTO alerts(ts, kind, message) VALUES (?,?,?)", (self.clock.now(), "outbox.rewind", message)
        )
        self._bump(self.conn, "rewinds", 1)
        log.error("alert outbox.rewind: %s", message)
        return AckResult(deleted=0, rewind=True, repended=len(facts))

    def unacked(self, stream: str | None = None) -> int:
        """Sealed messages HQ has not acknowledged (of one stream, or all)."""
        with self._lock:
            return self._unacked.get(stream, 0) if stream else sum(self._unacked.values())

    def high_water(self) -> dict[str, dict[str, object]]:
        """Per stream, the last sealed seq and its id: what HQ should hold once everything arrived."""
        return {s: {"seq": last, "id": last_id} for s, last, last_id in self.read("SELECT stream, last, last_id FROM seqs")}

    def seq_floors(self) -> dict[str, int]:
        """Per stream, the first seq after a rebuild from a corrupt file (empty if there never was one)."""
        rows = self.read("SELECT value FROM meta WHERE key = 'seq_floor'")
        return {str(k): int(v) for k, v in json.loads(rows[0][0]).items()} if rows else {}

    def last_seq(self, stream: str, conn: sqlite3.Connection | None = None) -> int:
        return self.last_mark(stream, conn)[0]

    def last_mark(self, stream: str, conn: sqlite3.Connection | None = None) -> tuple[int, str]:
        """The last sealed seq of ``stream`` and that message's id ((0, "") before the first)."""
        with self._lock:
            row = (conn or self.conn).execute("SELECT last, last_id FROM seqs WHERE stream = ?", (stream,)).fetchone()
        return (row[0], row[1]) if row else (0, "")

    # ------------------------------------------------------------ figures

    def read(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        with self._lock:
            return self.conn.execute(sql, params).fetchall()

    def used_bytes(self) -> int:
        """Bytes in the file's pages in use (free pages not counted): cheap, three header fields."""
        with self._lock:
            pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
            free = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
            size = self.conn.execute("PRAGMA page_size").fetchone()[0]
        return (pages - free) * size

    def disk_use(self) -> DiskUse:
        """The pages in use, split into what waits to be sent and the book. SQLite's dbstat walks the
        pages of one side and the other is the rest; it walks the side that was smaller last time,
        so a day's backlog beside a small book, or a big book beside an empty queue, cost little (about
        0.6 ms per MB walked here). Pages of no b-tree (auto-vacuum's pointer maps, one in 819) fall on
        the side not walked. A SQLite built without dbstat counts everything in use as queued: never
        less than the truth."""
        with self._lock:
            used = self.used_bytes()
            if not self._dbstat:
                return DiskUse(used, used, 0)
            queue_side = self._last_use.queued <= self._last_use.book
            side = self.conn.execute(_BTREE_BYTES, (int(queue_side),)).fetchone()[0]
            queued = side if queue_side else used - side
            self._last_use = DiskUse(used, queued, used - queued)
            return self._last_use

    def file_bytes(self) -> int:
        return sum(
            p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists()
        )

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self.conn.execute("SELECT name, value FROM counters").fetchall())

    def pending_count(self) -> int:
        with self._lock:
            return self.conn.execute("SELECT count(*) FROM pending").fetchone()[0]

    def oldest_waiting(self) -> float | None:
        """When the oldest fact HQ has not acknowledged was created (None when nothing waits): the oldest
        sealed message and each stream's head of the pending queue, a few index lookups however deep the
        backlog (a scan of a million pending facts would hold the lock for a good part of a second). A
        pending queue is in creation order except for facts the cap merged (compaction keeps the oldest
        time under a new id), so under cap pressure this can be younger than the truth."""
        with self._lock:
            heads = [self.conn.execute("SELECT created FROM pending WHERE stream = ? ORDER BY id LIMIT 1",
                                       (stream,)).fetchone() for stream in STREAMS]
            sealed = self.conn.execute("SELECT min(oldest_created) FROM sealed").fetchone()[0]
        return min([h[0] for h in heads if h] + ([sealed] if sealed is not None else []), default=None)

    def sealed_count(self) -> int:
        with self._lock:
            return self.conn.execute("SELECT count(*) FROM sealed").fetchone()[0]

    def quarantined(self, limit: int = 100) -> list[tuple[float, str, str, bytes | None]]:
        with self._lock:
            return self.conn.execute(
                "SELECT at, source, reason, raw FROM quarantine ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()

    def take_alerts(self, tx: OutboxTx) -> list[tuple[float, str, str]]:
        rows = tx.conn.execute("SELECT id, ts, kind, message FROM alerts WHERE reported = 0 ORDER BY id").fetchall()
        if rows:
            tx.conn.execute("UPDATE alerts SET reported = 1 WHERE id <= ?", (rows[-1][0],))
        return [(ts, kind, msg) for _, ts, kind, msg in rows]

    # ------------------------------------------------------------ disk cap

    def enforce_cap(self) -> CapReport | None:
        """Bring what waits to be sent back under the cap (compact, then coarsen, then drop the lowest
        classes), then give free pages back to the file system. Returns the round's report, or None if
        what waits was within the cap.

        The cap budgets the queue, not the book: a book bigger than the cap is the store's state, which
        nothing here could shrink. Rounds past the cap make an episode, warned about when it starts,
        alerted once if undroppable facts alone exceed the cap, and logged when what waits is back under
        the target (not when it merely dips under the cap between two rounds of a long outage).
        """
        with self._lock:
            report = self._enforce()
            self._reclaim()
        return report

    def _enforce(self) -> CapReport | None:
        target = int(self.cap_bytes * CAP_TARGET)
        if self.used_bytes() <= target:  # what waits is a part of what is in use: no pages to walk
            self._end_episode()
            return None
        use = self.disk_use()
        if use.queued <= self.cap_bytes:
            if use.queued <= target:
                self._end_episode()
            return None

        def queued() -> int:
            # While the lock is held only this round writes, and only to the queue (and a few counters):
            # the book stays as measured, so what waits is what is in use less the book, without a walk.
            return self.used_bytes() - use.book

        report = CapReport(queued_before=use.queued, queued_after=use.queued)
        report.compacted = self._compact_inventory()
        for level in compaction.COARSEN_LEVELS_S:
            if queued() <= target:
                break
            report.coarsened += self._coarsen(level)
        for spec in sorted((s for s in STREAMS.values() if s.droppable), key=lambda s: s.drop_order):
            while queued() > target:
                # Small steps, so only the oldest go: the figure is checked again after each.
                n = self._drop_oldest(spec.name, 200)
                if not n:
                    break
                report.dropped[spec.name] = report.dropped.get(spec.name, 0) + n
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        report.queued_after = queued()
        self._record(report, use.book)
        return report

    def _record(self, report: CapReport, book: int) -> None:
        ep = self._over_cap
        first = ep is None
        if ep is None:
            ep = self._over_cap = CapEpisode(self.clock.now())
        ep.rounds += 1
        ep.compacted += report.compacted
        ep.coarsened += report.coarsened
        ep.dropped.update(report.dropped)
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "outbox over its cap of %d bytes: %d -> %d bytes wait to be sent (book %d, not capped); compacted %d,"
            " coarsened %d, dropped %s",
            self.cap_bytes, report.queued_before, report.queued_after, book, report.compacted, report.coarsened,
            report.dropped,
        )
        if report.queued_after > self.cap_bytes and not ep.alerted:
            ep.alerted = True
            self.alert(
                "outbox.cap_exceeded",
                f"{report.queued_after} bytes of undroppable facts wait to be sent, over the outbox's cap of"
                f" {self.cap_bytes}",
            )

    def _end_episode(self) -> None:
        ep, self._over_cap = self._over_cap, None
        if ep is not None:
            log.info(
                "outbox back under its cap after %.0f s and %d rounds: compacted %d, coarsened %d, dropped %s",
                self.clock.now() - ep.started, ep.rounds, ep.compacted, ep.coarsened, dict(ep.dropped),
            )

    def _reclaim(self) -> None:
        """Give free pages beyond a WAL's worth back to the file system, a WAL's worth per round (so the
        pages moved fit the WAL's bound), once what waits is down to that much too: after a drain. The
        file shrinks from its end, so until then every page of the backlog still at the end would be moved
        to the front, competing with the drain for the disk. The slack left is reused by the queue's
        churn: shrinking the file only to grow it again would be I/O for nothing."""
        size = self.conn.execute("PRAGMA page_size").fetchone()[0]
        slack = wal_limit(self.cap_bytes) // size
        excess = self.conn.execute("PRAGMA freelist_count").fetchone()[0] - slack
        if excess <= 0 or self.disk_use().queued > slack * size:
            return
        # executescript steps the pragma to the end; execute would free one page per call.
        self.conn.executescript(f"PRAGMA incremental_vacuum({min(excess, slack)});")
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _replace_group(self, stream: str, ids: list[int], merged: list[tuple[str | None, float, float, str]]) -> None:
        self.conn.executemany("DELETE FROM pending WHERE id = ?", [(i,) for i in ids])
        self.conn.executemany(
            "INSERT INTO pending(stream, key, ts, created, body) VALUES (?,?,?,?,?)",
            [(stream, k, ts, created, body) for k, ts, created, body in merged],
        )

    def _compact_inventory(self) -> int:
        """Sum pending inventory deltas with the same (zone, GTIN); lossless because deltas commute."""
        stream = "inventory/delta"
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            groups = self.conn.execute(
                "SELECT key FROM pending WHERE stream = ? AND key IS NOT NULL GROUP BY key HAVING count(*) > 1",
                (stream,),
            ).fetchall()
            removed = 0
            for (key,) in groups:
                rows = self.conn.execute(
                    "SELECT id, ts, created, body FROM pending WHERE stream = ? AND key = ? ORDER BY id", (stream, key)
                ).fetchall()
                merged = compaction.merge_inventory([json.loads(r[3]) for r in rows])
                self._replace_group(
                    stream,
                    [r[0] for r in rows],
                    [(key, max(r[1] for r in rows), min(r[2] for r in rows), json.dumps(merged, separators=(",", ":")))],
                )
                removed += len(rows) - 1
            self._bump(self.conn, "compacted", removed)
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return removed

    def _coarsen(self, level_s: int) -> int:
        removed = 0
        for stream in compaction.ANALYTICS_MERGE:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                rows = self.conn.execute(
                    "SELECT id, ts, created, body FROM pending WHERE stream = ? ORDER BY id", (stream,)
                ).fetchall()
                merged = compaction.coarsen(stream, (r[3] for r in rows), level_s) if len(rows) > 1 else []
                if merged and len(merged) < len(rows):
                    key_of = compaction.ANALYTICS_MERGE[stream][0]
                    created = min(r[2] for r in rows)
                    self._replace_group(
                        stream,
                        [r[0] for r in rows],
                        [(key_of(m), _ts_of(m), created, json.dumps(m, separators=(",", ":"))) for m in merged],
                    )
                    removed += len(rows) - len(merged)
                    self._bump(self.conn, "coarsened", len(rows) - len(merged))
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
        return removed

    def _drop_oldest(self, stream: str, n: int) -> int:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            cur = self.conn.execute(
                "DELETE FROM pending WHERE id IN (SELECT id FROM pending WHERE stream = ? ORDER BY id LIMIT ?)",
                (stream, n),
            )
            dropped = cur.rowcount
            if dropped:
                self._bump(self.conn, f"dropped.{stream}", dropped)
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return dropped


def _ts_of(item: dict) -> float:
    return parse_rfc3339(item["bucket_start"])


def _item_ts(item: object) -> float:
    """When a fact happened, read back from its JSON (items carry ``ts`` or ``bucket_start``)."""
    if isinstance(item, dict):
        for k in ("ts", "bucket_start"):
            if isinstance(item.get(k), str):
                return parse_rfc3339(item[k])
    return 0.0


def add_missing_columns(conn: sqlite3.Connection, migrations: Sequence[tuple[str, str, str]]) -> None:
    """Add the columns a database made by an older release lacks (SQLite adds a column in place)."""
    for table, column, definition in migrations:
        if column not in {r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')}:
            conn.execute(f'ALTER TABLE "{table}" ADD COLUMN {column} {definition}')


def _salvage(moved: Path, into: sqlite3.Connection) -> tuple[dict[str, int], list[str]]:
    """Copy whatever can still be read from a corrupt outbox into the fresh one: every table, including
    those other components keep here (the inventory book, source positions, tag presence, commands).

    Returns rows copied per table and the tables that could not be read whole. The caller must treat
    any loss as losing the sequence numbers too: a half-salvaged book must be resynced, not trusted.
    """
    salvaged: dict[str, int] = {}
    failed: list[str] = []
    try:
        src = sqlite3.connect(f"file:{moved}?mode=ro", uri=True)
        tables = src.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall()
    except sqlite3.Error:
        return salvaged, ["(schema)"]
    for name, sql in tables:
        if name.startswith("sqlite_") or not sql:
            continue
        try:
            cols = [r[1] for r in src.execute(f'PRAGMA table_info("{name}")')]
            rows = src.execute(f'SELECT {", ".join(cols)} FROM "{name}"').fetchall()
        except sqlite3.Error:
            failed.append(name)
            continue
        into.execute("BEGIN IMMEDIATE")
        into.execute(sql.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1))
        into.executemany(
            f'INSERT OR IGNORE INTO "{name}"({", ".join(cols)}) VALUES ({",".join("?" * len(cols))})', rows
        )
        into.execute("COMMIT")
        salvaged[name] = len(rows)
    src.close()
    return salvaged, failed
