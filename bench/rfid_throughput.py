"""RFID pipeline throughput on one core: raw reader JSON messages (Impinj IoT device interface arrays,
as readers send them) through validation, EPC decode, presence and inventory into the SQLite outbox.

The payloads are generated first (the simulator is not what is measured); then the pipeline of one
thread ingests them as fast as it can. Steady state: the store is read for a warm-up first, so most
reads refresh tags already present, while shoppers keep moving and buying items.

    python bench/rfid_throughput.py                    # 5,000 items, 60 cycles of 1 s (~270k reads)
    python bench/rfid_throughput.py --cycles 10        # CI size
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import emit, header, note

from edge_agent.clock import VirtualClock
from edge_agent.config import RfidConfig
from edge_agent.inventory.book import InventoryBook
from edge_agent.rfid.pipeline import RfidPipeline
from edge_agent.sync.outbox import Outbox
from simulators.rfid_reader import SimConfig, StoreSim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--cycles", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL")
    a = ap.parse_args()
    header("rfid_throughput", items=a.items, cycles=a.cycles, synchronous=a.synchronous)
    sim = StoreSim(SimConfig(seed=3, n_items=a.items, n_gtins=max(10, a.items // 12), purchase_per_h=400,
                             tryon_per_h=200))
    clock = VirtualClock(sim.now)
    work = Path(tempfile.mkdtemp(prefix="bench-rfid-tp-"))
    ob = Outbox(work / "outbox.db", clock, synchronous=a.synchronous)
    book = InventoryBook(ob, clock)
    cfg = RfidConfig(enabled=True, snapshot_interval_s=0,
                     antennas=[{k: x[k] for k in ("reader", "port", "zone")} for x in sim.layout()])
    pipe = RfidPipeline(cfg, book, ob, clock)
    for t, payloads in sim.run(a.warmup * sim.cfg.read_cycle_s):
        clock.set(t)
        for p in payloads:
            pipe.ingest(p)
        pipe.tick()
    cycles = [(t, list(p)) for t, p in sim.run(a.cycles * sim.cfg.read_cycle_s)]
    n_payloads = sum(len(p) for _, p in cycles)
    n_bytes = sum(len(x) for _, p in cycles for x in p)
    reads = events = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    for t, payloads in cycles:
        clock.set(t)
        for p in payloads:
            r = pipe.ingest(p)
            reads += r.reads
            events += r.events
        pipe.tick()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    note(f"{n_payloads} payloads, {n_bytes / 1e6:.1f} MB of JSON, {events} presence events, "
         f"{len(pipe.engine.tags)} tags tracked")
    emit("rfid_reads_per_s", reads / wall)
    emit("rfid_reads_per_cpu_s", reads / cpu)
    emit("rfid_us_per_read", wall / max(reads, 1) * 1e6)
    ob.close()


if __name__ == "__main__":
    main()
