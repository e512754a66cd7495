"""End-to-end sustained throughput: inventory facts enqueued at the agent -> applied at HQ.

Agent (in this process: InventoryBook.apply -> SQLite outbox -> Uplink, QoS 1, sealed messages
deleted only when HQ's ack covers them; --sign adds Ed25519 signatures, required both ways) -> a real mosquitto on 127.0.0.1 -> the HQ receiver as its own process
(``python -m edge_agent.cli hq``), whose SQLite database is polled read-only. A producer thread
applies batches of deltas for --seconds (as fast as it can, or at --rate facts/s).
e2e_sustained_facts_per_s is HQ's applied rate over that time (after --warmup); if the producer is
faster, the backlog grows (e2e_backlog_end_facts) and drains after it stops. Then HQ's inventory is
checked against the truth.

    python bench/e2e_throughput.py                     # full size: 30 s of production
    python bench/e2e_throughput.py --seconds 3         # CI size
    python bench/e2e_throughput.py --rate 100000       # offered load instead of flat out
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import psutil
from _common import Background, DeltaPool, HqProcess, agent_config, emit, header, note, signing_tables, wait_for

from edge_agent.agent import Agent
from simulators.mosquitto import Mosquitto


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each of this process's threads, by thread name (threads with one name summed)."""
    names = {t.native_id: t.name.split("-")[0] if t.name.startswith("bench-producer") else t.name
             for t in threading.enumerate()}
    out: dict[str, float] = {}
    for t in psutil.Process().threads():
        name = names.get(t.id, "other")
        out[name] = out.get(name, 0.0) + t.user_time + t.system_time
    return out


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=30.0, help="how long the producer runs")
    p.add_argument("--rate", type=float, default=0.0, help="offered facts/s (0 = as fast as possible)")
    p.add_argument("--batch", type=int, default=500, help="deltas per InventoryBook.apply transaction")
    p.add_argument("--producers", type=int, default=1, help="source threads applying batches concurrently")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds left out of the steady-state HQ rate")
    p.add_argument("--inflight-window", type=int, default=32)
    p.add_argument("--max-message-bytes", type=int, default=128 * 1024)
    p.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL")
    p.add_argument("--drain-timeout", type=float, default=300.0)
    p.add_argument("--workdir", help="parent of the run's temp dir")
    p.add_argument("--sign", action="store_true", help="Ed25519 signatures on, required both ways")
    a = p.parse_args()
    header("e2e_throughput", sign=a.sign, seconds=a.seconds, rate=a.rate or "max", batch=a.batch, producers=a.producers,
           window=a.inflight_window,
           max_message_bytes=a.max_message_bytes, synchronous=a.synchronous)

    bg = Background()
    with tempfile.TemporaryDirectory(prefix="bench-e2e-", dir=a.workdir) as tmp:
        workdir = Path(tmp)
        broker = Mosquitto(workdir=workdir / "mosquitto").start()
        agent_signing, hq_signing = signing_tables(workdir) if a.sign else ({}, {})
        hq = HqProcess(workdir, broker.port, signing=hq_signing).start()
        agent = Agent(agent_config(workdir, broker.port, agent_signing, cap_bytes=1 << 40, inflight_window=a.inflight_window,
                                   max_message_bytes=a.max_message_bytes, synchronous=a.synchronous))
        try:
            agent.start()
            wait_for(hq.online, 30, "HQ to subscribe and see the agent online")
            pools = [DeltaPool(a.batch, seed=k + 1) for k in range(a.producers)]
            enqueued = [0] * a.producers
            stop = threading.Event()

            def produce(k: int) -> None:
                pool, n, rate = pools[k], 0, a.rate / a.producers
                t0 = time.monotonic()
                while not stop.is_set():
                    b = pool.next()
                    agent.book.apply(b, cursor=(f"bench-{k}", n + len(b)))
                    n += len(b)
                    enqueued[k] = n
                    if rate:
                        ahead = t0 + n / rate - time.monotonic()
                        if ahead > 0:
                            time.sleep(ahead)

            procs = {"agent": psutil.Process(), "hq": psutil.Process(hq.pid),
                     "broker": psutil.Process(broker.proc.pid)}  # type: ignore[union-attr]
            cpu0 = {k: cpu_s(v) for k, v in procs.items()}
            threads0 = thread_cpu()
            io0 = {k: v.io_counters().write_bytes for k, v in procs.items() if k != "broker"}
            producers = [threading.Thread(target=produce, args=(k,), name=f"bench-producer-{k}", daemon=True)
                         for k in range(a.producers)]
            t0 = time.monotonic()
            for t in producers:
                t.start()
            samples: list[tuple[float, int, int]] = []
            while time.monotonic() < t0 + a.seconds:
                time.sleep(0.1)
                samples.append((time.monotonic() - t0, sum(enqueued), hq.facts()))
            threads1, t_threads = thread_cpu(), time.monotonic() - t0
            stop.set()
            for t in producers:
                t.join(30)
            t_prod = time.monotonic() - t0
            total = sum(enqueued)
            t_done = wait_for(lambda: hq.facts() >= total, a.drain_timeout, "HQ to apply every fact", 0.01) - t0
            wall = time.monotonic() - t0
            cpu = {k: (cpu_s(v) - cpu0[k]) / wall * 100 for k, v in procs.items()}
            io = {k: procs[k].io_counters().write_bytes - v for k, v in io0.items()}
            wait_for(lambda: agent.outbox.sealed_count() == 0, 30, "HQ's last acks")

            steady = [s for s in samples if s[0] >= a.warmup]
            if len(steady) >= 2:
                (ta, _, fa), (tb, _, fb) = steady[0], steady[-1]
                hq_steady = (fb - fa) / (tb - ta)
            else:
                hq_steady = float("nan")
            backlog_end = samples[-1][1] - samples[-1][2] if samples else 0
            emit("e2e_facts_enqueued", total)
            emit("e2e_enqueue_facts_per_s", total / t_prod)
            # Sustained: HQ's applied rate while the producer keeps the pipeline full (warm-up left out).
            emit("e2e_sustained_facts_per_s", hq_steady)
            # Everything enqueued, divided by the time until HQ had applied the last of it.
            emit("e2e_all_applied_facts_per_s", total / t_done)
            emit("e2e_drain_after_producer_stop_s", t_done - t_prod)
            emit("e2e_backlog_max_facts", max((e - f for _, e, f in samples), default=0))
            emit("e2e_backlog_end_facts", backlog_end)
            if backlog_end > 0.1 * hq_steady:
                note("the producer outran the pipeline: the outbox absorbed the difference (backlog grew)")
            s = hq.stream()
            emit("e2e_messages", s["applied"])
            emit("e2e_facts_per_message", s["facts"] / max(1, s["applied"]))
            for k, v in cpu.items():
                emit(f"e2e_cpu_{k}_pct", v)
            for k, v in io.items():
                emit(f"e2e_disk_write_{k}_bytes_per_fact", v / max(1, total))
            note("agent threads while producing, % of one CPU: " + ", ".join(
                f"{name} {(t - threads0.get(name, 0.0)) / t_threads * 100:.0f}"
                for name, t in sorted(threads1.items(), key=lambda kv: -kv[1] + threads0.get(kv[0], 0.0))))
            truth: dict[tuple[str, str], int] = {}
            for pool in pools:
                for key, q in pool.truth().items():
                    truth[key] = truth.get(key, 0) + q
            truth = {key: q for key, q in truth.items() if q}
            ok = hq.inventory() == truth and s["facts"] == total and s["gaps"] == 0
            emit("e2e_hq_equals_truth", int(ok))
            if not ok:
                note(f"MISMATCH: hq stream {s} vs {total} enqueued")
            emit("e2e_background_cpu_pct", bg.other_pct())
            if agent.outbox.counters().get("compacted"):
                note("the outbox compacted facts during the run")
        finally:
            agent.stop(flush_timeout=2.0)
            hq.stop()
            broker.stop()


if __name__ == "__main__":
    main()
