"""Chaos: break the system on purpose and check the guarantees of DESIGN.md still hold.

Every test runs against a real mosquitto on a free 127.0.0.1 port (the ``broker`` fixture), real
SQLite files and, where a process has to die, real subprocesses killed with SIGKILL.
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.clock import rfc3339
from edge_agent.config import AgentConfig
from edge_agent.contract import TrafficHeatmapItem, TrafficStatsItem
from edge_agent.hq.receiver import HqReceiver
from edge_agent.inventory.book import Delta
from edge_agent.sync.compaction import heatmap_key, stats_key
from edge_agent.sync.outbox import Fact
from simulators.inventory_feed import InventoryFeed, gtin_for
from simulators.mosquitto import Mosquitto, free_port

from .helpers import AgentProcess, CuttableLink, HqProcess, agent_config, start_hq, wait_for

ZONES = ["backroom", "salesfloor", "fitting-room", "pos"]
DELTA = "inventory/delta"


def sim(seed: int, total: int, rate: float, batch: int, gtins: int = 40) -> dict[str, Any]:
    return {"seed": seed, "total": total, "rate_per_s": rate, "batch": batch, "zones": ZONES, "gtins": gtins}


def feed_position(outbox: Path) -> int:
    """How many deltas of the simulated feed the agent has committed to its book so far."""
    rows = read_db(outbox, "SELECT position FROM source_cursors WHERE source = 'sim-inventory'")
    return rows[0][0] if rows else 0


def delta_stats(hq: HqReceiver, store: str = "S001") -> dict[str, Any]:
    return next((s for s in hq.db.stream_stats() if s["store"] == store and s["stream"] == DELTA), {})


def read_db(path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Read another process's SQLite file (WAL mode, so readers never block its writer)."""
    if not path.exists():
        return []
    conn = sqlite3.connect(path, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:  # schema not created yet
        return []
    finally:
        conn.close()


def assert_exactly_once(hq: HqReceiver, truth: dict[tuple[str, str], int], total: int) -> dict[str, Any]:
    """HQ holds the ground truth, and every delta of the feed was applied exactly once."""
    wait_for(lambda: hq.db.inventory("S001") == truth, 60, "HQ inventory to equal the ground truth")
    st = delta_stats(hq)
    # No compaction runs below the cap, so each applied fact is one delta of the feed: more than
    # ``total`` would mean a double apply; a gap would have been papered over by a snapshot.
    assert st["facts"] == total, st
    assert st["gaps"] == 0 and st["lost"] == 0, st
    assert hq.db.read("SELECT count(*) FROM stash")[0][0] == 0
    assert hq.db.read("SELECT count(*) FROM rejected")[0][0] == 0
    return st


# ---------------------------------------------------------------------------- 1. broker outage


@pytest.mark.slow
def test_broker_outage_loses_nothing_and_backlog_is_historical(tmp_path: Path, broker: Mosquitto) -> None:
    total = 24_000
    cfg = agent_config(tmp_path, broker.port, sim=sim(11, total, 3_000, 60))
    hq = start_hq(tmp_path, broker.port)
    wait_for(lambda: hq.conn.connected.is_set(), 10, "HQ to connect")
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    truth = InventoryFeed(11, ZONES, 40).truth(total)
    try:
        wait_for(lambda: delta_stats(hq).get("facts", 0) >= 3_000, 20, "deltas flowing before the outage")
        broker.stop()
        made_at_stop = feed_position(tmp_path / "outbox-S001.db")
        time.sleep(2.5)  # ~7500 deltas are made while the uplink is cut
        made_in_outage = feed_position(tmp_path / "outbox-S001.db") - made_at_stop
        assert made_in_outage > 1_000 and made_at_stop < total, (made_at_stop, made_in_outage)  # really mid-run
        assert agent.alive
        broker.start()
        st = assert_exactly_once(hq, truth, total)
        # The backlog went out marked historical; the live traffic before the outage did not.
        assert st["historical"] > 0, st
        assert st["historical"] < st["applied"], st
        assert agent.alive
    finally:
        assert agent.terminate() == 0
        hq.stop()


# ---------------------------------------------------------------------------- 2. agent kill -9


@pytest.mark.slow
def test_agent_kill9_at_random_moments(tmp_path: Path, broker: Mosquitto) -> None:
    rng = random.Random(20_240_917)
    total = 50_000  # about 40k are made during the rounds at this rate
    cfg = agent_config(tmp_path, broker.port, sim=sim(23, total, 2_000, 40))
    hq = start_hq(tmp_path, broker.port)
    wait_for(lambda: hq.conn.connected.is_set(), 10, "HQ to connect")
    truth = InventoryFeed(23, ZONES, 40).truth(total)
    outbox = tmp_path / "outbox-S001.db"
    kinds: Counter[str] = Counter()
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    try:
        for _ in range(24):
            down = rng.random() < 0.4
            if down and broker.running:
                broker.stop()
            elif not down and not broker.running:
                broker.start()
            agent.start().wait_started()
            time.sleep(rng.uniform(0.3, 1.5))
            assert agent.alive, f"agent died on its own; log: {agent.log}"
            agent.kill9()
            kinds["down" if down else "up"] += 1
        assert kinds["down"] >= 5 and kinds["up"] >= 5, kinds
        made = feed_position(outbox)
        assert 0 < made < total, made  # the rounds really interrupted the feed
        if not broker.running:
            broker.start()
        agent.start()
        assert_exactly_once(hq, truth, total)
        assert agent.alive
    finally:
        if agent.alive:
            assert agent.terminate() == 0
        hq.stop()


# ---------------------------------------------------------------------------- 3. HQ restarts


@pytest.mark.slow
def test_hq_receiver_restart_and_kill9(tmp_path: Path, broker: Mosquitto) -> None:
    total = 30_000
    cfg = agent_config(tmp_path, broker.port, sim=sim(31, total, 2_500, 50))
    hq = start_hq(tmp_path, broker.port)
    wait_for(lambda: hq.conn.connected.is_set(), 10, "HQ to connect")
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    truth = InventoryFeed(31, ZONES, 40).truth(total)
    proc: HqProcess | None = None
    try:
        wait_for(lambda: delta_stats(hq).get("facts", 0) >= 2_000, 20, "deltas flowing")
        # A clean restart: the broker queues for HQ's persistent session meanwhile.
        hq.stop()
        time.sleep(1.0)
        hq = start_hq(tmp_path, broker.port)
        wait_for(lambda: delta_stats(hq).get("facts", 0) >= 8_000, 20, "deltas flowing after the restart")
        hq.stop()
        # The same receiver as a process, killed with SIGKILL while it is applying.
        proc = p = HqProcess(tmp_path, broker.port).start()
        before = p.facts()
        wait_for(lambda: p.facts() >= before + 3_000, 20, "the HQ process to apply deltas")
        p.kill9()
        killed_at = p.facts()
        assert killed_at < total, "HQ was killed after the feed was complete"
        time.sleep(0.5)
        hq = start_hq(tmp_path, broker.port)
        assert_exactly_once(hq, truth, total)
        assert agent.alive
    finally:
        if proc is not None:
            proc.kill9()
        assert agent.terminate() == 0
        hq.stop()


# ---------------------------------------------------------------------------- 4. disk cap


def heatmap_item(rng: random.Random, camera: str, t: float) -> str:
    cols, rows = 32, 24
    item = {"camera": camera, "bucket_start": rfc3339(t), "bucket_s": 60, "cell_m": 0.5, "cols": cols,
            "rows": rows, "cells": [rng.randrange(100) for _ in range(cols * rows)]}
    return json.dumps(item, separators=(",", ":"))


def stats_item(rng: random.Random, camera: str, zone: str, t: float) -> str:
    entries = rng.randrange(30)
    hist = [rng.randrange(10) for _ in range(6)]
    item = {"camera": camera, "zone": zone, "bucket_start": rfc3339(t), "bucket_s": 60, "entries": entries,
            "exits": rng.randrange(30), "occupancy_min": 0.0, "occupancy_avg": round(rng.uniform(0, 8), 3),
            "occupancy_max": float(rng.randrange(8, 20)), "visits": entries,
            "dwell_edges_s": [10.0, 30.0, 60.0, 120.0, 300.0], "dwell_hist": hist, "dwell_median_s": 45.0}
    return json.dumps(item, separators=(",", ":"))


@pytest.mark.slow
def test_disk_cap_during_long_outage(tmp_path: Path, broker: Mosquitto) -> None:
    cap = 2 * 1024 * 1024
    store = "S004"
    cfg = AgentConfig.model_validate(
        {
            "store": {"id": store},
            "mqtt": {"port": broker.port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5, "connect_timeout_s": 2.0},
            "outbox": {"path": str(tmp_path / f"outbox-{store}.db"), "cap_bytes": cap, "cap_check_interval_s": 0.1},
            "health": {"interval_s": 2.0},
        }
    )
    hq = start_hq(tmp_path, broker.port)
    wait_for(lambda: hq.conn.connected.is_set(), 10, "HQ to connect")  # its session outlives the outage
    broker.stop()
    agent = Agent(cfg)
    agent.start()
    rng = random.Random(4)
    cameras = [f"cam-{i:02d}" for i in range(32)]
    gtins = [gtin_for(i) for i in range(50)]
    expected: Counter[tuple[str, str]] = Counter()
    day0 = 1_764_547_200.0  # 2025-12-01T00:00:00Z: a month-long outage, one chunk per day
    enqueued = max_chunk = peak_used = peak_file = 0
    try:
        for day in range(30):
            chunk = 0
            # Inventory keeps moving all day; the same (zone, GTIN) recurs, so it compacts losslessly.
            for _ in range(5):
                deltas = [
                    Delta(day0 + day * 86_400 + rng.uniform(0, 86_400), rng.choice(ZONES), rng.choice(gtins),
                          rng.choice((1, 1, 2, 3, -1, -1, -2)))
                    for _ in range(100)
                ]
                agent.book.apply(deltas)
                for d in deltas:
                    expected[(d.zone, d.gtin)] += d.delta
                chunk += sum(len(d.to_json()) for d in deltas)
            # Analytics: 60-second buckets at a few busy minutes of the day, per camera.
            heatmaps, stats = [], []
            for minute in sorted(rng.sample(range(8 * 60, 21 * 60), 5)):
                t = day0 + day * 86_400 + minute * 60
                for cam in cameras:
                    h = heatmap_item(rng, cam, t)
                    s = stats_item(rng, cam, rng.choice(ZONES), t)
                    TrafficHeatmapItem.model_validate_json(h)
                    TrafficStatsItem.model_validate_json(s)
                    heatmaps.append(Fact(ts=t, body=h, key=heatmap_key(json.loads(h))))
                    stats.append(Fact(ts=t, body=s, key=stats_key(json.loads(s))))
            agent.outbox.enqueue("traffic/heatmap", heatmaps)
            agent.outbox.enqueue("traffic/stats", stats)
            chunk += sum(len(f.body) for f in heatmaps + stats)
            enqueued += chunk
            max_chunk = max(max_chunk, chunk)
            peak_used = max(peak_used, agent.outbox.used_bytes())
            peak_file = max(peak_file, agent.outbox.path.stat().st_size)
            # Housekeeping (not the test) enforces the cap.
            wait_for(lambda: agent.outbox.used_bytes() <= cap, 20, "housekeeping to enforce the cap", every=0.05)
            peak_file = max(peak_file, agent.outbox.path.stat().st_size)
        assert not agent.uplink.connected
        assert enqueued > 5 * cap, enqueued  # well past the cap
        assert agent.outbox.used_bytes() <= cap
        # Between two housekeeping rounds the outbox overshoots by at most what was written meanwhile
        # (a day's chunk of JSON, under 2x in SQLite pages); the file itself stays within twice the cap.
        assert peak_used <= cap + 2 * max_chunk, (peak_used, max_chunk)
        assert peak_file <= 2 * cap, peak_file
        counters = agent.outbox.counters()
        assert counters.get("dropped.traffic/heatmap", 0) > 0, counters
        assert counters.get("compacted", 0) > 0, counters
        assert "dropped.inventory/delta" not in counters, counters

        broker.start()
        truth = {k: v for k, v in expected.items() if v != 0}
        wait_for(lambda: hq.db.inventory(store) == truth, 60, "HQ inventory to equal the sum of the deltas")

        dropped = counters["dropped.traffic/heatmap"]

        def reported_drops() -> list[int]:
            bodies = [json.loads(b) for (b,) in hq.db.read(
                "SELECT body FROM telemetry WHERE store = ? AND stream = 'health'", (store,))]
            return [b["dropped_facts"].get("traffic/heatmap", 0) for b in bodies]

        # The health report made after the last drop carries the full count up to HQ.
        wait_for(lambda: dropped in reported_drops(), 30, f"a health message reporting {dropped} dropped heatmaps")
        assert max(reported_drops()) == dropped
        assert agent.outbox.counters().get("dropped.traffic/heatmap") == dropped  # nothing dropped once online
        # Housekeeping gives the drained pages back: the file does not keep the outage's size.
        wait_for(lambda: agent.outbox.file_bytes() < peak_file / 2, 20, "the outbox file to shrink after the drain")
        # What survived (coarsened or not) is still valid under the contract: HQ rejected nothing.
        assert hq.db.read("SELECT count(*) FROM rejected")[0][0] == 0
    finally:
        agent.stop(flush_timeout=2.0)
        hq.stop()


# ---------------------------------------------------------------------------- 5. corrupt database


def test_cap_pressure_floods_neither_health_nor_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A book bigger than the cap is no pressure at all. Undroppable inventory over the cap through an
    outage is one warning and one alert, and at most one forced health message per health interval,
    however often housekeeping runs."""
    cap, interval = 256 * 1024, 1.0
    cfg = AgentConfig.model_validate(
        {
            "store": {"id": "S005"},
            "mqtt": {"port": free_port(), "reconnect_min_s": 0.5, "reconnect_max_s": 1.0},  # nobody listens
            "outbox": {"path": str(tmp_path / "outbox.db"), "cap_bytes": cap, "cap_check_interval_s": 0.02},
            "health": {"interval_s": interval},
        }
    )
    agent = Agent(cfg)
    ob = agent.outbox
    t = 1_764_547_200.0
    for start in range(0, 20_000, 1000):  # a book of 20,000 (zone, GTIN) rows, every delta delivered
        agent.book.apply([Delta(t, ZONES[i % 4], gtin_for(i), 1) for i in range(start, start + 1000)])
    while (m := ob.seal(DELTA)) is not None:
        ob.ack_through(m.stream, m.seq, m.id)
    assert ob.disk_use().book > 2 * cap

    def health_messages() -> int:
        return ob.read("SELECT count(*) FROM pending WHERE stream = 'health'")[0][0]

    def cap_warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "cap" in r.getMessage()]

    with caplog.at_level(logging.INFO):
        agent.start()
        try:
            time.sleep(3 * interval)
            assert health_messages() <= 4  # at start, then once an interval
            assert cap_warnings() == []
            assert ob.read("SELECT count(*) FROM alerts") == [(0,)]

            before = health_messages()
            agent.book.apply([Delta(t, "backroom", gtin_for(20_000 + i), 1) for i in range(6000)])  # undroppable
            assert ob.disk_use().queued > cap
            time.sleep(3 * interval)  # 150 housekeeping rounds over the cap
            # Once an interval, plus at most one forced an interval, plus the alert's own report.
            assert health_messages() - before <= 2 * 3 + 2
            warned = cap_warnings()
            assert len(warned) == 2 and "outbox over its cap" in warned[0] and "cap_exceeded" in warned[1], warned
            assert [k for (k,) in ob.read("SELECT kind FROM alerts")] == ["outbox.cap_exceeded"]
        finally:
            agent.stop(flush_timeout=0.1)


@pytest.mark.slow
def test_corrupt_outbox_is_moved_aside_and_agent_carries_on(tmp_path: Path, broker: Mosquitto) -> None:
    total = 6_000
    cfg = agent_config(tmp_path, broker.port, sim=sim(5, total, 5_000, 100))
    garbage = b"not a database" * 1000
    outbox = tmp_path / "outbox-S001.db"
    outbox.write_bytes(garbage)
    hq = start_hq(tmp_path, broker.port)
    wait_for(lambda: hq.conn.connected.is_set(), 10, "HQ to connect")
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    truth = InventoryFeed(5, ZONES, 40).truth(total)
    try:
        wait_for(lambda: hq.db.inventory("S001") == truth, 60, "HQ inventory to equal the ground truth")

        def corrupt_alerts() -> list[dict]:
            bodies = [json.loads(b) for (b,) in hq.db.read("SELECT body FROM telemetry WHERE stream = 'health'")]
            return [a for b in bodies for a in b["alerts"] if a["kind"] == "outbox.corrupt"]

        wait_for(lambda: bool(corrupt_alerts()), 30, "a health message with the outbox.corrupt alert")
        moved = [p for p in tmp_path.glob("outbox-S001.db.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]
        assert len(moved) == 1, moved
        main = moved[0]
        assert main.read_bytes() == garbage  # moved aside intact, not deleted or rewritten
        assert main.name in corrupt_alerts()[0]["message"]
        assert outbox.read_bytes()[:16] == b"SQLite format 3\x00"  # a fresh outbox took its place
        # Its numbers start far ahead so HQ resyncs; its birth message says where, so HQ counts no loss.
        wait_for(lambda: all(s["last_seq"] > 10**9 for s in hq.db.stream_stats() if s["stream"] == "health"), 30,
                 "HQ to skip to the rebuilt outbox's numbers")
        assert [s for s in hq.db.stream_stats() if s["lost"]] == []
        assert agent.alive
    finally:
        assert agent.terminate() == 0
        hq.stop()


# ---------------------------------------------------------------------------- 6. network cut


@pytest.mark.slow
def test_network_cut_loses_nothing_in_flight(tmp_path: Path, broker: Mosquitto) -> None:
    """Messages the broker never acknowledged (lost on a dead link) are resent, not forgotten."""
    total = 20_000
    link = CuttableLink(broker.port)
    cfg = agent_config(tmp_path, link.port, sim=sim(43, total, 4_000, 40), outbox={"inflight_window": 8, "ack_window": 8})
    outbox = tmp_path / "outbox-S001.db"
    hq = start_hq(tmp_path, broker.port)
    wait_for(lambda: hq.conn.connected.is_set(), 10, "HQ to connect")
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    truth = InventoryFeed(43, ZONES, 40).truth(total)
    try:
        wait_for(lambda: delta_stats(hq).get("facts", 0) >= 3_000, 20, "deltas flowing before the cut")
        assert link.cut() == 1
        made_at_cut = feed_position(outbox)
        # The agent does not notice: it fills its in-flight window with messages that go nowhere.
        def sealed_deltas() -> int:
            return read_db(outbox, "SELECT count(*) FROM sealed WHERE stream = ?", (DELTA,))[0][0]

        wait_for(lambda: sealed_deltas() >= 8, 10, "the window to fill up on the dead link")
        time.sleep(1.0)
        sealed = sealed_deltas()
        pending = read_db(outbox, "SELECT count(*) FROM pending")[0][0]
        # Only the window (messages HQ has not acknowledged) is sealed while the link is dead; the rest
        # stays pending (compactable).
        assert sealed <= 8, sealed
        assert pending > 0 and feed_position(outbox) > made_at_cut, (pending, made_at_cut)
        link.drop()
        st = assert_exactly_once(hq, truth, total)
        assert st["historical"] > 0, st
        assert agent.alive
    finally:
        assert agent.terminate() == 0
        hq.stop()
        link.close()
