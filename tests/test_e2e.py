"""End to end: simulator -> agent (subprocess) -> real mosquitto -> HQ receiver; HQ equals the truth."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulators.inventory_feed import InventoryFeed
from simulators.mosquitto import Mosquitto

from .helpers import AgentProcess, HqBackend, agent_config, start_hq, wait_for

ZONES = ["backroom", "salesfloor", "fitting-room", "pos"]


@pytest.mark.slow
def test_hq_equals_ground_truth(tmp_path: Path, broker: Mosquitto, hq_backend: HqBackend) -> None:
    total = 20_000
    cfg = agent_config(tmp_path, broker.port, sim={"seed": 7, "total": total, "rate_per_s": 20_000, "batch": 200,
                                                   "zones": ZONES, "gtins": 40})
    hq = start_hq(tmp_path, broker.port, **hq_backend.config())
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    truth = InventoryFeed(7, ZONES, 40).truth(total)
    try:
        wait_for(lambda: hq.db.inventory("S001") == truth, 60, "HQ inventory to equal the ground truth")
        stats = {s["stream"]: s for s in hq.db.stream_stats()}
        assert stats["inventory/delta"]["gaps"] == 0
        assert stats["inventory/delta"]["facts"] == total
    finally:
        assert agent.terminate() == 0
        hq.stop()
