"""Resident memory of the real agent process (``python -m edge_agent.cli run``) while it holds a big
offline backlog: the broker is unreachable, the simulated inventory source feeds --facts deltas as fast
as it can, and the process's RSS (psutil) is sampled until all of them are buffered in the outbox.

    python bench/agent_memory.py                      # full size: 1,000,000 facts
    python bench/agent_memory.py --facts 20000        # CI size
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from _common import REPO, STORE, Background, emit, header, mqtt_table, write_toml

from simulators.mosquitto import free_port


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--facts", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=1000, help="the source's deltas per transaction")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--workdir", help="parent of the run's temp dir")
    a = p.parse_args()
    header("agent_memory", facts=a.facts, batch=a.batch)
    bg = Background()
    with tempfile.TemporaryDirectory(prefix="bench-memory-", dir=a.workdir) as tmp:
        workdir = Path(tmp)
        db = workdir / "outbox.db"
        cfg = write_toml(workdir / "agent.toml", {
            "store": {"id": STORE},
            "mqtt": mqtt_table(free_port()),  # nothing listens there: the uplink is down throughout
            "outbox": {"path": str(db)},
            "health": {"interval_s": 60.0},
            "log": {"level": "WARNING"},
            "sources.simulated_inventory": {"enabled": True, "total": a.facts, "batch": a.batch,
                                            "rate_per_s": 1e9, "gtins": 200},
        })
        with open(workdir / "agent.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "-c", str(cfg)], cwd=REPO,
                                    stdout=log, stderr=log, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        ps = psutil.Process(proc.pid)
        peak = 0.0
        done = 0
        ro: sqlite3.Connection | None = None
        t0 = time.monotonic()
        try:
            while time.monotonic() < t0 + a.timeout and proc.poll() is None:
                peak = max(peak, ps.memory_info().rss / 1e6)
                if ro is None and db.exists():
                    ro = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
                if ro is not None:
                    try:
                        rows = ro.execute("SELECT position FROM source_cursors WHERE source = 'sim-inventory'").fetchall()
                    except sqlite3.OperationalError:
                        rows = []
                    done = rows[0][0] if rows else 0
                    if done >= a.facts:
                        break
                time.sleep(0.1)
            fill_s = time.monotonic() - t0
            time.sleep(1.0)  # a housekeeping round on the full outbox
            rss = ps.memory_info().rss / 1e6
            peak = max(peak, rss)
            pending = ro.execute("SELECT count(*) FROM pending").fetchone()[0] if ro else 0
            emit("agent_memory_facts_buffered", done)
            emit("agent_memory_pending_facts", pending)
            emit("agent_memory_fill_facts_per_s", done / fill_s)
            emit("agent_memory_rss_mb", rss)
            emit("agent_memory_rss_peak_mb", peak)
            emit("agent_memory_outbox_db_mb", sum(f.stat().st_size for f in workdir.glob("outbox.db*")) / 1e6)
            emit("agent_memory_background_cpu_pct", bg.other_pct())
        finally:
            if ro is not None:
                ro.close()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


if __name__ == "__main__":
    main()
