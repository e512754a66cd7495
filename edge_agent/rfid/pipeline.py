"""RFID pipeline: reader payloads -> reads -> EPC decode -> presence -> inventory deltas in the outbox.

The presence engine keeps its state in memory for speed; which tags are present where is also kept
in the outbox database (``rfid_tags``) and changes in the same transaction as the deltas it causes,
so after a crash the engine restarts from exactly the book HQ is being told about. When that
transaction fails (a full disk), the engine is rolled back and nothing else a batch changes in memory
(read counts, antenna liveness, cycle counts) has been touched yet: ``ingest`` raises, and the same
payload can be given again, with the same outcome as if the first attempt had never happened.

Liveness and hold-off use the agent's clock at ingest (reader clocks drift and are often wrong);
on a replay that clock is the simulator's virtual clock, so replays are deterministic.

What never becomes stock is still accounted for, in ``health()``:

- Reader events that are not tag reads, by type (``rfid.ignored.<type>``). An Impinj overflow event means the
  reader purged events it could not deliver, reads lost at the source: it also raises ``rfid.reader_overflow``
  with the reader and the count, and the counts add up per reader in ``rfid.reader_purged.<reader>``.
- Products the store does not sell. A tag's header may say SGTIN-96 for goods of any company (a shopper's own
  coat, a neighbour's delivery; Zebra's documentation example decodes to GTIN 96810064511308). A GTIN is taken
  when the EPC's GS1 company prefix is in ``rfid.company_prefixes`` or HQ's catalogue (the price book: a GTIN
  HQ has priced) knows it. Other reads are counted per reason (``rfid.foreign_reads.<reason>``) and each
  foreign EPC's first read is quarantined with its reason. With no prefixes configured and an empty catalogue
  there is nothing to check against: every GTIN is taken, as before, and counted in ``rfid.unverified_reads``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol
from zoneinfo import ZoneInfo

from ulid import ULID

from ..clock import Clock, rfc3339
from ..config import RfidConfig
from ..inventory.book import Delta, InventoryBook
from ..sync.diskstate import WriteFailed
from ..sync.outbox import Fact, Outbox, OutboxTx
from .epc import DecodedEpc, EpcError, decode_epc
from .epcis import EpcisEvents
from .formats import ParseStats, ReaderDefaults, parse_payload
from .presence import PresenceEngine, PresenceEvent, PresenceParams
from .reads import BadRead

log = logging.getLogger(__name__)

COUNT_STREAM = "inventory/count"
EPCIS_STREAM = "epcis/events"  # bodies built by epcis.py
MAX_QUARANTINE_PER_PAYLOAD = 50  # a flood of garbage is counted in full but stored only in part
MAX_FOREIGN_REMEMBERED = 100_000  # foreign EPCs whose first read was quarantined; past this, only counted
SGTIN_URI = "urn:epc:id:sgtin:"  # then <company prefix>.<indicator + item reference>.<serial>


class Catalogue(Protocol):
    """HQ's list of the products the store sells (the ESL price book implements it)."""

    def knows(self, gtin: str) -> bool: ...

    def __len__(self) -> int: ...


class ReadsClock:
    """Time as told by the newest read seen: lets a feed replay at any speed, deterministically."""

    def __init__(self, start: float) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def saw(self, ts: float) -> None:
        if ts > self.t:
            self.t = ts


@dataclass
class CycleCount:
    count_id: str
    zone: str
    started: float
    ends: float
    book_before: frozenset[str]
    seen: set[str] = field(default_factory=set)


@dataclass
class IngestResult:
    reads: int = 0
    bad: int = 0
    events: int = 0
    foreign: int = 0


class RfidPipeline:
    def __init__(
        self, cfg: RfidConfig, book: InventoryBook, outbox: Outbox, clock: Clock, catalogue: Catalogue | None = None
    ) -> None:
        self.cfg = cfg
        self.catalogue = catalogue  # the agent sets it when ESL runs
        self.book = book
        self.outbox = outbox
        self.wall = clock  # judges absurd timestamps whatever drives presence
        self.reads_clock = ReadsClock(0.0) if cfg.clock == "reads" else None
        self.clock: Clock = self.reads_clock or clock
        self.zones: dict[tuple[str, int | str], str] = {a.key: a.zone for a in cfg.antennas}
        self.epcis = EpcisEvents.from_config(cfg) if cfg.epcis else None
        self.reader_defaults = {
            r.name: ReaderDefaults(r.default_antenna, ZoneInfo(r.timezone) if r.timezone else None)
            for r in cfg.readers
        }
        self.company_prefixes = frozenset(cfg.company_prefixes)
        self.engine = PresenceEngine(
            PresenceParams(
                departure_timeout_s=cfg.departure_timeout_s,
                departure_zones=frozenset(cfg.departure_zones),
                min_reads=cfg.min_reads,
                dedupe_s=cfg.dedupe_s,
                arrive_window_s=cfg.arrive_window_s,
                holdoff_s=cfg.holdoff_s,
                hysteresis_db=cfg.hysteresis_db,
                rssi_alpha=cfg.rssi_alpha,
                recent_s=cfg.recent_s,
            )
        )
        self.lock = threading.RLock()  # ingest, tick and commands come from different threads
        self.counts: dict[str, CycleCount] = {}
        self.reads_by_antenna: Counter[tuple[str, int | str]] = Counter()
        self.last_read_at: dict[tuple[str, int | str], float] = {}
        self.bad_by_reason: Counter[str] = Counter()
        self.raw_epcs = 0
        self.ignored: Counter[str] = Counter()
        self.purged: Counter[str] = Counter()
        self.foreign_reads: Counter[str] = Counter()
        self.unverified_reads = 0
        self._foreign_seen: set[str] = set()
        self._silent_alerted: set[tuple[str, int | str]] = set()
        self._last_snapshot = clock.now()
        self._rate_base: dict[tuple[str, int | str], int] = {}
        self._rate_since = clock.now()
        with outbox.transaction() as tx:
            tx.conn.execute(
                "CREATE TABLE IF NOT EXISTS rfid_tags(epc TEXT PRIMARY KEY, gtin TEXT NOT NULL, zone TEXT NOT NULL,"
                " since REAL NOT NULL) WITHOUT ROWID"
            )
        self.engine.restore(
            (epc, gtin, zone, since) for epc, gtin, zone, since in outbox.read("SELECT epc, gtin, zone, since FROM rfid_tags")
        )
        self._fresh_start = True
        if self.reads_clock is None:
            self._start_clock(clock.now())

    def _start_clock(self, now: float) -> None:
        """Restored tags get a full timeout, and antennas a full silence window, from the first moment
        this process knows the time (for a replay: its first read)."""
        self._fresh_start = False
        self.engine.touch_all(now)
        for key in self.zones:
            self.last_read_at[key] = now
        self._last_snapshot = self._rate_since = now

    # ------------------------------------------------------------ intake

    def ingest(self, payload: bytes, source: str = "rfid", reader_hint: str | None = None,
               only_reader: str | None = None) -> IngestResult:
        """``reader_hint`` names the reader for formats whose events do not (Zebra's). ``only_reader``: the
        payload came with that reader's credentials (the HTTP intake's token), so a read naming another
        reader (an Impinj ``hostname``, a generic ``reader``) is quarantined: one token speaks for one reader."""
        st = ParseStats()
        reads, bad = parse_payload(payload, now=self.wall.now(), reader_hint=reader_hint, stats=st,
                                   defaults=self.reader_defaults)
        if only_reader is not None and any(r.reader != only_reader for r in reads):
            bad = bad + [BadRead(f"names reader {r.reader!r} but came with reader {only_reader!r}'s token",
                                 json.dumps(asdict(r)).encode()) for r in reads if r.reader != only_reader]
            reads = [r for r in reads if r.reader == only_reader]
        self._alert_overflows(st)
        rewind = self.reads_clock.t if self.reads_clock is not None else None
        if self.reads_clock is not None and reads:
            self.reads_clock.saw(max(r.ts for r in reads))
        now = self.clock.now()
        if self._fresh_start:
            if not reads:
                return self._bad_only(source, bad, st)
            self._start_clock(now)
        res = IngestResult(reads=len(reads), bad=len(bad))
        quarantine: list[tuple[str, bytes]] = [(b.reason, b.raw) for b in bad]
        events: list[PresenceEvent] = []
        by_antenna: Counter[tuple[str, int | str]] = Counter()
        counted: list[tuple[set[str], str]] = []  # (a cycle count's seen set, EPC), added once committed
        raw = unverified = 0
        foreign: Counter[str] = Counter()
        first_foreign: dict[str, str] = {}  # EPC -> reason, for EPCs not reported before
        prefixes, catalogue = self.company_prefixes, self.catalogue
        verify = bool(prefixes) or (catalogue is not None and len(catalogue) > 0)
        with self.lock:
            with self.engine.atomic(), self._rewinding(rewind):
                zones = self.zones
                observe = self.engine.observe
                counts = self.counts
                for r in reads:
                    key = (r.reader, r.antenna)
                    zone = zones.get(key)
                    if zone is None:
                        res.bad += 1
                        quarantine.append((f"unknown antenna {r.reader} port {r.antenna}", r.epc.encode()))
                        continue
                    by_antenna[key] += 1
                    try:
                        dec = decode_epc(r.epc)
                    except EpcError as e:
                        res.bad += 1
                        quarantine.append((f"bad EPC {r.epc}: {e}", r.epc.encode()))
                        continue
                    if dec.gtin is None:
                        raw += 1
                        continue
                    if not verify:
                        unverified += 1
                    else:
                        why = _foreign(dec, prefixes, catalogue)
                        if why is not None:
                            foreign[why[0]] += 1
                            if r.epc not in self._foreign_seen:
                                first_foreign.setdefault(r.epc, why[1])
                            continue
                    if counts:
                        counted.extend((c.seen, r.epc) for c in counts.values() if c.zone == zone)
                    ev = observe(r.epc, dec.gtin, zone, r.rssi_dbm, now)
                    if ev is not None:
                        events.append(ev)
                self._commit(events)
            # Committed: only now is what the batch says about antennas and cycle counts kept.
            self.reads_by_antenna.update(by_antenna)
            for key in by_antenna:
                self.last_read_at[key] = now
            self.raw_epcs += raw
            for seen, epc in counted:
                seen.add(epc)
            self._count_events(st)
            self.unverified_reads += unverified
            self.foreign_reads.update(foreign)
            if len(self._foreign_seen) < MAX_FOREIGN_REMEMBERED:
                self._foreign_seen.update(first_foreign)
        res.events = len(events)
        res.foreign = sum(foreign.values())
        self._count_bad(quarantine)
        # One transaction for the batch's bad records and first foreign reads, not one per record.
        self._keep_copies(source, quarantine + [(why, epc.encode()) for epc, why in first_foreign.items()])
        return res

    def _alert_overflows(self, st: ParseStats) -> None:
        """Raised before the batch is taken in: if the batch's transaction is then refused, the payload given
        again raises it a second time, which is better than losing it (the counts are kept only once)."""
        for reader, purged in st.overflows:
            told = f"{purged} events" if purged is not None else "an unknown number of events"
            self.outbox.alert("rfid.reader_overflow", f"reader {reader} purged {told} from its buffer: reads lost "
                              "at the source (the reader could not deliver them in time)")

    def _count_events(self, st: ParseStats) -> None:
        self.ignored.update(st.ignored)
        for reader, purged in st.overflows:
            self.purged[reader] += purged or 0

    @contextlib.contextmanager
    def _rewinding(self, to: float | None) -> Iterator[None]:
        """A replay's clock goes back to ``to`` if the block raises: reads not taken in tell no time."""
        try:
            yield
        except BaseException:
            if self.reads_clock is not None and to is not None:
                self.reads_clock.t = to
            raise

    def _bad_only(self, source: str, bad: list, st: ParseStats) -> IngestResult:
        with self.lock:
            self._count_events(st)
        copies = [(b.reason, b.raw) for b in bad]
        self._count_bad(copies)
        self._keep_copies(source, copies)
        return IngestResult(bad=len(bad))

    def _count_bad(self, bad: Sequence[tuple[str, bytes]]) -> None:
        for reason, _ in bad:
            self.bad_by_reason[reason.split(":")[0].split(" ")[0]] += 1

    def _keep_copies(self, source: str, bad: Sequence[tuple[str, bytes]]) -> None:
        try:
            self.outbox.quarantine_many(source, bad, MAX_QUARANTINE_PER_PAYLOAD)
        except WriteFailed:
            # Counted above; only the copies are not kept while the disk refuses writes. Raising would
            # have the payload, good reads and all, given again and taken in twice.
            pass

    # ------------------------------------------------------------ state changes

    def _commit(self, events: Sequence[PresenceEvent], extra: list[tuple[str, Fact]] | None = None) -> None:
        if not events and not extra:
            return
        deltas: list[Delta] = []
        upserts: list[tuple[str, str, str, float]] = []
        deletes: list[tuple[str]] = []
        for ev in events:
            if ev.kind == "arrived":
                deltas.append(Delta(ev.ts, ev.zone, ev.gtin, 1, added=(ev.epc,)))
                upserts.append((ev.epc, ev.gtin, ev.zone, ev.ts))
            elif ev.kind == "moved":
                deltas.append(Delta(ev.ts, ev.from_zone or "?", ev.gtin, -1, removed=(ev.epc,)))
                deltas.append(Delta(ev.ts, ev.zone, ev.gtin, 1, added=(ev.epc,)))
                upserts.append((ev.epc, ev.gtin, ev.zone, ev.ts))
            else:
                deltas.append(Delta(ev.ts, ev.zone, ev.gtin, -1, removed=(ev.epc,)))
                deletes.append((ev.epc,))
        with self.outbox.transaction() as tx:
            self._write(tx, deltas, upserts, deletes)
            if self.cfg.epcis and events:
                tx.enqueue(EPCIS_STREAM, [self._epcis(ev) for ev in events])
            for stream, fact in extra or ():
                tx.enqueue(stream, [fact])

    def _epcis(self, ev: PresenceEvent) -> Fact:
        return Fact(ts=ev.ts, body=self.epcis.body(ev))  # type: ignore[union-attr]

    def _write(self, tx: OutboxTx, deltas: list[Delta], upserts: list, deletes: list) -> None:
        self.book.apply_in(tx, deltas)
        if upserts:
            tx.conn.executemany(
                "INSERT INTO rfid_tags(epc, gtin, zone, since) VALUES (?,?,?,?)"
                " ON CONFLICT(epc) DO UPDATE SET zone = excluded.zone, since = excluded.since",
                upserts,
            )
        if deletes:
            tx.conn.executemany("DELETE FROM rfid_tags WHERE epc = ?", deletes)

    # ------------------------------------------------------------ time

    def tick(self) -> None:
        if self._fresh_start:
            return  # a replay that has not started yet has no time to act on
        now = self.clock.now()
        with self.lock:
            finished = [c for c in self.counts.values() if now >= c.ends]
            with self.engine.atomic():
                events = self.engine.tick(now)
                extra = []
                for c in finished:
                    ev, fact = self._finish_count(c, now)
                    events += ev
                    extra.append((COUNT_STREAM, fact))
                self._commit(events, extra)
            for c in finished:
                del self.counts[c.count_id]
        self._check_silent(now)
        if self.cfg.snapshot_interval_s and now - self._last_snapshot >= self.cfg.snapshot_interval_s:
            self.book.snapshot("periodic")
            self._last_snapshot = now

    def _check_silent(self, now: float) -> None:
        for key, at in self.last_read_at.items():
            if now - at > self.cfg.silent_antenna_s:
                if key not in self._silent_alerted:
                    self.outbox.alert(
                        "rfid.antenna_silent", f"reader {key[0]} antenna {key[1]} ({self.zones[key]}) has read "
                        f"nothing for {now - at:.0f} s",
                    )
                    self._silent_alerted.add(key)
            else:
                self._silent_alerted.discard(key)

    # ------------------------------------------------------------ cycle counts

    def start_count(self, zone: str, duration_s: float) -> CycleCount:
        if zone not in set(self.zones.values()):
            raise ValueError(f"no antenna covers zone {zone!r}")
        now = self.clock.now()
        with self.lock:
            book = frozenset(epc for epc, (z, _) in self.engine.present().items() if z == zone)
            c = CycleCount(str(ULID()), zone, now, now + duration_s, book)
            self.counts[c.count_id] = c
        log.info("cycle count %s of %s started: %d tags on the book", c.count_id, zone, len(book))
        return c

    def _finish_count(self, c: CycleCount, now: float) -> tuple[list[PresenceEvent], Fact]:
        present = self.engine.present()
        # Only tags still booked in this zone can be missing; those that moved or left during the count
        # were seen doing so.
        missing = sorted(e for e in c.book_before - c.seen if present.get(e, ("", ""))[0] == c.zone)
        unexpected = sorted(c.seen - c.book_before)
        events = []
        for epc in missing:
            _, gtin = present[epc]
            self.engine.forget(epc)
            events.append(PresenceEvent("departed", now, epc, gtin, c.zone, reason=f"missing in count {c.count_id}"))
        wrong = len(missing) + len(unexpected)
        accuracy = 1.0 - wrong / max(len(c.book_before), len(c.seen), 1)
        body = {
            "count_id": c.count_id, "zone": c.zone, "started": rfc3339(c.started), "ended": rfc3339(now),
            "book_before": len(c.book_before), "seen": len(c.seen), "missing": missing, "unexpected": unexpected,
            "accuracy": round(max(accuracy, 0.0), 6), "outcome": "completed",
        }
        log.info("cycle count %s of %s: %d missing, %d unexpected, accuracy %.4f", c.count_id, c.zone,
                 len(missing), len(unexpected), accuracy)
        return events, Fact(ts=now, body=json.dumps(body, separators=(",", ":")))

    # ------------------------------------------------------------ figures

    def antennas(self) -> list[tuple[str, int | str, str, int, float | None]]:
        """Every configured antenna: (reader, port or name, zone, reads taken, when it last read on the agent's
        clock). Unlike ``health()`` this leaves the health report's reads/s window alone."""
        with self.lock:
            return [(reader, ant, zone, self.reads_by_antenna[(reader, ant)], self.last_read_at.get((reader, ant)))
                    for (reader, ant), zone in self.zones.items()]

    def health(self) -> dict[str, float]:
        with self.lock:
            figures: dict[str, float] = {
                "rfid.tags_present": float(sum(1 for t in self.engine.tags.values() if t.zone is not None)),
                "rfid.reads": float(self.engine.reads_seen),
                "rfid.ghosts_dropped": float(self.engine.ghosts_dropped),
                "rfid.raw_epcs": float(self.raw_epcs),
            }
            now = self.clock.now()
            span = max(now - self._rate_since, 1e-9)
            for key, n in self.reads_by_antenna.items():
                figures[f"rfid.reads_per_s.{key[0]}.{key[1]}"] = round((n - self._rate_base.get(key, 0)) / span, 3)
            self._rate_base, self._rate_since = dict(self.reads_by_antenna), now
            for reason, n in self.bad_by_reason.items():
                figures[f"rfid.bad.{reason}"] = float(n)
            for kind, n in self.ignored.items():
                figures[f"rfid.ignored.{kind}"] = float(n)
            for reader, n in self.purged.items():
                figures[f"rfid.reader_purged.{reader}"] = float(n)
            for reason, n in self.foreign_reads.items():
                figures[f"rfid.foreign_reads.{reason}"] = float(n)
            figures["rfid.foreign_tags"] = float(len(self._foreign_seen))
            figures["rfid.unverified_reads"] = float(self.unverified_reads)
            figures["rfid.silent_antennas"] = float(len(self._silent_alerted))
        return figures


def _foreign(dec: DecodedEpc, prefixes: frozenset[str], catalogue: Catalogue | None) -> tuple[str, str] | None:
    """None when the store sells this GTIN, else (reason key, reason). Only called when there is something
    to check against: prefixes, or a catalogue that knows at least one product."""
    gtin = dec.gtin
    assert gtin is not None and dec.uri is not None
    uri = dec.uri
    prefix = uri[len(SGTIN_URI):uri.index(".", len(SGTIN_URI))]
    if prefix in prefixes or (catalogue is not None and catalogue.knows(gtin)):
        return None
    if prefixes:
        return "company_prefix", (f"foreign tag: GTIN {gtin} of company prefix {prefix}, not in rfid.company_prefixes"
                                  " and not in HQ's catalogue")
    return "not_in_catalogue", f"foreign tag: GTIN {gtin} is not in HQ's catalogue (the price book)"
