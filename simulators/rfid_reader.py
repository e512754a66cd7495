"""A simulated RFID store: fixed readers, tagged items, shoppers and staff, with exact ground truth.

A deterministic discrete-time simulation on a virtual clock (no wall clock, no threads). Every read cycle
each antenna inventories its zone; the result is what the readers would send, byte for byte the same for the
same seed, in the shape of the Impinj R700 "IoT device interface" (a JSON array of ``tagInventory`` events, as
its webhook POSTs), or optionally Zebra IoT Connector style or this project's generic shape.

World (what physically happens; random stream "<seed>:world", so it does not depend on the RF settings):

* ``n_items`` SGTIN-96-tagged items of ``n_gtins`` GTINs start in ``backroom`` / ``salesfloor``.
* deliveries: new items appear in ``backroom`` (a few GTINs, several units each);
* restock: staff move units of one GTIN ``backroom -> salesfloor``;
* try-on: a shopper takes 1-3 items ``salesfloor -> fitting-room``; a few minutes later each goes back to
  ``salesfloor`` or is bought (``-> pos``);
* purchase: a shopper takes 1-4 items ``salesfloor -> pos``; 10-60 s later ``-> exit``, where they stay 1-2
  read cycles, then they are gone for ever.

Arrivals of each kind are Poisson processes (rates per hour); delayed moves come from a time-ordered queue.
Every physical move is logged in ``truth_events`` as ``(ts, epc, from_zone, to_zone)``; ``from_zone`` is
None for a delivery, ``to_zone`` is ``"gone"`` when an item leaves the store. Moves take effect at the start
of the cycle they fall in, before that cycle's reads.

Radio (random stream "<seed>:rf"):

* each item in a zone has a home antenna of that zone (chosen when it arrives) and a base RSSI;
* miss: in each cycle the home antenna reports the tag with probability ``1 - miss_rate`` (independent
  Bernoulli per tag and cycle); other antennas of the same zone do not read it (no intra-zone overlap);
* cross-read: independently, with probability ``cross_read_rate`` per tag and cycle, one antenna of a
  neighbouring zone also reports it, 10-20 dB weaker than at home;
* ghost: Poisson(``ghost_rate``) reads per cycle, store-wide, of EPCs never seen before or again (half are
  real EPCs with one bit flipped, half random 96-bit values), weak, on a random antenna;
* burst: each report (home, cross or ghost) is, with probability ``burst_rate``, repeated so it appears 2-5
  times in a row in the same cycle (duplicate reads);
* RSSI: the home RSSI of a tag is its base plus Gaussian noise, re-drawn for a random ``rssi_refresh_rate``
  share of tags each cycle (slow fading); a report carries the antenna's dwell time within the cycle
  (antennas of a reader are multiplexed) and a hop channel.
* foreign tags: a ``foreign_share`` of the initial items are other companies' products (SGTIN-96 of company
  prefix ``FOREIGN_COMPANY_PREFIX``: a shopper's coat, a neighbour's parcel). They sit on their shelf, are read
  like any tag, and are never stock (not in ``truth()``). ``stats["foreign_reads"]`` counts every delivered read
  whose EPC is an SGTIN-96 of a prefix the store does not sell, ghosts that happen to decode so included.
* overflow: with probability ``overflow_rate`` per Impinj reader and cycle the reader purges the events of its
  first antenna that has any (the oldest in its buffer) and says so with an ``overflowEvent`` carrying
  ``eventsPurged`` (Impinj Reader Configuration API OverflowEvent); ``stats["purged"]`` counts them.

Reader set-ups: ``reader_formats`` gives a reader its own shape (Impinj, Zebra, generic); a Zebra reader's
events name it by ``data.MAC`` (see ``layout()``), and with ``zebra_concatenated`` its message is the events'
JSON objects back to back, ``{...}{...}``, as the IoT Connector's WebSocket and MQTT endpoints may send them.
Impinj readers in ``name_readers`` identify antennas by ``antennaName`` only (preset ``antennaIdentifier =
antennaName``, ``antennaPort`` off).

Speed: a cycle costs Python work only for the exceptions (misses, cross-reads, ghosts, bursts, RSSI
refreshes, moves); the reads themselves are pre-rendered byte fragments, sliced and joined in C.

CLI::

    python -m simulators.rfid_reader --seed 1 --items 5000 --hours 12 --out DIR
    python -m simulators.rfid_reader --hours 1 --mqtt-port 1883 [--topic-prefix readers] [--speed 10]
    python -m simulators.rfid_reader --hours 1 --http http://127.0.0.1:8781/rfid/events --speed 1 \
        [--token <reader>=<token> ...]   # the tokens `edge-agent hq-token --name <reader>` made

``--out`` writes ``<reader>.ndjson`` (one payload, i.e. one JSON array, per line), ``truth.json`` (final and
initial truth, layout, stats, config) and ``truth_events.ndjson``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = [
    "GONE",
    "ZONES",
    "SimConfig",
    "StoreSim",
    "ZoneSpec",
    "gtin14",
    "gtin14_of",
    "gs1_check_digit",
    "main",
    "sgtin96_decode",
    "sgtin96_hex",
]

GONE = "gone"
ZONES = ("backroom", "salesfloor", "fitting-room", "pos", "exit")

# --------------------------------------------------------------------------------------------------------
# GS1 EPC Tag Data Standard: SGTIN-96
# --------------------------------------------------------------------------------------------------------

# partition value -> (company prefix bits, digits, item reference bits, digits); TDS table "SGTIN Partition".
_SGTIN_PARTITIONS = {
    0: (40, 12, 4, 1),
    1: (37, 11, 7, 2),
    2: (34, 10, 10, 3),
    3: (30, 9, 14, 4),
    4: (27, 8, 17, 5),
    5: (24, 7, 20, 6),
    6: (20, 6, 24, 7),
}
_PARTITION_BY_PREFIX_DIGITS = {v[1]: k for k, v in _SGTIN_PARTITIONS.items()}
SGTIN96_HEADER = 0x30
FOREIGN_COMPANY_PREFIX = "4012345"  # other companies' products in the store (foreign tags)


def gs1_check_digit(digits: str) -> str:
    """GS1 mod-10 check digit for the data digits of a GTIN/SSCC/GLN (weights 3,1,3,... from the right)."""
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(digits)))
    return str((10 - total % 10) % 10)


def gtin14(company_prefix: str, item_ref: str) -> str:
    """GTIN-14 of a company prefix and an item reference whose first digit is the indicator digit."""
    if len(company_prefix) + len(item_ref) != 13:
        raise ValueError("company prefix + item reference must be 13 digits")
    body = item_ref[0] + company_prefix + item_ref[1:]
    return body + gs1_check_digit(body)


def sgtin96_hex(company_prefix: str, item_ref: str, serial: int, filter_value: int = 1) -> str:
    """SGTIN-96 EPC as 24 upper-case hex digits (GS1 EPC TDS).

    ``item_ref`` is the item reference with the indicator digit first (TDS convention), so that company
    prefix + item reference have 13 digits. Example (TDS): ``sgtin96_hex("0614141", "812345", 6789, 3)``
    is ``"3074257BF7194E4000001A85"``.
    """
    if not (company_prefix.isdigit() and item_ref.isdigit()):
        raise ValueError("company prefix and item reference must be decimal digits")
    partition = _PARTITION_BY_PREFIX_DIGITS.get(len(company_prefix))
    if partition is None:
        raise ValueError(f"company prefix must have 6-12 digits, not {len(company_prefix)}")
    cp_bits, cp_digits, ir_bits, ir_digits = _SGTIN_PARTITIONS[partition]
    if len(item_ref) != ir_digits:
        raise ValueError(f"item reference must have {ir_digits} digits with a {cp_digits}-digit company prefix")
    if not 0 <= filter_value <= 7:
        raise ValueError("filter value must be 0-7")
    if not 0 <= serial < 1 << 38:
        raise ValueError("SGTIN-96 serial must be 0 .. 2^38-1")
    cp, ir = int(company_prefix), int(item_ref)
    if cp >= 1 << cp_bits or ir >= 1 << ir_bits:
        raise ValueError("company prefix or item reference too large for its partition")
    value = SGTIN96_HEADER
    value = (value << 3) | filter_value
    value = (value << 3) | partition
    value = (value << cp_bits) | cp
    value = (value << ir_bits) | ir
    value = (value << 38) | serial
    return f"{value:024X}"


def sgtin96_decode(epc_hex: str) -> tuple[int, str, str, int]:
    """(filter, company prefix, item reference, serial) of an SGTIN-96 EPC; ValueError otherwise."""
    if len(epc_hex) != 24:
        raise ValueError("an SGTIN-96 EPC has 24 hex digits")
    value = int(epc_hex, 16)
    if value >> 88 != SGTIN96_HEADER:
        raise ValueError("not an SGTIN-96 EPC (header is not 0x30)")
    filter_value = (value >> 85) & 0x7
    partition = (value >> 82) & 0x7
    if partition not in _SGTIN_PARTITIONS:
        raise ValueError(f"invalid SGTIN partition {partition}")
    cp_bits, cp_digits, ir_bits, ir_digits = _SGTIN_PARTITIONS[partition]
    serial = value & ((1 << 38) - 1)
    ir = (value >> 38) & ((1 << ir_bits) - 1)
    cp = (value >> (38 + ir_bits)) & ((1 << cp_bits) - 1)
    cp_s, ir_s = str(cp).zfill(cp_digits), str(ir).zfill(ir_digits)
    if len(cp_s) != cp_digits or len(ir_s) != ir_digits:
        raise ValueError("company prefix or item reference has too many digits for its partition")
    return filter_value, cp_s, ir_s, serial


def gtin14_of(epc_hex: str) -> str:
    """GTIN-14 of an SGTIN-96 EPC (the truth the agent's decoder must reproduce)."""
    _f, cp, ir, _s = sgtin96_decode(epc_hex.upper())
    return gtin14(cp, ir)


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZoneSpec:
    """A read zone and the reader antennas that cover it."""

    name: str
    reader: str  # reader hostname
    ports: tuple[int, ...]  # antenna ports of that reader covering the zone (1-4 on an R700)
    tx_power_cdbm: int = 3000


def _default_zones() -> tuple[ZoneSpec, ...]:
    return (
        ZoneSpec("backroom", "r1", (1, 2)),
        ZoneSpec("salesfloor", "r2", (1, 2, 3, 4)),
        ZoneSpec("fitting-room", "r3", (1, 2), 2000),
        ZoneSpec("pos", "r4", (1,), 2000),
        ZoneSpec("exit", "r5", (1, 2)),
    )


def _default_neighbours() -> tuple[tuple[str, str], ...]:
    return (("backroom", "salesfloor"), ("salesfloor", "fitting-room"), ("salesfloor", "pos"), ("pos", "exit"))


@dataclass(frozen=True)
class SimConfig:
    seed: int = 1
    start_ts: float = 1748854800.0  # 2025-06-02T09:00:00Z
    n_items: int = 5000
    n_gtins: int = 400
    # Company prefixes of 7, 9 and 6 digits (SGTIN partitions 5, 3 and 6); GTINs are spread over them.
    company_prefixes: tuple[str, ...] = ("0614141", "950110153", "453456")
    filter_value: int = 1  # 1 = point-of-sale trade item
    zones: tuple[ZoneSpec, ...] = field(default_factory=_default_zones)
    neighbours: tuple[tuple[str, str], ...] = field(default_factory=_default_neighbours)  # both ways
    read_cycle_s: float = 1.0
    # Radio noise
    miss_rate: float = 0.10  # P(a tag is not reported by its home antenna in a cycle)
    cross_read_rate: float = 0.02  # P(a tag is also reported by a neighbouring zone's antenna in a cycle)
    cross_read_drop_db: tuple[float, float] = (10.0, 20.0)
    ghost_rate: float = 0.05  # expected ghost reads per cycle, store-wide
    burst_rate: float = 0.01  # P(a report is repeated 2-5 times in the same cycle)
    burst_copies: tuple[int, int] = (2, 5)
    rssi_dbm: tuple[float, float] = (-72.0, -42.0)  # base RSSI range at the home antenna
    rssi_noise_db: float = 2.0
    rssi_refresh_rate: float = 0.02  # share of tags whose RSSI noise is re-drawn each cycle
    region: str = "FCC"  # hop table: FCC (50 channels, 902.75-927.25 MHz) or ETSI (4 channels)
    # Store
    initial_backroom_share: float = 0.35
    # World (rates per hour of virtual time; ranges inclusive)
    delivery_per_h: float = 1.5
    delivery_gtins: tuple[int, int] = (1, 5)
    delivery_units: tuple[int, int] = (5, 20)
    restock_per_h: float = 30.0
    restock_units: tuple[int, int] = (1, 8)
    tryon_per_h: float = 20.0
    tryon_units: tuple[int, int] = (1, 3)
    tryon_minutes: tuple[float, float] = (2.0, 10.0)
    tryon_buy_p: float = 0.3
    purchase_per_h: float = 40.0
    purchase_units: tuple[int, int] = (1, 4)
    pos_seconds: tuple[float, float] = (10.0, 60.0)
    exit_cycles: tuple[int, int] = (1, 2)
    # Output
    format: str = "impinj"  # impinj | zebra | generic
    reader_formats: tuple[tuple[str, str], ...] = ()  # (reader, format) for readers that differ from ``format``
    zebra_concatenated: bool = False  # Zebra messages: objects back to back instead of a JSON array
    name_readers: tuple[str, ...] = ()  # Impinj readers that report antennaName instead of antennaPort
    overflow_rate: float = 0.0  # P(an Impinj reader purges its first antenna's events in a cycle)
    foreign_share: float = 0.0  # share of the initial items that are other companies' products
    max_events_per_payload: int = 0  # 0 = one payload per reader per cycle
    timestamp_digits: int = 3  # fractional-second digits of RFC 3339 timestamps (Impinj firmware sends 9)

    def __post_init__(self) -> None:
        names = [z.name for z in self.zones]
        if sorted(names) != sorted(ZONES):
            raise ValueError(f"zones must be exactly {ZONES}, got {names}")
        seen: set[tuple[str, int]] = set()
        for z in self.zones:
            if not 1 <= len(z.ports) <= 4:
                raise ValueError(f"zone {z.name}: 1-4 antennas")
            for p in z.ports:
                if not 1 <= p <= 64 or (z.reader, p) in seen:
                    raise ValueError(f"zone {z.name}: bad or duplicate antenna {z.reader}:{p}")
                seen.add((z.reader, p))
        for a, b in self.neighbours:
            if a not in ZONES or b not in ZONES or a == b:
                raise ValueError(f"bad neighbour pair {a}<->{b}")
        for name in ("miss_rate", "cross_read_rate", "burst_rate", "rssi_refresh_rate", "tryon_buy_p",
                     "initial_backroom_share"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0 or (name == "tryon_buy_p" and v > 1.0):
                raise ValueError(f"{name} must be in [0, 1)")
        if self.ghost_rate < 0 or self.read_cycle_s <= 0 or self.n_items < 0 or self.n_gtins < 1:
            raise ValueError("ghost_rate >= 0, read_cycle_s > 0, n_items >= 0, n_gtins >= 1")
        if round(self.read_cycle_s * 1000) < 1:
            raise ValueError("read_cycle_s must be at least 1 ms")
        if self.format not in ("impinj", "zebra", "generic") or any(
                f not in ("impinj", "zebra", "generic") for _r, f in self.reader_formats):
            raise ValueError("format must be impinj, zebra or generic")
        if not (0.0 <= self.overflow_rate < 1.0 and 0.0 <= self.foreign_share < 1.0):
            raise ValueError("overflow_rate and foreign_share must be in [0, 1)")
        if FOREIGN_COMPANY_PREFIX in self.company_prefixes:
            raise ValueError(f"company prefix {FOREIGN_COMPANY_PREFIX} is the foreign products' one")
        if self.region not in _CHANNELS:
            raise ValueError(f"region must be one of {sorted(_CHANNELS)}")
        if self.timestamp_digits not in (3, 6, 9):
            raise ValueError("timestamp_digits must be 3, 6 or 9")
        if not self.company_prefixes:
            raise ValueError("at least one company prefix")
        for cp in self.company_prefixes:
            if not cp.isdigit() or len(cp) not in _PARTITION_BY_PREFIX_DIGITS:
                raise ValueError(f"company prefix {cp!r}: 6-12 digits")
            per_prefix = -(-self.n_gtins // len(self.company_prefixes))
            if per_prefix > 10 ** (12 - len(cp)):
                raise ValueError(f"company prefix {cp}: room for only {10 ** (12 - len(cp))} item references")


_CHANNELS = {
    "FCC": tuple(902750 + 500 * i for i in range(50)),
    "ETSI": (865700, 866300, 866900, 867500),
}

# --------------------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------------------

_RSSI_MIN_CDBM = -9500
_RSSI_MAX_CDBM = -2000
_RSSI_STEP = 50  # 0.5 dB
_NOISE_POOL = 4096


def _rssi_index(cdbm: float) -> int:
    c = min(max(cdbm, _RSSI_MIN_CDBM), _RSSI_MAX_CDBM)
    return int(round((c - _RSSI_MIN_CDBM) / _RSSI_STEP))


def _rssi_table(fmt: str) -> list[bytes]:
    out = []
    for i in range((_RSSI_MAX_CDBM - _RSSI_MIN_CDBM) // _RSSI_STEP + 1):
        cdbm = _RSSI_MIN_CDBM + i * _RSSI_STEP
        if fmt == "impinj":
            out.append(str(cdbm).encode())
        elif fmt == "zebra":
            out.append(str(int(math.floor(cdbm / 100 + 0.5))).encode())  # Zebra: whole dBm
        else:
            out.append(repr(cdbm / 100).encode())
    return out


class _Item:
    __slots__ = ("epc", "epc_b", "gtin", "zone", "ant", "aidx", "base", "head", "cross", "zidx", "gidx", "pidx",
                 "busy")

    def __init__(self, epc: str, gtin: str) -> None:
        self.epc = epc
        self.epc_b = epc.encode()
        self.gtin = gtin
        self.zone = ""
        self.ant: _Antenna | None = None
        self.aidx = -1
        self.base = 0  # index into the RSSI table
        self.head = b""  # epc + antenna fragment; a report is head + rssi
        self.cross: list[tuple[_Antenna, bytes]] = []
        self.zidx = self.gidx = self.pidx = -1
        self.busy = False  # held by a shopper (fitting room / checkout): not picked again


class _Antenna:
    __slots__ = ("zone", "reader", "port", "name", "tx", "mid", "items", "frags", "pieces", "mac", "rs")

    def __init__(self, zone: str, reader: str, port: int, tx: int, fmt: str, mac: str, by_name: bool,
                 rs: list[bytes]) -> None:
        self.zone, self.reader, self.port, self.tx, self.mac, self.rs = zone, reader, port, tx, mac, rs
        self.name = f"{zone}-{port}"
        if fmt == "impinj" and by_name:
            self.mid = f'","antennaName":"{self.name}","peakRssiCdbm":'.encode()
        elif fmt == "impinj":
            self.mid = f'","antennaPort":{port},"antennaName":"{self.name}","peakRssiCdbm":'.encode()
        elif fmt == "zebra":
            self.mid = f'","antenna":{port},"peakRssi":'.encode()
        else:
            self.mid = f'","antenna":{port},"rssi":'.encode()
        self.items: list[_Item] = []
        self.frags: list[bytes] = []
        self.pieces: list[bytes] = []


class _Reader:
    __slots__ = ("name", "ants", "mac", "event_num", "fmt")

    def __init__(self, name: str, mac: str, fmt: str) -> None:
        self.name, self.mac, self.fmt = name, mac, fmt
        self.ants: list[_Antenna] = []
        self.event_num = 0


def _bag_add(bag: list, item: _Item, attr: str) -> None:
    setattr(item, attr, len(bag))
    bag.append(item)


def _bag_remove(bag: list, item: _Item, attr: str) -> None:
    i = getattr(item, attr)
    last = bag.pop()
    if last is not item:
        bag[i] = last
        setattr(last, attr, i)
    setattr(item, attr, -1)


def _positions(rng: random.Random, n: int, p: float, log1mp: float) -> list[int]:
    """Indices in range(n) of the successes of n Bernoulli(p) trials, by geometric skipping (exact)."""
    out: list[int] = []
    if n <= 0 or p <= 0.0:
        return out
    rand, log = rng.random, math.log
    i = -1
    while True:
        i += 1 + int(log(1.0 - rand()) / log1mp)
        if i >= n:
            return out
        out.append(i)


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 30:  # normal approximation; ghosts are never this many per cycle in practice
        return max(0, int(round(rng.gauss(lam, math.sqrt(lam)))))
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


class StoreSim:
    """The simulated store. ``step()`` advances one read cycle and returns that cycle's reader payloads."""

    def __init__(self, cfg: SimConfig | None = None) -> None:
        self.cfg = cfg = cfg or SimConfig()
        self._world = random.Random(f"{cfg.seed}:world")
        self._rf = random.Random(f"{cfg.seed}:rf")
        self._cycle_ms = int(round(cfg.read_cycle_s * 1000))
        self._t0_ms = int(round(cfg.start_ts * 1000))
        self._k = 0  # index of the next cycle
        fmts = dict(cfg.reader_formats)
        rs_of = {f: _rssi_table(f) for f in ("impinj", "zebra", "generic")}
        self._rs_max = len(rs_of["impinj"]) - 1
        self._channels = _CHANNELS[cfg.region]
        noise_steps = cfg.rssi_noise_db * 100 / _RSSI_STEP
        self._noise = [max(-12, min(12, int(round(self._rf.gauss(0.0, noise_steps))))) for _ in range(_NOISE_POOL)]
        self._lo_rssi = _rssi_index(cfg.rssi_dbm[0] * 100)
        self._hi_rssi = _rssi_index(cfg.rssi_dbm[1] * 100)
        self._log1m = {name: (math.log(1.0 - getattr(cfg, name)) if getattr(cfg, name) > 0 else -1.0)
                       for name in ("miss_rate", "cross_read_rate", "burst_rate", "rssi_refresh_rate")}

        # Layout
        self._readers: dict[str, _Reader] = {}
        self._zone_ants: dict[str, list[_Antenna]] = {}
        self._antennas: list[_Antenna] = []
        for z in cfg.zones:
            if z.reader not in self._readers:
                n = len(self._readers) + 1
                self._readers[z.reader] = _Reader(z.reader, f"02:00:00:00:00:{n:02X}", fmts.get(z.reader, cfg.format))
            rdr = self._readers[z.reader]
            for port in z.ports:
                ant = _Antenna(z.name, z.reader, port, z.tx_power_cdbm, rdr.fmt, rdr.mac, z.reader in cfg.name_readers,
                               rs_of[rdr.fmt])
                rdr.ants.append(ant)
                self._antennas.append(ant)
                self._zone_ants.setdefault(z.name, []).append(ant)
        for rdr in self._readers.values():
            rdr.ants.sort(key=lambda a: a.port)
        self._neigh: dict[str, list[str]] = {z: [] for z in ZONES}
        for a, b in cfg.neighbours:
            if b not in self._neigh[a]:
                self._neigh[a].append(b)
            if a not in self._neigh[b]:
                self._neigh[b].append(a)

        # Catalogue
        self.gtins: list[str] = []
        self._gtin_parts: list[tuple[str, str]] = []
        for i in range(cfg.n_gtins):
            cp = cfg.company_prefixes[i % len(cfg.company_prefixes)]
            ref = "0" + str(i // len(cfg.company_prefixes)).zfill(12 - len(cp))
            self._gtin_parts.append((cp, ref))
            self.gtins.append(gtin14(cp, ref))
        self._next_serial = [1] * cfg.n_gtins
        self._known_epcs: set[str] = set()  # every item EPC and ghost EPC ever produced
        self._items: list[_Item] = []  # every item ever (for ghosts made by bit flips)

        # State
        self._zone_items: dict[str, list[_Item]] = {z: [] for z in ZONES}
        self._bags: dict[tuple[str, str], list[_Item]] = {}
        self._present: list[_Item] = []
        self._queue: list[tuple[int, int, str, tuple]] = []  # (due ms, seq, kind, args)
        self._qseq = 0
        self.truth_events: list[tuple[float, str, str | None, str]] = []
        self.stats: dict[str, int] = dict(
            cycles=0, payloads=0, events=0, home_reads=0, misses=0, cross_reads=0, ghosts=0, bursts=0,
            burst_extra=0, delivered=0, sold=0, moves=0, deliveries=0, restocks=0, tryons=0, purchases=0,
            foreign_items=0, foreign_reads=0, overflows=0, purged=0,
        )
        self._foreign_epcs: set[bytes] = set()  # EPCs of other companies' SGTINs: items and ghosts

        w = self._world
        for _ in range(cfg.n_items):
            g = w.randrange(cfg.n_gtins)
            zone = "backroom" if w.random() < cfg.initial_backroom_share else "salesfloor"
            self._place(self._new_item(g), zone)
        for k in range(int(round(cfg.n_items * cfg.foreign_share))):
            self._place_foreign(k, "backroom" if w.random() < cfg.initial_backroom_share else "salesfloor")
        self.initial_truth = self.truth()
        self.initial_total = len(self._present)
        # Next arrival of each Poisson process, in ms of virtual time
        self._next: dict[str, float] = {}
        for kind in ("delivery", "restock", "tryon", "purchase"):
            self._next[kind] = self._next_arrival(kind, float(self._t0_ms))
        self._ts_cache: tuple[int, str] = (-1, "")
        self._keep: list = []

    # ---- public API ------------------------------------------------------------------------------------

    @property
    def now(self) -> float:
        """Virtual time (epoch seconds) of the next cycle."""
        return (self._t0_ms + self._k * self._cycle_ms) / 1000.0

    def step(self) -> list[bytes]:
        """Advance one read cycle; the reader payloads of that cycle (readers with nothing to say send none)."""
        return [p for _r, p in self.step_by_reader()]

    def step_by_reader(self) -> list[tuple[str, bytes]]:
        """Like step(), with the hostname of the reader that sent each payload."""
        t_ms = self._t0_ms + self._k * self._cycle_ms
        self._k += 1
        self._world_until(t_ms)
        self._radio()
        out: list[tuple[str, bytes]] = []
        for rdr in self._readers.values():
            for p in self._render(rdr, t_ms):
                out.append((rdr.name, p))
        self.stats["cycles"] += 1
        self.stats["payloads"] += len(out)
        # Hold this cycle's payloads until the next cycle's exist: freed before, they would let malloc hand
        # the megabytes back to the OS and the next cycle would page-fault them all in again (2-3x slower).
        self._keep = out
        return out

    def run(self, seconds: float) -> Iterator[tuple[float, list[bytes]]]:
        """Run ``seconds`` of virtual time: yields (cycle time in epoch seconds, payloads) per cycle."""
        n = int(math.ceil(seconds * 1000 / self._cycle_ms - 1e-9))
        for _ in range(n):
            t = self.now
            yield t, self.step()

    def close(self) -> None:
        """Closing time: no new deliveries, restocks, try-ons or purchases; what is under way finishes
        (try-ons come back, purchases walk out), and the readers keep reading."""
        for kind in self._next:
            self._next[kind] = math.inf

    def truth(self) -> dict[tuple[str, str], int]:
        """Exact on-hand count per (zone, GTIN-14) right now (after the last step); zero counts left out."""
        return {k: len(v) for k, v in self._bags.items() if v}

    def stock_truth(self) -> dict[tuple[str, str], int]:
        """truth() without the exit zone: items there are walking out, by definition no longer stock."""
        return {k: v for k, v in self.truth().items() if k[0] != "exit"}

    def replay(self, set_time: Callable[[float], None], ingest: Callable[[bytes], int], tick: Callable[[], None],
               open_s: float, closed_s: float = 0.0) -> int:
        """Trade for ``open_s``, then close and settle for ``closed_s``, feeding every payload to ``ingest``
        (which returns the reads it took) at its cycle's virtual time; ``tick`` after each cycle."""
        reads = 0
        for phase, span in (("open", open_s), ("closed", closed_s)):
            if phase == "closed":
                self.close()
            for t, payloads in self.run(span):
                set_time(t)
                for p in payloads:
                    reads += ingest(p)
                tick()
        return reads

    def item_zone(self) -> dict[str, str]:
        """EPC -> zone of every item in the store right now."""
        return {it.epc: it.zone for it in self._present}

    def item_antenna(self) -> dict[str, tuple[str, int]]:
        """EPC -> (reader, port) of the home antenna of every item in the store right now."""
        return {it.epc: (it.ant.reader, it.ant.port) for it in self._present}  # type: ignore[union-attr]

    def layout(self) -> list[dict]:
        """Every antenna: reader, port, antenna name and zone (what the agent's [[rfid.antennas]] should say)."""
        return [dict(reader=a.reader, port=a.port, name=a.name, zone=a.zone, mac=a.mac) for a in self._antennas]

    def total(self) -> int:
        return len(self._present)

    # ---- world -----------------------------------------------------------------------------------------

    def _new_item(self, g: int) -> _Item:
        cp, ref = self._gtin_parts[g]
        while True:
            serial = self._next_serial[g]
            self._next_serial[g] += 1
            epc = sgtin96_hex(cp, ref, serial, self.cfg.filter_value)
            if epc not in self._known_epcs:  # a ghost may have taken it
                break
        self._known_epcs.add(epc)
        it = _Item(epc, self.gtins[g])
        self._items.append(it)
        return it

    def _place_foreign(self, k: int, zone: str) -> None:
        """Another company's product on a shelf: read like any tag (home antenna only), never stock."""
        ref = "0" + str(k % 100_000).zfill(5)
        epc = sgtin96_hex(FOREIGN_COMPANY_PREFIX, ref, 1 + k // 100_000, self.cfg.filter_value)
        it = _Item(epc, gtin14(FOREIGN_COMPANY_PREFIX, ref))
        self._known_epcs.add(epc)
        self._foreign_epcs.add(it.epc_b)
        rf = self._rf
        ants = self._zone_ants[zone]
        ant = ants[rf.randrange(len(ants))]
        it.zone, it.ant = zone, ant
        it.base = rf.randint(self._lo_rssi, self._hi_rssi)
        it.head = it.epc_b + ant.mid
        it.aidx = len(ant.items)
        ant.items.append(it)
        ant.frags.append(it.head + ant.rs[it.base])
        self.stats["foreign_items"] += 1

    def _place(self, it: _Item, zone: str) -> None:
        """Put an item (not in any zone) into ``zone``, with a home antenna and its pre-rendered reports."""
        rf = self._rf
        ants = self._zone_ants[zone]
        ant = ants[rf.randrange(len(ants))] if len(ants) > 1 else ants[0]
        it.zone, it.ant = zone, ant
        it.base = rf.randint(self._lo_rssi, self._hi_rssi)
        it.head = it.epc_b + ant.mid
        it.aidx = len(ant.items)
        ant.items.append(it)
        ant.frags.append(it.head + ant.rs[min(self._rs_max, max(0, it.base + self._noise[rf.getrandbits(12)]))])
        lo, hi = self.cfg.cross_read_drop_db
        cross = []
        for nz in self._neigh[zone]:
            nants = self._zone_ants[nz]
            na = nants[rf.randrange(len(nants))] if len(nants) > 1 else nants[0]
            idx = max(0, it.base - int(round(rf.uniform(lo, hi) * 100 / _RSSI_STEP)))
            cross.append((na, it.epc_b + na.mid + na.rs[idx]))
        it.cross = cross
        _bag_add(self._zone_items[zone], it, "zidx")
        key = (zone, it.gtin)
        bag = self._bags.get(key)
        if bag is None:
            bag = self._bags[key] = []
        _bag_add(bag, it, "gidx")
        if it.pidx < 0:
            _bag_add(self._present, it, "pidx")

    def _unplace(self, it: _Item) -> None:
        ant = it.ant
        assert ant is not None
        i = it.aidx
        last = ant.items.pop()
        lastf = ant.frags.pop()
        if last is not it:
            ant.items[i] = last
            ant.frags[i] = lastf
            last.aidx = i
        it.ant, it.aidx = None, -1
        _bag_remove(self._zone_items[it.zone], it, "zidx")
        _bag_remove(self._bags[(it.zone, it.gtin)], it, "gidx")

    def _move(self, it: _Item, to: str, t_ms: int) -> None:
        frm = it.zone
        self._unplace(it)
        ts = t_ms / 1000.0
        if to == GONE:
            _bag_remove(self._present, it, "pidx")
            it.zone = GONE
            self.stats["sold"] += 1
        else:
            self._place(it, to)
        self.stats["moves"] += 1
        self.truth_events.append((ts, it.epc, frm, to))

    def _schedule(self, due_ms: float, kind: str, args: tuple) -> None:
        self._qseq += 1
        heapq.heappush(self._queue, (int(due_ms), self._qseq, kind, args))

    def _next_arrival(self, kind: str, after_ms: float) -> float:
        rate = getattr(self.cfg, f"{kind}_per_h")
        if rate <= 0:
            return math.inf
        return after_ms + self._world.expovariate(rate / 3_600_000.0)

    def _world_until(self, t_ms: int) -> None:
        """Apply every physical event due at or before t_ms, in time order, at cycle time t_ms."""
        while True:
            due_q = self._queue[0][0] if self._queue else math.inf
            kind_a, due_a = min(self._next.items(), key=lambda kv: kv[1])
            if min(due_q, due_a) > t_ms:
                return
            if due_q <= due_a:
                _due, _seq, kind, args = heapq.heappop(self._queue)
                self._delayed(kind, args, t_ms)
            else:
                self._arrival(kind_a, t_ms, due_a)
                self._next[kind_a] = self._next_arrival(kind_a, due_a)

    def _pick(self, zone: str, n: int) -> list[_Item]:
        """Up to n distinct free items from a zone, at random."""
        w, bag = self._world, self._zone_items[zone]
        out: list[_Item] = []
        tries = 0
        while len(out) < n and bag and tries < 4 * n + 8:
            tries += 1
            it = bag[w.randrange(len(bag))]
            if not it.busy and it not in out:
                out.append(it)
        return out

    def _arrival(self, kind: str, t_ms: int, due_ms: float) -> None:
        cfg, w = self.cfg, self._world
        if kind == "delivery":
            self.stats["deliveries"] += 1
            for _ in range(w.randint(*cfg.delivery_gtins)):
                g = w.randrange(cfg.n_gtins)
                for _u in range(w.randint(*cfg.delivery_units)):
                    it = self._new_item(g)
                    self._place(it, "backroom")
                    self.stats["delivered"] += 1
                    self.truth_events.append((t_ms / 1000.0, it.epc, None, "backroom"))
        elif kind == "restock":
            first = self._pick("backroom", 1)
            if not first:
                return
            self.stats["restocks"] += 1
            bag = self._bags[("backroom", first[0].gtin)]
            n = min(len(bag), w.randint(*cfg.restock_units))
            for it in [x for x in bag if not x.busy][:n]:
                self._move(it, "salesfloor", t_ms)
        elif kind == "tryon":
            items = self._pick("salesfloor", w.randint(*cfg.tryon_units))
            if not items:
                return
            self.stats["tryons"] += 1
            for it in items:
                it.busy = True
                self._move(it, "fitting-room", t_ms)
            back = due_ms + w.uniform(*cfg.tryon_minutes) * 60_000
            self._schedule(back, "tryon_end", tuple(items))
        elif kind == "purchase":
            items = self._pick("salesfloor", w.randint(*cfg.purchase_units))
            if not items:
                return
            self.stats["purchases"] += 1
            self._checkout(items, t_ms, due_ms)

    def _checkout(self, items: list[_Item] | tuple[_Item, ...], t_ms: int, due_ms: float) -> None:
        for it in items:
            it.busy = True
            self._move(it, "pos", t_ms)
        self._schedule(due_ms + self._world.uniform(*self.cfg.pos_seconds) * 1000, "to_exit", tuple(items))

    def _delayed(self, kind: str, args: tuple, t_ms: int) -> None:
        w, cfg = self._world, self.cfg
        if kind == "tryon_end":
            buy = [it for it in args if w.random() < cfg.tryon_buy_p]
            for it in args:
                if it not in buy:
                    it.busy = False
                    self._move(it, "salesfloor", t_ms)
            if buy:
                self._checkout(buy, t_ms, t_ms)
        elif kind == "to_exit":
            for it in args:
                self._move(it, "exit", t_ms)
            self._schedule(t_ms + w.randint(*cfg.exit_cycles) * self._cycle_ms, "gone", args)
        elif kind == "gone":
            for it in args:
                self._move(it, GONE, t_ms)

    # ---- radio -----------------------------------------------------------------------------------------

    def _radio(self) -> None:
        cfg, rf, st = self.cfg, self._rf, self.stats
        noise, rs_max = self._noise, self._rs_max
        l_miss, l_ref = self._log1m["miss_rate"], self._log1m["rssi_refresh_rate"]
        getbits = rf.getrandbits
        for ant in self._antennas:
            frags = ant.frags
            n = len(frags)
            if not n:
                ant.pieces = []
                continue
            if cfg.rssi_refresh_rate > 0:
                items, rs = ant.items, ant.rs
                for j in _positions(rf, n, cfg.rssi_refresh_rate, l_ref):
                    it = items[j]
                    frags[j] = it.head + rs[min(rs_max, max(0, it.base + noise[getbits(12)]))]
            missed = _positions(rf, n, cfg.miss_rate, l_miss)
            if not missed:
                pieces = frags[:]
            else:
                pieces = []
                prev = 0
                for m in missed:
                    if m > prev:
                        pieces += frags[prev:m]
                    prev = m + 1
                if prev < n:
                    pieces += frags[prev:]
            st["home_reads"] += len(pieces)
            st["misses"] += len(missed)
            ant.pieces = pieces
        # cross-reads
        present = self._present
        if cfg.cross_read_rate > 0 and present:
            for j in _positions(rf, len(present), cfg.cross_read_rate, self._log1m["cross_read_rate"]):
                cross = present[j].cross
                na, frag = cross[rf.randrange(len(cross))] if len(cross) > 1 else cross[0]
                na.pieces.append(frag)
                st["cross_reads"] += 1
        # ghosts
        for _ in range(_poisson(rf, cfg.ghost_rate)):
            ant = self._antennas[rf.randrange(len(self._antennas))]
            epc = self._ghost_epc()
            idx = _rssi_index(rf.uniform(-85.0, -70.0) * 100)
            ant.pieces.append(epc.encode() + ant.mid + ant.rs[idx])
            st["ghosts"] += 1
        # bursts: a report repeated so it appears 2-5 times in a row
        if cfg.burst_rate > 0:
            lo, hi = cfg.burst_copies
            l_b = self._log1m["burst_rate"]
            for ant in self._antennas:
                pieces = ant.pieces
                if not pieces:
                    continue
                hits = _positions(rf, len(pieces), cfg.burst_rate, l_b)
                for j in reversed(hits):
                    extra = rf.randint(lo, hi) - 1
                    pieces[j + 1:j + 1] = [pieces[j]] * extra
                    st["burst_extra"] += extra
                st["bursts"] += len(hits)

    def _ghost_epc(self) -> str:
        rf = self._rf
        while True:
            if self._items and rf.random() < 0.5:
                src = self._items[rf.randrange(len(self._items))].epc
                epc = f"{int(src, 16) ^ (1 << rf.randrange(88)):024X}"
            else:
                epc = f"{rf.getrandbits(96):024X}"
            if epc not in self._known_epcs:
                self._known_epcs.add(epc)
                if self._is_foreign(epc):
                    self._foreign_epcs.add(epc.encode())
                return epc

    def _is_foreign(self, epc: str) -> bool:
        try:
            _f, cp, _ir, _s = sgtin96_decode(epc)
        except ValueError:
            return False
        return cp not in self.cfg.company_prefixes

    # ---- rendering -------------------------------------------------------------------------------------

    def _iso(self, ms: int, zebra: bool = False) -> str:
        s, r = divmod(ms, 1000)
        if self._ts_cache[0] != s:
            self._ts_cache = (s, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)))
        digits = self.cfg.timestamp_digits
        frac = f"{r:03d}" + "0" * (digits - 3)
        return f"{self._ts_cache[1]}.{frac}{'+0000' if zebra else 'Z'}"

    def _render(self, rdr: _Reader, t_ms: int) -> list[bytes]:
        """The reader's payloads for this cycle. Built as one flat list of fragments and joined once: a big
        bytes object is never concatenated (each copy of a megabyte costs more than all the reads)."""
        ants = rdr.ants
        n_ants = len(ants)
        limit = self.cfg.max_events_per_payload
        fmt = rdr.fmt
        zebra = fmt == "zebra"
        glued = zebra and self.cfg.zebra_concatenated  # {...}{...}: no brackets, no commas
        opening = b"" if glued else b"["
        comma = b"" if glued else b","
        parts: list[bytes] = [opening]
        out: list[bytes] = []
        count = 0
        st = self.stats
        if fmt == "impinj" and self.cfg.overflow_rate > 0 and self._rf.random() < self.cfg.overflow_rate:
            purged = next((a for a in ants if a.pieces), None)
            if purged is not None:
                n_purged, purged.pieces = len(purged.pieces), []
                st["overflows"] += 1
                st["purged"] += n_purged
                ts = self._iso(t_ms)
                parts.append(f'{{"timestamp":"{ts}","hostname":"{rdr.name}","eventType":"overflow","overflowEvent":'
                             f'{{"firstEventTimestamp":"{ts}","lastEventTimestamp":"{ts}","eventsPurged":{n_purged},'
                             f'"eventsRemaining":0}}}}'.encode())
                count += 1
        foreign = self._foreign_epcs
        for k, ant in enumerate(ants):
            pieces = ant.pieces
            if not pieces:
                continue
            ant.pieces = []
            ms = t_ms + (k * self._cycle_ms) // n_ants  # antennas are multiplexed through the cycle
            freq = self._channels[self._rf.randrange(len(self._channels))]
            st["events"] += len(pieces)
            if foreign:
                st["foreign_reads"] += sum(1 for p in pieces if p[:24] in foreign)
            if fmt == "impinj":
                ts = self._iso(ms)
                a = (f'{{"timestamp":"{ts}","hostname":"{rdr.name}","eventType":"tagInventory",'
                     f'"tagInventoryEvent":{{"epcHex":"').encode()
                c = f',"frequency":{freq},"transmitPowerCdbm":{ant.tx},"lastSeenTime":"{ts}"}}}}'.encode()
            elif fmt == "generic":
                a = b'{"epc":"'
                c = f',"ts":{ms // 1000}.{ms % 1000:03d},"reader":"{rdr.name}"}}'.encode()
            else:
                a = (f'{{"type":"SIMPLE","timestamp":"{self._iso(ms, zebra=True)}","data":{{"MAC":"{rdr.mac}",'
                     f'"format":"epc","channel":{freq / 1000:.2f},"idHex":"').encode()
                c = b"}}"
            sep = c + comma + a
            i, n = 0, len(pieces)
            while i < n:
                take = n - i if not limit else min(n - i, limit - count)
                sub = pieces if (i == 0 and take == n) else pieces[i:i + take]
                if count:
                    parts.append(comma)
                if zebra:  # eventNum counts up per reader: one small join per event
                    n0 = rdr.event_num
                    rdr.event_num += take
                    sub = [p + b',"reads":1,"eventNum":' + str(n0 + e + 1).encode() for e, p in enumerate(sub)]
                seg = [sep] * (2 * take - 1)
                seg[0::2] = sub
                parts.append(a)
                parts += seg
                parts.append(c)
                i += take
                count += take
                if limit and count >= limit:
                    parts.append(b"" if glued else b"]")
                    out.append(b"".join(parts))
                    parts, count = [opening], 0
        if count:
            parts.append(b"" if glued else b"]")
            out.append(b"".join(parts))
        return out


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _truth_doc(sim: StoreSim) -> dict:
    cfg = asdict(sim.cfg)
    return {
        "config": cfg,
        "layout": sim.layout(),
        "start_ts": sim.cfg.start_ts,
        "end_ts": sim.now,
        "cycles": sim.stats["cycles"],
        "initial_truth": [dict(zone=z, gtin=g, count=n) for (z, g), n in sorted(sim.initial_truth.items())],
        "truth": [dict(zone=z, gtin=g, count=n) for (z, g), n in sorted(sim.truth().items())],
        "total": sim.total(),
        "initial_total": sim.initial_total,
        "stats": dict(sim.stats),
        "item_zone": dict(sorted(sim.item_zone().items())),
    }


class _MqttSink:
    def __init__(self, port: int, prefix: str, qos: int) -> None:
        import paho.mqtt.client as mqtt

        self.prefix, self.qos = prefix.rstrip("/"), qos
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"rfid-sim-{os.getpid()}")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.pending: list = []

    def send(self, reader: str, payload: bytes) -> None:
        info = self.client.publish(f"{self.prefix}/{reader}/events", payload, qos=self.qos)
        self.pending.append(info)
        if len(self.pending) >= 200:  # keep paho's out-queue bounded when running flat out
            for p in self.pending:
                p.wait_for_publish(timeout=30)
            self.pending.clear()

    def close(self) -> None:
        for p in self.pending:
            p.wait_for_publish(timeout=30)
        self.client.loop_stop()
        self.client.disconnect()


class _HttpSink:
    """POSTs each reader's payloads; with that reader's token (``--token``) in basic auth, as reader
    firmware whose HTTP client has only basic auth sends it (the agent's intake takes Bearer as well)."""

    def __init__(self, url: str, tokens: dict[str, str]) -> None:
        from urllib.parse import urlparse

        host = urlparse(url).hostname
        if host not in _LOOPBACK:
            raise SystemExit(f"--http must point at this machine (127.0.0.1/localhost), not {host!r}")
        self.url = url
        self.tokens = tokens

    def send(self, reader: str, payload: bytes) -> None:
        import base64
        import urllib.request

        headers = {"Content-Type": "application/json", "X-Reader": reader}
        if reader in self.tokens:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{reader}:{self.tokens[reader]}".encode()).decode()
        req = urllib.request.Request(self.url, data=payload, method="POST", headers=headers)
        with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 - loopback only, checked above
            r.read()

    def close(self) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulators.rfid_reader", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--gtins", type=int, default=400)
    ap.add_argument("--hours", type=float, default=12.0)
    ap.add_argument("--start", type=float, default=SimConfig.start_ts, help="virtual start, epoch seconds")
    ap.add_argument("--cycle", type=float, default=1.0, help="read cycle in seconds")
    ap.add_argument("--miss", type=float, default=0.10)
    ap.add_argument("--cross", type=float, default=0.02)
    ap.add_argument("--ghost", type=float, default=0.05, help="ghost reads per cycle, store-wide")
    ap.add_argument("--burst", type=float, default=0.01)
    ap.add_argument("--format", choices=("impinj", "zebra", "generic"), default="impinj")
    ap.add_argument("--max-events", type=int, default=0, help="events per payload at most (0 = no limit)")
    ap.add_argument("--out", type=Path, help="write <reader>.ndjson, truth.json, truth_events.ndjson here "
                    "(about 1.3 MB per 1 s cycle with 5000 items: a 12 h day is ~57 GB; use --cycle 10 for less)")
    ap.add_argument("--mqtt-port", type=int, help="publish to a mosquitto on 127.0.0.1:PORT")
    ap.add_argument("--topic-prefix", default="readers", help="topics are PREFIX/<hostname>/events")
    ap.add_argument("--qos", type=int, choices=(0, 1), default=1)
    ap.add_argument("--http", help="POST every payload to this URL (127.0.0.1 only)")
    ap.add_argument("--token", action="append", default=[], metavar="READER=TOKEN",
                    help="a reader's token for the agent's rfid.http.tokens (repeat per reader)")
    ap.add_argument("--speed", type=float, default=0.0, help="virtual seconds per real second; 0 = flat out")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    cfg = SimConfig(seed=args.seed, start_ts=args.start, n_items=args.items, n_gtins=args.gtins,
                    read_cycle_s=args.cycle, miss_rate=args.miss, cross_read_rate=args.cross,
                    ghost_rate=args.ghost, burst_rate=args.burst, format=args.format,
                    max_events_per_payload=args.max_events)
    sim = StoreSim(cfg)
    sinks: list = []
    files: dict[str, object] = {}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for r in dict.fromkeys(z.reader for z in cfg.zones):
            files[r] = open(args.out / f"{r}.ndjson", "wb")  # noqa: SIM115 - closed below
    if args.mqtt_port:
        sinks.append(_MqttSink(args.mqtt_port, args.topic_prefix, args.qos))
    if args.http:
        tokens = dict(t.split("=", 1) for t in args.token if "=" in t)
        if len(tokens) != len(args.token):
            raise SystemExit("--token takes READER=TOKEN")
        sinks.append(_HttpSink(args.http, tokens))

    n_cycles = int(math.ceil(args.hours * 3600 / cfg.read_cycle_s - 1e-9))
    say = (lambda *_a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"rfid-sim: seed {cfg.seed}, {cfg.n_items} items, {cfg.n_gtins} GTINs, {n_cycles} cycles of "
        f"{cfg.read_cycle_s} s, format {cfg.format}")
    real0 = time.monotonic()
    t0 = sim.now
    report_every = max(1, int(3600 / cfg.read_cycle_s))
    nbytes = 0
    try:
        for k in range(n_cycles):
            t = sim.now
            if args.speed > 0:
                delay = real0 + (t - t0) / args.speed - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            for reader, payload in sim.step_by_reader():
                nbytes += len(payload)
                f = files.get(reader)
                if f is not None:
                    f.write(payload)  # type: ignore[attr-defined]
                    f.write(b"\n")  # type: ignore[attr-defined]
                for s in sinks:
                    s.send(reader, payload)
            if (k + 1) % report_every == 0:
                st = sim.stats
                say(f"  {(k + 1) * cfg.read_cycle_s / 3600:5.1f} h virtual, {time.monotonic() - real0:6.1f} s real: "
                    f"{st['events']:,} events, {nbytes / 1e6:,.0f} MB, {sim.total()} items on hand, "
                    f"{st['sold']} sold, {st['delivered']} delivered")
    finally:
        for s in sinks:
            s.close()
        for f in files.values():
            f.close()  # type: ignore[attr-defined]
    if args.out:
        (args.out / "truth.json").write_text(json.dumps(_truth_doc(sim), indent=1))
        with open(args.out / "truth_events.ndjson", "w") as fh:
            for ts, epc, frm, to in sim.truth_events:
                fh.write(json.dumps({"ts": ts, "epc": epc, "from": frm, "to": to}) + "\n")
    st = sim.stats
    say(f"rfid-sim: done in {time.monotonic() - real0:.1f} s: {st['cycles']} cycles, {st['payloads']:,} payloads, "
        f"{st['events']:,} events ({nbytes / 1e6:,.1f} MB); {sim.total()} items on hand "
        f"({sim.initial_total} + {st['delivered']} delivered - {st['sold']} sold)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
