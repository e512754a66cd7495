"""Fleet load on one box: N simulated stores (simulators/fleet.py: the agent's own outbox and uplink per
store, in P processes) -> a real mosquitto -> R HQ receivers (``edge-agent hq`` subprocesses) on a
private PostgreSQL.

Three modes:
- load (default): the nominal workload for --seconds, a seeded --outage-share of the stores cut off for
  10-120 s, optionally one receiver SIGKILLed half way and restarted --kill-down-s later; then the
  workload stops, every outbox drains (bounded), and HQ is checked against every store's truth.
- --capacity 600,1200,...: a load run per size, without outages or kills, until p99 lag reaches 1 s.
- --drain-down-s S: every receiver down (stopped; their broker sessions persist) for S seconds while
  the fleet keeps working; then the workload stops, the receivers start, and the drain is timed until
  every outbox is empty. In the same run, the inventory delta rows the fleet generated are inserted
  plainly into a bare table (COPY, and a batched multi-row INSERT) for the ratio.

How lag is measured (two ways, both printed):
- apply: a sampler polls HQ's ``streams`` table every 0.25 s for (store, stream, last_seq,
  last_applied_at); a message seen there gets HQ's apply time (taken in its apply transaction). Lag =
  that minus the commit time of the message's oldest fact at the store (``oldest_created``, recorded
  when the store sealed it). Only messages that were the last of their stream at a poll are seen:
  coverage is printed (at ~1 message/s per stream, nearly all).
- ack: for every message, from the same commit time until HQ's ack covering it reached the store (an
  upper bound of commit -> apply: it adds the ack's coalescing and its way back).
Figures: ``steady`` = messages committed after --warmup and before the receiver kill (or the end), at
stores not in an outage then; ``live`` = every message not caught in its store's outage; ``all``.

CPU per component: utime+stime from /proc of each process tree (fleet workers, each receiver with its
restarted self, mosquitto, PostgreSQL's postmaster and backends), sampled every second, over the run.

    python bench/fleet_load.py --stores 60 --seconds 60
    python bench/fleet_load.py --stores 600 --receivers 3 --kill-receiver
    python bench/fleet_load.py --capacity 300,600,900,1200 --seconds 60
    python bench/fleet_load.py --stores 600 --drain-down-s 600
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil
import psycopg
from _common import REPO, emit, header, note, percentile

from simulators.fleet import NOMINAL, STREAMS_GENERATED, Fleet, plan_outages, store_ids
from simulators.mosquitto import Mosquitto, stop_process
from simulators.postgres import Postgres
from simulators.toml_files import write_toml

# Shared subscriptions are on by default in mosquitto 2; Nagle off (DESIGN.md: PUBACK spikes to 42 ms).
MOSQUITTO_CONF = "set_tcp_nodelay true\n"


class Receiver:
    def __init__(self, workdir: Path, i: int, port: int, url: str, share: bool) -> None:
        self.name = f"hq-{i}"
        hq: dict[str, Any] = {"database": url, "client_id": self.name, "http_port": 0, "print_applied": False}
        if share:  # the lead's shared-subscription key; the current receiver's config refuses it
            hq["share_group"] = "hq"
        self.config = write_toml(workdir / f"{self.name}.toml", {
            "mqtt": {"port": port, "reconnect_min_s": 0.05, "reconnect_max_s": 1.0},
            "hq": hq,
            "log": {"level": "WARNING"},
        })
        self.log = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []

    def start(self) -> Receiver:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_agent.cli", "hq", "-c", str(self.config), "--http-port", "0"],
                stdout=out, stderr=out, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.pids.append(self.proc.pid)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        stop_process(self.proc, timeout=30)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class CpuMeter:
    """CPU seconds per component: every process of each component's trees, last reading per pid kept."""

    def __init__(self) -> None:
        self.roots: dict[str, list[int]] = defaultdict(list)
        self.seen: dict[str, dict[int, float]] = defaultdict(dict)
        self._base: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def add(self, component: str, pid: int) -> None:
        self.roots[component].append(pid)

    def sample(self) -> None:
        for comp, roots in list(self.roots.items()):
            for root in roots:
                try:
                    p = psutil.Process(root)
                    procs = [p, *p.children(recursive=True)]
                except psutil.Error:
                    continue
                for q in procs:
                    try:
                        t = q.cpu_times()
                        self.seen[comp][q.pid] = t.user + t.system
                    except psutil.Error:
                        pass

    def totals(self) -> dict[str, float]:
        return {c: sum(v.values()) for c, v in self.seen.items()}

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def mark(self) -> None:
        self.sample()
        self._base = self.totals()
        self._busy0 = self._busy()

    def background(self, mine: dict[str, float]) -> float:
        """CPU seconds the box spent on anything else since the mark (other users of a shared box)."""
        return max(0.0, self._busy() - self._busy0 - sum(mine.values()))

    def since_mark(self) -> dict[str, float]:
        self.sample()
        return {c: v - self._base.get(c, 0.0) for c, v in self.totals().items()}

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self.sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


class Sampler:
    """Polls HQ's streams table: apply times of the messages seen, and the running totals."""

    def __init__(self, url: str, every: float = 0.25) -> None:
        self.url = url
        self.every = every
        self.applied_at: dict[tuple[str, str, int], float] = {}
        self.timeline: list[tuple[float, dict[str, tuple[int, int]]]] = []  # (t, stream -> (msgs, facts))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.errors = 0

    def _loop(self) -> None:
        since = 0.0
        conn: psycopg.Connection | None = None
        while not self._stop.wait(self.every):
            try:
                if conn is None:
                    conn = psycopg.connect(self.url, autocommit=True)
                rows = conn.execute("SELECT store, stream, last_seq, last_applied_at FROM streams"
                                    " WHERE last_applied_at > %s", (since,)).fetchall()
                for store, stream, seq, at in rows:
                    self.applied_at.setdefault((store, stream, seq), at)
                    # A little overlap: a transaction that took its time may commit after a later one.
                    since = max(since, at - 2.0)
                tot = conn.execute("SELECT stream, sum(applied), sum(facts) FROM streams GROUP BY stream").fetchall()
                self.timeline.append((time.time(), {s: (int(m), int(f)) for s, m, f in tot}))
            except psycopg.Error:
                self.errors += 1
                conn = None

    def totals_at(self, t: float, streams: tuple[str, ...] | None = None) -> tuple[int, int]:
        """Messages and facts applied by time t (the last sample at or before it)."""
        best: dict[str, tuple[int, int]] = {}
        for ts, tot in self.timeline:
            if ts > t:
                break
            best = tot
        pick = [v for s, v in best.items() if streams is None or s in streams]
        return sum(m for m, _ in pick), sum(f for _, f in pick)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def pct(values: list[float]) -> tuple[float, float, float]:
    v = sorted(values)
    return percentile(v, 50), percentile(v, 99), (v[-1] if v else float("nan"))


class Run:
    """One fleet run on fresh infrastructure."""

    def __init__(self, a: argparse.Namespace, stores: int, workdir: Path) -> None:
        self.a = a
        self.n = stores
        self.workdir = workdir
        self.cpu = CpuMeter()
        self.pg = Postgres().start()
        self.url = self.pg.create_database()
        pm = int((self.pg.data / "postmaster.pid").read_text().split()[0])
        self.cpu.add("postgres", pm)
        self.broker = Mosquitto(workdir=workdir / "mosquitto", extra_conf=MOSQUITTO_CONF).start()
        assert self.broker.proc is not None
        self.cpu.add("mosquitto", self.broker.proc.pid)
        self.receivers = [Receiver(workdir, i + 1, self.broker.port, self.url, a.receivers > 1)
                          for i in range(a.receivers)]
        self.sampler = Sampler(self.url)
        self.fleet: Fleet | None = None

    def start_receivers(self) -> None:
        for r in self.receivers:
            r.start()
            self.cpu.add(r.name, r.proc.pid)  # type: ignore[union-attr]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the schema is in place once a receiver has opened its store
            try:
                with psycopg.connect(self.url, autocommit=True) as c:
                    c.execute("SELECT 1 FROM streams LIMIT 1")
                break
            except psycopg.Error:
                time.sleep(0.2)
        time.sleep(1.0)  # and subscribed
        for r in self.receivers:
            if not r.alive():
                raise RuntimeError(f"{r.name} exited; see {r.log}")

    def start_fleet(self, outages: dict, record_rows: bool = False) -> float:
        self.fleet = Fleet(self.n, self.a.procs, self.broker.port, self.workdir / "fleet", seed=self.a.seed,
                           workload=NOMINAL.scaled(self.a.rate), outages=outages, synchronous=self.a.synchronous,
                           record_rows=record_rows, idle_poll_s=None if self.a.agent_polls else 0.5,
                           nice=self.a.fleet_nice)
        t0 = self.fleet.start()
        for pid in self.fleet.pids:
            self.cpu.add("fleet", pid)
        return t0

    def hq(self, sql: str) -> list[tuple]:
        with psycopg.connect(self.url, autocommit=True) as c:
            return c.execute(sql).fetchall()

    def close(self) -> None:
        self.sampler.stop()
        self.cpu.stop()
        if self.fleet is not None:
            self.fleet.stop()
        for r in self.receivers:
            r.stop()
        self.broker.stop()
        self.pg.stop()


def check(run: Run, res: dict[str, Any]) -> dict[str, int]:
    """Every store's HQ state against its truth."""
    inv: dict[str, dict[tuple[str, str], int]] = defaultdict(dict)
    for store, zone, gtin, qty in run.hq("SELECT store, zone, gtin, qty FROM inventory WHERE qty != 0"):
        inv[store][(zone, gtin)] = qty
    streams = {(r[0], r[1]): r[2:] for r in run.hq(
        "SELECT store, stream, last_seq, applied, facts, gaps, lost, duplicates FROM streams")}
    out = defaultdict(int)
    for st in res["stores"]:
        s = st["store"]
        truth = {(z, g): q for z, g, q in st["inventory"]}
        out["stores"] += 1
        out["stores_inventory_ok"] += inv.get(s, {}) == truth
        out["stores_drained"] += st["pending"] == 0 and st["sealed"] == 0
        out["compacted_or_dropped"] += sum(v for k, v in st["counters"].items()
                                           if k == "compacted" or k.startswith("dropped."))
        for stream, hwm in st["hwm"].items():
            last, applied, facts, gaps, lost, dups = streams.get((s, stream), (0, 0, 0, 0, 0, 0))
            out["streams"] += 1
            ok = last == hwm and applied == last and gaps == 0 and lost == 0
            if stream in STREAMS_GENERATED:
                ok = ok and facts == st["facts"].get(stream, 0)
                out["facts_truth"] += st["facts"].get(stream, 0)
                out["facts_hq"] += facts
            out["streams_ok"] += ok
            if not ok:  # said, not only counted: which stream, and how it is off
                print(f"# off: {s} {stream} hwm={hwm} last={last} applied={applied} facts={facts}"
                      f" truth={st['facts'].get(stream)} gaps={gaps} lost={lost}", file=sys.stderr)
            out["applied_twice"] += max(0, applied - last)
            out["missing_messages"] += max(0, hwm - last)
            out["gaps"] += gaps
            out["lost"] += lost
            out["redelivered_ignored"] += dups
    return dict(out)


def lags(run: Run, res: dict[str, Any], t_warm: float, t_end_steady: float) -> dict[str, list[float]]:
    outage = {st["store"]: st["outage"] for st in res["stores"] if st["outage"][0] is not None}
    out: dict[str, list[float]] = defaultdict(list)
    seen = run.sampler.applied_at
    for store, recs in res["records"].items():
        o = outage.get(store)
        for stream, seq, _facts, created, acked in recs:
            caught = o is not None and created <= (o[2] or o[1] or float("inf")) and acked >= o[0]
            classes = ["all"] + ([] if caught else ["live"])
            if not caught and t_warm <= created < t_end_steady:
                classes.append("steady")
            applied = seen.get((store, stream, seq))
            for c in classes:
                out[f"ack_{c}"].append(acked - created)
                if applied is not None:
                    out[f"apply_{c}"].append(applied - created)
    return out


def report_lags(prefix: str, lag: dict[str, list[float]]) -> float:
    for kind in ("apply", "ack"):
        for c in ("steady", "live", "all"):
            v = lag.get(f"{kind}_{c}", [])
            if not v:
                continue
            p50, p99, mx = pct(v)
            emit(f"{prefix}_lag_{kind}_{c}_p50_s", p50)
            emit(f"{prefix}_lag_{kind}_{c}_p99_s", p99)
            emit(f"{prefix}_lag_{kind}_{c}_max_s", mx)
    n_all, n_seen = len(lag.get("ack_all", [])), len(lag.get("apply_all", []))
    emit(f"{prefix}_lag_apply_coverage", n_seen / max(1, n_all))
    return pct(lag.get("apply_steady", []))[1]


def emit_cpu(prefix: str, cpu: dict[str, float], wall: float, background: float) -> None:
    for comp, sec in sorted(cpu.items()):
        emit(f"{prefix}_cpu_{comp.replace('-', '_')}_s", sec)
        emit(f"{prefix}_cpu_{comp.replace('-', '_')}_pct_of_one_cpu", sec / wall * 100)
    # Not this benchmark's: on a shared box it explains noise (and starvation).
    emit(f"{prefix}_cpu_background_pct_of_box", background / wall / (os.cpu_count() or 1) * 100)


def emit_check(prefix: str, c: dict[str, int], stores: int, drained: bool) -> bool:
    """The truth check's figures, and its verdict: every store's inventory and every stream exact, drained."""
    for k in ("stores_inventory_ok", "streams_ok", "streams", "applied_twice", "missing_messages",
              "gaps", "lost", "redelivered_ignored", "facts_truth", "facts_hq", "compacted_or_dropped"):
        emit(f"{prefix}_{k}", c.get(k, 0))
    ok = c.get("stores_inventory_ok") == stores and c.get("streams_ok") == c.get("streams") and drained
    emit(f"{prefix}_hq_equals_truth", int(ok))
    return ok


def load(a: argparse.Namespace, stores: int, prefix: str, *, outages_on: bool, kill: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-fleet-", dir=a.workdir) as tmp:
        run = Run(a, stores, Path(tmp))
        try:
            run.start_receivers()
            run.sampler.start()
            run.cpu.start()
            ids = store_ids(stores)
            outages = plan_outages(ids, a.seed, a.outage_share, a.outage_min_s, a.outage_max_s, a.seconds) \
                if outages_on else {}
            t_build = time.time()
            t0 = run.start_fleet(outages)
            note(f"{stores} stores built and connected in {t0 - t_build:.1f} s; {len(outages)} outages planned")
            rss = sum(psutil.Process(p).memory_info().rss for p in run.fleet.pids) / 1e6  # type: ignore[union-attr]
            run.cpu.mark()
            t_kill = t_restart = None
            t_stop = t0 + a.seconds
            while time.time() < t_stop:
                if kill and t_kill is None and time.time() >= t0 + a.seconds / 2:
                    t_kill = time.time()
                    run.receivers[0].kill()
                    note(f"{run.receivers[0].name} SIGKILLed at +{t_kill - t0:.1f} s")
                if t_kill is not None and t_restart is None and time.time() >= t_kill + a.kill_down_s:
                    run.receivers[0].start()
                    run.cpu.add(run.receivers[0].name, run.receivers[0].proc.pid)  # type: ignore[union-attr]
                    t_restart = time.time()
                    note(f"{run.receivers[0].name} restarted at +{t_restart - t0:.1f} s")
                time.sleep(0.2)
            run.fleet.stop_workload()  # type: ignore[union-attr]
            t_stopped = time.time()
            drained = run.fleet.wait_drained(a.drain_timeout)  # type: ignore[union-attr]
            t_drained = time.time()
            cpu = run.cpu.since_mark()
            bg = run.cpu.background(cpu)
            wall = t_drained - t0
            time.sleep(1.0)
            res = run.fleet.results()  # type: ignore[union-attr]
            c = check(run, res)
            t_warm = t0 + a.warmup
            m0, f0 = run.sampler.totals_at(t_warm)
            m1, f1 = run.sampler.totals_at(t_stopped)
            window = max(1e-9, t_stopped - t_warm)
            emit(f"{prefix}_stores", stores)
            emit(f"{prefix}_receivers", a.receivers)
            emit(f"{prefix}_fleet_processes", len(run.fleet.pids))  # type: ignore[union-attr]
            emit(f"{prefix}_seconds", a.seconds)
            emit(f"{prefix}_outages", len(outages))
            emit(f"{prefix}_messages_per_s", (m1 - m0) / window)
            emit(f"{prefix}_facts_per_s", (f1 - f0) / window)
            emit(f"{prefix}_drain_after_stop_s", t_drained - t_stopped)
            emit(f"{prefix}_all_drained", int(drained))
            # Steady: committed at least 2 s before the kill, so not caught by it.
            p99 = report_lags(prefix, lags(run, res, t_warm, t_kill - 2.0 if t_kill else t_stopped))
            emit_cpu(prefix, cpu, wall, bg)
            emit(f"{prefix}_fleet_rss_mb", rss)
            emit(f"{prefix}_fleet_rss_mb_per_store", rss / stores)
            ok = emit_check(prefix, c, stores, drained and not res["errors"])
            if res["errors"]:
                note(f"fleet errors: {res['errors'][:5]}")
            if run.sampler.errors:
                note(f"sampler errors: {run.sampler.errors}")
            return {"ok": ok, "p99": p99, "drained": drained}
        finally:
            run.close()


def drain(a: argparse.Namespace, stores: int) -> None:
    prefix = "drain"
    with tempfile.TemporaryDirectory(prefix="bench-fleet-drain-", dir=a.workdir) as tmp:
        run = Run(a, stores, Path(tmp))
        try:
            run.start_receivers()
            run.sampler.start()
            run.cpu.start()
            t0 = run.start_fleet({}, record_rows=True)
            time.sleep(a.warmup)
            for r in run.receivers:
                r.stop()  # graceful: their sessions (and subscriptions) persist at the broker
            t_down = time.time()
            note(f"all {len(run.receivers)} receivers stopped at +{t_down - t0:.1f} s; down for {a.drain_down_s:.0f} s")
            time.sleep(a.drain_down_s)
            run.fleet.stop_workload()  # type: ignore[union-attr]
            pend = run.fleet.drained()  # type: ignore[union-attr]
            m_before, f_before = run.sampler.totals_at(time.time())
            _, d_before = run.sampler.totals_at(time.time(), ("inventory/delta",))
            run.cpu.mark()
            t_up = time.time()
            for r in run.receivers:
                r.start()
                run.cpu.add(r.name, r.proc.pid)  # type: ignore[union-attr]
            drained = run.fleet.wait_drained(a.drain_timeout)  # type: ignore[union-attr]
            t_done = time.time()
            cpu = run.cpu.since_mark()
            bg = run.cpu.background(cpu)
            time.sleep(1.0)
            m_after, f_after = run.sampler.totals_at(time.time())
            _, d_after = run.sampler.totals_at(time.time(), ("inventory/delta",))
            res = run.fleet.results()  # type: ignore[union-attr]
            c = check(run, res)
            took = t_done - t_up
            emit(f"{prefix}_stores", stores)
            emit(f"{prefix}_receivers", a.receivers)
            emit(f"{prefix}_receivers_down_s", t_up - t_down)
            emit(f"{prefix}_stores_drained_before_restart", pend[0])
            emit(f"{prefix}_backlog_messages_applied", m_after - m_before)
            emit(f"{prefix}_backlog_facts_applied", f_after - f_before)
            emit(f"{prefix}_backlog_inventory_facts_applied", d_after - d_before)
            emit(f"{prefix}_s", took)
            emit(f"{prefix}_messages_per_s", (m_after - m_before) / took)
            emit(f"{prefix}_facts_per_s", (f_after - f_before) / took)
            emit(f"{prefix}_inventory_facts_per_s", (d_after - d_before) / took)
            emit(f"{prefix}_all_drained", int(drained))
            emit_cpu(prefix, cpu, took, bg)
            emit_check(prefix, c, stores, drained)
            plain = plain_insert(run, run.fleet.rows_files())  # type: ignore[union-attr]
            for k, v in plain.items():
                emit(f"{prefix}_plain_{k}", v)
            rate = (d_after - d_before) / took
            for k in ("copy_rows_per_s", "insert_rows_per_s"):
                emit(f"{prefix}_inventory_facts_vs_plain_{k.split('_')[0]}", rate / plain[k])
        finally:
            run.close()


def plain_insert(run: Run, files: list[Path]) -> dict[str, float]:
    """The fleet's inventory delta rows (store, zone, gtin, delta), inserted plainly into a bare table."""
    rows: list[tuple[str, str, str, int]] = []
    for f in files:
        with open(f) as fh:
            for line in fh:
                s, z, g, d = line.rstrip("\n").split("\t")
                rows.append((s, z, g, int(d)))
    out: dict[str, float] = {"rows": len(rows)}
    with psycopg.connect(run.url) as conn:
        conn.execute("CREATE TABLE plain_copy(store text, zone text, gtin text, delta bigint)")
        conn.execute("CREATE TABLE plain_insert(store text, zone text, gtin text, delta bigint)")
        conn.commit()
        t = time.perf_counter()
        with conn.cursor() as cur, cur.copy("COPY plain_copy(store, zone, gtin, delta) FROM STDIN") as cp:
            for r in rows:
                cp.write_row(r)
        conn.commit()
        out["copy_rows_per_s"] = len(rows) / (time.perf_counter() - t)
        batch = 1000
        one = "(%s,%s,%s,%s)"
        t = time.perf_counter()
        with conn.cursor() as cur:
            for i in range(0, len(rows), batch):
                chunk = rows[i:i + batch]
                cur.execute("INSERT INTO plain_insert(store, zone, gtin, delta) VALUES " + ",".join([one] * len(chunk)),
                            [x for r in chunk for x in r])
                conn.commit()
        out["insert_rows_per_s"] = len(rows) / (time.perf_counter() - t)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stores", type=int, default=600)
    p.add_argument("--procs", type=int, default=0, help="fleet worker processes (0: one per 150 stores)")
    p.add_argument("--receivers", type=int, default=1)
    p.add_argument("--seconds", type=float, default=120.0, help="how long the workload runs")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds left out of the rates and steady lag")
    p.add_argument("--rate", type=float, default=1.0, help="times the nominal RFID and ESL rates")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--outage-share", type=float, default=0.1)
    p.add_argument("--outage-min-s", type=float, default=10.0)
    p.add_argument("--outage-max-s", type=float, default=120.0)
    p.add_argument("--kill-receiver", action="store_true", help="SIGKILL one receiver half way, restart it")
    p.add_argument("--kill-down-s", type=float, default=5.0)
    p.add_argument("--capacity", help="comma-separated fleet sizes to ramp through (no outages, no kill)")
    p.add_argument("--drain-down-s", type=float, help="drain mode: receivers down this long")
    p.add_argument("--drain-timeout", type=float, default=600.0)
    p.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="NORMAL",
                   help="the stores' outbox fsync (NORMAL: 600 boxes do not share one disk in the field)")
    p.add_argument("--agent-polls", action="store_true",
                   help="keep the agent's idle polls (0.05/0.1 s) in the fleet instead of 0.5 s (simulators/fleet.py)")
    p.add_argument("--fleet-nice", type=int, default=0,
                   help="run the simulated stores at this nice level (19: the stores stand in for other machines and"
                        " take only the CPU HQ's side leaves; for measuring HQ, e.g. the drain)")
    p.add_argument("--workdir", help="parent of the run's temp dir")
    a = p.parse_args()

    def procs_for(n: int) -> int:
        return a.procs or max(1, -(-n // 150))

    mode = "capacity" if a.capacity else "drain" if a.drain_down_s else "load"
    header(f"fleet_load {mode}", stores=a.stores, receivers=a.receivers, seconds=a.seconds, rate=a.rate,
           outage_share=a.outage_share, kill=a.kill_receiver, synchronous=a.synchronous, fleet_nice=a.fleet_nice,
           nproc=os.cpu_count(), mem_gb=round(psutil.virtual_memory().total / 1e9, 1))
    note("PostgreSQL: private cluster, fsync=off synchronous_commit=off (simulators/postgres.py); "
         f"workload per store: {NOMINAL.scaled(a.rate)}")
    if mode == "capacity":
        best = 0
        for n in [int(x) for x in a.capacity.split(",")]:
            a.procs = procs_for(n)
            r = load(a, n, f"cap{n}", outages_on=False, kill=False)
            if not (r["drained"] and r["p99"] < 1.0):
                note(f"{n} stores: p99 {r['p99']:.2f} s, drained {r['drained']}: over capacity")
                break
            best = n
        emit("capacity_stores_p99_under_1s", best)
    elif mode == "drain":
        a.procs = procs_for(a.stores)
        drain(a, a.stores)
    else:
        a.procs = procs_for(a.stores)
        load(a, a.stores, "fleet", outages_on=a.outage_share > 0, kill=a.kill_receiver)


if __name__ == "__main__":
    main()
