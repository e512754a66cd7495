"""Reader payload parsing: vendor samples, rejection reasons, batches with bad events, and fuzzing."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.rfid import formats
from edge_agent.rfid.formats import MAX_PAYLOAD_BYTES, ParseStats, parse_payload
from edge_agent.rfid.reads import BadRead, TagRead

NOW = datetime(2025, 6, 15, 12, 0, tzinfo=UTC).timestamp()


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# An R700 tagInventory event as captured from a reader (every eventConfig field enabled, nanosecond timestamp).
IMPINJ = {
    "timestamp": "2025-06-15T11:59:58.277766184Z",
    "hostname": "impinj-14-2f-f4",
    "eventType": "tagInventory",
    "tagInventoryEvent": {
        "epc": "4sRRo6UBH6APNUaT",
        "epcHex": "E2C451A3A5011FA00F354693",
        "tid": "4sRRoyAAJpN5qv0A",
        "tidHex": "E2C451A32000269379AAFD00",
        "pc": "NAA=",
        "antennaPort": 2,
        "antennaName": "dock door",
        "peakRssiCdbm": -5750,
        "frequency": 921625,
        "transmitPowerCdbm": 1000,
        "lastSeenTime": "2025-06-15T11:59:58.225324Z",
        "phaseAngle": 208.82,
        "tagMemoryData": [{"memoryBank": "user", "wordOffset": 0, "tagDataHex": ""}],
    },
}
IMPINJ_READ = TagRead("E2C451A3A5011FA00F354693", "impinj-14-2f-f4", 2, -57.5, ts("2025-06-15T11:59:58.225324+00:00"))

# Zebra IoT Connector tag data event (INVENTORY mode: antenna, peakRssi, reads by default; +0200 without colon).
ZEBRA = {
    "data": {
        "antenna": 1,
        "eventNum": 1759,
        "format": "epc",
        "idHex": "3005fb63ac1f3681ec880468",
        "peakRssi": -53,
        "reads": 4,
        "channel": 911.75,
        "phase": 0,
        "PC": "3000",
    },
    "timestamp": "2025-06-15T13:50:16.699+0200",
    "type": "INVENTORY",
}
ZEBRA_READ = TagRead("3005FB63AC1F3681EC880468", "fx9600-dock", 1, -53.0, ts("2025-06-15T11:50:16.699+00:00"))

GENERIC = {"epc": "3074257bf7194e4000001a85", "antenna": 3, "rssi": -55.0, "ts": NOW - 10, "reader": "r1"}
GENERIC_READ = TagRead("3074257BF7194E4000001A85", "r1", 3, -55.0, NOW - 10)


def enc(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def impinj(i: int = 0, **tie: Any) -> dict[str, Any]:
    ev = json.loads(json.dumps(IMPINJ))
    ev["tagInventoryEvent"]["epcHex"] = f"3074257BF7194E4000{i:06X}"
    ev["tagInventoryEvent"].update(tie)
    return ev


def parse(payload: bytes, **kw: Any) -> tuple[list[TagRead], list[BadRead]]:
    return parse_payload(payload, now=kw.pop("now", NOW), **kw)


# ----------------------------------------------------------------------------------------- vendor samples


def test_impinj_sample() -> None:
    assert parse(enc([IMPINJ])) == ([IMPINJ_READ], [])


def test_impinj_single_object_and_ndjson_stream_with_keepalives() -> None:
    assert parse(enc(IMPINJ)) == ([IMPINJ_READ], [])
    stream = b"\r\n" + enc(IMPINJ) + b"\r\n\r\n" + enc(impinj(7)) + b"\r\n"
    reads, bad = parse(stream)
    assert not bad and [r.epc for r in reads] == ["E2C451A3A5011FA00F354693", "3074257BF7194E4000000007"]
    assert parse(b"\r\n") == ([], [])  # an idle stream's keep-alive is nothing, not garbage


def test_impinj_epc_in_base64_only() -> None:
    ev = json.loads(json.dumps(IMPINJ))
    del ev["tagInventoryEvent"]["epcHex"]
    assert parse(enc([ev])) == ([IMPINJ_READ], [])
    ev["tagInventoryEvent"]["epc"] = "4oARkaUDAGXybMv_"  # URL-safe alphabet, as some captures show
    assert parse(enc([ev]))[0][0].epc == "E2801191A5030065F26CCBFF"


def test_impinj_minimal_event_uses_timestamp_and_reader_hint() -> None:
    ev = {"timestamp": "2025-06-15T11:00:00Z", "eventType": "tagInventory",
          "tagInventoryEvent": {"epc": "MHQle/cZTkAAABqF", "antennaPort": 4}}
    assert parse(enc([ev]), reader_hint="r7") == (
        [TagRead("3074257BF7194E4000001A85", "r7", 4, None, ts("2025-06-15T11:00:00+00:00"))], [])
    reads, bad = parse(enc([ev]))
    assert not reads and "no reader id" in bad[0].reason


def test_impinj_other_event_types_are_ignored_and_counted() -> None:
    st_ = ParseStats()
    payload = enc([
        IMPINJ,
        {"timestamp": "2025-06-15T11:59:58Z", "eventType": "inventoryStatus", "inventoryStatusEvent": {"status": "running"}},
        {"timestamp": "2025-06-15T11:59:58Z", "eventType": "gpiTransition", "gpiTransitionEvent": {"gpi": 1, "transition": "high-to-low"}},
        {"timestamp": "2025-06-15T11:59:58Z", "eventType": "inventoryStatus", "inventoryStatusEvent": {"status": "idle"}},
        {"timestamp": "2025-06-15T11:59:58Z", "antennaDisconnectedEvent": {"antennaPort": 3}},  # no eventType (v1)
    ])
    assert parse(payload, stats=st_) == ([IMPINJ_READ], [])
    assert st_.ignored == {"inventoryStatus": 2, "gpiTransition": 1, "antennaDisconnected": 1}
    assert (st_.events, st_.reads, st_.bad, st_.fast_path) == (5, 1, 0, 0)


def test_zebra_sample() -> None:
    assert parse(enc(ZEBRA), reader_hint="fx9600-dock") == ([ZEBRA_READ], [])
    assert parse(enc([ZEBRA, ZEBRA]), reader_hint="fx9600-dock") == ([ZEBRA_READ, ZEBRA_READ], [])


def test_zebra_reader_falls_back_to_mac_and_simple_mode_without_antenna_is_quarantined() -> None:
    ev = json.loads(json.dumps(ZEBRA))
    ev["data"]["MAC"] = "C4:7D:CC:FF:FF:FF"
    assert parse(enc(ev))[0][0].reader == "C4:7D:CC:FF:FF:FF"
    simple = {"data": {"eventNum": 5036, "format": "epc", "idHex": "e2806894000040017790e471"},
              "timestamp": "2025-06-15T12:50:36.194+0000", "type": "SIMPLE"}
    reads, bad = parse(enc(simple), reader_hint="fx")
    assert not reads and bad[0].reason == "missing antenna port"
    ev["data"]["format"] = "tid"
    assert "not an EPC" in parse(enc(ev))[1][0].reason


def test_generic_shape() -> None:
    assert parse(enc(GENERIC)) == ([GENERIC_READ], [])
    rfc = dict(GENERIC, ts="2025-06-15T11:59:50Z")
    assert parse(enc([rfc]))[0][0].ts == NOW - 10
    no_reader = {k: v for k, v in GENERIC.items() if k != "reader"}
    assert parse(enc(no_reader), reader_hint="hint")[0][0].reader == "hint"
    reads, bad = parse(enc(dict(GENERIC, colour="red")))
    assert not reads and "colour" in bad[0].reason and "Extra inputs" in bad[0].reason


def test_mixed_formats_in_one_array() -> None:
    reads, bad = parse(enc([IMPINJ, ZEBRA, GENERIC]), reader_hint="fx9600-dock")
    assert not bad and reads == [IMPINJ_READ, ZEBRA_READ, GENERIC_READ]


# --------------------------------------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"epcHex": "30742G7BF7194E4000001A85"}, "not hex"),
        ({"epcHex": "30 74257BF7194E4000001A85"}, "not hex"),
        ({"epcHex": "3074257BF7194E4000001A8"}, "odd length"),
        ({"epcHex": "ABCDEF"}, "shorter than 32 bits"),
        ({"epcHex": "AB" * 63}, "longer than 496 bits"),
        ({"epcHex": ""}, "empty EPC"),
        ({"epcHex": None, "epc": "not base64!"}, "not base64"),
        ({"epcHex": None, "epc": None}, "no EPC"),
        ({"antennaPort": 0}, "antenna port 0 out of range 1-64"),
        ({"antennaPort": 65}, "antenna port 65 out of range"),
        ({"antennaPort": None, "antennaName": None}, "missing antenna port"),  # no port and no name
        ({"antennaPort": "two"}, "antennaPort"),
        ({"lastSeenTime": "1999-12-31T23:59:59Z"}, "before 2000"),
        ({"lastSeenTime": "2025-06-16T12:00:01Z"}, "more than 1 day after now"),
        ({"lastSeenTime": "2025-06-15T11:00:00"}, "no UTC offset"),
        ({"lastSeenTime": "yesterday"}, "not RFC 3339"),
        ({"peakRssiCdbm": 9000}, "out of range"),
    ],
)
def test_each_bad_field_is_quarantined_with_its_reason(change: dict[str, Any], reason: str) -> None:
    reads, bad = parse(enc([impinj(1, **change)]))
    assert reads == [] and len(bad) == 1
    assert reason in bad[0].reason
    assert b"tagInventoryEvent" in bad[0].raw


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_rssi_and_timestamp(token: bytes) -> None:
    rssi = b'{"reader": "r1", "epc": "3074257BF7194E4000001A85", "antenna": 1, "rssi": %s, "ts": %d}' % (token, NOW)
    reads, bad = parse(rssi)
    assert not reads and "RSSI" in bad[0].reason and ("finite" in bad[0].reason or "range" in bad[0].reason)
    when = b'{"reader": "r1", "epc": "3074257BF7194E4000001A85", "antenna": 1, "ts": %s}' % token
    reads, bad = parse(when)
    assert not reads and "timestamp" in bad[0].reason


def test_future_limit_follows_the_injected_now() -> None:
    ev = dict(GENERIC, ts=NOW + 2 * 86_400)
    assert parse(enc(ev))[0] == []
    assert parse(enc(ev), now=NOW + 86_400)[0][0].ts == NOW + 2 * 86_400


def test_oversized_payload_is_one_bad_read() -> None:
    big = b"[" + b" " * MAX_PAYLOAD_BYTES + b"]"
    reads, bad = parse(big)
    assert reads == [] and len(bad) == 1 and "too large" in bad[0].reason and len(bad[0].raw) <= 4096


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "invalid JSON"),
        (b"42", "not an object"),
        (b"[1, \"x\", null]", "not an object"),
        (b'{"foo": 1}', "unrecognised event shape"),
        (b'{"eventType": 7}', "eventType"),
        (b"\xff\xfe\x00garbage", "invalid JSON"),
    ],
)
def test_garbage_payloads(payload: bytes, reason: str) -> None:
    reads, bad = parse(payload)
    assert reads == [] and bad and all(reason in b.reason for b in bad)


def test_a_bad_event_in_a_batch_keeps_the_others() -> None:
    events = [impinj(i) for i in range(100)]
    events[37]["tagInventoryEvent"]["epcHex"] = "NOT-HEX"
    events[80]["tagInventoryEvent"]["antennaPort"] = 99
    st_ = ParseStats()
    reads, bad = parse(enc(events), stats=st_)
    assert len(reads) == 98 and len(bad) == 2
    assert [r.epc for r in reads] == [f"3074257BF7194E4000{i:06X}" for i in range(100) if i not in (37, 80)]
    assert "not hex" in bad[0].reason and b"NOT-HEX" in bad[0].raw
    assert "antenna port 99" in bad[1].reason
    assert (st_.events, st_.reads, st_.bad, st_.fast_path) == (100, 98, 2, 0)


def test_a_broken_line_in_an_ndjson_stream_keeps_the_others() -> None:
    stream = enc(impinj(1)) + b"\n" + b'{"timestamp": "2025-06-15T11:5' + b"\n" + enc(impinj(2)) + b"\n"
    reads, bad = parse(stream)
    assert [r.epc[-1] for r in reads] == ["1", "2"]
    assert len(bad) == 1 and "invalid JSON" in bad[0].reason and bad[0].raw.startswith(b'{"timestamp"')


def test_fast_path_counts_and_matches_the_per_event_path() -> None:
    payload = enc([impinj(i) for i in range(50)] + [ZEBRA, GENERIC])
    st_ = ParseStats()
    fast = parse(payload, stats=st_, reader_hint="fx9600-dock")
    assert st_.fast_path == 1 and st_.reads == 52
    slow = formats._slow(payload, NOW, "fx9600-dock", ParseStats())
    assert fast == slow


def test_impinj_keys_win_over_zebra_data_on_both_paths() -> None:
    odd = dict(ZEBRA, eventType="inventoryStatus")  # an Impinj non-tag event that also happens to carry "data"
    st_ = ParseStats()
    assert parse(enc([odd, GENERIC]), stats=st_) == ([GENERIC_READ], [])
    assert st_.ignored == {"inventoryStatus": 1}


def test_reads_are_real_frozen_tag_reads() -> None:
    (read,), _ = parse(enc([IMPINJ]))
    assert type(read) is TagRead and read == IMPINJ_READ and hash(read) == hash(IMPINJ_READ)
    assert dataclasses.asdict(read) == dataclasses.asdict(IMPINJ_READ)
    with pytest.raises(dataclasses.FrozenInstanceError):
        read.antenna = 3  # type: ignore[misc]


def test_non_bytes_payloads() -> None:
    assert parse(bytearray(enc(GENERIC)))[0] == [GENERIC_READ]
    assert parse(enc(GENERIC).decode())[0] == [GENERIC_READ]  # type: ignore[arg-type]
    reads, bad = parse(12345)  # type: ignore[arg-type]
    assert not reads and "not bytes" in bad[0].reason


# ------------------------------------------------------------------------------------------------ fuzzing


def _no_internal_errors(bad: list[BadRead]) -> None:
    for b in bad:
        assert isinstance(b, BadRead) and b.reason and isinstance(b.raw, bytes) and len(b.raw) <= 4096
        assert not b.reason.startswith("internal parser error"), b.reason


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(payload: bytes) -> None:
    reads, bad = parse(payload)
    _no_internal_errors(bad)
    assert all(type(r) is TagRead for r in reads)


SAMPLE = enc([impinj(1), ZEBRA, GENERIC, impinj(2)])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, len(SAMPLE) - 1), st.sampled_from(["flip", "delete", "insert", "truncate"]), st.binary(min_size=1, max_size=4)),
        min_size=1,
        max_size=6,
    )
)
def test_mutated_valid_payloads_never_raise(mutations: list[tuple[int, str, bytes]]) -> None:
    data = bytearray(SAMPLE)
    for pos, kind, junk in mutations:
        pos = min(pos, max(len(data) - 1, 0))
        if kind == "flip" and data:
            data[pos] ^= junk[0] or 1
        elif kind == "delete":
            del data[pos : pos + len(junk)]
        elif kind == "insert":
            data[pos:pos] = junk
        else:
            del data[pos:]
    reads, bad = parse(bytes(data), reader_hint="fx9600-dock")
    _no_internal_errors(bad)
    for r in reads:
        assert r.epc == r.epc.upper() and formats.TS_MIN <= r.ts <= NOW + 86_400
        if isinstance(r.antenna, str):  # an antenna identified by name (its antennaPort key was mutated away)
            assert 0 < len(r.antenna) <= 128 and r.antenna.isprintable()
        else:
            assert 1 <= r.antenna <= 64


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
FIELDS = {
    "impinj": ["epcHex", "epc", "antennaPort", "peakRssiCdbm", "lastSeenTime"],
    "zebra": ["idHex", "antenna", "peakRssi", "format"],
    "generic": ["epc", "antenna", "rssi", "ts", "reader"],
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from(["impinj", "zebra", "generic"]), st.booleans(), st.integers(0, 4), json_values),
        min_size=1,
        max_size=8,
    )
)
def test_every_event_is_either_a_read_or_quarantined(plan: list[tuple[str, bool, int, Any]]) -> None:
    """Structured mutation: events keep their shape, some fields get junk. Good events always survive."""
    events, expect_good = [], 0
    for i, (kind, spoil, field_no, junk) in enumerate(plan):
        if kind == "impinj":
            ev, target = impinj(i), None
            target = ev["tagInventoryEvent"]
        elif kind == "zebra":
            ev = json.loads(json.dumps(ZEBRA))
            target = ev["data"]
        else:
            ev = dict(GENERIC)
            target = ev
        if spoil:
            names = FIELDS[kind]
            target[names[field_no % len(names)]] = junk
        else:
            expect_good += 1
        events.append(ev)
    st_ = ParseStats()
    reads, bad = parse(json.dumps(events).encode(), reader_hint="fx9600-dock", stats=st_)
    _no_internal_errors(bad)
    assert len(reads) + len(bad) == len(events)
    assert len(reads) >= expect_good
    assert st_.events == len(events)


# ------------------------------------------------------------------------------- reader set-ups (issue 13)


def test_impinj_overflow_event_is_kept_per_reader_with_its_count() -> None:
    """The R700 sends ``overflowEvent`` when it purged events it could not deliver: ``eventsPurged``,
    ``eventsRemaining``, ``firstEventTimestamp``, ``lastEventTimestamp`` (Impinj Reader Configuration API v1.7.0,
    ReaderEvent.overflow_event / OverflowEvent, as generated in saji-ttarius/impinj-reader-config-api-v1.7.0
    docs/OverflowEvent.md and docs/ReaderEvent.md). Before: counted only in ``ignored``, count and reader lost."""
    st_ = ParseStats()
    overflow = {"timestamp": "2025-06-15T11:59:59Z", "hostname": "impinj-14-2f-f4", "eventType": "overflow",
                "overflowEvent": {"firstEventTimestamp": "2025-06-15T11:59:50Z",
                                  "lastEventTimestamp": "2025-06-15T11:59:58Z", "eventsPurged": 1200,
                                  "eventsRemaining": 5000}}
    v1 = {"timestamp": "2025-06-15T11:59:59Z", "overflowEvent": {}}  # no eventType, no count
    assert parse(enc([overflow, IMPINJ, v1]), stats=st_, reader_hint="r9") == ([IMPINJ_READ], [])
    assert st_.overflows == [("impinj-14-2f-f4", 1200), ("r9", None)]
    assert st_.ignored == {"overflow": 2}
    broken = dict(overflow, overflowEvent={"eventsPurged": "lots"})
    reads, bad = parse(enc([broken]), stats=(st2 := ParseStats()))
    assert not reads and "eventsPurged" in bad[0].reason and st2.overflows == []


def test_zebra_objects_back_to_back_are_split_and_a_broken_one_is_quarantined_alone() -> None:
    """Zebra's IoT Connector may send several events in one message with no separator, ``{...}{...}``:
    reelyActive/barnowl-zebra lib/zebradecoder.js (extractTagDataEvents: "each chunk of data contains one or more
    JSON strings, however, together these are not valid JSON, nor are they separated by a delimiter") and
    ZebraDevs/RFID_ZIOTC_Examples RFID-Monitor/pkg/html/index.html (parsePotentiallyConcatenatedJson). Before:
    the whole message was one "invalid JSON" record and every read in it was lost."""
    second = json.loads(json.dumps(ZEBRA))
    second["data"]["idHex"] = "3074257bf7194e4000001a85"
    glued = enc(ZEBRA) + enc(second) + b'{"data": {"idHex": "30", oops}' + enc(ZEBRA) + b"\r\n"
    reads, bad = parse(glued, reader_hint="fx9600-dock")
    assert [r.epc for r in reads] == ["3005FB63AC1F3681EC880468", "3074257BF7194E4000001A85",
                                      "3005FB63AC1F3681EC880468"]
    assert len(bad) == 1 and "invalid JSON" in bad[0].reason and bad[0].raw == b'{"data": {"idHex": "30", oops}'
    # Compact, as the reader writes them, and a bad event among good ones keeps its own reason.
    compact = b"".join(json.dumps(e, separators=(",", ":")).encode() for e in (ZEBRA, dict(ZEBRA, timestamp="x")))
    reads, bad = parse(compact, reader_hint="fx9600-dock")
    assert reads == [ZEBRA_READ] and len(bad) == 1 and "not RFC 3339" in bad[0].reason
    # Garbage costs linear time: only }{ boundaries are tried, a bounded number of times, then one bad record.
    for garbage in (b'{"a":' * 200_000, b'}{"a":[' * 200_000):
        reads, bad = parse(garbage)
        assert not reads and len(bad) == 1 and "invalid JSON" in bad[0].reason


def test_impinj_antenna_identified_by_name() -> None:
    """An R700 preset's ``eventConfig.tagInventory.tagReporting.antennaIdentifier`` is "antennaPort" by default
    and may be "antennaName" (Impinj Reader Configuration API v1.7.0 TagReportingConfiguration.antenna_identifier,
    saji-ttarius/impinj-reader-config-api-v1.7.0 docs/TagReportingConfiguration.md); ``antennaPort`` can be
    switched off (docs/TagInventoryEventConfiguration.md). Before: "missing antenna port", quarantined."""
    ev = impinj(3)
    del ev["tagInventoryEvent"]["antennaPort"]
    assert parse(enc([ev]))[0][0].antenna == "dock door"
    ev["tagInventoryEvent"]["antennaName"] = "dock\x00door"
    assert "invalid antenna name" in parse(enc([ev]))[1][0].reason


def test_zebra_simple_mode_and_local_timestamps_take_the_reader_defaults() -> None:
    """Zebra's IoT Connector sends ``antenna`` and ``peakRssi`` only when the operating mode's metadata enables
    them (SIMPLE-mode and access-operation events carry eventNum, format and idHex alone: zebradevs.github.io/
    rfid-ziotc-docs; reelyActive/barnowl-zebra lib/zebradecoder.js adds antenna and RSSI only ``if(hasMac &&
    hasAntenna && hasPeakRssi)``). Such a reader's antenna, and the zone of a timestamp written without an
    offset, come from ``[[rfid.readers]]``. Before: both quarantined whatever the configuration."""
    simple = {"data": {"eventNum": 5036, "format": "epc", "idHex": "e2806894000040017790e471"},
              "timestamp": "2025-06-15T13:50:36.194", "type": "SIMPLE"}
    reads, bad = parse(enc(simple), reader_hint="fx")
    assert not reads and ("missing antenna port" in bad[0].reason or "no UTC offset" in bad[0].reason)
    defaults = {"fx": formats.ReaderDefaults(antenna=2, tz=ZoneInfo("Europe/Berlin"))}
    reads, bad = parse(enc(simple), reader_hint="fx", defaults=defaults)
    assert not bad and reads == [TagRead("E2806894000040017790E471", "fx", 2, None, ts("2025-06-15T11:50:36.194+00:00"))]
    # An explicit antenna and offset still win, on both paths; another reader gets no defaults.
    assert parse(enc([ZEBRA]), reader_hint="fx", defaults=defaults)[0][0].antenna == 1
    assert parse(enc(simple), reader_hint="other", defaults=defaults)[0] == []
