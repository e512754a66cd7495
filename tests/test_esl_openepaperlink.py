"""The OpenEPaperLink adapter against the simulated access point, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.clock import VirtualClock
from edge_agent.esl.controller import ControllerError, LabelContent, LabelReport, Rejected
from edge_agent.esl.openepaperlink import OpenEPaperLinkController, parse_tag, parse_template, render_template
from simulators.esl_controller import GarbageKind, SimulatedAccessPoint, label_macs

CHECKIN_S = 40.0
REFRESH_S = 4.0
ONE_CHECKIN = CHECKIN_S * 1.1 + REFRESH_S + 1  # every label checks in and redraws within this
OLD = LabelContent(gtin="09506000134352", price="3.49", currency="EUR")
NEW = LabelContent(gtin="09506000134352", price="2.99", currency="EUR", promo="WEEKEND", stock_note="LOW STOCK")

MakeAp = Callable[..., SimulatedAccessPoint]


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def make_ap(clock: VirtualClock) -> Iterator[MakeAp]:
    started: list[SimulatedAccessPoint] = []

    def make(labels: int = 40, **kw: Any) -> SimulatedAccessPoint:
        kw.setdefault("checkin_s", CHECKIN_S)
        kw.setdefault("refresh_s", REFRESH_S)
        ap = SimulatedAccessPoint(labels, seed=7, clock=clock, **kw).start()
        started.append(ap)
        return ap

    yield make
    for ap in started:
        ap.stop()


def controller(ap: SimulatedAccessPoint) -> OpenEPaperLinkController:
    return OpenEPaperLinkController(ap.url, timeout=2.0)


def report_of(ctl: OpenEPaperLinkController, label: str) -> LabelReport:
    return next(r for r in ctl.poll().reports if r.label == label)


# ---------------------------------------------------------------- polling


def test_poll_walks_every_page_of_a_thousand_labels(make_ap: MakeAp, clock: VirtualClock) -> None:
    ap = make_ap(1000, silent=0.05, low_battery=0.1)
    raw = json.loads(urllib.request.urlopen(ap.url + "/get_db?pos=0", timeout=2).read())
    assert {"mac", "hash", "lastseen", "pending", "batteryMv", "RSSI", "LQI", "nextcheckin", "hwType"} <= set(
        raw["tags"][0])
    assert raw["continu"] == len(raw["tags"])  # the firmware's next index: a page holds ~5 kB

    result = controller(ap).poll()
    assert result.rejected == []
    assert sorted(r.label for r in result.reports) == sorted(ap.macs())
    assert ap.stats().db_requests > 50  # really paged
    assert sum(r.battery_mv is not None and r.battery_mv < 2400 for r in result.reports) == 100
    stale = [r for r in result.reports if r.last_seen is not None and clock.now() - r.last_seen.timestamp() > 3600]
    assert len(stale) == 50  # the silent ones
    assert all(r.content_hash is None and not r.pending for r in result.reports)  # nothing uploaded yet: zero hash


def test_a_firmware_that_wraps_pos_past_255_is_flagged_not_looped(make_ap: MakeAp) -> None:
    ap = make_ap(300, pos_u8=True)
    result = controller(ap).poll()
    assert 255 <= len(result.reports) < 300
    assert len(result.rejected) == 1 and "does not move past pos" in result.rejected[0].reason


# ---------------------------------------------------------------- sending


def test_hash_changes_only_when_the_label_has_the_new_content_as_on_the_firmware(
        make_ap: MakeAp, clock: VirtualClock) -> None:
    mac = label_macs(40, 7)[3]
    ap = make_ap(initial={mac: OLD})
    ctl = controller(ap)
    before = report_of(ctl, mac)
    assert not before.pending and ap.displayed(mac) == OLD.model_dump(mode="json")

    receipt = ctl.send(mac, NEW)
    assert receipt.label == mac and receipt.content_hash is None and receipt.hash_before == before.content_hash
    now = report_of(ctl, mac)
    assert now.pending and now.content_hash == before.content_hash  # the AP holds it; the tag has not fetched it
    assert ap.displayed(mac) == OLD.model_dump(mode="json")  # e-paper is slow: nothing changed yet

    clock.advance(ONE_CHECKIN)
    after = report_of(ctl, mac)
    assert not after.pending and after.content_hash != before.content_hash
    assert after.last_seen is not None and now.last_seen is not None and after.last_seen > now.last_seen
    assert ap.displayed(mac) == NEW.model_dump(mode="json")
    assert ap.stats().uploads == 1 and ap.stats().redraws == 1


def test_every_send_is_a_new_image_so_resending_shown_content_is_still_confirmed(
        make_ap: MakeAp, clock: VirtualClock) -> None:
    mac = label_macs(40, 7)[0]
    ap = make_ap(initial={mac: OLD})
    ctl = controller(ap)
    receipt = ctl.send(mac, OLD)
    assert report_of(ctl, mac).pending
    clock.advance(ONE_CHECKIN)
    r = report_of(ctl, mac)
    assert not r.pending and r.content_hash != receipt.hash_before
    assert ap.displayed(mac) == OLD.model_dump(mode="json")


def test_failed_transfers_keep_the_label_pending_until_a_later_checkin_succeeds(
        make_ap: MakeAp, clock: VirtualClock) -> None:
    mac = label_macs(40, 7)[5]
    ap = make_ap(initial={mac: OLD}, transfer_fail_rate=1.0)
    ctl = controller(ap)
    receipt = ctl.send(mac, NEW)
    clock.advance(3 * ONE_CHECKIN)
    r = report_of(ctl, mac)
    assert r.pending and r.content_hash == receipt.hash_before
    assert ap.displayed(mac) == OLD.model_dump(mode="json")
    assert ap.stats().transfer_failures >= 3

    ap.transfer_fail_rate = 0.0
    clock.advance(ONE_CHECKIN)
    assert not report_of(ctl, mac).pending
    assert ap.displayed(mac) == NEW.model_dump(mode="json")


def test_silent_label_stays_pending(make_ap: MakeAp, clock: VirtualClock) -> None:
    mac = label_macs(40, 7)[9]
    ap = make_ap(initial={mac: OLD}, silent=[mac])
    ctl = controller(ap)
    ctl.send(mac, NEW)
    clock.advance(10 * ONE_CHECKIN)
    assert report_of(ctl, mac).pending and ap.displayed(mac) == OLD.model_dump(mode="json")


def test_refused_upload_raises(make_ap: MakeAp) -> None:
    mac = label_macs(40, 7)[1]
    ap = make_ap(initial={mac: OLD}, upload_fail_rate=1.0)
    with pytest.raises(ControllerError, match="HTTP 409 'come back later'"):
        controller(ap).send(mac, NEW)
    assert ap.stats().upload_failures == 1 and ap.stats().uploads == 0
    assert not report_of(controller(ap), mac).pending


def test_unknown_label_raises(make_ap: MakeAp) -> None:
    with pytest.raises(ControllerError, match="HTTP 400 'mac not found in tagDB'"):
        controller(make_ap()).send("0000FFFFFFFFFFFF", NEW)


def test_stopped_or_hung_access_point_raises(make_ap: MakeAp) -> None:
    ap = make_ap()
    ctl = controller(ap)
    ap.stop()
    with pytest.raises(ControllerError):
        ctl.poll()
    with pytest.raises(ControllerError):
        ctl.send(ap.macs()[0], NEW)

    with socket.socket() as hung:  # accepts connections (the kernel's backlog) and never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(4)
        with pytest.raises(ControllerError, match="timed out"):
            OpenEPaperLinkController(f"http://127.0.0.1:{hung.getsockname()[1]}", timeout=0.3).poll()


# ---------------------------------------------------------------- garbage


def test_a_page_that_is_not_json_is_quarantined_and_the_next_poll_is_whole(make_ap: MakeAp) -> None:
    ap = make_ap()
    ap.inject_garbage("bad_json")
    ctl = controller(ap)
    result = ctl.poll()
    assert result.reports == []
    assert len(result.rejected) == 1 and "not JSON" in result.rejected[0].reason
    assert result.rejected[0].raw.startswith('{"tags":[')
    assert len(ctl.poll().reports) == 40


@pytest.mark.parametrize(("kind", "fields"), [
    ("odd_records", ["not a JSON object", "missing field mac", "mac is not", "pending is not"]),
    ("absurd_values", ["batteryMv 900000", "lastseen 32503680000", "RSSI 500", "LQI -7"]),
])
def test_bad_records_are_quarantined_with_the_field_and_the_rest_of_the_page_comes_through(
        make_ap: MakeAp, kind: GarbageKind, fields: list[str]) -> None:
    ap = make_ap()
    ap.inject_garbage(kind)
    ctl = controller(ap)
    result = ctl.poll()
    reasons = [r.reason for r in result.rejected]
    assert len(reasons) == 4
    for field, reason in zip(fields, reasons, strict=True):
        assert field in reason
    assert len(result.reports) == 36  # the page's other records, including ones with fields we do not know
    assert len(ctl.poll().reports) == 40


def test_garbage_in_the_read_back_fails_the_send(make_ap: MakeAp) -> None:
    ap = make_ap()
    ap.inject_garbage("absurd_values")
    with pytest.raises(ControllerError, match="batteryMv"):
        controller(ap).send(ap.macs()[0], NEW)


# ---------------------------------------------------------------- parsers

GOOD = {"mac": "0000021C3E2B1A01", "hash": "ab" * 16, "lastseen": 1_767_225_600, "pending": 1,
        "batteryMv": 2900, "RSSI": -60, "LQI": 100, "alias": "", "contentMode": 19}


def test_older_firmware_records_are_accepted() -> None:
    r = parse_tag({**GOOD, "mac": "021c3e2b1a01", "pending": False, "batteryMv": 0, "lastseen": 0})
    assert isinstance(r, LabelReport)
    assert r.label == "021C3E2B1A01" and not r.pending and r.battery_mv is None and r.last_seen is None


def test_template_round_trip() -> None:
    for c in (OLD, NEW, NEW.model_copy(update={"pick": True, "promo": None})):
        assert parse_template(render_template(c)) == c
    assert parse_template('[{"text": [1, 2, "hello", "glasstown_nbp_tf", 1]}]') is None
    assert parse_template("not json") is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
tag_like = st.fixed_dictionaries({}, optional={k: json_values | st.just(v) for k, v in GOOD.items()})


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, tag_like))
def test_parse_tag_never_raises(raw: object) -> None:
    r = parse_tag(raw)
    assert isinstance(r, (LabelReport, Rejected))
    if isinstance(r, Rejected):
        assert r.reason and isinstance(r.raw, str)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(), json_values.map(json.dumps)))
def test_parse_template_never_raises(body: str) -> None:
    assert parse_template(body) is None or isinstance(parse_template(body), LabelContent)


# ---------------------------------------------------------------- push (the AP's websocket)


def test_the_ap_websocket_pushes_tag_changes_as_they_happen(make_ap: MakeAp, clock: VirtualClock) -> None:
    import threading
    import time

    mac = label_macs(40, 7)[2]
    ap = make_ap(initial={mac: OLD})
    ctl = controller(ap)
    got: list = []
    stop = threading.Event()
    t = threading.Thread(target=ctl.listen, args=(got.append, stop), daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 5
        while ap._ws_clients == set() and time.monotonic() < deadline:
            time.sleep(0.02)
        receipt = ctl.send(mac, NEW)
        clock.advance(ONE_CHECKIN)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            mine = [r for res in got for r in res.reports if r.label == mac]
            if mine and not mine[-1].pending and mine[-1].content_hash != receipt.hash_before:
                break
            time.sleep(0.02)
        mine = [r for res in got for r in res.reports if r.label == mac]
        assert mine[0].pending, "the upload itself is pushed"
        assert not mine[-1].pending and mine[-1].content_hash != receipt.hash_before, "and the redraw"
        assert ap.stats().pushes >= 3
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()


def test_push_messages_that_are_not_about_tags_are_ignored_and_garbage_is_rejected() -> None:
    from edge_agent.esl.openepaperlink import parse_push

    assert parse_push('{"sys": {"heap": 1000}}') is None
    assert parse_push('{"logMsg": "hello"}') is None
    bad = parse_push(b"\xff{not json")
    assert bad is not None and not bad.reports and "not JSON" in bad.rejected[0].reason
    odd = parse_push('{"tags": [{"mac": "XYZ"}]}')
    assert odd is not None and odd.rejected and not odd.reports


def test_pick_content_flashes_the_led_when_asked(make_ap: MakeAp, clock: VirtualClock) -> None:
    mac = label_macs(40, 7)[4]
    ap = make_ap()
    controller(ap).send(mac, NEW.model_copy(update={"pick": True}), flash=True)
    assert ap.stats().led_commands == 1 and not ap.flashing(mac)  # queued: the tag runs it at its check-in
    clock.advance(ONE_CHECKIN)
    assert ap.flashing(mac)
    controller(ap).send(mac, NEW.model_copy(update={"pick": True}))
    assert ap.stats().led_commands == 1
