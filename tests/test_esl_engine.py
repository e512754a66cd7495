"""The price book and the reconcile engine, pure: no HTTP, no threads, time as a number."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.contract import PriceSetArgs
from edge_agent.esl.controller import LabelContent, LabelReport, SendReceipt
from edge_agent.esl.pricebook import PriceBook, SetOutcome, VersionConflict
from edge_agent.esl.reconcile import LabelState, ReconcileParams, Reconciler

T0 = 1_767_225_600.0
GTIN = "09506000134352"
LABEL = "0000021C3E2B1A01"


def ts(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def price(version: int, p: str, frm: float | None = None, until: float | None = None, promo: str | None = None,
          gtin: str = GTIN) -> PriceSetArgs:
    return PriceSetArgs(gtin=gtin, price=p, currency="EUR", promo=promo, version=version,
                        effective_from=ts(frm) if frm is not None else None,
                        effective_until=ts(until) if until is not None else None)


def book() -> tuple[PriceBook, sqlite3.Connection]:
    conn = sqlite3.connect(":memory:")
    return PriceBook(conn), conn


# ---------------------------------------------------------------- price book


def test_highest_version_in_effect_wins_and_promo_falls_back() -> None:
    b, c = book()
    b.set(c, price(1, "3.49"), T0)
    b.set(c, price(2, "2.99", frm=T0 + 100, until=T0 + 200, promo="WEEKEND"), T0)
    assert b.effective(GTIN, T0).price == "3.49"
    assert b.effective(GTIN, T0 + 150).price == "2.99"
    assert b.effective(GTIN, T0 + 200).price == "3.49"  # the promo ended: back to the base price


def test_older_version_never_overwrites_newer() -> None:
    b, c = book()
    b.set(c, price(5, "4.00"), T0)
    assert b.set(c, price(4, "9.99"), T0) is SetOutcome.STORED  # late, stored, but never wins
    assert b.effective(GTIN, T0 + 1).price == "4.00"


def test_repeat_is_duplicate_and_same_version_other_content_conflicts() -> None:
    b, c = book()
    assert b.set(c, price(1, "1.00"), T0) is SetOutcome.STORED
    assert b.set(c, price(1, "1.00"), T0) is SetOutcome.DUPLICATE
    with pytest.raises(VersionConflict, match="version 1"):
        b.set(c, price(1, "1.10"), T0)


def test_book_survives_reopen() -> None:
    conn = sqlite3.connect(":memory:")
    PriceBook(conn).set(conn, price(3, "7.00"), T0)
    assert PriceBook(conn).effective(GTIN, T0).price == "7.00"


versions = st.lists(
    st.tuples(st.integers(1, 12), st.integers(0, 9999), st.one_of(st.none(), st.integers(0, 1000)),
              st.integers(1, 1000)),
    min_size=1, max_size=15, unique_by=lambda x: x[0],
)


@settings(max_examples=150, deadline=None)
@given(versions, st.randoms(use_true_random=False), st.integers(0, 3))
def test_arrival_order_and_repeats_do_not_matter(vs: list, rnd, repeats: int) -> None:  # type: ignore[no-untyped-def]
    cmds = [price(v, f"{p // 100}.{p % 100:02d}", None if f is None else T0 + f,
                  None if f is None else T0 + f + d) for v, p, f, d in vs]
    ref, rc = book()
    for a in cmds:
        ref.set(rc, a, T0)
    shuffled = cmds + [rnd.choice(cmds) for _ in range(repeats)]
    rnd.shuffle(shuffled)
    other, oc = book()
    for a in shuffled:
        other.set(oc, a, T0)
    for t in range(0, 2200, 37):
        assert ref.effective(GTIN, T0 + t) == other.effective(GTIN, T0 + t)


@settings(max_examples=100, deadline=None)
@given(versions, st.integers(0, 2000))
def test_prune_never_changes_what_is_in_effect_from_now_on(vs: list, at: int) -> None:
    b, c = book()
    for v, p, f, d in vs:
        b.set(c, price(v, f"{p}.00", None if f is None else T0 + f, None if f is None else T0 + f + d), T0)
    now = T0 + at
    before = [b.effective(GTIN, now + t) for t in range(0, 2200, 29)]
    b.prune(c, now)
    assert [b.effective(GTIN, now + t) for t in range(0, 2200, 29)] == before
    assert c.execute("SELECT COUNT(*) FROM esl_prices").fetchone()[0] == sum(len(x) for x in b._by_gtin.values())


# ---------------------------------------------------------------- reconcile

P = ReconcileParams(resend_after_s=300, mismatch_deadline_s=600, pending_deadline_s=900, silent_after_s=3600,
                    low_battery_mv=2400, retry_min_s=5, retry_max_s=300)
WANT = LabelContent(gtin=GTIN, price="3.49", currency="EUR")


def report(t: float, h: str | None, pending: bool, battery: int = 3000) -> LabelReport:
    return LabelReport(label=LABEL, last_seen=ts(t), battery_mv=battery, rssi=-60, lqi=100, pending=pending,
                       content_hash=h)


def test_send_then_confirmed_only_when_the_controller_reports_our_hash_not_pending() -> None:
    e = Reconciler(P)
    e.observe(report(T0, "old", False), T0)
    assert e.plan({LABEL: WANT}, T0, 10) == [(LABEL, WANT)]
    e.sent(SendReceipt(LABEL, "h1"), WANT, T0)
    e.observe(report(T0 + 1, "h1", True), T0 + 10)
    assert e.plan({LABEL: WANT}, T0 + 10, 10) == []  # held by the controller: wait for the label
    assert e.labels[LABEL].shown is None
    e.observe(report(T0 + 40, "h1", False), T0 + 45)
    assert e.labels[LABEL].shown == WANT
    assert e.plan({LABEL: WANT}, T0 + 50, 10) == []


def test_pending_too_long_is_resent_and_then_alerted_once() -> None:
    e = Reconciler(P)
    e.sent(SendReceipt(LABEL, "h1"), WANT, T0)
    e.observe(report(T0, "h1", True), T0 + 1)
    assert e.plan({LABEL: WANT}, T0 + 299, 10) == []
    assert e.plan({LABEL: WANT}, T0 + 300, 10) == [(LABEL, WANT)]
    hq = {LABEL: WANT}
    assert [a.kind for a in e.assess(hq, hq, T0 + 1)] == []
    kinds = [a.kind for a in e.assess(hq, hq, T0 + 901)]
    assert kinds == ["price_mismatch", "stuck_pending"]
    assert e.assess(hq, hq, T0 + 1000) == []  # once per episode
    e.observe(report(T0 + 1001, "h1", False), T0 + 1002)
    assert e.assess(hq, hq, T0 + 1003) == []
    assert e.labels[LABEL].alerted == []


def test_content_the_agent_did_not_send_is_sent_again_at_once() -> None:
    e = Reconciler(P)
    e.sent(SendReceipt(LABEL, "h1"), WANT, T0)
    e.observe(report(T0 + 40, "h1", False), T0 + 41)
    assert e.labels[LABEL].shown == WANT
    e.observe(report(T0 + 80, "someone-else", False), T0 + 81)  # overwritten, or the AP lost it
    assert e.labels[LABEL].shown is None
    assert e.plan({LABEL: WANT}, T0 + 82, 10) == [(LABEL, WANT)]


def test_refused_sends_back_off_exponentially() -> None:
    e = Reconciler(P, seed=3)
    t = T0
    gaps = []
    for _ in range(8):
        assert e.plan({LABEL: WANT}, t, 10) == [(LABEL, WANT)]
        e.failed(LABEL, t)
        nxt = e.labels[LABEL].next_try
        assert e.plan({LABEL: WANT}, nxt - 0.01, 10) == []
        gaps.append(nxt - t)
        t = nxt
    assert gaps[-1] > gaps[0] * 8 and max(gaps) <= P.retry_max_s


def test_new_price_is_sent_even_while_the_old_one_is_pending() -> None:
    e = Reconciler(P)
    e.sent(SendReceipt(LABEL, "h1"), WANT, T0)
    e.observe(report(T0, "h1", True), T0 + 1)
    newer = WANT.model_copy(update={"price": "2.99"})
    assert e.plan({LABEL: newer}, T0 + 2, 10) == [(LABEL, newer)]


def test_low_battery_and_silent_alerts() -> None:
    e = Reconciler(P)
    e.observe(report(T0, None, False, battery=2300), T0)
    kinds = [a.kind for a in e.assess({}, {}, T0 + 3600)]
    assert kinds == ["low_battery", "label_silent"]


def test_integrity_ignores_overlays() -> None:
    picked = WANT.model_copy(update={"pick": True})
    assert Reconciler.integrity({LABEL: picked}, {LABEL: WANT}) == (1, 1)
    assert Reconciler.integrity({LABEL: None}, {LABEL: WANT}) == (0, 1)


def test_state_round_trips_through_json() -> None:
    e = Reconciler(P)
    e.sent(SendReceipt(LABEL, "h1"), WANT, T0)
    e.observe(report(T0 + 40, "h1", False), T0 + 41)
    st = e.labels[LABEL]
    assert LabelState.from_json(st.to_json()) == st


def test_without_an_advance_hash_a_new_hash_from_a_later_checkin_is_the_proof() -> None:
    e = Reconciler(P)
    e.observe(report(T0, "old", False), T0)
    e.sent(SendReceipt(LABEL, None, hash_before="old"), WANT, T0 + 1)
    e.observe(report(T0, "old", True), T0 + 2)
    assert e.labels[LABEL].shown is None
    e.observe(report(T0 + 30, "old", False), T0 + 31)  # checked in but never took it: not proof
    assert e.labels[LABEL].shown is None
    e.observe(report(T0 + 70, "new", False), T0 + 71)
    assert e.labels[LABEL].shown == WANT and e.labels[LABEL].shown_hash == "new"
    e.observe(report(T0 + 110, "other", False), T0 + 111)  # later overwritten by someone else
    assert e.labels[LABEL].shown is None
