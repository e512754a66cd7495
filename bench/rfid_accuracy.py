"""RFID inventory accuracy at HQ after a simulated trading day, against the simulator's exact truth.

The simulated store (simulators/rfid_reader.py: 5 readers, shoppers, restocking, deliveries, 10%
missed reads, 2% cross-reads, ghost reads, duplicate bursts) is replayed on a virtual clock through
the whole agent (pipeline -> outbox -> uplink) to a real mosquitto and the reference HQ receiver in
its own process. At closing time the store stops trading; once what is under way has settled, HQ's
inventory is compared with the truth:

- ``rfid_accuracy_keys`` share of (zone, GTIN) counts exactly right (target >= 0.998)
- ``rfid_item_count_error`` sum of |HQ - truth| over all keys / items on hand (target < 0.001)

Items at the exit are leaving the store: by definition not stock, so not compared.

The readers are not all alike (issue 13): r1 (backroom) identifies its antennas by name (Impinj
antennaIdentifier = antennaName), r3 (fitting room) is a Zebra IoT Connector reader whose messages are JSON
objects back to back, every Impinj reader purges a cycle's events now and then (``--overflow``, reported by an
overflowEvent), and ``--foreign`` of the items are other companies' products. Every read lost or foreign must be
accounted for in the agent's health, exactly:

- ``rfid_foreign_reads_injected`` / ``_counted``: reads of other companies' SGTINs sent / in rfid.foreign_reads.*
- ``rfid_overflow_events_injected`` / ``_counted`` and ``rfid_purged_reads_injected`` / ``_counted``
- ``rfid_accounting_exact``: 1 when both pairs match

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
    ap.add_argument("--overflow", type=float, default=0.002, help="P(an Impinj reader purges a cycle's events)")
    ap.add_argument("--foreign", type=float, default=0.01, help="share of items that are other companies' products")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    header("rfid_accuracy", items=a.items, hours=a.hours, cycle_s=a.cycle, miss=a.miss, cross=a.cross,
           overflow=a.overflow, foreign=a.foreign, seed=a.seed)
    sim = StoreSim(SimConfig(seed=a.seed, n_items=a.items, n_gtins=a.gtins, read_cycle_s=a.cycle,
                             miss_rate=a.miss, cross_read_rate=a.cross, name_readers=(BY_NAME,),
                             reader_formats=((ZEBRA, "zebra"),), zebra_concatenated=True,
                             overflow_rate=a.overflow, foreign_share=a.foreign))
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
            "antennas": [_antenna(x) for x in sim.layout()],
            "company_prefixes": list(sim.cfg.company_prefixes),
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
        h = pipe.health()
        counted = {
            "foreign_reads": sum(v for k, v in h.items() if k.startswith("rfid.foreign_reads.")),
            "overflow_events": h.get("rfid.ignored.overflow", 0.0),
            "purged_reads": sum(v for k, v in h.items() if k.startswith("rfid.reader_purged.")),
        }
        injected = {"foreign_reads": st["foreign_reads"], "overflow_events": st["overflows"], "purged_reads": st["purged"]}
        for name in counted:
            emit(f"rfid_{name}_injected", injected[name])
            emit(f"rfid_{name}_counted", int(counted[name]))
        emit("rfid_foreign_tags_counted", int(h["rfid.foreign_tags"]))
        emit("rfid_bad_reads", int(sum(v for k, v in h.items() if k.startswith("rfid.bad."))))
        emit("rfid_accounting_exact", int(all(counted[k] == injected[k] for k in counted)))
        wrong = sorted((k, truth.get(k, 0), got.get(k, 0)) for k in keys if truth.get(k, 0) != got.get(k, 0))
        for k, want, have in wrong[:10]:
            note(f"mismatch {k}: truth {want}, HQ {have}")
    finally:
        agent.stop(flush_timeout=2)
        hq.stop()
        broker.stop()


BY_NAME = "r1"  # identifies its antennas by name
ZEBRA = "r3"  # a Zebra reader: its events name it by MAC, several JSON objects back to back per message


def _antenna(x: dict) -> dict:
    """[[rfid.antennas]] for one simulated antenna, as each reader's set-up names it."""
    if x["reader"] == BY_NAME:
        return {"reader": x["reader"], "name": x["name"], "zone": x["zone"]}
    return {"reader": x["mac"] if x["reader"] == ZEBRA else x["reader"], "port": x["port"], "zone": x["zone"]}


if __name__ == "__main__":
    main()
