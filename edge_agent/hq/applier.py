"""The HQ apply engine: exactly-once per (store, stream) from at-least-once delivery.

Rules, per (store, stream):
- A message is applied only if ``seq == last + 1`` and it chains on to what was applied (its ``prev``
  is the id of message ``last``); ``seq <= last`` is a duplicate and ignored. State, ``last`` and its
  id change in one transaction, and HQ's ack (what it applied: seq and id) goes out after the commit.
- A message from the future is stashed (durably). So is a gap announced by the store's high-water
  mark (health and status carry its last sealed seq per stream): a tail lost on the way shows within
  one health interval. When the reorder window runs out and the stream did not move in it (a stream
  that moves is queued somewhere, not lost), HQ asks the store to ``replay`` from
  ``last + 1`` (the store keeps every message until HQ's ack covers it). Only if the store answers
  that it no longer holds them (or never sent them: a rebuilt outbox's seq floor) does HQ give up:
  inventory asks for ``inventory.resync`` and installs the snapshot, other streams skip ahead and
  count what was lost.
- A store that went back in time (a lost WAL, a restored backup, a copied box) shows as a message at
  HQ's last seq with another id, a message whose ``prev`` is not HQ's last id, or a birth whose
  high-water mark is below what HQ applied. Nothing of it is applied; HQ counts a rewind, raises an
  alert and acks its own position, from which the store renumbers past it and sends a snapshot.
- Sanity before anything is applied: a seq more than ``max_seq_jump`` past the last (or the store's
  announced floor) is refused, and so is a snapshot as of such a seq.
- A snapshot ahead of what HQ applied waits for the deltas it covers (the store holds them until
  acked), unless HQ gave up on them and asked for it, and then only up to what HQ knows the store
  sealed. One older than what HQ applied is brought forward with the journal of the deltas applied
  since (kept for the last ``JOURNAL_KEEP`` messages), so a resync never races the live stream.

Any number of receivers may run this applier on one database at once (MQTT shared subscriptions
hand each a share of every store's messages): everything a later message, a store's answer or another
receiver needs is in the database, written under the store's lock (``HqStore.tx``): the stash, the
high-water mark, what the store said it no longer holds, an open rewind, its recent births, when a
replay was asked and when an unanswered command was last sent. Each receiver discovers open gaps from
the database (every ``DISCOVER_S``), so one killed with a gap open leaves it to the others.

A receiver hands the applier a batch of messages (``receive_batch``): one transaction, each message in
a savepoint of it, so a bad one undoes only itself and the batch commits once (group commit). A
message below the seq this receiver saw committed in its stream is a duplicate (a store resending while
HQ was away piles them up at the broker): counted per stream, never opened in a savepoint of its own.

Timers (reorder window, retries) run on each receiver's injected monotonic clock; the wall clock
stamps, and is what receivers compare across processes, only to ask a store for a replay, a resync
or a command once rather than once per receiver.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from ulid import ULID

from ..clock import Clock, rfc3339
from ..contract import (
    MESSAGE_MODELS,
    STATUS_STREAM,
    Ack,
    Command,
    Envelope,
    Mark,
    ack_topic,
    command_topic,
    split_topic,
)
from ..sync.outbox import insert_rows
from .store import HqStore, Tx, Unstorable

log = logging.getLogger(__name__)

DELTA = "inventory/delta"
SNAPSHOT = "inventory/snapshot"
LABELS = "esl/state"
HEALTH = "health"
CMD_RESULT = "cmd-result"
MAX_PAYLOAD = 16 * 1024 * 1024
JOURNAL_KEEP = 4096
CLONE_QUIET_S = 10.0
AUTO = "hq:auto"  # who, in the audit log, for the commands HQ sends on its own (no token name has a colon)
DISCOVER_S = 1.0  # how often a receiver looks in the database for gaps and snapshots others left open


class Implausible(ValueError):
    """A well-formed message that cannot be true of the store (a forged or corrupted number)."""


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


@dataclass
class Gap:
    """An open gap in one stream, as this receiver sees it: since when (monotonic), HQ's last seq
    then, and when it last asked (or saw asked) for a replay."""

    since: float
    last: int
    asked_at: float | None = None


class HqApplier:
    def __init__(
        self,
        store: HqStore,
        clock: Clock,
        *,
        prefix: str,
        reorder_window_s: float = 2.0,
        resync_retry_s: float = 15.0,
        max_seq_jump: int = 100_000,
        on_applied: Callable[[Applied], None] | None = None,
        on_rejected: Callable[[str], None] | None = None,
        verify: Callable[[str, bytes], str | None] | None = None,
        sign: Callable[[dict[str, Any]], bytes] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = store
        self.clock = clock
        self.prefix = prefix
        self.reorder_window_s = reorder_window_s
        self.resync_retry_s = resync_retry_s
        self.max_seq_jump = max_seq_jump
        self.on_applied = on_applied
        self.on_rejected = on_rejected  # (reason), for HQ's metrics
        self._verify = verify  # (store, payload) -> None if authentic, else the reason
        self._sign = sign  # dict -> signed JSON bytes, for commands and acks
        self._mono = monotonic
        self.figures = Figures()
        self.ack_due: set[str] = set()  # stores whose ack should go out (after the commit that moved them)
        self._gaps: dict[tuple[str, str], Gap] = {}
        self._waiting_snapshots: set[str] = set()
        self._pending: list[Applied] | None = None  # applied in the open batch, told once it commits
        # Per (store, stream), the highest seq this receiver saw committed: a lower bound of last_seq
        # (which never goes down), learnt only after the commit, so a batch rolled back teaches nothing.
        self._committed: dict[tuple[str, str], int] = {}
        self._discovered_at = -1e9
        self._discover()

    def _discover(self) -> None:
        """Open gaps and waiting snapshots, whoever left them (another receiver, or this one before a restart)."""
        now = self._mono()
        self._discovered_at = now
        for st, stream, last in self.db.read(
            "SELECT s.store, s.stream, s.last_seq FROM streams AS s WHERE s.hwm > s.last_seq"
            " OR EXISTS (SELECT 1 FROM stash AS x WHERE x.store = s.store AND x.stream = s.stream)"
        ):
            self._gaps.setdefault((st, stream), Gap(now, last))
        self._waiting_snapshots |= {r[0] for r in self.db.read("SELECT DISTINCT store FROM snapshot_parts")}

    # ------------------------------------------------------------ intake

    def receive(self, topic: str, payload: bytes, retained: bool = False) -> list[Outgoing]:
        return self.receive_batch([(topic, payload, retained)])

    def receive_batch(self, batch: Sequence[tuple[str, bytes, bool]]) -> list[Outgoing]:
        """Apply messages (topic, payload, retained) in one transaction: parsed and verified first,
        outside it, then each in a savepoint under the locks of every store in the batch. Raises (and
        has applied nothing) only if the database itself failed: the caller acks nothing and retries."""
        parsed = [(topic, payload, retained, self._parse(topic, payload)) for topic, payload, retained in batch]
        stores = {env.store for *_, env in parsed if isinstance(env, Envelope)}
        # A message below what this receiver saw committed is a duplicate (a store resending while HQ was
        # away, a broker redelivering): counted in one statement per stream, not applied one by one.
        dups: Counter[tuple[str, str]] = Counter()
        self._pending = []
        try:
            with self.db.tx(*stores) as c:
                for topic, payload, retained, env in parsed:
                    if isinstance(env, str):
                        self._reject(topic, env, payload)
                    elif env is None:
                        continue
                    elif env.stream != STATUS_STREAM and env.seq < self._committed.get((env.store, env.stream), 0):
                        dups[(env.store, env.stream)] += 1
                        self.ack_due.add(env.store)  # it resends because it has not heard: tell it again
                    else:
                        self._one(topic, payload, retained, env)
                c.executemany("UPDATE streams SET duplicates = duplicates + ? WHERE store = ? AND stream = ?",
                              [(n, *key) for key, n in dups.items()])
            applied = self._pending
        finally:
            self._pending = None
        self._notify(applied)
        return []

    def _parse(self, topic: str, payload: bytes) -> Envelope | str | None:
        """The message, or why it is refused (None: HQ's own downlink, seen through its subscription)."""
        parts = split_topic(self.prefix, topic)
        if parts is not None and parts.stream in ("cmd", "ack"):
            return None
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
            if self._verify is not None and (reason := self._verify(env.store, payload)):
                raise ValueError(f"signature: {reason}")
        except (ValueError, ValidationError, UnicodeDecodeError, RecursionError) as e:
            return str(e)[:500]
        return env

    def _one(self, topic: str, payload: bytes, retained: bool, env: Envelope) -> None:
        try:
            with self.db.tx(env.store):  # a savepoint: what this message did is undone if it fails
                if env.stream == STATUS_STREAM:
                    self._status(env, retained)
                    return
                if env.stream == HEALTH:
                    self._note_hwm(env.store, env.body.hwm)  # type: ignore[attr-defined]
                self._sequenced(env, payload)
        except Implausible as e:
            self._reject(topic, f"implausible: {e}", payload)
        except Unstorable as e:
            # A number beyond the database's 64-bit integers (seq, qty, ...), or a NUL in a name on PostgreSQL:
            # its transaction rolled back, nothing applied.
            self._reject(topic, f"cannot be stored: {e}", payload)
        except Exception as e:
            if isinstance(e, self.db.outage):
                raise  # the database, not the message: the whole batch waits for it
            # A message this code cannot handle is quarantined with the error, not retried for ever
            # in front of every message behind it.
            log.exception("could not apply a message on %s", topic)
            self._reject(topic, f"internal error: {e!r}"[:500], payload)

    def _reject(self, topic: str, reason: str, payload: bytes) -> None:
        self.figures.rejected += 1
        if self.on_rejected:
            self.on_rejected(reason)
        log.warning("rejected message on %s: %s", topic, reason)
        with self.db.tx() as c:
            c.execute(
                "INSERT INTO rejected(at, topic, reason, payload) VALUES (?,?,?,?)",
                # Escaped: PostgreSQL text holds no NUL, and a garbage topic or reason may have one.
                (self.clock.now(), topic.replace("\0", "\\0"), reason.replace("\0", "\\0"), payload[:65536]),
            )

    def _alert(self, c: Tx, store: str, kind: str, message: str) -> None:
        c.execute("INSERT INTO alerts(at, store, kind, message) VALUES (?,?,?,?)", (self.clock.now(), store, kind, message))
        log.warning("alert %s for %s: %s", kind, store, message)

    def _status(self, env: Envelope, retained: bool) -> None:
        b: Any = env.body
        # A rebuilt outbox restarts its numbers at its clock in milliseconds (Outbox._replace_corrupt);
        # a floor past a day from now is no such thing, and would open the way for any seq.
        ceiling = int((self.clock.now() + 86_400) * 1000)
        if any(f > ceiling for f in b.seq_floor.values()):
            raise Implausible(f"a seq floor beyond {ceiling}")
        with self.db.tx(env.store) as c:
            c.executemany(
                "INSERT INTO floors(store, stream, floor) VALUES (?,?,?)"
                " ON CONFLICT(store, stream) DO UPDATE SET floor = greatest(floors.floor, excluded.floor)",
                [(env.store, s, f) for s, f in b.seq_floor.items()],
            )
            prev = c.execute("SELECT instance, births FROM status WHERE store = ?", (env.store,)).fetchone()
            c.execute(
                "INSERT INTO status(store, state, boot_id, connection, at, instance) VALUES (?,?,?,?,?,?)"
                " ON CONFLICT(store) DO UPDATE SET state=excluded.state, boot_id=excluded.boot_id,"
                " connection=excluded.connection, at=excluded.at, instance=excluded.instance",
                (env.store, b.state, b.boot_id, b.connection, self.clock.now(), b.instance),
            )
            if b.state != "online" or retained:
                # A retained birth is an old one replayed by the broker to a new subscription: its
                # high-water mark may predate what HQ applied since, so it proves nothing.
                return
            if prev and prev[0] and b.instance and prev[0] != b.instance:
                self._alert(c, env.store, "store.new_outbox",
                            f"outbox instance {b.instance} replaces {prev[0]} (a new or rebuilt box)")
            self._check_identity(c, env.store, b.boot_id, prev_births=prev[1] if prev else "[]")
            for stream, mark in b.hwm.items():
                row = c.execute(
                    "SELECT last_seq, last_id FROM streams WHERE store = ? AND stream = ?", (env.store, stream)
                ).fetchone()
                if row is None:
                    continue
                last, last_id = row
                if mark.seq < last or (mark.seq == last and mark.id and last_id and mark.id != last_id):
                    self._rewind(c, env.store, stream, f"the store's birth says it sealed up to {mark.seq}"
                                 f" ({mark.id or '?'}), HQ applied {last} ({last_id or '?'})")
        self.ack_due.add(env.store)
        self._note_hwm(env.store, b.hwm)

    def _check_identity(self, c: Tx, store: str, boot_id: str, prev_births: str) -> None:
        """Two running agents under one store id (a cloned box) take the broker session from each
        other in turn: births alternate between two boot ids, X, Y, X, within a minute. A restart
        gives X, Y and stays on Y. (Births reach any receiver: the last three are in ``status``.)"""
        now = self.clock.now()
        births = [b for b in json.loads(prev_births) if now - b[0] < 60.0][-2:] + [[now, boot_id]]
        c.execute("UPDATE status SET births = ? WHERE store = ?", (json.dumps(births), store))
        if len(births) == 3 and births[0][1] == births[2][1] != births[1][1]:
            c.execute("UPDATE status SET clone_suspect = 1 WHERE store = ?", (store,))  # resynced once it is over
            if c.execute("UPDATE status SET clone_alerted_at = ?, identity_conflicts = identity_conflicts + 1"
                         " WHERE store = ? AND (clone_alerted_at IS NULL OR clone_alerted_at <= ?)",
                         (now, store, now - 600.0)).rowcount:
                self._alert(c, store, "store.duplicate_identity",
                            f"two agents run as {store} (boots {births[0][1]} and {births[1][1]} take turns): a cloned"
                            " box or a copied outbox; their numbers collide and HQ applies neither's conflicting"
                            " messages. Stop one of them.")

    def _rewind(self, c: Tx, store: str, stream: str, why: str) -> None:
        """The store went back in time: apply nothing of it, count once per episode, alert, ack."""
        self.ack_due.add(store)
        if not c.execute("UPDATE streams SET rewinds = rewinds + 1, rewinding = 1 WHERE store = ? AND stream = ?"
                         " AND rewinding = 0", (store, stream)).rowcount:
            return  # this episode is counted already
        self._alert(c, store, "store.rewind", f"{stream}: {why}; the store went back in time (lost WAL, restored"
                    " backup or copied box): nothing of it applied, HQ's position sent back")

    def _note_hwm(self, store: str, hwm: dict[str, Mark]) -> None:
        """The store has sealed up to these seqs: what HQ lacks of them is a gap, even with nothing stashed."""
        if not hwm:
            return
        with self.db.tx(store) as c:
            for stream, mark in hwm.items():
                last = self._last(c, store, stream)[0]
                if mark.seq > self._limit(c, store, stream, last):
                    continue  # implausible: proves nothing, opens nothing
                c.execute("UPDATE streams SET hwm = greatest(hwm, ?) WHERE store = ? AND stream = ?", (mark.seq, store, stream))
                if mark.seq > last:
                    self._gaps.setdefault((store, stream), Gap(self._mono(), last))
        self._retry_snapshots(store)

    # ------------------------------------------------------------ sequenced streams

    @staticmethod
    def _last(c: Tx, store: str, stream: str) -> tuple[int, str]:
        row = c.execute("SELECT last_seq, last_id FROM streams WHERE store = ? AND stream = ?", (store, stream)).fetchone()
        if row is None:
            c.execute("INSERT INTO streams(store, stream) VALUES (?, ?)", (store, stream))
            return 0, ""
        return row[0], row[1]

    @staticmethod
    def _floor(c: Tx, store: str, stream: str) -> int:
        row = c.execute("SELECT floor FROM floors WHERE store = ? AND stream = ?", (store, stream)).fetchone()
        return row[0] if row else 0

    def _limit(self, c: Tx, store: str, stream: str, last: int) -> int:
        return max(last, self._floor(c, store, stream)) + self.max_seq_jump

    def _missing(self, c: Tx, store: str, stream: str, last: int, upto: int) -> int:
        """How many numbers in (last, upto] the store sent that never arrived: those below its seq floor
        were never sent (its outbox was rebuilt from a corrupt file and started there)."""
        floor = self._floor(c, store, stream)
        return max(0, upto - (max(last, floor - 1) if floor else last))

    def _sequenced(self, env: Envelope, payload: bytes) -> None:
        key = (env.store, env.stream)
        with self.db.tx(env.store) as c:
            last, last_id = self._last(c, *key)
            # The floor only lifts the limit, so it is read only for a seq past the plain one.
            if env.seq > last + self.max_seq_jump and env.seq > self._limit(c, *key, last):
                raise Implausible(f"seq {env.seq} is more than {self.max_seq_jump} past {last}")
            if env.stream == SNAPSHOT:
                as_of, delta_last = env.body.as_of_seq, self._last(c, env.store, DELTA)[0]  # type: ignore[attr-defined]
                if as_of > self._limit(c, env.store, DELTA, delta_last):
                    raise Implausible(f"snapshot as of seq {as_of}, more than {self.max_seq_jump} past {delta_last}")
            self.ack_due.add(env.store)
            if env.seq <= last:
                if env.seq == last and last_id and env.id != last_id:
                    self._rewind(c, *key, f"seq {last} arrived as {env.id}, HQ applied {last_id}")
                else:
                    c.execute("UPDATE streams SET duplicates = duplicates + 1 WHERE store = ? AND stream = ?", key)
                return
            if env.seq > last + 1:
                c.execute("UPDATE streams SET hwm = greatest(hwm, ?) WHERE store = ? AND stream = ?", (env.seq, *key))
                cur = c.execute(
                    "INSERT INTO stash(store, stream, seq, payload) VALUES (?,?,?,?) ON CONFLICT DO NOTHING",
                    (*key, env.seq, payload),
                )
                if not cur.rowcount:
                    c.execute("UPDATE streams SET duplicates = duplicates + 1 WHERE store = ? AND stream = ?", key)
                self._gaps.setdefault(key, Gap(self._mono(), last))
                return
            if last_id and not env.prev:
                raise Implausible(f"seq {env.seq} names no message before it (HQ applied {last_id} at {last})")
            if last_id and env.prev != last_id:
                self._rewind(c, *key, f"seq {env.seq} follows {env.prev}, HQ applied {last_id} at {last}")
                return
            applied = self._apply(c, env)
            applied += self._drain_stash(c, env.store, env.stream, env.seq)
        self._notify(applied)
        if env.stream in (DELTA, SNAPSHOT):
            self._retry_snapshots(env.store)

    def _drain_stash(self, c: Tx, store: str, stream: str, last: int) -> list[Applied]:
        applied = []
        # All of the stream's stash in one read: after every apply, and nearly always empty.
        stashed = c.execute("SELECT seq, payload FROM stash WHERE store = ? AND stream = ? ORDER BY seq",
                            (store, stream)).fetchall()
        if stashed:
            c.execute("DELETE FROM stash WHERE store = ? AND stream = ? AND seq <= ?", (store, stream, last))
        for seq, payload in stashed:
            if seq <= last:
                continue
            if seq != last + 1:
                break
            env = MESSAGE_MODELS[json.loads(payload)["type"]].model_validate_json(payload)
            last_id = c.execute("SELECT last_id FROM streams WHERE store = ? AND stream = ?", (store, stream)).fetchone()[0]
            c.execute("DELETE FROM stash WHERE store = ? AND stream = ? AND seq = ?", (store, stream, env.seq))
            if last_id and env.prev != last_id:  # a message that does not chain on (or names nothing) is not next
                self._rewind(c, store, stream, f"stashed seq {env.seq} follows {env.prev}, HQ applied {last_id}")
                break
            applied += self._apply(c, env)
            last = env.seq
        hwm = c.execute("SELECT hwm FROM streams WHERE store = ? AND stream = ?", (store, stream)).fetchone()[0]
        if hwm > last or any(seq > last for seq, _ in stashed):
            self._gaps.setdefault((store, stream), Gap(self._mono(), last))
        else:
            self._gaps.pop((store, stream), None)
        return applied

    def _apply(self, c: Tx, env: Envelope) -> list[Applied]:
        items = getattr(env.body, "items", None)
        extra: list[Applied] = []
        if env.stream == DELTA:
            sums: dict[tuple[str, str], int] = defaultdict(int)
            for it in items or ():
                sums[(it.zone, it.gtin)] += it.delta
            insert_rows(  # one multi-row upsert instead of a step per key (keys are distinct here)
                c,
                "INSERT INTO inventory(store, zone, gtin, qty)",
                4,
                [(env.store, z, g, q) for (z, g), q in sums.items()],
                " ON CONFLICT(store, zone, gtin) DO UPDATE SET qty = inventory.qty + excluded.qty",
            )
            # What this message changed, so a snapshot older than it can still be brought forward.
            c.execute("INSERT INTO inv_journal(store, seq, sums, id) VALUES (?,?,?,?)"
                      " ON CONFLICT(store, seq) DO UPDATE SET sums = excluded.sums, id = excluded.id",
                      (env.store, env.seq, json.dumps(list(sums.items()), separators=(",", ":")), env.id))
            if env.seq % 64 == 0:  # pruned now and then: a statement per message is a tenth of the apply
                c.execute("DELETE FROM inv_journal WHERE store = ? AND seq <= ?", (env.store, env.seq - JOURNAL_KEEP))
        elif env.stream == SNAPSHOT:
            extra = self._snapshot_part(c, env)
        else:
            if env.stream == LABELS:  # keep the newest state per label: what HQ's price-integrity view reads
                # One row per label, the one the items in order would leave: PostgreSQL refuses an
                # upsert that touches a row twice.
                newest: dict[str, Any] = {}
                for it in items or ():
                    if it.label not in newest or it.ts >= newest[it.label].ts:
                        newest[it.label] = it
                insert_rows(
                    c, "INSERT INTO labels(store, label, ts, state)", 4,
                    [(env.store, it.label, it.ts.timestamp(), it.model_dump_json()) for it in newest.values()],
                    " ON CONFLICT(store, label) DO UPDATE SET ts = excluded.ts, state = excluded.state"
                    " WHERE excluded.ts >= labels.ts",
                )
            elif env.stream == CMD_RESULT:
                self._replay_answers(c, env.store, items or ())
                c.executemany("UPDATE commands_out SET answered_at = ? WHERE store = ? AND cmd_id = ?",
                              [(self.clock.now(), env.store, it.cmd_id) for it in items or ()])
                # The audit log shows what became of each operator's command.
                c.executemany("UPDATE audit SET result = ?, result_at = ? WHERE store = ? AND cmd_id = ?",
                              [(it.model_dump_json(include={"status", "reason", "detail"}), self.clock.now(),
                                env.store, it.cmd_id) for it in items or ()])
            # Telemetry into its day and hourly roll-ups (retention), any other stream kept for good.
            self.db.record_messages(c, [(env.store, env.stream, env.seq, env.ts.timestamp(), env.historical,
                                         env.body)], self.clock.now())
        now = self.clock.now()
        facts = len(items) if items is not None else 1
        c.execute(
            "UPDATE streams SET last_seq = ?, last_id = ?, hwm = greatest(hwm, ?), applied = applied + 1, facts = facts + ?,"
            " historical = historical + ?, last_ts = ?, last_sent = ?, last_applied_at = ?, rewinding = 0"
            " WHERE store = ? AND stream = ?",
            (env.seq, env.id, env.seq, facts, int(env.historical), env.ts.timestamp(), env.sent.timestamp(), now, env.store,
             env.stream),
        )
        return [Applied(env.store, env.stream, env.seq, facts, env.historical, env.ts.timestamp(),
                        env.sent.timestamp(), now), *extra]

    @staticmethod
    def _replay_answers(c: Tx, store: str, items: Any) -> None:
        """A store's answer to ``replay``: seqs below what it still holds are gone for good."""
        for it in items:
            if it.name != "replay" or it.status != "ok":
                continue
            d = it.detail
            stream, held_from, last_sealed = d.get("stream"), d.get("held_from"), d.get("last_sealed")
            if not isinstance(stream, str) or not isinstance(last_sealed, int):
                continue
            gone_to = (held_from - 1) if isinstance(held_from, int) else last_sealed
            c.execute("UPDATE streams SET gone_to = greatest(gone_to, ?) WHERE store = ? AND stream = ? AND last_seq < ?",
                      (gone_to, store, stream, gone_to))

    def _notify(self, applied: list[Applied]) -> None:
        if self._pending is not None:  # in a batch: told once it commits
            self._pending += applied
            return
        for a in applied:
            key = (a.store, a.stream)
            self._committed[key] = max(self._committed.get(key, 0), a.seq)
            self.figures.by_stream[key] += a.facts
            if self.on_applied:
                self.on_applied(a)

    # ------------------------------------------------------------ snapshots

    def _snapshot_part(self, c: Tx, env: Envelope) -> list[Applied]:
        b: Any = env.body
        if c.execute("SELECT 1 FROM snapshots WHERE store = ? AND snapshot_id = ?", (env.store, b.snapshot_id)).fetchone():
            return []
        c.execute(
            "INSERT INTO snapshot_parts(store, snapshot_id, part, parts, as_of_seq, as_of_id, items)"
            " VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
            (env.store, b.snapshot_id, b.part, b.parts, b.as_of_seq, b.as_of_id,
             json.dumps([[i.zone, i.gtin, i.qty] for i in b.items])),
        )
        self._waiting_snapshots.add(env.store)
        return []

    def _retry_snapshots(self, store: str) -> None:
        """Install every complete snapshot of ``store`` whose as-of seq HQ knows the store has sealed."""
        if store not in self._waiting_snapshots:
            return
        with self.db.tx(store) as c:
            applied: list[Applied] = []
            complete = c.execute(
                "SELECT snapshot_id, max(parts), max(as_of_seq), max(as_of_id), count(*) FROM snapshot_parts"
                " WHERE store = ? GROUP BY snapshot_id ORDER BY snapshot_id", (store,)
            ).fetchall()
            waiting = False
            for sid, parts, as_of, as_of_id, have in complete:
                if have < parts:
                    waiting = True
                    continue
                last, hwm = c.execute(
                    "SELECT last_seq, hwm FROM streams WHERE store = ? AND stream = ?", (store, DELTA)
                ).fetchone() or (0, 0)
                resyncing = c.execute(
                    "SELECT 1 FROM resyncs WHERE store = ? AND done_at IS NULL LIMIT 1", (store,)).fetchone()
                # Ahead of what HQ applied: the store still holds those deltas (they come), so wait for
                # them, unless HQ gave up on them and asked for this resync. Never beyond what the store
                # is known to have sealed.
                if as_of > last and (not resyncing or as_of > hwm):
                    waiting = True
                    continue
                applied += self._install_snapshot(c, store, sid, as_of, as_of_id)
            if not waiting:
                self._waiting_snapshots.discard(store)
        self._notify(applied)

    def _install_snapshot(self, c: Tx, store: str, sid: str, as_of: int, as_of_id: str) -> list[Applied]:
        levels: dict[tuple[str, str], int] = {}
        for (items,) in c.execute(
            "SELECT items FROM snapshot_parts WHERE store = ? AND snapshot_id = ? ORDER BY part", (store, sid)
        ).fetchall():
            for z, g, q in json.loads(items):
                levels[(z, g)] = q
        c.execute("DELETE FROM snapshot_parts WHERE store = ? AND snapshot_id = ?", (store, sid))
        last, last_id = self._last(c, store, DELTA)
        # The delta message HQ holds at as_of, if it still knows it: the snapshot must speak of that one.
        if as_of == last:
            held = last_id
        else:
            row = c.execute("SELECT id FROM inv_journal WHERE store = ? AND seq = ?", (store, as_of)).fetchone()
            held = row[0] if row else ""
        if as_of_id and held and as_of_id != held:
            self._rewind(c, store, DELTA, f"snapshot {sid} is as of {as_of_id} at seq {as_of}, HQ applied {held}")
            c.execute(
                "INSERT INTO snapshots(store, snapshot_id, as_of_seq, applied_at, outcome, mismatches)"
                " VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING", (store, sid, as_of, self.clock.now(), "foreign", 0))
            log.warning("snapshot %s for %s as of seq %d is from another timeline; not installed", sid, store, as_of)
            return []
        if as_of < last:
            # Bring it forward with what HQ applied since, if the journal still covers that.
            journal = c.execute(
                "SELECT sums FROM inv_journal WHERE store = ? AND seq > ? AND seq <= ?", (store, as_of, last)
            ).fetchall()
            if len(journal) == last - as_of:
                for (sums,) in journal:
                    for (z, g), q in json.loads(sums):
                        levels[(z, g)] = levels.get((z, g), 0) + q
                as_of_effective = last
            else:
                as_of_effective = -1
        else:
            as_of_effective = as_of
        current = {
            (z, g): q
            for z, g, q in c.execute("SELECT zone, gtin, qty FROM inventory WHERE store = ? AND qty != 0", (store,))
        }
        levels = {k: v for k, v in levels.items() if v != 0}
        mismatches = sum(1 for k in set(levels) | set(current) if levels.get(k, 0) != current.get(k, 0))
        applied: list[Applied] = []
        if as_of_effective < 0:
            outcome = "stale"
        else:
            outcome = "installed" if as_of_effective > last else ("verified" if not mismatches else "corrected")
            if outcome != "verified":
                c.execute("DELETE FROM inventory WHERE store = ?", (store,))
                c.executemany(
                    "INSERT INTO inventory(store, zone, gtin, qty) VALUES (?,?,?,?)",
                    [(store, z, g, q) for (z, g), q in levels.items()],
                )
                if as_of_effective > last:
                    stashed = c.execute(
                        "SELECT count(*) FROM stash WHERE store = ? AND stream = ? AND seq > ? AND seq <= ?",
                        (store, DELTA, last, as_of_effective)).fetchone()[0]
                    c.execute(
                        "UPDATE streams SET lost = lost + ?, gaps = gaps + 1, last_seq = ?, last_id = '' WHERE store = ? AND stream = ?",
                        (self._missing(c, store, DELTA, last, as_of_effective) - stashed, as_of_effective, store, DELTA),
                    )
                    self.ack_due.add(store)
                applied = self._drain_stash(c, store, DELTA, as_of_effective)
            c.execute("UPDATE resyncs SET done_at = ? WHERE store = ? AND done_at IS NULL", (self.clock.now(), store))
        c.execute(
            "INSERT INTO snapshots(store, snapshot_id, as_of_seq, applied_at, outcome, mismatches) VALUES (?,?,?,?,?,?)"
            " ON CONFLICT DO NOTHING",
            (store, sid, as_of, self.clock.now(), outcome, mismatches),
        )
        log.info("snapshot %s for %s as of seq %d (HQ at %d): %s, %d keys differed", sid, store, as_of, last,
                 outcome, mismatches)
        return applied

    # ------------------------------------------------------------ acks

    def acks(self) -> list[Outgoing]:
        """HQ's position per stream for every store that moved (or needs telling), after the commit."""
        out = []
        due, self.ack_due = sorted(self.ack_due), set()
        marks: dict[str, dict[str, Mark]] = defaultdict(dict)
        for i in range(0, len(due), 500):  # one read per 500 stores, not one per store
            part = due[i:i + 500]
            for store, stream, seq, mid in self.db.read(
                    "SELECT store, stream, last_seq, last_id FROM streams WHERE last_seq > 0"
                    f" AND store IN ({','.join('?' * len(part))})", part):
                marks[store][stream] = Mark(seq=seq, id=mid)
        for store in due:
            if store not in marks:
                continue
            ack = Ack(store=store, ts=rfc3339(self.clock.now()), streams=marks[store])  # type: ignore[arg-type]
            out.append(Outgoing(ack_topic(self.prefix, store), self._encode(ack.model_dump(mode="json", exclude={"sig"}))))
        return out

    def _encode(self, obj: dict[str, Any]) -> bytes:
        return self._sign(obj) if self._sign is not None else json.dumps(obj, separators=(",", ":")).encode()

    # ------------------------------------------------------------ timers

    def tick(self) -> list[Outgoing]:
        """Act on gaps whose reorder window has run out: replay, and only then resync or skip."""
        now = self._mono()
        periodic = now - self._discovered_at >= DISCOVER_S  # the database-wide scans, once a second
        if periodic:
            self._discover()
        out: list[Outgoing] = []
        for (store, stream), gap in list(self._gaps.items()):
            if now - gap.since < self.reorder_window_s:
                continue
            applied: list[Applied] = []
            with self.db.tx(store) as c:
                row = c.execute("SELECT last_seq, hwm, gone_to, replay_asked_at FROM streams WHERE store = ? AND stream = ?",
                                (store, stream)).fetchone()
                last, hwm, gone, asked = row if row else (0, 0, 0, None)
                first_stashed = c.execute(
                    "SELECT min(seq) FROM stash WHERE store = ? AND stream = ? AND seq > ?", (store, stream, last)
                ).fetchone()[0]
                if first_stashed is None and hwm <= last:
                    self._gaps.pop((store, stream), None)
                    continue
                if last > gap.last:
                    # The stream moved on during the window: what is missing is queued (at a busy receiver,
                    # or sealed and not yet sent), not lost. A replay now would only add to the queue.
                    gap.since, gap.last = now, last
                    continue
                floor = self._floor(c, store, stream)
                gone_to = max(gone, floor - 1)
                if gone_to <= last:
                    if gap.asked_at is None or now - gap.asked_at >= self.resync_retry_s:
                        gap.asked_at = now
                        # Another receiver may have asked just now: one replay is enough.
                        if asked is None or self.clock.now() - asked >= self.resync_retry_s:
                            out.append(self._replay(c, store, stream, last + 1))
                    continue
                if stream == DELTA:
                    sent = c.execute("SELECT max(requested_at) FROM resyncs WHERE store = ? AND done_at IS NULL",
                                     (store,)).fetchone()[0]
                    if sent is None or self.clock.now() - sent >= self.resync_retry_s:
                        out.append(self._resync(c, store))
                    continue
                # The store no longer holds (or never sent) seqs up to gone_to: skip them, counted.
                skip_to = min(gone_to, first_stashed - 1) if first_stashed is not None else min(gone_to, hwm)
                c.execute(
                    "UPDATE streams SET last_seq = ?, last_id = '', gaps = gaps + 1, lost = lost + ?, gone_to = 0"
                    " WHERE store = ? AND stream = ?",
                    (skip_to, self._missing(c, store, stream, last, skip_to), store, stream),
                )
                log.warning("%s %s: seq %d..%d are gone; skipping ahead", store, stream, last + 1, skip_to)
                applied = self._drain_stash(c, store, stream, skip_to)
                self.ack_due.add(store)
            self._notify(applied)
        for store in list(self._waiting_snapshots):
            self._retry_snapshots(store)
        return out + (self._clones_gone() if periodic else []) + self._unanswered()

    def _clones_gone(self) -> list[Outgoing]:
        """While two agents fight, each one's snapshot is soon overtaken by the other's messages. Once
        only one is left (no birth for a while), its whole book settles what HQ holds."""
        out = []
        now = self.clock.now()
        for store, births in self.db.read("SELECT store, births FROM status WHERE clone_suspect = 1"):
            last = json.loads(births)[-1][0] if births != "[]" else 0.0
            if now - last < CLONE_QUIET_S:
                continue
            with self.db.tx(store) as c:
                if not c.execute("UPDATE status SET clone_suspect = 0 WHERE store = ? AND clone_suspect = 1",
                                 (store,)).rowcount:
                    continue  # another receiver asked
            out.append(self.issue(store, "inventory.resync", {"reason": "two agents ran as this store"}, who=AUTO))
        return out

    def _unanswered(self) -> list[Outgoing]:
        """Commands with no cmd-result yet, published again (the store runs each id once): a broker
        that crashed after taking one from HQ loses it, as it loses the store's messages. The row's
        ``sent_at`` moves first, so of several receivers one sends it."""
        out = []
        now = self.clock.now()
        due = now - self.resync_retry_s
        for store, cmd_id, payload in self.db.read(
            "SELECT store, cmd_id, payload FROM commands_out WHERE answered_at IS NULL AND sent_at <= ?", (due,)
        ):
            with self.db.tx() as c:
                if not c.execute("UPDATE commands_out SET sent_at = ? WHERE store = ? AND cmd_id = ? AND sent_at <= ?"
                                 " AND answered_at IS NULL", (now, store, cmd_id, due)).rowcount:
                    continue
            out.append(Outgoing(command_topic(self.prefix, store, json.loads(payload)["name"]), bytes(payload)))
        return out

    def issue(self, store: str, name: str, args: dict[str, Any], *, who: str | None = None,
              request: str = "") -> Outgoing:
        """An operator's command: kept until the store's cmd-result names it, and published again until then.
        ``who`` (an API token's name) puts it in the audit log, in the same transaction: no command goes
        out that the log does not show."""
        o = self.command(store, name, args)
        cmd_id = json.loads(o.payload)["id"]
        with self.db.tx(store) as c:
            c.execute("INSERT INTO commands_out(store, cmd_id, payload, issued_at, sent_at) VALUES (?,?,?,?,?)",
                      (store, cmd_id, o.payload, self.clock.now(), self.clock.now()))
            if who is not None:
                self._audit(c, who, request, o)
        return o

    def _audit(self, c: Tx, who: str, request: str, o: Outgoing) -> None:
        cmd = json.loads(o.payload)
        c.execute("INSERT INTO audit(at, who, request, store, cmd_id, name, args) VALUES (?,?,?,?,?,?,?)",
                  (self.clock.now(), who, request, cmd["store"], cmd["id"], cmd["name"],
                   json.dumps(cmd["args"], sort_keys=True)))

    def _replay(self, c: Tx, store: str, stream: str, from_seq: int) -> Outgoing:
        c.execute("UPDATE streams SET replays = replays + 1, replay_asked_at = ? WHERE store = ? AND stream = ?",
                  (self.clock.now(), store, stream))
        log.info("%s %s: missing from seq %d; asking the store to replay", store, stream, from_seq)
        o = self.command(store, "replay", {"stream": stream, "from_seq": from_seq})
        self._audit(c, AUTO, "", o)  # HQ's own commands are in the log too, under its own name
        return o

    def _resync(self, c: Tx, store: str) -> Outgoing:
        o = self.command(store, "inventory.resync", {"reason": "gap in inventory/delta"})
        self._audit(c, AUTO, "", o)
        c.execute("INSERT INTO resyncs(store, cmd_id, requested_at) VALUES (?,?,?)",
                  (store, json.loads(o.payload)["id"], self.clock.now()))
        log.warning("%s: gap in %s the store cannot replay; asking for inventory.resync", store, DELTA)
        return o

    def command(self, store: str, name: str, args: dict[str, Any]) -> Outgoing:
        cmd = Command(id=str(ULID()), name=name, store=store, ts=rfc3339(self.clock.now()), args=args)  # type: ignore[arg-type]
        return Outgoing(command_topic(self.prefix, store, name),
                        self._encode(cmd.model_dump(mode="json", exclude={"sig"})))


def lag_ms(a: Applied) -> float:
    return (a.at - a.ts) * 1000
