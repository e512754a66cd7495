"""Outbox enqueue throughput, no network.

* book_apply_facts_per_s: inventory deltas through InventoryBook.apply in batches (the real path:
  book upsert + one pending row per delta + the source cursor, one transaction per batch).
* outbox_enqueue_facts_per_s: raw Outbox.enqueue of ready-made Facts (JSON bodies prebuilt).
* seal_facts_per_s: sealing the enqueued facts into messages (what the uplink does), for context.

    python bench/outbox_enqueue.py                       # full size: 1,000,000 facts each
    python bench/outbox_enqueue.py --facts 20000         # CI size
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import Background, DeltaPool, emit, header, note

from edge_agent.clock import RealClock
from edge_agent.inventory.book import InventoryBook
from edge_agent.sync.outbox import Fact, Outbox


def make_outbox(workdir: Path, name: str, synchronous: str) -> Outbox:
    return Outbox(workdir / f"{name}.db", RealClock(), cap_bytes=1 << 40, synchronous=synchronous)


def bench_book(workdir: Path, facts: int, batch: int, synchronous: str, max_s: float) -> tuple[float, int]:
    outbox = make_outbox(workdir, f"book-{batch}", synchronous)
    book = InventoryBook(outbox, RealClock())
    pool = DeltaPool(batch)
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + max_s
    while n < facts and time.perf_counter() < deadline:
        n += len(b := pool.next())
        book.apply(b, cursor=("bench", n))
    dt = time.perf_counter() - t0
    outbox.close()
    return n / dt, n


def bench_raw(workdir: Path, facts: int, batch: int, synchronous: str, max_s: float) -> tuple[float, float, int]:
    outbox = make_outbox(workdir, f"raw-{batch}", synchronous)
    pool = DeltaPool(batch)
    ready = [[Fact(ts=d.ts, body=d.to_json(), key=d.key) for d in b] for b in pool.batches]
    n = 0
    i = 0
    t0 = time.perf_counter()
    deadline = t0 + max_s
    while n < facts and time.perf_counter() < deadline:
        b = ready[i % len(ready)]
        i += 1
        outbox.enqueue("inventory/delta", b)
        n += len(b)
    dt = time.perf_counter() - t0
    # Seal everything (as the uplink does, one message at a time up to the byte bound).
    sealed = 0
    t1 = time.perf_counter()
    deadline = t1 + max_s
    while time.perf_counter() < deadline:
        msg = outbox.seal("inventory/delta")
        if msg is None:
            break
        sealed += msg.facts
    dts = time.perf_counter() - t1
    outbox.close()
    return n / dt, sealed / dts if dts else 0.0, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--facts", type=int, default=1_000_000, help="facts per measurement")
    p.add_argument("--batch", type=int, default=500, help="facts per transaction")
    p.add_argument("--sweep", default="1,20,200", help="extra book.apply batch sizes to report ('' = none)")
    p.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL")
    p.add_argument("--max-seconds", type=float, default=120.0, help="bound on each measurement")
    p.add_argument("--workdir", help="where the databases go (default: a fresh temp dir)")
    a = p.parse_args()
    header("outbox_enqueue", facts=a.facts, batch=a.batch, synchronous=a.synchronous)
    bg = Background()
    with tempfile.TemporaryDirectory(prefix="bench-enqueue-", dir=a.workdir) as tmp:
        workdir = Path(tmp)
        rate, n = bench_book(workdir, a.facts, a.batch, a.synchronous, a.max_seconds)
        emit("book_apply_facts_per_s", rate)
        if n < a.facts:
            note(f"book.apply stopped at {n} facts (time bound)")
        raw, seal, n = bench_raw(workdir, a.facts, a.batch, a.synchronous, a.max_seconds)
        emit("outbox_enqueue_facts_per_s", raw)
        emit("outbox_seal_facts_per_s", seal)
        for b in [int(x) for x in a.sweep.split(",") if x.strip()]:
            # Small batches are commit-bound (one fsync each): measure them over fewer facts.
            size = min(a.facts, max(2000, b * 2000))
            rate, n = bench_book(workdir, size, b, a.synchronous, min(a.max_seconds, 30.0))
            emit(f"book_apply_facts_per_s_batch{b}", rate)
    emit("outbox_background_cpu_pct", bg.other_pct())


if __name__ == "__main__":
    main()
