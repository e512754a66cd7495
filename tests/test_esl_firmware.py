"""Every way an OpenEPaperLink access point changes a tag's hash or state for a reason other than our
content, reproduced by the simulated AP from the firmware, and the agent never calling a label right when
its e-paper shows something else.

Firmware: OpenEPaperLink ``ESP32_AP-Flasher/src/`` (``jjwbruijn/OpenEPaperLink`` and its forks):

* ``newproto.cpp`` ``processDataReq``: a tag checking in with a boot reason (``wakeupReason`` >= 0xE0) and
  nothing pending gets its hash zeroed; RSSI/LQI are stored only from a packet with RSSI != 0.
* ``newproto.cpp`` ``updateContent`` (``/tag_cmd`` ``refresh``): hash zeroed, template drawn again.
* ``newproto.cpp`` ``sendTagCommand`` and ``processXferComplete``: a command's payload goes in ``dataVer`` and
  becomes the hash when the tag reports the command done (``web.cpp`` ``/tag_cmd`` ``ledflash_long``).
* ``newproto.cpp`` ``processXferTimeout``: the AP drops the tag's queue, the hash stays.
* ``tag_db.cpp`` ``loadDB``: after an AP restart every ``pendingCount`` is 0 (the queue was in RAM).
* ``tag_db.cpp`` ``tagDBtoJson`` (ArduinoJson 6 builds): pages in a 5,000-byte ``DynamicJsonDocument``.
* ``web.cpp`` ``doJsonUpload``: a MAC ``hex2mac`` refuses returns without sending any answer.
"""

from __future__ import annotations

import http.client
import socket
import time
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edge_agent.clock import VirtualClock
from edge_agent.esl.controller import ControllerError, LabelContent, LabelReport, SendReceipt
from edge_agent.esl.openepaperlink import COMMAND_HASHES, OpenEPaperLinkController, parse_tag
from edge_agent.esl.reconcile import ReconcileParams, Reconciler
from simulators.esl_controller import COMMAND_PAYLOADS, SimulatedAccessPoint
from simulators.esl_store import EslStore

T0 = 1_767_225_600.0
LABEL = "0000021C3E2B1A01"
WANT = LabelContent(gtin="09506000134352", price="2.99", currency="EUR")
OTHER = LabelContent(gtin="09506000134352", price="3.49", currency="EUR")


def report(content_hash: str | None, count: int, pending: bool = False, seen: float = T0,
           rebooted: bool = False) -> LabelReport:
    return LabelReport(label=LABEL, last_seen=datetime.fromtimestamp(seen, UTC), pending=pending,
                       content_hash=content_hash, update_count=count, rebooted=rebooted)


# ---------------------------------------------------------------- the adapter reads the firmware's values


def _record(**kw: object) -> dict[str, object]:
    rec: dict[str, object] = {"mac": LABEL, "hash": "ab" * 8 + "0" * 16, "lastseen": int(T0), "nextupdate": 0,
                              "nextcheckin": 0, "pending": 0, "alias": "", "contentMode": 19, "LQI": 80,
                              "RSSI": -60, "temperature": 20, "batteryMv": 2900, "hwType": 1,
                              "wakeupReason": 0, "updatecount": 3, "ver": 30}
    rec.update(kw)
    return rec


def test_zero_hash_and_command_payloads_are_not_content() -> None:
    """processDataReq/updateContent zero the hash; processXferComplete puts a command's payload there."""
    assert isinstance(r := parse_tag(_record(hash="0" * 32)), LabelReport) and r.content_hash is None
    for name in ("ledflash", "ledflash_long"):
        # derived independently: the adapter from struct ledFlash's fields, the simulator from its bytes
        h = COMMAND_PAYLOADS[name] + "0" * 16
        assert h in COMMAND_HASHES
        assert isinstance(r := parse_tag(_record(hash=h)), LabelReport) and r.content_hash is None
    assert isinstance(r := parse_tag(_record()), LabelReport) and r.content_hash == "ab" * 8 + "0" * 16


def test_a_boot_reason_marks_the_report_rebooted() -> None:
    assert isinstance(r := parse_tag(_record(wakeupReason=0xFC)), LabelReport) and r.rebooted
    assert isinstance(r := parse_tag(_record(wakeupReason=0xE0)), LabelReport) and r.rebooted
    assert isinstance(r := parse_tag(_record(wakeupReason=0x04)), LabelReport) and not r.rebooted  # a button


def test_rssi_zero_is_no_reading() -> None:
    """A tag that never checked in: RSSI 0, LQI 0, battery 0, lastseen 0 are all "unknown"."""
    r = parse_tag(_record(RSSI=0, LQI=0, batteryMv=0, lastseen=0))
    assert isinstance(r, LabelReport)
    assert (r.rssi, r.lqi, r.battery_mv, r.last_seen) == (None, None, None, None)


def test_a_report_from_an_unset_ap_clock_is_kept_with_its_time_unknown() -> None:
    r = parse_tag(_record(lastseen=1234))  # seconds since the AP booted in 1970
    assert isinstance(r, LabelReport) and r.clock_unset and r.last_seen is None and r.update_count == 3


def test_a_record_cut_by_the_json_pool_keeps_what_it_has() -> None:
    cut = {k: v for k, v in _record().items() if k in ("mac", "hash", "lastseen", "nextupdate", "nextcheckin",
                                                       "pending", "alias")}
    r = parse_tag(cut)
    assert isinstance(r, LabelReport) and r.battery_mv is None and r.rssi is None and r.update_count is None


# ---------------------------------------------------------------- the rule, pure


def image(byte: str) -> str:
    """A content hash as processXferComplete stores it: 8 bytes of an md5, 8 zero bytes."""
    return byte * 8 + "0" * 16


def engine() -> Reconciler:
    """A label that reported image "aa" after 5 completed transfers."""
    e = Reconciler(ReconcileParams())
    e.observe(report(image("aa"), 5), T0)
    return e


def send(e: Reconciler, content: LabelContent, at: float) -> None:
    """What the adapter's send returns: the hash and count read back right after the upload."""
    e.sent(SendReceipt(LABEL, None, hash_before=image("aa"), count_before=5), content, at)


def test_a_zero_hash_after_a_send_never_confirms() -> None:
    """A tag rebooting with nothing pending (or a refresh) after our send: hash zero, count unchanged."""
    e = engine()
    send(e, WANT, T0 + 1)
    e.observe(report(None, 5, seen=T0 + 30), T0 + 31)
    assert e.labels[LABEL].shown is None


def test_a_command_completing_after_a_send_never_confirms() -> None:
    """A PICK flash run before the image: the count moves and the hash changes, to the command's payload."""
    e = engine()
    send(e, WANT, T0 + 1)
    e.observe(report(None, 6, seen=T0 + 30), T0 + 31)  # the adapter reports a command's payload as no hash
    assert e.labels[LABEL].shown is None
    e.observe(report(image("bb"), 7, seen=T0 + 35), T0 + 36)
    assert e.labels[LABEL].shown == WANT


def test_a_new_hash_without_a_completed_transfer_never_confirms() -> None:
    e = engine()
    send(e, WANT, T0 + 1)
    e.observe(report(image("bb"), 5, seen=T0 + 30), T0 + 31)
    assert e.labels[LABEL].shown is None


def test_a_reboot_unproves_what_was_shown() -> None:
    e = engine()
    send(e, WANT, T0 + 1)
    e.observe(report(image("bb"), 6, seen=T0 + 30), T0 + 31)
    assert e.labels[LABEL].shown == WANT
    # it rebooted with something queued: the hash stays, the e-paper shows the boot screen
    e.observe(report(image("bb"), 6, pending=True, seen=T0 + 90, rebooted=True), T0 + 91)
    assert e.labels[LABEL].shown is None
    assert e.plan({LABEL: WANT}, T0 + 92, 10) == [(LABEL, WANT)]  # sent again at once


def test_a_send_overlapping_an_unconfirmed_one_waits_for_its_own_transfer() -> None:
    """queueDataAvail replaces the queued image, but the first change after the second send may still be
    the first send's image: it is not taken as the second's."""
    e = engine()
    send(e, OTHER, T0 + 1)
    send(e, WANT, T0 + 2)
    e.observe(report(image("cc"), 6, seen=T0 + 30), T0 + 31)
    assert e.labels[LABEL].shown is None
    e.observe(report(image("dd"), 7, seen=T0 + 70), T0 + 71)
    assert e.labels[LABEL].shown == WANT


def test_a_dropped_send_goes_again_at_once() -> None:
    """processXferTimeout (or an AP restart) drops the queue: seen pending, then neither pending nor new."""
    e = engine()
    send(e, WANT, T0 + 1)
    e.observe(report(image("aa"), 5, pending=True, seen=T0 + 2), T0 + 3)
    assert e.plan({LABEL: WANT}, T0 + 4, 10) == []  # held by the AP: the label fetches it itself
    e.observe(report(image("aa"), 5, pending=False, seen=T0 + 40), T0 + 41)
    assert e.plan({LABEL: WANT}, T0 + 42, 10) == [(LABEL, WANT)]  # long before resend_after_s


# ---------------------------------------------------------------- the store, over HTTP, on every path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EslStore]:
    s = EslStore(tmp_path, labels=24, gtins=12, seed=4, firmware={"render_s": 1.0}, poll_interval_s=10.0)
    yield s
    s.close()


def run_checked(s: EslStore, seconds: float) -> None:
    """Run the store, checking at every step that no label is reported right while it shows otherwise."""
    end = s.clock.now() + seconds
    while s.clock.now() < end - 1e-9:
        s.clock.set(min(s.service.next_due(), end))
        s.service.step()
        assert s.lies() == [], f"reported as showing HQ's price but not showing it: {s.lies()}"


def settle(s: EslStore) -> None:
    s.bind_all()
    s.set_prices(sorted(set(s.gtin_of.values())), 1, {g: "1.25" for g in s.gtin_of.values()})
    run_checked(s, 600)
    assert s.wrong() == [] and s.service.integrity[0] == s.service.integrity[1] == len(s.gtin_of)


def test_tag_reboots_with_nothing_and_with_something_pending(store: EslStore) -> None:
    settle(store)
    macs = sorted(store.gtin_of)
    for mac in macs[:6]:  # nothing pending: hash zeroed, the AP draws the template again
        store.ap.reboot_tag(mac)
    g = store.gtin_of[macs[6]]
    store.set_prices([g], 2, {g: "7.77"})
    store.service.step()  # sent: pending at the AP
    for mac in macs:
        if store.gtin_of[mac] == g:
            store.ap.reboot_tag(mac)  # something pending: the hash stays, the boot screen is shown
    assert store.ap.stats().tag_reboots >= 7
    run_checked(store, 900)
    assert store.wrong() == [] and store.service.integrity[0] == len(macs)


def test_refresh_and_led_commands_from_anyone(store: EslStore) -> None:
    settle(store)
    macs = sorted(store.gtin_of)
    ctl = OpenEPaperLinkController(store.ap.url, timeout=5.0)
    g = store.gtin_of[macs[0]]
    store.set_prices([g], 2, {g: "4.44"})
    store.service.step()  # our image waits to be rendered (render_s) ...
    for mac in macs:
        ctl._request("/tag_cmd", urllib.parse.urlencode({"mac": mac, "cmd": "ledflash_long"}).encode())
        if mac in macs[::3]:
            ctl._request("/tag_cmd", urllib.parse.urlencode({"mac": mac, "cmd": "refresh"}).encode())
    run_checked(store, 900)  # ... so commands complete while it is pending, and their payload is the hash
    assert store.ap.stats().commands_done >= len(macs) and store.ap.stats().refreshes >= 8
    assert store.wrong() == [] and store.service.integrity[0] == len(macs)


def test_pick_flash_is_confirmed_without_lying(store: EslStore) -> None:
    settle(store)
    g = store.gtin_of[sorted(store.gtin_of)[0]]
    labels = [m for m, x in store.gtin_of.items() if x == g]
    assert store.command("esl.flash", {"gtin": g, "order_id": "BOPIS-1", "duration_s": 600}).status == "ok"
    run_checked(store, 300)
    assert all(store.ap.flashing(m) and store.ap.displayed(m)["pick"] for m in labels)
    assert all(store.service.engine.labels[m].shown.pick for m in labels)
    assert store.ap.stats().led_commands == len(labels)  # one flash each, not one per send


def test_transfer_timeouts_are_sent_again_at_once(tmp_path: Path) -> None:
    s = EslStore(tmp_path, labels=24, gtins=12, seed=4, firmware={"render_s": 1.0, "timeout_rate": 0.5},
                 poll_interval_s=10.0, resend_after_s=3600)
    try:
        settle(s)  # with resend_after_s an hour, only the "dropped: send again" rule can converge this fast
        assert s.ap.stats().transfer_timeouts > 0
    finally:
        s.close()


def test_an_ap_restart_forgets_its_queue_and_its_clock(store: EslStore) -> None:
    settle(store)
    g = store.gtin_of[sorted(store.gtin_of)[0]]
    store.set_prices([g], 2, {g: "8.88"})
    store.service.step()
    store.ap.reboot_ap(clock_unset_s=120)
    run_checked(store, 60)
    alerts = store.outbox.read("SELECT kind, message FROM alerts WHERE kind = 'esl.ap_clock_unset'")
    assert len(alerts) == 1 and "clock is not set" in alerts[0][1]
    run_checked(store, 900)
    assert store.wrong() == [] and store.service.integrity[0] == len(store.gtin_of)
    assert len(store.outbox.read("SELECT 1 FROM alerts WHERE kind = 'esl.ap_clock_unset'")) == 1  # one episode


# ---------------------------------------------------------------- paging and unanswered requests


def test_pool_sized_pages_list_every_label_even_when_records_are_cut() -> None:
    clock = VirtualClock()
    macs_long = {}
    ap = SimulatedAccessPoint(300, seed=2, clock=clock, never_seen=0.05)
    for mac in ap.macs()[10::40]:
        macs_long[mac] = "x" * 3000  # an alias so long that the pool runs out inside the record
    ap.stop()
    with SimulatedAccessPoint(300, seed=2, clock=clock, json_pool=False).start() as newer:
        OpenEPaperLinkController(newer.url, timeout=5.0).poll()
        serialized_pages = newer.stats().db_requests
    ap = SimulatedAccessPoint(300, seed=2, clock=clock, never_seen=0.05, aliases=macs_long).start()
    try:
        result = OpenEPaperLinkController(ap.url, timeout=5.0).poll()
        assert ap.stats().cut_records > 0
        assert ap.stats().db_requests > 1.2 * serialized_pages  # smaller pages than 5,000 JSON bytes make
        assert {r.label for r in result.reports} == set(ap.macs()), [x.reason for x in result.rejected]
        unseen = [r for r in result.reports if r.rssi is None]
        assert len(unseen) >= 15 and all(r.lqi is None and r.battery_mv is None for r in unseen)
    finally:
        ap.stop()


def test_a_malformed_mac_gets_no_answer_and_the_adapter_never_asks() -> None:
    with SimulatedAccessPoint(4, seed=1, clock=VirtualClock()) as ap:
        host, port = urllib.parse.urlsplit(ap.url).netloc.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=1.0)
        body = urllib.parse.urlencode({"mac": "0000ABCDEF0123", "json": "[]"})  # 14 digits: hex2mac refuses
        conn.request("POST", "/jsonupload", body, {"Content-Type": "application/x-www-form-urlencoded"})
        with pytest.raises((socket.timeout, TimeoutError)):
            conn.getresponse()
        conn.close()
        t0 = time.monotonic()
        with pytest.raises(ControllerError, match="0000ABCDEF0123"):
            OpenEPaperLinkController(ap.url, timeout=5.0).send("0000ABCDEF0123", WANT)
        assert time.monotonic() - t0 < 1.0
        assert ap.stats().unanswered == 1 and ap.stats().uploads == 0
