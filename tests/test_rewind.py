"""An outbox that goes back in time: its WAL's first frame overwritten, its WAL deleted, or the whole
file replaced by an older copy (a restored backup). SQLite opens each without complaint (a WAL whose
first frame fails its checksum is ignored, and so is a missing one), so seqs HQ already applied come
round again with other content. HQ must notice, count and alert, apply no seq twice, and converge to
the truth.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from simulators.inventory_feed import InventoryFeed
from simulators.mosquitto import Mosquitto

from .helpers import AgentProcess, HqBackend, agent_config, start_hq, wait_for
from .test_chaos import delta_stats

ZONES = ["backroom", "salesfloor", "fitting-room", "pos"]
DELTA = "inventory/delta"


def main_file_seq(outbox: Path, tmp: Path) -> int:
    """The delta seq the main database file holds on its own (what is left without the WAL)."""
    copy = tmp / "probe.db"
    shutil.copyfile(outbox, copy)
    conn = sqlite3.connect(copy)
    try:
        row = conn.execute("SELECT last FROM seqs WHERE stream = ?", (DELTA,)).fetchone()
    except sqlite3.OperationalError:  # not one checkpoint yet: the main file is still empty
        row = None
    finally:
        conn.close()
        copy.unlink()
    return row[0] if row else 0


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["wal-frame-overwritten", "wal-deleted", "older-copy"])
def test_rewound_outbox_is_detected_and_healed(
    tmp_path: Path, broker: Mosquitto, hq_backend: HqBackend, damage: str
) -> None:
    total = 16_000
    cfg = agent_config(tmp_path, broker.port, sim={"seed": 17, "total": total, "rate_per_s": 2_000, "batch": 40,
                                                     "zones": ZONES, "gtins": 40}, health={"interval_s": 1.0})
    outbox = tmp_path / "outbox-S001.db"
    hq = start_hq(tmp_path, broker.port, **hq_backend.config())
    wait_for(lambda: hq.conn.connected.is_set(), 10, "HQ to connect")
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    truth = InventoryFeed(17, ZONES, 40).truth(total)
    try:
        wait_for(lambda: delta_stats(hq).get("last_seq", 0) >= 20, 30, "deltas applied at HQ")
        if damage == "older-copy":
            backup = sqlite3.connect(tmp_path / "backup.db")
            live = sqlite3.connect(outbox)
            live.backup(backup)  # a consistent copy, as a nightly backup would take
            live.close()
            backup.close()
            copied_seq = main_file_seq(tmp_path / "backup.db", tmp_path)
            wait_for(lambda: delta_stats(hq).get("last_seq", 0) > copied_seq + 10, 30, "HQ to move past the copy")
        else:
            # Kill at a moment when HQ has applied seqs that only the WAL holds (after a first checkpoint).
            def wal_ahead() -> bool:
                on_disk = main_file_seq(outbox, tmp_path)
                return 0 < on_disk and delta_stats(hq).get("last_seq", 0) > on_disk + 2

            wait_for(wal_ahead, 30, "HQ to apply seqs that only the WAL holds")
        agent.kill9()
        applied_before = delta_stats(hq)["last_seq"]
        wal = Path(f"{outbox}-wal")
        Path(f"{outbox}-shm").unlink(missing_ok=True)
        if damage == "wal-frame-overwritten":
            with open(wal, "r+b") as f:  # the first frame: its 24-byte header and page, bytes 32-4152
                f.seek(32)
                f.write(b"\xa5" * 4120)
        elif damage == "wal-deleted":
            wal.unlink()
        else:
            wal.unlink(missing_ok=True)
            shutil.copyfile(tmp_path / "backup.db", outbox)
        assert main_file_seq(outbox, tmp_path) < applied_before  # the store really went back in time
        agent.start()

        wait_for(lambda: delta_stats(hq).get("rewinds", 0) >= 1, 30, "HQ to detect the rewind")
        wait_for(lambda: hq.db.inventory("S001") == truth, 90, "HQ inventory to equal the ground truth")
        st = delta_stats(hq)
        # No seq applied twice: as many applies as seqs, and none skipped.
        assert st["applied"] == st["last_seq"] and st["gaps"] == 0, st
        assert st["last_seq"] >= applied_before
        kinds = {a["kind"] for a in hq.db.alerts()}
        assert "store.rewind" in kinds, kinds

        def store_alerts() -> set[str]:
            return {a["kind"] for (b,) in hq.db.read("SELECT body FROM telemetry WHERE stream = 'health'")
                    for a in json.loads(b)["alerts"]}

        wait_for(lambda: "outbox.rewind" in store_alerts(), 30, "the store's own outbox.rewind alert at HQ")
        outcomes = [o for (o,) in hq.db.read("SELECT outcome FROM snapshots")]
        assert outcomes and set(outcomes) <= {"verified", "corrected", "stale"}, outcomes
        assert hq.db.read("SELECT count(*) FROM rejected")[0][0] == 0
        time.sleep(0.5)
        assert agent.alive
    finally:
        assert agent.terminate() == 0
        hq.stop()


@pytest.mark.slow
def test_cloned_box_is_detected_and_hq_converges_once_it_is_gone(
    tmp_path: Path, broker: Mosquitto, hq_backend: HqBackend
) -> None:
    """A second box started from a copy of the first one's outbox, under the same store id: the two take
    the broker session from each other in turn. HQ must say so, and heal once the clone is stopped."""
    total = 12_000
    sim = {"seed": 19, "total": total, "rate_per_s": 2_000, "batch": 40, "zones": ZONES, "gtins": 40}
    cfg_a = agent_config(tmp_path, broker.port, sim=sim, health={"interval_s": 1.0})
    hq = start_hq(tmp_path, broker.port, **hq_backend.config())
    wait_for(lambda: hq.conn.connected.is_set(), 10, "HQ to connect")
    a = AgentProcess(cfg_a, tmp_path / "agent-a.log").start()
    clone_dir = tmp_path / "clone"
    clone_dir.mkdir()
    b: AgentProcess | None = None
    try:
        wait_for(lambda: delta_stats(hq).get("last_seq", 0) >= 20, 30, "deltas applied at HQ")
        backup = sqlite3.connect(clone_dir / "outbox-S001.db")
        live = sqlite3.connect(tmp_path / "outbox-S001.db")
        live.backup(backup)  # the SD card copied while the box runs
        live.close()
        backup.close()
        b = AgentProcess(agent_config(clone_dir, broker.port, sim=sim, health={"interval_s": 1.0}),
                         clone_dir / "agent-b.log").start()
        wait_for(lambda: any(a_["kind"] == "store.duplicate_identity" for a_ in hq.db.alerts()), 30,
                 "HQ to notice two agents under one store id")
        assert hq.state()["status"]["S001"]["identity_conflicts"] >= 1
        assert b.terminate() == 0
        b = None
        truth = InventoryFeed(19, ZONES, 40).truth(total)
        wait_for(lambda: hq.db.inventory("S001") == truth, 90, "HQ inventory to equal the ground truth")
        st = delta_stats(hq)
        assert st["applied"] == st["last_seq"] and st["gaps"] == 0, st  # no seq applied twice, none skipped
        assert a.alive
    finally:
        if b is not None:
            b.kill9()
        assert a.terminate() == 0
        hq.stop()
