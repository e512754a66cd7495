"""EPCIS 2.0 ObjectEvents for what presence observed. Pure: no I/O, time comes in with the event.

The rules, in plain words:

- **Nothing is created or destroyed here.** A tag arriving, moving or departing is an *observation* of an
  object that exists before and after it, so every event is ``action: OBSERVE``; ``ADD``/``DELETE`` would
  say the object was commissioned or decommissioned (EPCIS 2.0 section 7.3.6.1). What happened is told by
  ``bizStep`` and ``disposition`` from the CBV 2.0 standard vocabulary (``VOCAB`` below says why each one).
- **Where is an SGLN per zone.** The store is ``epcis_location`` (``urn:epc:id:sgln:<company prefix>.<location
  reference>``, the store's own GLN: required config when EPCIS is on); each zone is an extension of it
  (GS1 AI 254: 1-20 characters of GS1's character set 82, escaped in the URI per the Tag Data Standard).
  A zone whose name is no valid extension ("sales floor": a space is not in set 82) must be mapped to one
  under ``[rfid.epcis_zones]``; ``check-config`` names it, and reports the whole mapping.
- ``readPoint`` is the zone that saw (or, for a departure, last saw) the tag; ``bizLocation``, where the
  object is expected to be from now on, is given for arrivals and moves and left out for departures,
  whose objects are no longer in the store.
- **Every event carries its ``@context`` and an ``eventID``**, the CBV 2.0 event hash
  (``ni:///sha-256;<hex>?ver=CBV2.0``, CBV 2.0 section 8.9): the same event built again (a replay, a resend,
  an export) has the same id, and anyone can recompute it from the event alone, with no agent state.
  ``event_hash`` implements the algorithm for the fields these events have (cross-checked in the tests
  against the GS1 community reference implementation, ``epcis-event-hash-generator``).
- ``document`` wraps events in an ``EPCISDocument``, the form an EPCIS 2.0 capture interface accepts.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..clock import rfc3339
from ..contract import EPCIS_CONTEXT
from .epc import decode_epc
from .presence import PresenceEvent

SCHEMA_VERSION = "2.0"
# GS1's example company prefixes (the EPCIS and TDS standards' examples): never a real store's location.
EXAMPLE_PREFIXES = frozenset({"0614141", "0012345", "4012345", "0037000"})

CBV = "https://ref.gs1.org/cbv/"


@dataclass(frozen=True, slots=True)
class Vocab:
    biz_step: str
    disposition: str
    at_location: bool  # the object is at the zone after the event: bizLocation is given


# GS1 Core Business Vocabulary (CBV) Standard 2.0, section 7.1 (business steps) and 7.2 (dispositions);
# the JSON bare-string forms as in EPCIS 2.0's JSON-LD context. Keyed by what presence saw and where.
VOCAB: dict[str, Vocab] = {
    # First sighting in the store. "arriving": an object arrives at a location; the agent knows no
    # shipment, so not "receiving" (which checks goods against a despatch advice).
    "arrived/accessible": Vocab("arriving", "sellable_accessible", True),
    "arrived/stockroom": Vocab("arriving", "sellable_not_accessible", True),
    # A move into a zone shoppers reach: "stocking" makes an object available to the customer.
    "moved/accessible": Vocab("stocking", "sellable_accessible", True),
    # A move into a stockroom zone: "storing" moves an object into a storage location; "not accessible":
    # still for sale, but not reachable by the consumer (CBV's own example is a backroom).
    "moved/stockroom": Vocab("storing", "sellable_not_accessible", True),
    # Read in a departure zone (the exit): "entering_exiting" is CBV's step at a facility's entrance/exit
    # where customers leave with purchased product; "retail_sold": transferred to a customer. The agent
    # has no till, so this is the store's assumption that what walks out was paid for.
    "departed/read": Vocab("entering_exiting", "retail_sold", False),
    # Unseen for departure_timeout_s: the object left the location ("departing") by a way no antenna
    # covers, and what became of it is not known ("unknown"): not "stolen", not "retail_sold".
    "departed/unseen": Vocab("departing", "unknown", False),
    # On the book but not read during a cycle count of its zone: "cycle_counting" is the count itself;
    # the object's state is "unknown" until it turns up again (it then arrives anew).
    "departed/missed": Vocab("cycle_counting", "unknown", False),
}

# ------------------------------------------------------------------ locations

# GS1 AI encodable character set 82 (GS1 General Specifications figure 7.11-1): what AI 254 may hold.
_CS82 = re.compile(r"""[!"%&'()*+,\-./0-9:;<=>?A-Z_a-z]{1,20}""")
# Characters of set 82 that the Tag Data Standard escapes in an EPC URI (TDS 2.0 section 6.3 / Table A-1).
_TDS_ESCAPE = {'"': "%22", "%": "%25", "&": "%26", "/": "%2F", "<": "%3C", ">": "%3E", "?": "%3F"}
_STORE_SGLN = re.compile(r"urn:epc:id:sgln:([0-9]{6,12})\.([0-9]{0,6})")


def check_store_location(uri: str) -> str:
    """The store's SGLN without extension, ``urn:epc:id:sgln:<company prefix>.<location ref>`` (12 digits
    in all); raises ValueError saying what is wrong."""
    m = _STORE_SGLN.fullmatch(uri)
    if m is None or len(m.group(1)) + len(m.group(2)) != 12:
        raise ValueError("must be the store's SGLN without extension, urn:epc:id:sgln:<company prefix>."
                         "<location reference> (12 digits in all, e.g. urn:epc:id:sgln:9521234.56789)")
    if m.group(1) in EXAMPLE_PREFIXES:
        raise ValueError(f"{m.group(1)} is GS1's example company prefix: give the store's own GLN")
    return uri


def check_extension(ext: str) -> str:
    """A valid SGLN extension (GS1 AI 254), unescaped; raises ValueError saying why not."""
    if not _CS82.fullmatch(ext):
        bad = sorted({c for c in ext if not _CS82.fullmatch(c)})
        why = f"characters {''.join(bad)!r} are" if bad else "its length is"
        raise ValueError(f"{ext!r} is not a valid SGLN extension: 1-20 characters of GS1 set 82 "
                         f"(letters, digits and !\"%&'()*+,-./:;<=>?_), and {why} not")
    return ext


def tds_escape(ext: str) -> str:
    return "".join(_TDS_ESCAPE.get(c, c) for c in ext)


def zone_problems(zones: Iterable[str], mapping: Mapping[str, str]) -> list[tuple[str, str]]:
    """(zone, why) for each zone with no valid SGLN extension (its mapped one, else its own name) or
    one it shares with another zone (two zones would read as one location)."""
    problems: list[tuple[str, str]] = []
    by_ext: dict[str, str] = {}
    for zone in dict.fromkeys(zones):
        ext = mapping.get(zone, zone)
        try:
            check_extension(ext)
        except ValueError as e:
            hint = "" if zone in mapping else f"; map zone {zone!r} to one under [rfid.epcis_zones]"
            problems.append((zone, f"{e}{hint}"))
            continue
        if ext in by_ext:
            problems.append((zone, f"zones {by_ext[ext]!r} and {zone!r} both have SGLN extension {ext!r}"))
        by_ext.setdefault(ext, zone)
    return problems


def zone_locations(store: str, zones: Iterable[str], mapping: Mapping[str, str]) -> dict[str, str]:
    """Zone -> its SGLN URI (``<store SGLN>.<extension, TDS-escaped>``); ValueError if any zone has none."""
    zones = list(dict.fromkeys(zones))
    if problems := zone_problems(zones, mapping):
        raise ValueError("; ".join(why for _, why in problems))
    return {zone: f"{check_store_location(store)}.{tds_escape(mapping.get(zone, zone))}" for zone in zones}


class EpcisEvents:
    """What the pipeline calls: one presence event in, the JSON body of its ObjectEvent out."""

    def __init__(self, store: str | None, zones: Iterable[str], mapping: Mapping[str, str],
                 stockroom: Iterable[str]) -> None:
        if store is None:
            raise ValueError("rfid.epcis_location is required when rfid.epcis is on")
        self.locations = zone_locations(store, zones, mapping)
        self.stockroom = frozenset(stockroom)

    @classmethod
    def from_config(cls, cfg: Any) -> EpcisEvents:  # an RfidConfig (config.py imports this module)
        return cls(cfg.epcis_location, (a.zone for a in cfg.antennas), cfg.epcis_zones, cfg.epcis_stockroom_zones)

    def body(self, ev: PresenceEvent) -> str:
        return json.dumps(object_event(ev, self.locations, self.stockroom), separators=(",", ":"))


# ------------------------------------------------------------------ events


def vocab_for(ev: PresenceEvent, stockroom: bool) -> Vocab:
    if ev.kind == "departed":
        if ev.reason.startswith("read at"):
            return VOCAB["departed/read"]
        return VOCAB["departed/missed" if ev.reason.startswith("missing in count") else "departed/unseen"]
    return VOCAB[f"{ev.kind}/{'stockroom' if stockroom else 'accessible'}"]


def epc_uri(epc_hex: str) -> str:
    return decode_epc(epc_hex).uri or f"urn:epc:raw:{len(epc_hex) * 4}.x{epc_hex}"


def object_event(ev: PresenceEvent, locations: Mapping[str, str], stockroom: frozenset[str]) -> dict[str, Any]:
    """The EPCIS 2.0 JSON-LD ObjectEvent for one presence event, eventID included."""
    v = vocab_for(ev, ev.zone in stockroom)
    where = {"id": locations[ev.zone]}
    item: dict[str, Any] = {
        "@context": EPCIS_CONTEXT, "type": "ObjectEvent", "eventTime": rfc3339(ev.ts), "eventTimeZoneOffset": "+00:00",
        "epcList": [epc_uri(ev.epc)], "action": "OBSERVE", "bizStep": v.biz_step, "disposition": v.disposition,
        "readPoint": where,
    }
    if v.at_location:
        item["bizLocation"] = where
    item["eventID"] = event_hash(item)
    return item


def for_document(item: Mapping[str, Any]) -> dict[str, Any]:
    """An event as stored (nulls dropped, ``@context`` and ``eventID`` added where an older agent sent
    none: the hash needs nothing but the event)."""
    out = {k: v for k, v in item.items() if v is not None}
    out.setdefault("@context", EPCIS_CONTEXT)
    if "eventID" not in out:
        out["eventID"] = event_hash(out)
    return out


def document(events: Iterable[Mapping[str, Any]], created: float) -> dict[str, Any]:
    """An EPCIS 2.0 ``EPCISDocument`` holding ``events``, as a capture interface takes it."""
    return {
        "@context": EPCIS_CONTEXT, "type": "EPCISDocument", "schemaVersion": SCHEMA_VERSION,
        "creationDate": rfc3339(created), "epcisBody": {"eventList": [for_document(e) for e in events]},
    }


# ------------------------------------------------------------------ event hash (CBV 2.0 section 8.9)

# Digital Link forms of the EPC URIs the agent writes. The AI values keep their EPC URI escapes and also
# percent-encode the characters GS1 Digital Link 1.2 table 7-1 reserves (as the reference implementation).
_DL_ENCODE = {c: f"%{ord(c):02X}" for c in "!()*+,:"}
_SGTIN = re.compile(r"urn:epc:id:sgtin:([0-9]{6,12})\.([0-9]{1,7})\.(.+)")
_SGLN = re.compile(r"urn:epc:id:sgln:([0-9]{6,12})\.([0-9]{0,6})\.(.+)")


def _check_digit(digits: str) -> str:
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(digits)))
    return str(-total % 10)


def _dl_value(v: str) -> str:
    return "".join(_DL_ENCODE.get(c, c) for c in v)


def digital_link(uri: str) -> str:
    """The canonical GS1 Digital Link URI of an SGTIN or SGLN EPC URI; other URIs unchanged (the agent
    writes no other ``urn:epc:id`` scheme)."""
    if m := _SGTIN.fullmatch(uri):
        prefix, item, serial = m.groups()
        gtin = item[:1] + prefix + item[1:]
        return f"https://id.gs1.org/01/{gtin}{_check_digit(gtin)}/21/{_dl_value(serial)}"
    if m := _SGLN.fullmatch(uri):
        prefix, loc, ext = m.groups()
        gln = prefix + loc
        base = f"https://id.gs1.org/414/{gln}{_check_digit(gln)}"
        return base if ext == "0" else f"{base}/254/{_dl_value(ext)}"
    return uri


def _utc_ms(t: str) -> str:
    d = datetime.fromisoformat(t.replace("Z", "+00:00")).astimezone(UTC)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


def _vocab_uri(value: str, kind: str) -> str:
    return value if ":" in value else f"{CBV}{kind}-{value}"


def prehash(item: Mapping[str, Any]) -> str:
    """The pre-hash string of an ObjectEvent with the fields ``object_event`` writes, in the canonical
    property order (eventType, eventTime, eventTimeZoneOffset, epcList, action, bizStep, disposition,
    readPoint, bizLocation); ``@context`` and ``eventID`` are not event data and take no part."""
    known = {"@context", "eventID", "type", "eventTime", "eventTimeZoneOffset", "epcList", "action", "bizStep",
             "disposition", "readPoint", "bizLocation"}
    if item.get("type") != "ObjectEvent" or set(item) - known:
        raise ValueError(f"event_hash covers ObjectEvents of {sorted(known)} only")
    parts: list[str] = [f"eventType={item['type']}", f"eventTime={_utc_ms(item['eventTime'])}",
                        f"eventTimeZoneOffset={item['eventTimeZoneOffset']}"]
    epcs: Sequence[str] = item.get("epcList") or ()
    if epcs:
        parts.append("epcList" + "".join(sorted(f"epc={digital_link(e.strip())}" for e in epcs)))
    parts.append(f"action={item['action']}")
    if item.get("bizStep"):
        parts.append(f"bizStep={_vocab_uri(item['bizStep'], 'BizStep')}")
    if item.get("disposition"):
        parts.append(f"disposition={_vocab_uri(item['disposition'], 'Disp')}")
    for key in ("readPoint", "bizLocation"):
        if item.get(key):
            parts.append(f"{key}id={digital_link(item[key]['id'])}")
    return "".join(parts)


def event_hash(item: Mapping[str, Any]) -> str:
    return f"ni:///sha-256;{hashlib.sha256(prehash(item).encode()).hexdigest()}?ver=CBV2.0"
