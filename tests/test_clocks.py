"""Wall-clock steps (NTP correcting a box that booted with no RTC, an operator setting the time) move
no interval: the agent's historical flag and HQ's reorder window run on what happened and on the
monotonic clock, not on wall-clock differences."""

from __future__ import annotations

import threading
from pathlib import Path

from edge_agent.agent import Agent
from edge_agent.clock import VirtualClock
from edge_agent.config import AgentConfig
from edge_agent.hq.applier import HqApplier
from edge_agent.inventory.book import Delta, InventoryBook
from edge_agent.sync.outbox import Outbox
from simulators.mosquitto import Mosquitto

from .helpers import HqBackend, start_hq, wait_for

T0 = 1_767_225_600.0
GTIN = "04000000000006"


class SteppedClock:
    """The real passage of time plus an offset the test can step either way, like a wall clock."""

    def __init__(self) -> None:
        import time

        self._time = time.time
        self.offset = 0.0
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._time() + self.offset

    def step(self, seconds: float) -> None:
        with self._lock:
            self.offset += seconds


def test_wall_clock_stepping_back_marks_no_live_message_historical(tmp_path: Path, broker: Mosquitto) -> None:
    clock = SteppedClock()
    cfg = AgentConfig.model_validate({
        "store": {"id": "S001"},
        "mqtt": {"port": broker.port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5},
        "outbox": {"path": str(tmp_path / "outbox.db")},
        "health": {"interval_s": 3600.0},
    })
    hq = start_hq(tmp_path, broker.port)
    agent = Agent(cfg, clock=clock)
    agent.start()
    try:
        # The start-up health message (made before the link was up) at HQ: the connection is in use.
        wait_for(lambda: bool(hq.db.read("SELECT 1 FROM streams WHERE stream = 'health' AND applied > 0")), 10,
                 "the agent's first health message at HQ")

        def applied() -> int:
            rows = hq.db.read("SELECT applied, historical FROM streams WHERE stream = 'inventory/delta'")
            return rows[0][0] if rows else 0

        agent.book.apply([Delta(clock.now(), "salesfloor", GTIN, 1)])
        wait_for(lambda: applied() == 1, 10, "the first delta at HQ")
        clock.step(-3600.0)  # the wall clock jumps an hour back while connected
        for i in range(5):
            agent.book.apply([Delta(clock.now(), "salesfloor", GTIN, 1)])
            wait_for(lambda i=i: applied() == i + 2, 10, "each live delta at HQ")
        hist = hq.db.read("SELECT historical FROM streams WHERE stream = 'inventory/delta'")[0][0]
        assert hist == 0  # all were live; none waited in the outbox for a link
    finally:
        agent.stop(flush_timeout=2.0)
        hq.stop()


def test_hq_reorder_window_runs_on_the_monotonic_clock(tmp_path: Path, hq_backend: HqBackend) -> None:
    wall = VirtualClock(T0)
    mono = [100.0]
    ob = Outbox(tmp_path / "agent.db", wall)
    book = InventoryBook(ob, wall)
    msgs = []
    for k in range(3):
        book.apply([Delta(T0 + k, "salesfloor", GTIN, 1)])
        msgs.append(ob.seal("inventory/delta"))
    hq = HqApplier(hq_backend.store(), wall, prefix="retail/v1", reorder_window_s=2.0,
                   monotonic=lambda: mono[0])
    topic = "retail/v1/S001/inventory/delta"
    hq.receive(topic, msgs[0].payload("S001", T0, False))  # type: ignore[union-attr]
    hq.receive(topic, msgs[2].payload("S001", T0, False))  # type: ignore[union-attr]  # seq 2 is missing
    wall.advance(7200.0)  # the wall clock leaps two hours: no window has run out for that
    assert hq.tick() == []
    mono[0] += 2.5  # 2.5 s really passed
    (cmd,) = hq.tick()
    assert cmd.topic == "retail/v1/S001/cmd/replay" and b'"from_seq":2' in cmd.payload
    hq.db.close()
    ob.close()
