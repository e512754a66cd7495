"""LLRP source: sllurp tag reports -> generic payloads, and end to end against an emulated reader on 127.0.0.1.

The end-to-end test needs the ``llrp`` extra (sllurp 3.x) and llrpkit, whose ``LLRPEmulator`` is an asyncio
LLRP reader emulator (sllurp ships none; its own tests use mock sockets). It is skipped without them. The
conversion tests need neither.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from edge_agent.rfid.formats import parse_payload
from edge_agent.rfid.llrp import SOURCE, LlrpReaderSource, tags_to_payload
from edge_agent.rfid.reads import TagRead
from edge_agent.supervise import Backoff, Supervisor
from simulators.mosquitto import free_port

NOW = 1_750_000_000.0

# A TagReportData entry as sllurp 3.0.5 decodes it (EPC-96 path: both keys, hexlified ASCII bytes).
SLLURP_TAG = {
    "EPC-96": b"3034257bf7194e4000001a85",
    "EPC": b"3034257bf7194e4000001a85",
    "AntennaID": 2,
    "PeakRSSI": -61,
    "LastSeenTimestampUTC": 1_749_999_999_123_456,
    "TagSeenCount": 3,
}


def parse(payload: bytes, now: float = NOW) -> tuple[list[TagRead], list[Any]]:
    return parse_payload(payload, now=now)


def test_tag_report_becomes_generic_payload() -> None:
    payload = tags_to_payload([SLLURP_TAG], "dock-1", now=NOW)
    assert json.loads(payload) == [
        {"epc": "3034257BF7194E4000001A85", "antenna": 2, "rssi": -61, "ts": 1_749_999_999.123456, "reader": "dock-1"}
    ]
    reads, bad = parse(payload)
    assert bad == []
    assert reads == [TagRead("3034257BF7194E4000001A85", "dock-1", 2, -61.0, 1_749_999_999.123456)]


def test_epcdata_impinj_rssi_and_missing_timestamp() -> None:
    # A 128-bit EPC arrives as EPCData (only "EPC"); Impinj's centi-dBm RSSI wins over LLRP's whole dBm;
    # without a UTC timestamp the time of receipt is used.
    tag = {"EPC": b"e28011052000794c1b2e0a1b00000001", "AntennaID": 1, "PeakRSSI": -48, "ImpinjPeakRSSI": -4825}
    reads, bad = parse(tags_to_payload([tag], "r1", now=NOW))
    assert bad == []
    assert reads == [TagRead("E28011052000794C1B2E0A1B00000001", "r1", 1, -48.25, NOW)]


def test_unusable_tags_are_quarantined_not_dropped() -> None:
    tags = [
        SLLURP_TAG,
        {"EPC": b"3034257bf7194e4000001a86", "PeakRSSI": -50, "LastSeenTimestampUTC": 1_749_999_999_000_000},
        {"AntennaID": 1, "LastSeenTimestampUTC": 1_749_999_999_000_000},
    ]
    reads, bad = parse(tags_to_payload(tags, "r1", now=NOW))
    assert [r.epc for r in reads] == ["3034257BF7194E4000001A85"]
    assert len(bad) == 2


def test_submit_refusal_is_counted() -> None:
    src = LlrpReaderSource("192.0.2.1", lambda *_: False, name="r1")
    src._on_report(None, [SLLURP_TAG, SLLURP_TAG])
    src._on_report(None, [])
    assert (src.reports, src.tags, src.rejected) == (1, 2, 1)


# ------------------------------------------------------------------------------------------- emulated reader


@contextmanager
def emulated_reader(port: int = 0) -> Iterator[Any]:
    """An LLRP reader emulator on 127.0.0.1:``port`` (0: any free port) for the block's duration."""
    pytest.importorskip("sllurp", minversion="3")
    emu_mod = pytest.importorskip("llrpkit.emulator")
    from llrpkit.protocol import messages

    class SpecEmulator(emu_mod.LLRPEmulator):
        """llrpkit 0.3.0's emulator plus three LLRP 1.0.1 behaviours that sllurp relies on and it lacks.

        Without them sllurp gives up during setup: the emulator answers ENABLE_EVENTS_AND_REPORTS (which has
        no response message) with ERROR_MESSAGE, refuses DELETE_ROSPEC for ROSpecID 0 ("all ROSpecs"), and
        leaves a ROSpec with an Immediate start trigger idle after ENABLE_ROSPEC.
        """

        async def _handle_message(self, msg: Any) -> None:
            if isinstance(msg, messages.ENABLE_EVENTS_AND_REPORTS):
                return
            if isinstance(msg, messages.DELETE_ROSPEC) and msg.ro_spec_id == 0:
                self._rospecs.clear()
                self._sync_reporting()
                await self._send(
                    messages.DELETE_ROSPEC_RESPONSE(llrp_status=self._status_ok()), message_id=msg.message_id
                )
                return
            await super()._handle_message(msg)
            if isinstance(msg, messages.ENABLE_ROSPEC):
                spec, state = self._rospecs.get(msg.ro_spec_id, (None, None))
                trigger = spec.ro_boundary_spec.ro_spec_start_trigger if spec is not None else None
                if state == "Enabled" and int(trigger.ro_spec_start_trigger_type) == 1:  # Immediate
                    self._rospecs[msg.ro_spec_id] = (spec, "Active")
                    self._sync_reporting()

    tags = [
        emu_mod.EmulatedTag(epc=bytes.fromhex("3034257BF7194E4000001A85"), antennas=(1,), rssi_dbm=-50.0),
        emu_mod.EmulatedTag(epc=bytes.fromhex("E28011052000794C1B2E0A1B00000001"), antennas=(2,), rssi_dbm=-60.0),
    ]
    emu = SpecEmulator(host="127.0.0.1", port=port, tags=tags, reads_per_sec=200.0, antenna_count=2, seed=3)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="llrp-emulator", daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(emu.start(), loop).result(10)
    try:
        yield emu
    finally:
        asyncio.run_coroutine_threadsafe(emu.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def emulator() -> Iterator[Any]:
    with emulated_reader() as emu:
        yield emu


def test_a_reader_off_at_boot_is_retried_until_it_answers() -> None:
    """A reader switched off (or unreachable) when the agent starts must not stop the agent: the source
    says why, the Supervisor tries again with backoff and tells HQ once (source.down), and reads flow once
    the reader answers, with source.recovered after it has worked stable_s."""
    pytest.importorskip("sllurp", minversion="3")
    port = free_port()
    got: queue.Queue[bytes] = queue.Queue()
    src = LlrpReaderSource("127.0.0.1", lambda payload, _s, _r: got.put(payload), port=port, name="llrp-late",
                           antennas=(1, 2), report_every_n_tags=10, timeout_s=2.0)
    alerts: list[tuple[str, str]] = []
    sup = Supervisor(src.supervised, Backoff(min_s=0.2, max_s=1.0, stable_s=1.0), lambda k, m: alerts.append((k, m)),
                     poll_s=0.1)
    src.start()  # nothing listens: logged, not raised
    assert src.exit()[0] == "died" and "cannot connect" in src.exit()[1]
    sup.start()
    try:
        time.sleep(1.5)
        assert [k for k, _ in alerts] == ["source.down"]  # once, however often it was retried
        with emulated_reader(port):
            payload = got.get(timeout=30)
            assert parse_payload(payload, now=time.time())[0]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(alerts) < 2:
                time.sleep(0.1)
            assert [k for k, _ in alerts] == ["source.down", "source.recovered"], alerts
            sup.stop()
            src.stop(timeout_s=5.0)
        assert src.exit() == ("finished", "")
    finally:
        sup.stop()
        src.stop(timeout_s=5.0)


def test_reads_from_emulated_reader(emulator: Any) -> None:
    got: queue.Queue[tuple[bytes, str, str]] = queue.Queue()
    src = LlrpReaderSource(
        "127.0.0.1",
        lambda payload, source, reader: got.put((payload, source, reader)),
        port=emulator.port,
        name="llrp-test-1",
        antennas=(1, 2),
        report_every_n_tags=10,
        timeout_s=5.0,
    )
    t0 = time.time()
    src.start()
    try:
        reads: list[TagRead] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
            {r.epc for r in reads} >= {"3034257BF7194E4000001A85", "E28011052000794C1B2E0A1B00000001"}
            and len(reads) >= 20
        ):
            try:
                payload, source, reader = got.get(timeout=0.5)
            except queue.Empty:
                continue
            assert (source, reader) == (SOURCE, "llrp-test-1")
            ok, bad = parse_payload(payload, now=time.time())
            assert bad == [], bad
            reads.extend(ok)
        assert src.connected
    finally:
        src.stop(timeout_s=5.0)
    assert not src.connected

    assert len(reads) >= 20
    expected = {"3034257BF7194E4000001A85": (1, -50.0), "E28011052000794C1B2E0A1B00000001": (2, -60.0)}
    assert {r.epc for r in reads} == set(expected)
    for r in reads:
        antenna, rssi = expected[r.epc]
        assert r.reader == "llrp-test-1"
        assert r.antenna == antenna
        assert r.rssi_dbm is not None and abs(r.rssi_dbm - rssi) <= 10  # emulator adds N(0, 1.5 dB) noise
        assert t0 - 1 <= r.ts <= time.time() + 1
    assert src.tags >= len(reads) and src.rejected == 0
