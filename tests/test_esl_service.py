"""The ESL service against the simulated access point over real HTTP, on a virtual clock; HQ's commands
go through the real downlink. Judged by what the simulated e-paper shows, not by the agent's view."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.esl.openepaperlink import OpenEPaperLinkController
from edge_agent.esl.service import EslService
from simulators.esl_store import EslStore, cents

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def store(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[EslStore]:
    s = EslStore(tmp_path, **getattr(request, "param", {}))
    yield s
    s.close()


BIG = {"labels": 1000, "gtins": 500, "transfer_fail_rate": 0.05, "upload_fail_rate": 0.05, "silent": 0.01,
       "poll_interval_s": 10.0, "mismatch_deadline_s": 600.0, "silent_after_s": 1800.0}


@pytest.mark.slow
@pytest.mark.parametrize("store", [BIG], indirect=True)
def test_a_thousand_labels_converge_after_a_price_change_for_30_percent_of_gtins(store: EslStore) -> None:
    rng = random.Random(5)
    gtins = sorted(set(store.gtin_of.values()))
    store.bind_all()
    store.set_prices(gtins, 1, {g: cents(rng.randint(100, 5000)) for g in gtins})
    first = store.run_until_right(timeout_s=1800)
    assert first is not None, f"{len(store.wrong())} labels still wrong after 30 min"

    changed = rng.sample(gtins, k=len(gtins) * 3 // 10)
    store.set_prices(changed, 2, {g: cents(rng.randint(100, 5000)) for g in changed})
    assert len(store.wrong()) > 250  # the change is real: about 300 labels now show an old price
    took = store.run_until_right(timeout_s=1800)
    assert took is not None, f"{len(store.wrong())} labels still wrong"
    # e-paper: a 40 s check-in and a redraw, some retries after 5% failures; well inside the deadline
    assert took < store.cfg.mismatch_deadline_s
    print(f"initial sync {first:.0f} s, 30% price change converged in {took:.0f} s (virtual)")

    ok, total = store.service.integrity
    assert total == len(store.gtin_of) and ok == total - len(store.wrong(include_silent=True))

    # Silent labels cannot show the price: past the deadline they raise alerts, each kind once.
    store.run(store.cfg.silent_after_s)
    alerts = store.uplinked("esl/alert")
    kinds = {(a["label"], a["kind"]) for a in alerts}
    for mac in store.silent:
        assert (mac, "price_mismatch") in kinds and (mac, "label_silent") in kinds
    assert len(kinds) == len(alerts), "an alert was raised twice for one episode"
    assert not {m for m, k in kinds if k == "price_mismatch"} - store.silent


def test_repeated_and_out_of_order_price_sets_are_harmless(store: EslStore) -> None:
    g = store.gtin_of[next(iter(store.gtin_of))]
    store.bind_all()
    args = {"gtin": g, "price": "2.00", "currency": "EUR", "version": 2}
    assert store.command("price.set", args).detail["outcome"] == "stored"
    assert store.command("price.set", {**args, "price": "1.00", "version": 1}).status == "ok"  # late, older
    assert store.command("price.set", args).detail["outcome"] == "duplicate"  # HQ sent it again
    assert store.command("price.set", args, cmd_id="c2").reason == "duplicate"  # MQTT redelivered it
    conflict = store.command("price.set", {**args, "price": "2.50"})
    assert conflict.status == "error" and "version 2" in (conflict.reason or "")
    store.run(300)
    labels = [m for m, x in store.gtin_of.items() if x == g]
    assert all(store.shows(m) == ("2.00", "EUR", None) for m in labels)
    sends = store.ap.stats().uploads
    for _ in range(3):
        store.command("price.set", args)
    store.run(120)
    assert store.ap.stats().uploads == sends  # nothing new to show: nothing sent


def test_unknown_gtin_gets_an_error_result(store: EslStore) -> None:
    store.bind_all()
    out = store.command("price.set", {"gtin": "00000000000017", "price": "1.00", "currency": "EUR", "version": 1})
    assert out.status == "error" and "unknown GTIN 00000000000017" in (out.reason or "")
    results = store.uplinked("cmd-result")
    assert results[-1]["status"] == "error" and results[-1]["name"] == "price.set"


def test_a_future_price_applies_at_its_effective_time_on_the_clock(store: EslStore) -> None:
    store.bind_all()
    g = store.gtin_of[next(iter(store.gtin_of))]
    labels = [m for m, x in store.gtin_of.items() if x == g]
    store.set_prices([g], 1, {g: "5.00"})
    store.set_prices([g], 2, {g: "4.00"}, after_s=3600)
    store.run(600)
    assert all(store.shows(m) == ("5.00", "EUR", None) for m in labels)
    store.run(3000)
    assert all(store.shows(m) == ("5.00", "EUR", None) for m in labels)  # not before its time
    store.run(600)
    assert all(store.shows(m) == ("4.00", "EUR", None) for m in labels)


def test_pick_flash_and_back(store: EslStore) -> None:
    store.bind_all()
    g = store.gtin_of[next(iter(store.gtin_of))]
    labels = [m for m, x in store.gtin_of.items() if x == g]
    store.set_prices([g], 1, {g: "5.00"})
    store.run(300)
    out = store.command("esl.flash", {"gtin": g, "order_id": "BOPIS-77", "duration_s": 600})
    assert out.status == "ok" and out.detail["labels"] == sorted(labels)
    store.run(120)
    assert all(store.ap.displayed(m)["pick"] for m in labels)
    assert store.service.integrity[0] == store.service.integrity[1]  # PICK does not make a price wrong
    store.run(900)
    assert not any(store.ap.displayed(m)["pick"] for m in labels)
    assert store.command("esl.flash", {"gtin": "00000000000017", "order_id": "x"}).status == "error"


@pytest.mark.parametrize("kind", ["bad_json", "odd_records", "absurd_values"])
def test_controller_garbage_is_quarantined_and_the_rest_goes_on(store: EslStore, kind: str) -> None:
    store.bind_all()
    gtins = sorted(set(store.gtin_of.values()))
    store.set_prices(gtins, 1, {g: "1.25" for g in gtins})
    store.ap.inject_garbage(kind, count=3)  # type: ignore[arg-type]
    store.run(600)
    rows = store.outbox.quarantined()
    assert rows and all(source == "esl" and reason for _, source, reason, _ in rows)
    assert not store.wrong()


def test_controller_down_then_back(store: EslStore) -> None:
    store.bind_all()
    gtins = sorted(set(store.gtin_of.values()))
    store.ap.stop()
    store.set_prices(gtins, 1, {g: "3.00" for g in gtins})  # stored even though the controller is down
    rep = store.service.step()
    assert rep.poll_error and rep.sent == 0
    assert store.service.figures()["esl.poll_errors"] >= 1


def test_state_survives_a_restart_without_resending(store: EslStore) -> None:
    store.bind_all()
    gtins = sorted(set(store.gtin_of.values()))
    store.set_prices(gtins, 1, {g: "7.77" for g in gtins})
    assert store.run_until_right(900) is not None
    sends = store.ap.stats().uploads
    store.service = EslService(store.cfg, OpenEPaperLinkController(store.ap.url), store.outbox, store.clock)
    assert store.service.book.effective(gtins[0], store.clock.now()).price == "7.77"
    store.run(600)
    assert store.ap.stats().uploads == sends and not store.wrong()


@pytest.mark.parametrize("store", [{"labels": 40, "gtins": 20, "low_stock_below": 2,
                                    "low_stock_zones": ["salesfloor"]}], indirect=True)
def test_low_rfid_stock_is_shown_on_the_label(store: EslStore) -> None:
    gtins = sorted(set(store.gtin_of.values()))
    low, plenty = gtins[0], gtins[1]
    store.service.stock = lambda: {("salesfloor", low): 1, ("backroom", low): 9, ("salesfloor", plenty): 5}
    store.bind_all()
    store.set_prices(gtins, 1, {g: "2.50" for g in gtins})
    assert store.run_until_right(900) is not None
    for mac, g in store.gtin_of.items():
        assert store.ap.displayed(mac)["stock_note"] == ("LOW STOCK" if g != plenty else None)


@pytest.mark.parametrize("store", [{"labels": 60, "gtins": 30, "poll_interval_s": 3600.0}], indirect=True)
def test_pushed_label_changes_confirm_prices_without_waiting_for_a_poll(store: EslStore) -> None:
    import threading
    import time

    stop = threading.Event()
    listener = threading.Thread(target=store.service.controller.listen, args=(store.service.ingest, stop),
                                daemon=True)
    listener.start()
    try:
        store.bind_all()
        gtins = sorted(set(store.gtin_of.values()))
        store.set_prices(gtins, 1, {g: "4.20" for g in gtins})  # one step: everything sent, no poll since
        store.clock.advance(60)  # every label checks in, fetches and redraws; the AP pushes each change
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and store.service.figures()["esl.pushed_reports"] < 3 * 60:
            time.sleep(0.05)
        store.service.step(poll=False)
        assert store.service.integrity == (60, 60) and not store.wrong()
    finally:
        stop.set()
        listener.join(5)
