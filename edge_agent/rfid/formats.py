"""Raw reader payloads (bytes from MQTT or an HTTP POST) -> TagRead, plus a BadRead for every unusable record.

Three event shapes are understood, one or many per message: a JSON array, a single JSON object, or
newline-delimited JSON (NDJSON, what the Impinj HTTP stream sends; blank keep-alive lines are skipped).
Events of different shapes may be mixed in one array.

Impinj IoT device interface (R700/R720 firmware 7.x/8.x), ``tagInventory`` events::

    {"timestamp": "2023-06-28T07:24:00.277766184Z", "hostname": "impinj-14-2f-f4", "eventType": "tagInventory",
     "tagInventoryEvent": {"epc": "4sRRo6UBH6APNUaT", "epcHex": "E2C451A3A5011FA00F354693",
                           "tid": "...", "tidHex": "...", "pc": "NAA=", "antennaPort": 2, "antennaName": "...",
                           "peakRssiCdbm": -5750, "frequency": 921625, "transmitPowerCdbm": 1000,
                           "lastSeenTime": "2023-06-28T07:24:00.225324Z", "phaseAngle": 208.82, ...}}

  Sources: Impinj's OpenAPI document "Impinj Reader Configuration REST API" (/data/stream is an HTTP stream that
  sends a CR-LF keep-alive every 30 s when idle); reelyActive/barnowl-impinj lib/impinjdecoder.js and
  lib/testlistener.js (the webhook POST body is a JSON array of these events, field set as above); captured
  reader output quoted in public integrations (nanosecond ``timestamp``, microsecond ``lastSeenTime``).
  Every tagInventoryEvent field is optional, switched on and off in the preset's ``eventConfig.tagInventory``
  (``"epc"``, ``"epcHex"``, ``"antennaPort"``, ``"peakRssiCdbm"``, ``"lastSeenTime"``...; ``common.hostname``
  can drop ``hostname``). So ``epcHex`` may be absent and only ``epc`` present (the EPC bytes in base64; a
  public sample uses the URL-safe alphabet, so both alphabets are accepted): we take ``epcHex`` when present,
  else decode ``epc``. RSSI is centi-dBm. The read time is ``lastSeenTime`` when enabled, else ``timestamp``.
  Other event types share the envelope (``eventType`` + ``<type>Event``): antennaConnected,
  antennaDisconnected, inventoryStatus, inventoryTerminated, diagnostic, overflow, tagLocationEntry/Update/Exit
  (Microsoft's Azure IoT PnP bridge for the R700, R700_telemetry.h) and gpiTransition (Impinj SmartReader R700
  GpiTransitionVm). They are not tag reads: they are ignored without quarantine and counted by type in
  ``ParseStats.ignored``. Some events carry no ``eventType`` (a public TypeScript model of the v1 ReaderEvent
  has only ``timestamp`` plus one ``<type>Event`` key); the ``*Event`` key then names the type.
  ``overflowEvent`` says the reader purged ``eventsPurged`` events from its buffer (firstEventTimestamp,
  lastEventTimestamp, eventsRemaining; all optional): reads lost at the source, so besides being counted it is
  kept per reader in ``ParseStats.overflows`` for the caller to raise.
  A preset's ``tagReporting.antennaIdentifier`` may be ``antennaName`` instead of the default ``antennaPort``:
  the event then names its antenna and carries no port, and ``TagRead.antenna`` is that name (a str).

Zebra FX7500/FX9600/ATR7000 IoT Connector tag data events::

    {"data": {"eventNum": 1759, "format": "epc", "idHex": "3005fb63ac1f3681ec880468", "antenna": 1,
              "peakRssi": -53, "reads": 1, "channel": 911.75, "phase": 0, "PC": "3000", "MAC": "..."},
     "timestamp": "2023-05-01T08:55:44.625+0300", "type": "SIMPLE"}

  Sources: Zebra's IoT Connector docs (zebradevs.github.io/rfid-ziotc-docs: access-operation results and the
  TagStorage/tagMetaData tutorial: ANTENNA, RSSI in dBm, PHASE, CHANNEL in MHz, SEEN_COUNT, PC, XPC, CRC, EPC,
  TID, USER); ZebraDevs/RFID-IoTConnector-MQTT-dotnet-DockDoorSample (TagReadEvent: eventNum, format, idHex);
  reelyActive/barnowl-zebra lib/zebradecoder.js + lib/testlistener.js (``antenna``, ``peakRssi``, ``reads``,
  ``MAC``; timestamp offset written ``+0000``, without a colon). ``type`` is the operating mode (SIMPLE,
  INVENTORY, PORTAL, CONVEYOR, CUSTOM). ``antenna`` and ``peakRssi`` are metadata that the mode or
  ``tagMetaData`` switches on; Zebra's access-operation example events carry only eventNum, format and idHex.
  A tag event without ``antenna`` cannot be placed in a zone and is quarantined with that reason. A ``format``
  other than ``"epc"`` means ``idHex`` is not an EPC: quarantined. The event names no reader, so
  ``reader_hint`` is used, falling back to ``data.MAC`` when that metadata is enabled. Zebra's WebSocket and
  MQTT endpoints may pack several events into one message as JSON objects back to back (``{...}{...}``, no
  separator: reelyActive/barnowl-zebra lib/zebradecoder.js extractTagDataEvents, ZebraDevs/RFID_ZIOTC_Examples
  RFID-Monitor parsePotentiallyConcatenatedJson): they are split, and a broken object among them is quarantined
  alone.

Reader defaults (``ReaderDefaults``, from ``[[rfid.readers]]``): a reader whose events carry no antenna (Zebra
SIMPLE mode without the antenna metadata) may be given a ``default_antenna``, and a reader whose timestamps
carry no UTC offset a time zone in which to read them. Without them such events are quarantined, as before.

Generic (this project's own shape, e.g. from gateways or the simulator), extra keys forbidden::

    {"epc": "<hex>", "antenna": 1, "rssi": -55.0, "ts": <epoch seconds or RFC 3339>, "reader": "r1"}

Reader identity: the event's own name (Impinj ``hostname``, generic ``reader``) when present, else
``reader_hint`` (the adapter's id for the connection or topic the payload came in on).

Speed: the common case (a JSON array of tag events) is validated by one pydantic ``TypeAdapter.validate_json``
over the whole payload. Only when that fails, or any event fails a content check, is the payload re-parsed
event by event, so one bad event is quarantined with its reason and the rest of the batch is kept.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from types import MappingProxyType
from typing import Annotated, Any, Literal, NotRequired, Union

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import TypedDict  # pydantic needs this one on Python < 3.12

from edge_agent.rfid.reads import BadRead, TagRead

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "ParseStats",
    "ReaderDefaults",
    "parse_payload",
    "ImpinjTagInventory",
    "ImpinjTagEvent",
    "ZebraTagData",
    "ZebraTagEvent",
    "GenericRead",
]

MAX_PAYLOAD_BYTES = 8 * 1024 * 1024
RAW_MAX_BYTES = 4096  # a quarantined record keeps at most this much of its raw bytes
MIN_EPC_BITS = 32
MAX_EPC_BITS = 496
MIN_ANTENNA = 1
MAX_ANTENNA = 64
MIN_RSSI_DBM = -200.0  # plausibility bounds: a centi-dBm value sent as dBm (-5350) lands outside
MAX_RSSI_DBM = 50.0
TS_MIN = 946_684_800.0  # 2000-01-01T00:00:00Z
FUTURE_SLACK_S = 86_400.0
MAX_READER_LEN = 128

_HEX = re.compile(r"[0-9A-Fa-f]+")


# --------------------------------------------------------------------------------------------------- models
# One schema per format, validated by pydantic v2. They are TypedDicts rather than BaseModels: pydantic builds
# plain dicts for them and skips ignored keys without materialising them, 1.1 us per Impinj event instead of
# 1.65 us for BaseModel instances (measured on a 100-event array), and the whole-pipeline budget is a few us.
# Timestamps stay strings and are parsed by _ts_seconds (datetime.fromisoformat, ~0.3 us), which is cheaper
# than a pydantic datetime followed by .timestamp().

_VENDOR = ConfigDict(extra="ignore")  # vendor firmware adds fields release by release: accepted, not kept


class ImpinjTagInventory(TypedDict):
    __pydantic_config__ = _VENDOR  # type: ignore[misc]
    epcHex: NotRequired[str | None]
    epc: NotRequired[str | None]  # base64 of the EPC bytes
    antennaPort: NotRequired[int | None]
    antennaName: NotRequired[str | None]
    peakRssiCdbm: NotRequired[float | None]  # centi-dBm
    lastSeenTime: NotRequired[str | None]


class ImpinjTagEvent(TypedDict):
    __pydantic_config__ = _VENDOR  # type: ignore[misc]
    timestamp: NotRequired[str | None]
    hostname: NotRequired[str | None]
    eventType: NotRequired[Literal["tagInventory"] | None]
    tagInventoryEvent: ImpinjTagInventory


class ZebraTagData(TypedDict):
    __pydantic_config__ = _VENDOR  # type: ignore[misc]
    idHex: str
    format: NotRequired[str | None]
    antenna: NotRequired[int | None]
    peakRssi: NotRequired[float | None]  # dBm
    MAC: NotRequired[str | None]


class ZebraTagEvent(TypedDict):
    __pydantic_config__ = _VENDOR  # type: ignore[misc]
    data: ZebraTagData
    timestamp: str
    type: NotRequired[str | None]
    # Not Zebra fields: declared so that an event carrying Impinj keys next to "data" is recognised on the
    # fast path and left to the per-event path, which classifies it as Impinj.
    eventType: NotRequired[Any]
    tagInventoryEvent: NotRequired[Any]


class GenericRead(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    epc: str
    antenna: int
    rssi: NotRequired[float | None]  # dBm
    # A JSON number (or numeric string) is epoch seconds; any other string must be an RFC 3339 timestamp.
    ts: Annotated[Union[float, str], Field(union_mode="left_to_right")]  # noqa: UP007
    reader: NotRequired[str | None]


class ImpinjOverflow(TypedDict):
    __pydantic_config__ = _VENDOR  # type: ignore[misc]
    eventsPurged: NotRequired[Annotated[int, Field(ge=0)] | None]
    eventsRemaining: NotRequired[int | None]


_AnyTagEvent = Annotated[
    Union[ImpinjTagEvent, ZebraTagEvent, GenericRead],  # noqa: UP007
    Field(union_mode="left_to_right"),
]
_FAST_LIST: TypeAdapter[list[dict[str, Any]]] = TypeAdapter(list[_AnyTagEvent])
_FAST_ONE: TypeAdapter[dict[str, Any]] = TypeAdapter(_AnyTagEvent)
_IMPINJ: TypeAdapter[ImpinjTagEvent] = TypeAdapter(ImpinjTagEvent)
_ZEBRA: TypeAdapter[ZebraTagEvent] = TypeAdapter(ZebraTagEvent)
_GENERIC: TypeAdapter[GenericRead] = TypeAdapter(GenericRead)
_OVERFLOW: TypeAdapter[ImpinjOverflow] = TypeAdapter(ImpinjOverflow)


# ---------------------------------------------------------------------------------------------------- stats


@dataclass(slots=True)
class ParseStats:
    """Counters a caller can pass to successive ``parse_payload`` calls (they accumulate)."""

    payloads: int = 0
    events: int = 0  # records seen, tag reads or not
    reads: int = 0
    bad: int = 0
    fast_path: int = 0  # payloads handled entirely by the whole-payload validation
    ignored: dict[str, int] = field(default_factory=dict)  # non-tag events by type, e.g. {"inventoryStatus": 3}
    # One entry per overflow event: (reader, events it purged; None when the event does not say).
    overflows: list[tuple[str, int | None]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ReaderDefaults:
    """What a reader's events may leave out, supplied by configuration."""

    antenna: int | None = None  # for events without an antenna (Zebra SIMPLE mode without metadata)
    tz: tzinfo | None = None  # for timestamps without a UTC offset


_NONE = ReaderDefaults()
_NO_DEFAULTS: Mapping[str, ReaderDefaults] = MappingProxyType({})


# ------------------------------------------------------------------------------------------------- checking
# Each check has a one-expression fast test inline in _to_read and a function that finds the exact reason
# (and raises ValueError with it) or returns the normalised value.

_HEX_RUN = re.compile(rf"[0-9A-Fa-f]{{{MIN_EPC_BITS // 4},{MAX_EPC_BITS // 4}}}").fullmatch
_fromiso = datetime.fromisoformat


def _epc_from_hex(value: str) -> str:
    """Upper-case EPC hex, or raise ValueError with the reason."""
    if _HEX_RUN(value) is not None and not len(value) & 1:
        return value.upper()
    n = len(value)
    if n == 0:
        raise ValueError("empty EPC")
    if _HEX.fullmatch(value) is None:
        raise ValueError(f"EPC is not hex: {value[:64]!r}")
    if n & 1:
        raise ValueError(f"EPC hex has odd length {n}")
    bits = n * 4
    if bits < MIN_EPC_BITS:
        raise ValueError(f"EPC shorter than {MIN_EPC_BITS} bits ({bits} bits)")
    raise ValueError(f"EPC longer than {MAX_EPC_BITS} bits ({bits} bits)")


def _epc_from_base64(value: str) -> str:
    try:
        raw = base64.b64decode(value.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"EPC is not base64: {value[:64]!r}") from None
    if not raw:
        raise ValueError("empty EPC")
    return _epc_from_hex(raw.hex())


def _ts_seconds(value: str | float, now: float, tz: tzinfo | None = None) -> float:
    if type(value) is str:
        try:
            dt = _fromiso(value)
        except (ValueError, OverflowError):
            try:
                ts = float(value)  # a numeric string: epoch seconds
            except ValueError:
                raise ValueError(f"timestamp is not RFC 3339: {value[:64]!r}") from None
        else:
            if dt.tzinfo is None:
                if tz is None:
                    raise ValueError(f"timestamp has no UTC offset: {value[:64]!r}")
                dt = dt.replace(tzinfo=tz)
            try:
                ts = dt.timestamp()
            except (ValueError, OverflowError):
                raise ValueError(f"timestamp out of range: {value[:64]!r}") from None
    else:
        ts = float(value)
    if TS_MIN <= ts <= now + FUTURE_SLACK_S:
        return ts
    if not math.isfinite(ts):
        raise ValueError("timestamp is not a finite number")
    if ts < TS_MIN:
        raise ValueError(f"timestamp {ts:.3f} is before 2000-01-01")
    raise ValueError(f"timestamp {ts:.3f} is more than 1 day after now ({now:.3f})")


def _antenna(value: int | None) -> int:
    if value is None:
        raise ValueError("missing antenna port")
    if not (MIN_ANTENNA <= value <= MAX_ANTENNA):
        raise ValueError(f"antenna port {value} out of range {MIN_ANTENNA}-{MAX_ANTENNA}")
    return value


def _antenna_name(value: str) -> str:
    if not (0 < len(value) <= MAX_READER_LEN) or not value.isprintable():
        raise ValueError(f"invalid antenna name {value[:64]!r}")
    return value


def _rssi(value: float | None) -> float | None:
    if value is None:
        return None
    if not (MIN_RSSI_DBM <= value <= MAX_RSSI_DBM):
        if not math.isfinite(value):
            raise ValueError(f"RSSI is not finite: {value}")
        raise ValueError(f"RSSI {value} dBm out of range {MIN_RSSI_DBM:g}..{MAX_RSSI_DBM:g}")
    return value


_READERS_OK: set[str] = set()  # reader ids already checked (a store has tens of readers; bounded anyway)


def _reader(value: str | None) -> str:
    if value in _READERS_OK:
        return value  # type: ignore[return-value]
    if value is None:
        raise ValueError("no reader id: the event names none and no reader_hint was given")
    if not (0 < len(value) <= MAX_READER_LEN) or not value.isprintable():
        raise ValueError(f"invalid reader id {value[:64]!r}")
    if len(_READERS_OK) < 4096:
        _READERS_OK.add(value)
    return value


# TagRead is a frozen slotted dataclass: its generated __init__ goes through object.__setattr__ per field and
# costs ~0.9 us, a fifth of the per-event budget. Filling the slots through their descriptors builds the very
# same object (tests compare it with the constructor's) in a third of the time.
_new = object.__new__
_set_epc, _set_reader, _set_antenna, _set_rssi, _set_ts = (
    TagRead.__dict__[name].__set__ for name in ("epc", "reader", "antenna", "rssi_dbm", "ts")
)


def _tag_read(epc: str, reader: str, antenna: int | str, rssi: float | None, ts: float) -> TagRead:
    r = _new(TagRead)
    _set_epc(r, epc)
    _set_reader(r, reader)
    _set_antenna(r, antenna)
    _set_rssi(r, rssi)
    _set_ts(r, ts)
    return r


def _to_read(ev: dict[str, Any], now: float, hint: str | None, defaults: Mapping[str, ReaderDefaults]) -> TagRead:
    """One validated event -> TagRead, or ValueError with the reason. The hot path: keep it lean (reader
    defaults are looked up only when an event lacks an antenna or a UTC offset)."""
    if "data" in ev:  # Zebra (checked first: a Zebra-validated dict may also hold the Impinj keys)
        if "eventType" in ev or "tagInventoryEvent" in ev:
            raise ValueError("ambiguous event: Impinj keys next to Zebra data")  # the per-event path sorts it out
        d = ev["data"]
        fmt = d.get("format")
        if fmt is not None and fmt != "epc":
            raise ValueError(f"Zebra idHex is not an EPC (format {fmt[:32]!r})")
        epc = _epc_from_hex(d["idHex"])
        reader = _reader(hint if hint is not None else d.get("MAC"))
        antenna = d.get("antenna")
        when = ev["timestamp"]
        try:
            ts = _ts_seconds(when, now)
        except ValueError:
            ts = _ts_seconds(when, now, defaults.get(reader, _NONE).tz)
        return _tag_read(
            epc,
            reader,
            _antenna(antenna if antenna is not None else defaults.get(reader, _NONE).antenna),
            _rssi(d.get("peakRssi")),
            ts,
        )
    tie = ev.get("tagInventoryEvent")
    if tie is not None:  # Impinj
        epc = tie.get("epcHex")
        if epc is None:
            b64 = tie.get("epc")
            if b64 is None:
                raise ValueError("no EPC: neither epcHex nor epc in tagInventoryEvent")
            epc = _epc_from_base64(b64)
        elif _HEX_RUN(epc) is None or len(epc) & 1:
            epc = _epc_from_hex(epc)  # raises with the reason
        else:
            epc = epc.upper()
        reader = ev.get("hostname") or hint
        if reader not in _READERS_OK:
            _reader(reader)
        antenna: int | str | None = tie.get("antennaPort")
        if antenna is None:
            name = tie.get("antennaName")
            antenna = _antenna_name(name) if name else _antenna(defaults.get(reader, _NONE).antenna)  # type: ignore[arg-type]
        elif not (MIN_ANTENNA <= antenna <= MAX_ANTENNA):  # type: ignore[operator]
            _antenna(antenna)  # type: ignore[arg-type]
        rssi = tie.get("peakRssiCdbm")
        if rssi is not None:
            rssi = rssi / 100.0
            if not (MIN_RSSI_DBM <= rssi <= MAX_RSSI_DBM):
                _rssi(rssi)
        when = tie.get("lastSeenTime") or ev.get("timestamp")
        if when is None:
            raise ValueError("no timestamp: neither lastSeenTime nor timestamp")
        try:
            ts = _ts_seconds(when, now)
        except ValueError:
            ts = _ts_seconds(when, now, defaults.get(reader, _NONE).tz)  # type: ignore[arg-type]
        return _tag_read(epc, reader, antenna, rssi, ts)  # type: ignore[arg-type]
    # Generic
    reader = ev.get("reader")
    return _tag_read(
        _epc_from_hex(ev["epc"]),
        _reader(reader if reader is not None else hint),
        _antenna(ev["antenna"]),
        _rssi(ev.get("rssi")),
        _ts_seconds(ev["ts"], now),
    )


# -------------------------------------------------------------------------------------------------- parsing


def parse_payload(
    payload: bytes,
    *,
    now: float,
    reader_hint: str | None = None,
    stats: ParseStats | None = None,
    defaults: Mapping[str, ReaderDefaults] | None = None,
) -> tuple[list[TagRead], list[BadRead]]:
    """Parse one reader message. Never raises: anything unusable comes back as a BadRead with its reason.

    ``now`` (epoch seconds, from the injected clock) bounds timestamps: a read more than a day ahead of it
    is absurd. ``stats``, when given, is updated in place. ``defaults`` maps a reader id to what its events
    may leave out.
    """
    dflt = defaults if defaults is not None else _NO_DEFAULTS
    st = stats if stats is not None else ParseStats()
    st.payloads += 1
    try:
        if not isinstance(payload, bytes):
            if isinstance(payload, (bytearray, memoryview)):
                payload = bytes(payload)
            elif isinstance(payload, str):
                payload = payload.encode("utf-8", "surrogatepass")
            else:
                return _finish(st, [], [BadRead(f"payload is {type(payload).__name__}, not bytes", b"")], 1)
        if len(payload) > MAX_PAYLOAD_BYTES:
            bad = BadRead(f"payload too large: {len(payload)} bytes > {MAX_PAYLOAD_BYTES}", payload[:RAW_MAX_BYTES])
            return _finish(st, [], [bad], 1)
        fast = _fast(payload, now, reader_hint, dflt)
        if fast is not None:
            st.fast_path += 1
            return _finish(st, fast, [], len(fast))
        return _slow(payload, now, reader_hint, st, dflt)
    except Exception as exc:  # a parser bug must not take the agent down; the payload is kept for the post-mortem
        raw = payload[:RAW_MAX_BYTES] if isinstance(payload, bytes) else b""
        return _finish(st, [], [BadRead(f"internal parser error: {type(exc).__name__}: {str(exc)[:200]}", raw)], 1)


def _finish(
    st: ParseStats, reads: list[TagRead], bad: list[BadRead], events: int
) -> tuple[list[TagRead], list[BadRead]]:
    st.events += events
    st.reads += len(reads)
    st.bad += len(bad)
    return reads, bad


def _fast(
    payload: bytes, now: float, hint: str | None, defaults: Mapping[str, ReaderDefaults]
) -> list[TagRead] | None:
    """Whole-payload validation. None means "take the slow path" (any failure at all, or not a plain case)."""
    head = payload.lstrip()[:1]
    try:
        if head == b"[":
            events = _FAST_LIST.validate_json(payload)
        elif head == b"{":
            try:
                events = [_FAST_ONE.validate_json(payload)]
            except ValueError:
                if b"\n" not in payload:
                    return None
                lines = [line for line in payload.split(b"\n") if line.strip()]
                events = _FAST_LIST.validate_json(b"[" + b",".join(lines) + b"]")
        else:
            return None
        return [_to_read(ev, now, hint, defaults) for ev in events]
    except (ValueError, RecursionError):  # ValidationError is a ValueError; so are the content checks
        return None


def _slow(
    payload: bytes, now: float, hint: str | None, st: ParseStats, defaults: Mapping[str, ReaderDefaults] = _NO_DEFAULTS
) -> tuple[list[TagRead], list[BadRead]]:
    reads: list[TagRead] = []
    bad: list[BadRead] = []
    events = 0
    for raw, item in _split(payload):
        events += 1
        if isinstance(item, BadRead):
            bad.append(item)
            continue
        try:
            read = _one(item, now, hint, st, defaults)
        except ValidationError as exc:
            bad.append(BadRead(_reason(exc), raw if raw is not None else _dump(item)))
            continue
        except ValueError as exc:
            bad.append(BadRead(str(exc), raw if raw is not None else _dump(item)))
            continue
        if read is not None:
            reads.append(read)
    return _finish(st, reads, bad, events)


def _split(payload: bytes) -> list[tuple[bytes | None, Any]]:
    """Payload -> [(raw bytes of the record if known, decoded JSON value or BadRead)]."""
    if not payload.strip():
        return []  # an idle HTTP stream's keep-alive
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        pass
    else:
        return _flatten(None, doc)
    # Not one JSON document: newline-delimited JSON, one record (or array of records) per line, and a line may
    # hold several documents back to back (Zebra's {...}{...}).
    out: list[tuple[bytes | None, Any]] = []
    for line in payload.split(b"\n"):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except (ValueError, RecursionError) as exc:
            out.extend(_concatenated(line, exc))
            continue
        out.extend(_flatten(line[:RAW_MAX_BYTES], doc))
    return out


_decoder = json.JSONDecoder()
_NEXT_DOC = re.compile(r"\}\s*(?=\{)")  # where one object ends and the next begins
MAX_RESYNCS = 1000  # failed attempts to find the next document in one line; then the rest is one bad record


def _concatenated(line: bytes, first_error: BaseException) -> list[tuple[bytes | None, Any]]:
    """JSON documents written back to back. A document that does not parse is quarantined with its reason, from
    where it starts up to the next ``}{`` boundary at which a document does parse; the rest still count. Only
    those boundaries are tried (as barnowl-zebra splits), and at most MAX_RESYNCS of them, so that a large
    garbage line costs linear time, not one parse attempt per character."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raw = line[:RAW_MAX_BYTES]
        return [(raw, BadRead(f"invalid JSON: {_short(first_error)}", raw))]
    out: list[tuple[bytes | None, Any]] = []
    i, n = 0, len(text)
    bad_from: int | None = None  # start of a run of text that did not parse
    bad_exc: BaseException = first_error
    resyncs = 0
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        try:
            doc, end = _decoder.raw_decode(text, i)
        except (ValueError, RecursionError) as exc:
            if bad_from is None:
                bad_from, bad_exc = i, exc
            resyncs += 1
            m = _NEXT_DOC.search(text, i) if resyncs < MAX_RESYNCS else None
            i = m.end() if m else n
            continue
        if bad_from is not None:
            out.append(_bad_text(text[bad_from:i], bad_exc))
            bad_from = None
        out.extend(_flatten(text[i:end].encode()[:RAW_MAX_BYTES], doc))
        i = end
    if bad_from is not None:
        out.append(_bad_text(text[bad_from:], bad_exc))
    return out


def _bad_text(text: str, exc: BaseException) -> tuple[bytes, BadRead]:
    raw = text.encode("utf-8", "replace")[:RAW_MAX_BYTES]
    return raw, BadRead(f"invalid JSON: {_short(exc)}", raw)


def _flatten(raw: bytes | None, doc: Any) -> list[tuple[bytes | None, Any]]:
    if isinstance(doc, list):
        return [(None, item) for item in doc]
    return [(raw, doc)]


def _one(
    ev: Any, now: float, hint: str | None, st: ParseStats, defaults: Mapping[str, ReaderDefaults]
) -> TagRead | None:
    """One decoded JSON record -> TagRead, None (a non-tag event, counted), or ValueError/ValidationError."""
    if not isinstance(ev, dict):
        raise ValueError(f"event is a JSON {_json_type(ev)}, not an object")
    if "eventType" in ev:
        kind = ev["eventType"]
        if not isinstance(kind, str):
            raise ValueError(f"Impinj eventType is a JSON {_json_type(kind)}, not a string")
        if kind != "tagInventory":
            _ignore(st, kind, ev, hint)
            return None
        return _to_read(_IMPINJ.validate_python(ev), now, hint, defaults)
    if "tagInventoryEvent" in ev:
        return _to_read(_IMPINJ.validate_python(ev), now, hint, defaults)
    if "data" in ev:
        return _to_read(_ZEBRA.validate_python(ev), now, hint, defaults)
    if "epc" in ev:
        return _to_read(_GENERIC.validate_python(ev), now, hint, defaults)
    for key, value in ev.items():  # Impinj firmware without eventType: {"timestamp", "<type>Event": {...}}
        if isinstance(key, str) and key.endswith("Event") and len(key) > 5 and isinstance(value, dict):
            _ignore(st, key[:-5], ev, hint)
            return None
    keys = ", ".join(sorted(str(k)[:32] for k in list(ev)[:8]))
    raise ValueError(f"unrecognised event shape (keys: {keys})")


def _ignore(st: ParseStats, kind: str, ev: dict[str, Any], hint: str | None) -> None:
    if kind == "overflow":
        # Validated before it is counted: a malformed one is quarantined with its reason, never taken as 0.
        purged = _OVERFLOW.validate_python(ev.get("overflowEvent")).get("eventsPurged")
        reader = ev.get("hostname") or hint
        st.overflows.append((reader if isinstance(reader, str) and reader else "unknown reader", purged))
    kind = kind[:64]
    st.ignored[kind] = st.ignored.get(kind, 0) + 1


def _reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg', '')}" if loc else str(err.get("msg", "")))
    more = exc.error_count() - len(parts)
    if more > 0:
        parts.append(f"(+{more} more)")
    return ("; ".join(parts))[:500]


def _short(exc: BaseException) -> str:
    return str(exc)[:200] or type(exc).__name__


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _dump(value: Any) -> bytes:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace")[:RAW_MAX_BYTES]
    except (ValueError, TypeError, RecursionError):
        return repr(value).encode("utf-8", "replace")[:RAW_MAX_BYTES]
