"""RFID inventory accuracy at HQ after a simulated trading day, against the simulator's exact truth.

The simulated store (simulators/rfid_reader.py: 5 readers, shoppers, restocking, deliveries, 10%
missed reads, 2% cross-reads, ghost reads, duplicate bursts) is replayed on a virtual clock through
the whole agent (pipeline -> outbox -> uplink) to a real mosquitto and the reference HQ receiver in
its own process. At closing time the store stops trading; once what is under way has settled, HQ's
inventory is compared with the truth:

- ``rfid_accuracy_keys`` share of (zone, GTIN) counts exactly right (target >= 0.998)
- ``rfid_item_count_error`` sum of |HQ - truth| over all keys / items on hand (target < 0.001)

Items at the exit are leaving the store: by definition not stock, so not compared.

    python bench/rfid_accuracy.py                         # full size: 5,000 items, 12 h day
    python bench/rfid_accuracy.py --items 500 --hours 1   # CI size
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import HqProcess, emit, header, mqtt_table, note, wait_for

from edge_agent.agent import Agent
from edge_agent.clock import VirtualClock
from edge_agent.config import AgentConfig
from simulators.mosquitto import Mosquitto
from simulators.rfid_reader import SimConfig, StoreSim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--gtins", type=int, default=400)
    ap.add_argument("--hours", type=float, default=12.0)
    ap.add_argument("--cycle", type=float, default=5.0, help="read cycle of every antenna, seconds")
    ap.add_argument("--miss", type=float, default=0.10)
    ap.add_argument("--cross", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    header("rfid_accuracy", items=a.items, hours=a.hours, cycle_s=a.cycle, miss=a.miss, cross=a.cross, seed=a.seed)
    sim = StoreSim(SimConfig(seed=a.seed, n_items=a.items, n_gtins=a.gtins, read_cycle_s=a.cycle,
                             miss_rate=a.miss, cross_read_rate=a.cross))
    clock = VirtualClock(sim.now)
    work = Path(tempfile.mkdtemp(prefix="bench-rfid-acc-"))
    broker = Mosquitto(workdir=work / "mosquitto").start()
    hq = HqProcess(work, broker.port).start()
    cfg = AgentConfig.model_validate({
        "store": {"id": "S001"},
        "mqtt": mqtt_table(broker.port),
        "outbox": {"path": str(work / "outbox.db")},
        "log": {"level": "WARNING"},
        "rfid": {
            "enabled": True,
            "snapshot_interval_s": 0,
            # Timeouts scale with the read cycle: a tag must be missed many cycles in a row to depart.
            "departure_timeout_s": max(120.0, 24 * a.cycle),
            "arrive_window_s": max(30.0, 6 * a.cycle),
            "recent_s": max(5.0, 2.5 * a.cycle),
            "silent_antenna_s": 3600.0,
            "antennas": [{k: x[k] for k in ("reader", "port", "zone")} for x in sim.layout()],
        },
    })
    agent = Agent(cfg, clock)
    agent.start()
    pipe = agent.rfid
    assert pipe is not None
    t0 = time.perf_counter()
    try:
        reads = sim.replay(lambda t: clock.set(max(t, clock.now())), lambda p: pipe.ingest(p).reads, pipe.tick,
                           a.hours * 3600, 900 + cfg.rfid.departure_timeout_s)
        elapsed = time.perf_counter() - t0
        book = {k: v for k, v in agent.book.levels().items() if v}
        wait_for(lambda: hq.inventory() == book, 120, "HQ to apply the whole day")
        got = hq.inventory()
        truth = sim.stock_truth()
        keys = set(truth) | set(got)
        exact = sum(1 for k in keys if truth.get(k, 0) == got.get(k, 0))
        err = sum(abs(truth.get(k, 0) - got.get(k, 0)) for k in keys)
        st = sim.stats
        note(f"{st['cycles']} cycles, {reads} reads in {elapsed:.0f} s; {sim.total()} items on hand; "
             f"{st['delivered']} delivered, {st['sold']} sold; health {pipe.health().get('rfid.ghosts_dropped')} "
             "ghosts dropped")
        emit("rfid_accuracy_keys", exact / max(len(keys), 1))
        emit("rfid_item_count_error", err / max(sum(truth.values()), 1))
        emit("rfid_keys_compared", len(keys))
        emit("rfid_reads_replayed", reads)
        emit("rfid_replay_reads_per_s", reads / elapsed)
        wrong = sorted((k, truth.get(k, 0), got.get(k, 0)) for k in keys if truth.get(k, 0) != got.get(k, 0))
        for k, want, have in wrong[:10]:
            note(f"mismatch {k}: truth {want}, HQ {have}")
    finally:
        agent.stop(flush_timeout=2)
        hq.stop()
        broker.stop()


if __name__ == "__main__":
    main()
