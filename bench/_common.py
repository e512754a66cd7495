"""Shared pieces of the benchmarks (not a benchmark itself).

Each benchmark is a plain script that prints one figure per line, ``name value``; lines starting
with ``#`` are context (machine, date, sizes). The agent runs in the benchmark's process (it is the
code under test); the HQ receiver runs in its own process, as it does in a real deployment, and is
observed through its SQLite database opened read-only; mosquitto is a real broker on a free
loopback port. Every wait is bounded in time.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("YOLO_OFFLINE", "1")

from edge_agent.config import AgentConfig  # noqa: E402
from edge_agent.inventory.book import Delta  # noqa: E402
from simulators.inventory_feed import gtin_for  # noqa: E402
from simulators.mosquitto import stop_process  # noqa: E402
from simulators.toml_files import write_toml  # noqa: E402

STORE = "S001"
DELTA_STREAM = "inventory/delta"
ZONES = ["backroom", "salesfloor", "fitting-room", "pos"]
DELTA_CHOICES = (1, 1, 2, 3, -1, -1, -2)


# ---------------------------------------------------------------- output


def header(name: str, **sizes: Any) -> None:
    try:
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"
        )
    except OSError:
        cpu = platform.processor() or "?"
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"# {name} {now} host={platform.node()} cpus={os.cpu_count()} cpu={cpu!r}", flush=True)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# python={platform.python_version()} sqlite={sqlite3.sqlite_version} loadavg=[{load}] "
          + " ".join(f"{k}={v}" for k, v in sizes.items()), flush=True)


def emit(name: str, value: float | int) -> None:
    if isinstance(value, float):
        text = f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    else:
        text = str(value)
    print(f"{name} {text}", flush=True)


def note(text: str) -> None:
    print(f"# {text}", flush=True)


class Background:
    """How busy the machine was with processes other than this benchmark's (this process and its
    children: HQ, mosquitto), in % of all CPUs. Benchmarks print it: on a shared box it explains noise."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._t0 = time.monotonic()
        self._busy0 = self._busy()
        self._own: dict[int, float] = {}
        self._own0 = self.own()

    def _busy(self) -> float:
        t = self._psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def own(self) -> float:
        """CPU seconds of this process tree; call it before children exit so they are counted."""
        me = self._psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                self._own[p.pid] = t.user + t.system
            except self._psutil.Error:
                pass
        return sum(self._own.values())

    def other_pct(self) -> float:
        wall = time.monotonic() - self._t0
        other = (self._busy() - self._busy0) - (self.own() - self._own0)
        return max(0.0, other / wall / (os.cpu_count() or 1) * 100)


def rss_mb(pid: int | None = None) -> float:
    import psutil

    return psutil.Process(pid or os.getpid()).memory_info().rss / 1e6


# ---------------------------------------------------------------- facts


class DeltaPool:
    """Pre-generated batches of inventory deltas, cycled, with the running truth of what was used.

    Generating the deltas is the sources' job, not the outbox's, so it is kept out of the timed path.
    """

    def __init__(self, batch: int, batches: int = 64, gtins: int = 200, seed: int = 1, ts: float | None = None):
        rng = random.Random(seed)
        g = [gtin_for(i) for i in range(gtins)]
        t = time.time() if ts is None else ts
        self.batch = batch
        self.batches: list[list[Delta]] = []
        self._sums: list[dict[tuple[str, str], int]] = []
        for _ in range(batches):
            b = [Delta(t, rng.choice(ZONES), rng.choice(g), rng.choice(DELTA_CHOICES)) for _ in range(batch)]
            s: dict[tuple[str, str], int] = {}
            for d in b:
                s[(d.zone, d.gtin)] = s.get((d.zone, d.gtin), 0) + d.delta
            self.batches.append(b)
            self._sums.append(s)
        self._used = [0] * batches
        self._extra: dict[tuple[str, str], int] = {}
        self._i = 0

    def next(self, limit: int | None = None) -> list[Delta]:
        i = self._i
        self._i = (i + 1) % len(self.batches)
        if limit is not None and limit < self.batch:
            part = self.batches[i][:limit]
            for d in part:
                self._extra[(d.zone, d.gtin)] = self._extra.get((d.zone, d.gtin), 0) + d.delta
            return part
        self._used[i] += 1
        return self.batches[i]

    def truth(self) -> dict[tuple[str, str], int]:
        levels: dict[tuple[str, str], int] = dict(self._extra)
        for n, s in zip(self._used, self._sums, strict=True):
            if n:
                for k, v in s.items():
                    levels[k] = levels.get(k, 0) + n * v
        return {k: v for k, v in levels.items() if v != 0}


# ---------------------------------------------------------------- configs


def mqtt_table(port: int) -> dict[str, Any]:
    # Short reconnect backoff, as in the tests: the benchmarks stop and start the broker on purpose.
    return {"port": port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5, "connect_timeout_s": 2.0}


def agent_config(workdir: Path, port: int, signing: dict[str, Any] | None = None, **outbox: Any) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "store": {"id": STORE},
            "mqtt": mqtt_table(port),
            "outbox": {"path": str(workdir / "outbox.db"), **outbox},
            "health": {"interval_s": 60.0},
            "log": {"level": "WARNING"},
            "signing": signing or {},
        }
    )


def signing_tables(workdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fresh keys for the store and HQ: the agent's [signing] table and HQ's [hq.signing] table, with
    signatures required both ways (what --sign measures)."""
    from edge_agent.signing import write_keypair

    keys = workdir / "keys"
    _, _, store_pub = write_keypair(keys, STORE)
    _, _, hq_pub = write_keypair(keys, "hq")
    agent = {"key_file": str(keys / f"{STORE}.key"), "hq_public_key": hq_pub, "require_signed_commands": True}
    hq = {"key_file": str(keys / "hq.key"), "keys": {STORE: store_pub}, "require_signatures": True}
    return agent, hq


# ---------------------------------------------------------------- HQ in its own process


class HqProcess:
    """The reference HQ receiver as a separate process.

    Default: the real command, ``python -m edge_agent.cli hq -c FILE --http-port 0``. With
    ``probe=True`` it is ``bench/_hq_probe.py``: the same HqReceiver, plus an on_applied callback that
    writes one line per applied message (for per-message latency).
    """

    def __init__(self, workdir: Path, port: int, *, probe: bool = False, signing: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.db_path = workdir / "hq.db"
        self.applied_path = workdir / "hq-applied.txt"
        self.log_path = workdir / "hq.log"
        self.config = write_toml(
            workdir / "hq.toml",
            {
                "mqtt": mqtt_table(port),
                "hq": {"db_path": str(self.db_path), "http_port": 0, "print_applied": False,
                       "reorder_window_s": 2.0, "signing": signing or {}},
                "log": {"level": "WARNING"},
            },
        )
        self.probe = probe
        self.proc: subprocess.Popen[bytes] | None = None
        self._ro: sqlite3.Connection | None = None

    def start(self) -> HqProcess:
        if self.probe:
            cmd = [sys.executable, str(REPO / "bench" / "_hq_probe.py"), str(self.config), str(self.applied_path)]
        else:
            cmd = [sys.executable, "-m", "edge_agent.cli", "hq", "-c", str(self.config), "--http-port", "0"]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, cwd=REPO,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _conn(self) -> sqlite3.Connection | None:
        if self._ro is None:
            if not self.db_path.exists():
                return None
            self._ro = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=5, check_same_thread=False)
        return self._ro

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        c = self._conn()
        if c is None:
            return []
        try:
            return c.execute(sql, params).fetchall()
        except sqlite3.OperationalError:  # schema not created yet
            return []

    def stream(self, stream: str = DELTA_STREAM) -> dict[str, Any]:
        rows = self.query(
            "SELECT last_seq, applied, facts, historical, duplicates, gaps, lost, last_applied_at"
            " FROM streams WHERE store = ? AND stream = ?", (STORE, stream))
        cols = ("last_seq", "applied", "facts", "historical", "duplicates", "gaps", "lost", "last_applied_at")
        return dict(zip(cols, rows[0], strict=True)) if rows else dict.fromkeys(cols, 0)

    def facts(self) -> int:
        rows = self.query("SELECT facts FROM streams WHERE store = ? AND stream = ?", (STORE, DELTA_STREAM))
        return rows[0][0] if rows else 0

    def online(self) -> bool:
        rows = self.query("SELECT state FROM status WHERE store = ?", (STORE,))
        return bool(rows) and rows[0][0] == "online"

    def inventory(self) -> dict[tuple[str, str], int]:
        return {(z, g): q for z, g, q in self.query(
            "SELECT zone, gtin, qty FROM inventory WHERE store = ? AND qty != 0", (STORE,))}

    def stop(self) -> None:
        if self._ro is not None:
            self._ro.close()
            self._ro = None
        stop_process(self.proc)
        self.proc = None


def wait_for(pred: Callable[[], bool], timeout: float, what: str, every: float = 0.02) -> float:
    """Poll until ``pred()``; returns the time.monotonic() at which it held. Raises on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]
