"""The presence state machine: pure, so tested with plain reads and hypothesis-generated feeds."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.rfid.presence import PresenceEngine, PresenceEvent, PresenceParams

G = "04000000000006"
T0 = 1_767_225_600.0


def stock_from(events: list[PresenceEvent]) -> Counter[tuple[str, str]]:
    stock: Counter[tuple[str, str]] = Counter()
    for ev in events:
        if ev.kind == "arrived":
            stock[(ev.zone, ev.gtin)] += 1
        elif ev.kind == "moved":
            stock[(ev.from_zone, ev.gtin)] -= 1  # type: ignore[index]
            stock[(ev.zone, ev.gtin)] += 1
        else:
            stock[(ev.zone, ev.gtin)] -= 1
    return stock


def test_ghost_read_creates_no_stock() -> None:
    e = PresenceEngine()
    assert e.observe("A1", G, "salesfloor", -50, T0) is None
    assert e.tick(T0 + 60) == []
    assert e.present() == {}
    assert e.ghosts_dropped == 1


def test_arrive_then_depart_by_timeout_and_by_exit() -> None:
    e = PresenceEngine(PresenceParams(departure_timeout_s=10))
    assert e.observe("A1", G, "salesfloor", -50, T0) is None
    ev = e.observe("A1", G, "salesfloor", -50, T0 + 1)
    assert ev is not None and (ev.kind, ev.zone) == ("arrived", "salesfloor")
    for t in (T0 + 5, T0 + 6):
        e.observe("B1", G, "backroom", -50, t)
    (gone,) = e.tick(T0 + 12)  # A1 unseen for 11 s, B1 for only 6 s
    assert gone.epc == "A1"
    assert gone.kind == "departed" and gone.reason == "unseen"
    e2 = PresenceEngine()
    e2.observe("C1", G, "pos", -50, T0)
    e2.observe("C1", G, "pos", -50, T0 + 1)
    ev = e2.observe("C1", G, "exit", -60, T0 + 2)
    assert ev is not None and (ev.kind, ev.zone, ev.reason) == ("departed", "pos", "read at exit")


def test_cross_reads_by_a_weaker_neighbour_do_not_flap() -> None:
    e = PresenceEngine()
    events = []
    for i in range(300):
        if ev := e.observe("A1", G, "salesfloor", -55 + (i % 3), T0 + i):
            events.append(ev)
        if i % 7 == 0 and (ev := e.observe("A1", G, "pos", -70, T0 + i + 0.5)):
            events.append(ev)
    assert [ev.kind for ev in events] == ["arrived"]


def test_a_real_move_happens_after_the_holdoff() -> None:
    e = PresenceEngine(PresenceParams(holdoff_s=3, recent_s=5))
    for i in range(5):
        e.observe("A1", G, "salesfloor", -50, T0 + i)
    moved = [ev for i in range(5, 20) if (ev := e.observe("A1", G, "fitting-room", -52, T0 + i))]
    assert len(moved) == 1 and (moved[0].from_zone, moved[0].zone) == ("salesfloor", "fitting-room")
    # Not before the old zone went quiet (recent_s) and the new one held for holdoff_s.
    assert moved[0].ts >= T0 + 4 + 3


def test_restore_keeps_tags_and_gives_them_a_fresh_timeout() -> None:
    e = PresenceEngine(PresenceParams(departure_timeout_s=10))
    e.restore([("A1", G, "backroom", T0)])
    e.touch_all(T0 + 100)
    assert e.tick(T0 + 105) == []
    assert e.present() == {"A1": ("backroom", G)}


ZONES = ["backroom", "salesfloor", "fitting-room", "pos", "exit"]
reads = st.lists(
    st.tuples(
        st.sampled_from(["E1", "E2", "E3", "E4", "E5"]),
        st.sampled_from(ZONES),
        st.floats(-90, -30, allow_nan=False),
        st.floats(0, 5, allow_nan=False),  # time step
        st.booleans(),  # tick after this read
    ),
    max_size=200,
)


def run(feed: list[tuple[str, str, float, float, bool]]) -> list[PresenceEvent]:
    e = PresenceEngine(PresenceParams(departure_timeout_s=20, holdoff_s=2, arrive_window_s=10))
    events: list[PresenceEvent] = []
    t = T0
    for epc, zone, rssi, dt, tick in feed:
        t += dt
        if ev := e.observe(epc, G, zone, rssi, t):
            events.append(ev)
        if tick:
            events += e.tick(t)
        # The book implied by the events always matches the engine's own view.
        stock = stock_from(events)
        assert all(n >= 0 for n in stock.values()), stock
        present = Counter((z, g) for z, g in e.present().values())
        assert +stock == present
    return events


@settings(max_examples=200, deadline=None)
@given(reads)
def test_never_negative_and_consistent(feed: list) -> None:
    run(feed)


@settings(max_examples=100, deadline=None)
@given(reads)
def test_replay_is_identical(feed: list) -> None:
    assert run(feed) == run(feed)
