"""Backlog drain: N inventory facts buffered while the broker is down, then the broker comes back.

Agent in this process, HQ receiver as its own process (``python -m edge_agent.cli hq``), real
mosquitto. The HQ subscribes first (persistent session), the broker is stopped gracefully, the agent
buffers --facts deltas offline (InventoryBook.apply in batches), its resident memory is read, then
the broker is started again on the same port and the clock runs until HQ has applied every fact (and
until the agent's outbox is empty, i.e. every message was PUBACKed and deleted), and then until
housekeeping has given the drained pages back to the file system.

    python bench/backlog_drain.py                     # full size: 1,000,000 facts
    python bench/backlog_drain.py --facts 20000       # CI size
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from _common import Background, DeltaPool, HqProcess, agent_config, emit, header, note, rss_mb, signing_tables, wait_for

from edge_agent.agent import Agent
from simulators.mosquitto import Mosquitto


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--facts", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=1000, help="deltas per InventoryBook.apply while offline")
    p.add_argument("--cap-bytes", type=int, default=256 * 1024 * 1024, help="outbox disk cap (config default)")
    p.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL")
    p.add_argument("--timeout", type=float, default=300.0, help="bound on the offline fill and on the drain")
    p.add_argument("--workdir", help="parent of the run's temp dir")
    p.add_argument("--sign", action="store_true", help="Ed25519 signatures on, required both ways")
    a = p.parse_args()
    header("backlog_drain", sign=a.sign, facts=a.facts, batch=a.batch, cap_bytes=a.cap_bytes, synchronous=a.synchronous)

    bg = Background()
    with tempfile.TemporaryDirectory(prefix="bench-backlog-", dir=a.workdir) as tmp:
        workdir = Path(tmp)
        broker = Mosquitto(workdir=workdir / "mosquitto").start()
        agent_signing, hq_signing = signing_tables(workdir) if a.sign else ({}, {})
        hq = HqProcess(workdir, broker.port, signing=hq_signing).start()
        agent = Agent(agent_config(workdir, broker.port, agent_signing, cap_bytes=a.cap_bytes, synchronous=a.synchronous))
        try:
            agent.start()
            wait_for(hq.online, 30, "HQ to subscribe and see the agent online")
            rss_idle = rss_mb()
            broker.stop()  # graceful: mosquitto keeps HQ's persistent session
            wait_for(lambda: not agent.uplink.connected, 10, "the agent to notice the broker is gone")

            pool = DeltaPool(a.batch)
            n = 0
            t0 = time.monotonic()
            while n < a.facts and time.monotonic() < t0 + a.timeout:
                b = pool.next(limit=a.facts - n)
                agent.book.apply(b, cursor=("bench", n + len(b)))
                n += len(b)
            fill_s = time.monotonic() - t0
            time.sleep(1.0)  # let the housekeeper run a cap check on the full outbox
            rss_buffered = rss_mb()
            pending = agent.outbox.pending_count()
            emit("backlog_facts_buffered", n)
            emit("backlog_offline_enqueue_facts_per_s", n / fill_s)
            emit("backlog_outbox_pending_facts", pending)
            emit("backlog_outbox_db_mb", agent.outbox.file_bytes() / 1e6)
            emit("agent_rss_idle_mb", rss_idle)
            emit("agent_rss_mb_with_backlog", rss_buffered)
            if pending != n:
                note(f"the outbox holds {pending} pending facts for {n} enqueued (compacted under the disk cap)")

            peak = [rss_buffered]
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.1):
                    peak[0] = max(peak[0], rss_mb())

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            bg.own()  # count the first broker before it is replaced
            broker.start()
            t1 = time.monotonic()
            t_conn = wait_for(lambda: agent.uplink.connected, a.timeout, "the agent to reconnect", 0.005) - t1
            t_hq = wait_for(lambda: hq.facts() >= pending, a.timeout, "HQ to apply the backlog", 0.01) - t1
            t_empty = wait_for(
                lambda: agent.outbox.pending_count() == 0 and agent.outbox.sealed_count() == 0,
                a.timeout, "the agent's outbox to empty", 0.01,
            ) - t1
            stop.set()
            sampler.join(1)
            emit("backlog_outbox_db_mb_drained", agent.outbox.file_bytes() / 1e6)
            t_shrunk = settled(agent.outbox.file_bytes, a.timeout)
            emit("backlog_outbox_db_mb_after_housekeeping", agent.outbox.file_bytes() / 1e6)
            emit("backlog_outbox_shrink_s", t_shrunk)
            emit("backlog_reconnect_s", t_conn)
            emit("backlog_drain_s", t_hq)
            emit("backlog_drain_facts_per_s", pending / t_hq)
            emit("backlog_outbox_empty_s", t_empty)
            emit("agent_rss_peak_mb_during_drain", peak[0])
            emit("agent_maxrss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6)
            s = hq.stream()
            emit("backlog_messages", s["applied"])
            emit("backlog_historical_messages", s["historical"])
            ok = hq.inventory() == pool.truth() and s["gaps"] == 0 and s["duplicates"] == 0
            emit("backlog_hq_equals_truth", int(ok))
            emit("backlog_background_cpu_pct", bg.other_pct())
            if not ok:
                note(f"MISMATCH: hq stream {s}")
        finally:
            agent.stop(flush_timeout=2.0)
            hq.stop()
            broker.stop()


def settled(size: Callable[[], int], timeout: float, quiet_s: float = 3.0) -> float:
    """Seconds until ``size()`` has not changed for ``quiet_s`` (housekeeping is done with it)."""
    t0 = last_change = time.monotonic()
    last = size()
    while time.monotonic() < min(last_change + quiet_s, t0 + timeout):
        time.sleep(0.1)
        if (now := size()) != last:
            last, last_change = now, time.monotonic()
    return last_change - t0


if __name__ == "__main__":
    main()
