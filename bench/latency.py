"""Online latency, enqueue at the agent -> applied at HQ, at a steady rate (default 1,000 facts/s).

Agent in this process; HQ receiver in its own process (``bench/_hq_probe.py``: the reference
HqReceiver plus an on_applied callback that logs every applied message); real mosquitto. Both
processes read the same wall clock (time.time()).

Per-fact latency is exact: the bench records each fact's enqueue time (just before
InventoryBook.apply), and since the inventory/delta stream starts at seq 1 on a fresh outbox and
seals facts in order, message seq k holds the facts numbered after the first k-1 messages' facts.
The fact is "applied" when HQ's apply transaction has committed (the callback's time); the figures
from Applied.at (taken inside the transaction, before COMMIT) are printed too.

Two runs by default, figures named after the batch size: ``latency_b10_*`` with facts applied 10 at a
time (a source at 1,000 facts/s flushing every 10 ms: 100 transactions/s) and ``latency_b1_*`` with
every fact its own transaction (1,000 transactions/s: the worst case, every fact pays its own fsyncs).

    python bench/latency.py                          # full size: 1,000 facts/s, 30 s per run
    python bench/latency.py --seconds 3              # CI size
    python bench/latency.py --batches 1              # one run, one fact per transaction
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import psutil
from _common import (
    DELTA_CHOICES,
    ZONES,
    Background,
    HqProcess,
    agent_config,
    emit,
    header,
    note,
    percentile,
    signing_tables,
    wait_for,
)

from edge_agent.agent import Agent
from edge_agent.inventory.book import Delta
from simulators.inventory_feed import gtin_for
from simulators.mosquitto import Mosquitto


def run(a: argparse.Namespace, batch_size: int, name: str) -> None:
    """One measurement with a fresh broker, HQ and agent; figures are prefixed with ``name``."""
    rng = random.Random(1)
    gtins = [gtin_for(i) for i in range(200)]
    bg = Background()
    background = float("nan")
    cpu: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-latency-", dir=a.workdir) as tmp:
        workdir = Path(tmp)
        broker = Mosquitto(workdir=workdir / "mosquitto").start()
        agent_signing, hq_signing = signing_tables(workdir) if a.sign else ({}, {})
        hq = HqProcess(workdir, broker.port, probe=True, signing=hq_signing).start()
        agent = Agent(agent_config(workdir, broker.port, agent_signing, synchronous=a.synchronous))
        enq: list[float] = []
        committed: list[float] = []
        published: dict[int, float] = {}
        publish = agent.uplink._publish

        def timed_publish(msg):  # type: ignore[no-untyped-def]
            # Bench-only instrumentation: when each message left the pump (sealed and handed to paho).
            ok = publish(msg)
            if ok and msg.stream == "inventory/delta":
                published.setdefault(msg.seq, time.time())
            return ok

        agent.uplink._publish = timed_publish  # type: ignore[method-assign]
        try:
            agent.start()
            wait_for(hq.online, 30, "HQ to subscribe and see the agent online")
            time.sleep(0.5)
            procs = {"agent": psutil.Process(), "hq": psutil.Process(hq.pid)}
            cpu0 = {k: sum(v.cpu_times()[:2]) for k, v in procs.items()}
            total = int(a.rate * a.seconds)
            interval = batch_size / a.rate
            t0 = time.monotonic()
            late = 0
            while len(enq) < total:
                due = t0 + len(enq) / batch_size * interval
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                elif delay < -interval:
                    late += 1
                k = min(batch_size, total - len(enq))
                now = time.time()
                batch = [Delta(now, rng.choice(ZONES), rng.choice(gtins), rng.choice(DELTA_CHOICES)) for _ in range(k)]
                agent.book.apply(batch, cursor=("bench", len(enq) + k))
                enq.extend([now] * k)
                committed.extend([time.time()] * k)
            t_prod = time.monotonic() - t0
            wait_for(lambda: hq.facts() >= total, 60, "HQ to apply every fact")
            wall = time.monotonic() - t0
            cpu = {k: (sum(v.cpu_times()[:2]) - cpu0[k]) / wall * 100 for k, v in procs.items()}
            background = bg.other_pct()
        finally:
            agent.stop(flush_timeout=2.0)
            hq.stop()  # the probe writes its log on exit
            broker.stop()

        rows = []
        for line in hq.applied_path.read_text().splitlines():
            stream, seq, facts, ts, at, done = line.split()
            if stream == "inventory/delta":
                rows.append((int(seq), int(facts), float(ts), float(at), float(done)))
        rows.sort()
        lat_done: list[float] = []
        lat_at: list[float] = []
        seg_commit: list[float] = []
        seg_publish: list[float] = []
        seg_hq: list[float] = []
        seg_hq_commit = sorted((r[4] - r[3]) * 1000 for r in rows)
        i = 0
        bad = 0
        skip_until = enq[0] + a.warmup if enq else 0
        for seq, facts, ts, at, done in rows:
            if abs(ts - enq[i]) > 0.0011:  # Applied.ts is the first fact's time, to the millisecond
                bad += 1
            for j in range(i, i + facts):
                if enq[j] >= skip_until:
                    lat_done.append((done - enq[j]) * 1000)
                    lat_at.append((at - enq[j]) * 1000)
                    seg_commit.append((committed[j] - enq[j]) * 1000)
                    if seq in published:
                        seg_publish.append((published[seq] - committed[j]) * 1000)
                        seg_hq.append((done - published[seq]) * 1000)
            i += facts
        if i != len(enq) or [r[0] for r in rows] != list(range(1, len(rows) + 1)):
            note(f"MISMATCH: HQ applied {i} facts in seqs {rows[0][0] if rows else None}..; {len(enq)} enqueued")
        lat_done.sort()
        lat_at.sort()
        emit(f"{name}_facts", len(lat_done))
        emit(f"{name}_offered_facts_per_s", len(enq) / t_prod)
        emit(f"{name}_messages", len(rows))
        emit(f"{name}_facts_per_message", i / max(1, len(rows)))
        emit(f"{name}_p50_ms", percentile(lat_done, 50))
        emit(f"{name}_p90_ms", percentile(lat_done, 90))
        emit(f"{name}_p99_ms", percentile(lat_done, 99))
        emit(f"{name}_p999_ms", percentile(lat_done, 99.9))
        emit(f"{name}_max_ms", lat_done[-1] if lat_done else float("nan"))
        emit(f"{name}_at_p50_ms", percentile(lat_at, 50))
        emit(f"{name}_at_p99_ms", percentile(lat_at, 99))
        for seg_name, seg in (("enqueue_commit", seg_commit), ("commit_to_publish", seg_publish),
                              ("publish_to_hq_commit", seg_hq)):
            seg.sort()
            emit(f"{name}_seg_{seg_name}_p50_ms", percentile(seg, 50))
            emit(f"{name}_seg_{seg_name}_p99_ms", percentile(seg, 99))
        emit(f"{name}_hq_commit_p50_ms", percentile(seg_hq_commit, 50))
        emit(f"{name}_hq_commit_p99_ms", percentile(seg_hq_commit, 99))
        emit(f"{name}_hq_commit_max_ms", seg_hq_commit[-1] if seg_hq_commit else float("nan"))
        for k, v in cpu.items():
            emit(f"{name}_cpu_{k}_pct", v)
        emit(f"{name}_producer_late_batches", late)
        emit(f"{name}_mapping_errors", bad)
        emit(f"{name}_background_cpu_pct", background)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=1000.0, help="facts per second")
    p.add_argument("--seconds", type=float, default=30.0, help="length of each run")
    p.add_argument("--batches", default="10,1",
                   help="facts per InventoryBook.apply, one run each (1 = every fact its own transaction)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of facts left out of the figures")
    p.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL")
    p.add_argument("--workdir", help="parent of the run's temp dir")
    p.add_argument("--sign", action="store_true", help="Ed25519 signatures on, required both ways")
    a = p.parse_args()
    batches = [int(x) for x in a.batches.split(",") if x.strip()]
    header("latency", sign=a.sign, rate=a.rate, seconds=a.seconds, batches=a.batches, synchronous=a.synchronous)
    for b in batches:
        run(a, b, f"latency_b{b}")


if __name__ == "__main__":
    main()
