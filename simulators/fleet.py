"""A fleet of simulated stores for HQ's load tests: N stores in P processes, each store the agent's own
wiring (``edge_agent.agent.Agent``: its SQLite outbox and inventory book, the MQTT uplink and downlink,
the housekeeper and its health reports with the high-water marks), fed a seeded workload with exact
ground truth. Nothing here publishes by itself: every message HQ sees was sealed by a store's Outbox
and sent by its Uplink, with the agent's windows, acks, resends and backoff.

The nominal workload of one store (``NOMINAL``), flat all day, i.e. a busy hour taken as the whole day:
- RFID: tag moves are a Poisson process of 3 a second per store (10,800 an hour: shoppers carrying items
  between zones, fitting rooms, replenishment; a 1,500 m2 apparel store sells one or two thousand items a
  day, so moves, not sales, dominate). Of the moves 20% are sales (-1 at the till), 10% deliveries
  (+1 in the backroom), the rest a move between two zones (-1 here, +1 there). The RFID pipeline applies
  what it learnt once per tick (``RfidConfig.tick_s``, 1 s): one ``InventoryBook.apply`` per tick with
  the tick's deltas summed per (zone, GTIN), about 5 items, over 2,000 GTINs. The uplink seals what is
  pending when it wakes: about one inventory/delta message a second.
- ESL: a label state change (price, battery, signal) every 20 s on average (Poisson), one item each.
- Vision: 3 cameras with 2 zones each. When a minute bucket closes: per camera one traffic/stats item for
  the camera and one per zone, plus the store-wide ``*`` item (10 items), and a 20 x 16 heatmap per
  camera (3 items of about 1.5 KB). Buckets close on the minute; each store flushes them a per-store
  0-5 s later (its frame loops see the boundary at different moments), not all 600 in the same
  millisecond.
- Health: the agent's own ``HealthReporter`` every 60 s (its default interval), with the outbox's
  high-water marks.
That is about 1.1 messages and 6 facts a second per store; 600 stores: about 700 messages/s, 3,700
facts/s.

Outages: a seeded share of the stores (10% by default) lose their link for a seeded 10-120 s: the live
socket is shut down under paho (the uplink sees the link drop, as on a failed uplink) and, until the end
of the outage, reconnecting is refused (the store's connection is pointed at a loopback port that
refuses). Meanwhile the store keeps working: facts stay pending in its outbox, and drain, historical,
when it is back.

Idle polling: a store's threads also wake on timers when nothing happens (paho's network loop every
0.05 s, the uplink pump and the downlink worker every 0.1 s). Measured here, that is 0.37% of a CPU per
idle store, 2.2 CPUs for 600: more than this whole box. ``idle_poll_s`` (0.5 s by default; None keeps
the agent's) stretches those three polls in the simulator's processes only: 0.09% per idle store. Every
message, PUBACK, HQ ack and command still wakes its thread at once (paho's select returns on data, the
pump's event is set, the downlink's queue is put to); only timer work (resend checks, keepalive) runs
up to 0.5 s later.

Ground truth, per store: the sum of every delta it applied per (zone, GTIN), and the facts it enqueued
per stream; with the outbox's last sealed seq per stream and the figures of its uplink. Lag records,
per sealed message: when its oldest fact was committed to the outbox, and when HQ's ack covering it came
back (from thin wrappers around ``Outbox.seal`` and ``Outbox.ack_through``, which only observe).

    python -m simulators.fleet --port 1883 --stores 20 --procs 2 --seconds 30    # against a running broker
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import logging
import math
import multiprocessing as mp
import os
import random
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ZONES = ("backroom", "salesfloor", "fitting-room", "pos")
STREAMS_GENERATED = ("inventory/delta", "esl/state", "traffic/stats", "traffic/heatmap", "health")


@dataclass(frozen=True)
class Workload:
    """One store's rates (see the module docstring for where the nominal figures come from)."""

    tag_moves_per_s: float = 3.0
    sale_share: float = 0.2
    delivery_share: float = 0.1
    rfid_tick_s: float = 1.0
    gtins: int = 2000
    esl_changes_per_s: float = 0.05
    labels: int = 2000
    cameras: int = 3
    zones_per_camera: int = 2
    bucket_s: int = 60
    heatmap_cols: int = 20
    heatmap_rows: int = 16
    flush_jitter_s: float = 5.0
    health_interval_s: float = 60.0

    def scaled(self, factor: float) -> Workload:
        """The same store, ``factor`` times as busy (RFID and ESL rates; vision and health are clocked)."""
        return Workload(**{**asdict(self), "tag_moves_per_s": self.tag_moves_per_s * factor,
                           "esl_changes_per_s": self.esl_changes_per_s * factor})


NOMINAL = Workload()


@dataclass(frozen=True)
class Outage:
    start_s: float  # after the workload starts
    duration_s: float


def plan_outages(stores: list[str], seed: int, share: float, min_s: float, max_s: float,
                 run_s: float) -> dict[str, Outage]:
    """A seeded ``share`` of the stores, each cut once for min_s..max_s, starting within the run."""
    rng = random.Random(f"outages:{seed}")
    chosen = rng.sample(stores, round(len(stores) * share)) if share > 0 else []
    plan = {}
    for s in sorted(chosen):
        dur = rng.uniform(min_s, max_s)
        latest = max(0.05 * run_s, run_s - dur - 5.0)
        plan[s] = Outage(round(rng.uniform(0.05 * run_s, latest), 3), round(dur, 3))
    return plan


def store_ids(n: int) -> list[str]:
    return [f"S{i:04d}" for i in range(1, n + 1)]


def _gtin(n: int) -> str:
    body = f"04{n:011d}"
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(body))
    return body + str((10 - total % 10) % 10)


class _SlowEvent(threading.Event):
    """An Event whose timed waits last at least ``floor`` seconds (set() still wakes them at once)."""

    floor = 0.5

    def wait(self, timeout: float | None = None) -> bool:
        return super().wait(None if timeout is None else max(timeout, self.floor))


def stretch_idle_polls(seconds: float) -> None:
    """For this process: paho's loop and the downlink worker poll at most every ``seconds`` (see above)."""
    import paho.mqtt.client as mqtt

    import edge_agent.sync.downlink as downlink

    loop = mqtt.Client.loop
    if getattr(loop, "_stretched", None) is None:
        def stretched(self: mqtt.Client, timeout: float = 1.0) -> Any:
            return loop(self, max(timeout, seconds))

        stretched._stretched = seconds  # type: ignore[attr-defined]
        mqtt.Client.loop = stretched  # type: ignore[method-assign]
    downlink.TICK_S = max(downlink.TICK_S, seconds)
    _SlowEvent.floor = seconds


def _poisson(rng: random.Random, lam: float) -> int:
    # Knuth's method: fine for the small means of one tick.
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


@dataclass
class StoreRecord:
    """What one store did: the ground truth and the lag records."""

    store: str
    inventory: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    facts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # Per stream, sealed but not yet acked: [seq, facts, oldest_created]; done: (stream, seq, facts, created, acked).
    open: dict[str, deque] = field(default_factory=lambda: defaultdict(deque))
    done: list[tuple[str, int, int, float, float]] = field(default_factory=list)
    cut_at: float | None = None
    restored_at: float | None = None
    up_again_at: float | None = None


class SimStore:
    """One store: the agent's wiring with no sources, driven by :class:`StoreGroup`'s workload thread."""

    def __init__(self, store: str, workdir: Path, port: int, wl: Workload, seed: int, *, synchronous: str,
                 rows_out: Any = None, idle_poll_s: float | None = 0.5) -> None:
        from edge_agent.agent import Agent
        from edge_agent.config import AgentConfig

        self.store = store
        self.wl = wl
        self.rng = random.Random(f"{seed}:{store}")
        self.rec = StoreRecord(store)
        self.quiet = False  # the workload stopped: no more health reports either
        self.rows_out = rows_out
        self.cfg = AgentConfig.model_validate({
            "store": {"id": store},
            # Backoff capped at 5 s, not the agent's 30 s: an outage's end shows within seconds.
            "mqtt": {"port": port, "client_id": store, "reconnect_min_s": 0.2, "reconnect_max_s": 5.0},
            "outbox": {"path": str(workdir / f"{store}.db"), "synchronous": synchronous, "cap_bytes": 1 << 34,
                       "cap_check_interval_s": 2.0},
            "health": {"interval_s": wl.health_interval_s},
            "log": {"level": "WARNING"},
        })
        self.agent = Agent(self.cfg)
        self._instrument()
        if idle_poll_s is not None:
            up = self.agent.uplink
            slow = _SlowEvent()
            listeners = self.agent.outbox._listeners
            listeners[listeners.index(up._wake.set)] = slow.set
            up._wake = slow
        self.labels = [f"{self.rng.getrandbits(48):012X}" for _ in range(min(wl.labels, 64))]

    def _instrument(self) -> None:
        outbox, rec = self.agent.outbox, self.rec
        seal, ack_through, tick = outbox.seal, outbox.ack_through, self.agent.health.tick

        def sealed(stream: str, **kw: Any):  # type: ignore[no-untyped-def]
            msg = seal(stream, **kw)
            if msg is not None:
                rec.open[stream].append((msg.seq, msg.facts, msg.oldest_created))
            return msg

        def acked(stream: str, seq: int, msg_id: str):  # type: ignore[no-untyped-def]
            result = ack_through(stream, seq, msg_id)
            now = time.time()
            q = rec.open.get(stream)
            while q and q[0][0] <= seq:
                s, n, created = q.popleft()
                rec.done.append((stream, s, n, created, now))
            return result

        def health_tick(force: bool = False) -> bool:
            if self.quiet:  # health is part of the workload: none after it stopped, so the truth stays exact
                return False
            done = tick(force)
            if done:
                rec.facts["health"] += 1
            return done

        outbox.seal = sealed  # type: ignore[method-assign]
        outbox.ack_through = acked  # type: ignore[method-assign]
        self.agent.health.tick = health_tick  # type: ignore[method-assign]

    # ------------------------------------------------------------ workload

    def rfid_tick(self, now: float) -> None:
        from edge_agent.inventory.book import Delta

        wl, rng = self.wl, self.rng
        sums: dict[tuple[str, str], int] = defaultdict(int)
        for _ in range(_poisson(rng, wl.tag_moves_per_s * wl.rfid_tick_s)):
            g = _gtin(rng.randrange(wl.gtins))
            r = rng.random()
            if r < wl.sale_share:
                sums[("pos", g)] -= 1
            elif r < wl.sale_share + wl.delivery_share:
                sums[("backroom", g)] += 1
            else:
                a, b = rng.sample(ZONES, 2)
                sums[(a, g)] -= 1
                sums[(b, g)] += 1
        deltas = [Delta(now, z, g, d) for (z, g), d in sums.items() if d]
        if not deltas:
            return
        self.agent.book.apply(deltas)
        for d in deltas:
            self.rec.inventory[(d.zone, d.gtin)] += d.delta
        self.rec.facts["inventory/delta"] += len(deltas)
        if self.rows_out is not None:
            self.rows_out.writelines(f"{self.store}\t{d.zone}\t{d.gtin}\t{d.delta}\n" for d in deltas)

    def esl_change(self, now: float) -> None:
        from edge_agent.clock import rfc3339
        from edge_agent.sync.outbox import Fact

        rng = self.rng
        label = rng.choice(self.labels)
        item = {"ts": rfc3339(now), "label": label, "gtin": _gtin(rng.randrange(self.wl.gtins)),
                "price": f"{rng.randrange(100, 10000) / 100:.2f}", "currency": "EUR", "promo": None,
                "battery_mv": rng.randrange(2500, 3100), "rssi": -rng.randrange(40, 90), "lqi": rng.randrange(50, 255),
                "last_seen": rfc3339(now - rng.uniform(0, 60)), "pending_since": None, "pick": False,
                "matches_hq": True}
        with self.agent.outbox.transaction() as tx:
            tx.enqueue("esl/state", [Fact(now, json.dumps(item, separators=(",", ":")), key=f"esl|{label}")])
        self.rec.facts["esl/state"] += 1

    def traffic_flush(self, bucket_start: float) -> None:
        from edge_agent.clock import rfc3339
        from edge_agent.sync import compaction
        from edge_agent.sync.outbox import Fact

        wl, rng = self.wl, self.rng
        start = rfc3339(bucket_start)
        stats, heat = [], []

        def stat(camera: str, zone: str | None, scale: float) -> dict[str, Any]:
            visits = _poisson(rng, 6 * scale)
            occ = [round(rng.uniform(0, 4 * scale), 2) for _ in range(3)]
            occ.sort()
            hist = [_poisson(rng, visits / 4) for _ in range(4)]
            return {"camera": camera, "zone": zone, "bucket_start": start, "bucket_s": wl.bucket_s,
                    "entries": _poisson(rng, 5 * scale), "exits": _poisson(rng, 5 * scale),
                    "occupancy_min": occ[0], "occupancy_avg": occ[1], "occupancy_max": occ[2], "visits": visits,
                    "dwell_edges_s": [10.0, 30.0, 120.0, 600.0], "dwell_hist": hist,
                    "dwell_median_s": round(rng.uniform(5, 90), 1)}

        for c in range(wl.cameras):
            cam = f"cam{c + 1}"
            stats.append(stat(cam, None, 1.0))
            stats += [stat(cam, f"{cam}-zone{z + 1}", 0.5) for z in range(wl.zones_per_camera)]
            cells = [round(rng.expovariate(1.0), 1) if rng.random() < 0.3 else 0.0
                     for _ in range(wl.heatmap_cols * wl.heatmap_rows)]
            heat.append({"camera": cam, "bucket_start": start, "bucket_s": wl.bucket_s, "cell_m": 0.5,
                         "cols": wl.heatmap_cols, "rows": wl.heatmap_rows, "cells": cells})
        stats.append(stat("*", None, wl.cameras))
        with self.agent.outbox.transaction() as tx:
            tx.enqueue("traffic/stats", [Fact(bucket_start, json.dumps(s, separators=(",", ":")),
                                              key=compaction.stats_key(s)) for s in stats])
            tx.enqueue("traffic/heatmap", [Fact(bucket_start, json.dumps(h, separators=(",", ":")),
                                                key=compaction.heatmap_key(h)) for h in heat])
        self.rec.facts["traffic/stats"] += len(stats)
        self.rec.facts["traffic/heatmap"] += len(heat)

    # ------------------------------------------------------------ outages

    def cut(self, dead_port: int) -> None:
        """Drop the live link and refuse reconnecting until :meth:`restore`."""
        conn = self.agent.uplink.conn
        self._cfg = conn.cfg
        conn.cfg = conn.cfg.model_copy(update={"port": dead_port})
        client = conn._client
        sock = client.socket() if client is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.rec.cut_at = time.time()

    def restore(self) -> None:
        self.agent.uplink.conn.cfg = self._cfg
        self.rec.restored_at = time.time()

    def drained(self) -> bool:
        ob = self.agent.outbox
        return ob.pending_count() == 0 and ob.sealed_count() == 0

    def result(self) -> dict[str, Any]:
        ob, up = self.agent.outbox, self.agent.uplink
        return {
            "store": self.store,
            "inventory": [[z, g, q] for (z, g), q in sorted(self.rec.inventory.items()) if q],
            "facts": dict(self.rec.facts),
            "hwm": {s: m["seq"] for s, m in ob.high_water().items()},
            "pending": ob.pending_count(),
            "sealed": ob.sealed_count(),
            "counters": ob.counters(),
            "uplink": up.figures(),
            "outage": [self.rec.cut_at, self.rec.restored_at, self.rec.up_again_at],
            "unacked_records": sum(len(q) for q in self.rec.open.values()),
        }


class StoreGroup:
    """K stores in this process, and one thread that runs all their workloads from a timer heap."""

    def __init__(self, stores: list[str], workdir: Path, port: int, wl: Workload, seed: int,
                 outages: dict[str, Outage], *, synchronous: str = "NORMAL", record_rows: bool = False,
                 idle_poll_s: float | None = 0.5) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        if idle_poll_s is not None:
            stretch_idle_polls(idle_poll_s)
        self.workdir = workdir
        self.wl = wl
        self.outages = outages
        self._rows = open(workdir / "rows.tsv", "w") if record_rows else None  # noqa: SIM115
        self.stores = [SimStore(s, workdir, port, wl, seed, synchronous=synchronous, rows_out=self._rows,
                                idle_poll_s=idle_poll_s) for s in stores]
        self._stop_workload = threading.Event()
        self._thread: threading.Thread | None = None
        # A loopback port that refuses connections, for stores whose link is cut.
        self._dead = socket.socket()
        self._dead.bind(("127.0.0.1", 0))
        self.dead_port = self._dead.getsockname()[1]
        self.errors: list[str] = []

    def start_agents(self) -> None:
        for s in self.stores:
            s.agent.start()

    def connected(self) -> int:
        return sum(s.agent.uplink.connected for s in self.stores)

    def start_workload(self, t0: float) -> None:
        self._thread = threading.Thread(target=self._run, args=(t0,), name="fleet-workload", daemon=True)
        self._thread.start()

    def stop_workload(self) -> None:
        self._stop_workload.set()
        for s in self.stores:
            s.quiet = True

    def _run(self, t0: float) -> None:
        wl = self.wl
        heap: list[tuple[float, int, int, str]] = []
        n = 0

        def push(t: float, i: int, kind: str) -> None:
            nonlocal n
            n += 1
            heapq.heappush(heap, (t, n, i, kind))

        first_bucket = (t0 // wl.bucket_s + 1) * wl.bucket_s
        for i, s in enumerate(self.stores):
            push(t0 + s.rng.uniform(0, wl.rfid_tick_s), i, "rfid")
            if wl.esl_changes_per_s > 0:
                push(t0 + s.rng.expovariate(wl.esl_changes_per_s), i, "esl")
            push(first_bucket + s.rng.uniform(0, wl.flush_jitter_s), i, "traffic")
            if (o := self.outages.get(s.store)) is not None:
                push(t0 + o.start_s, i, "cut")
        # Outages run their course after the workload stops (the drain waits for them).
        while heap:
            t, _, i, kind = heap[0]
            if self._stop_workload.is_set() and kind not in ("restore", "up?"):
                heapq.heappop(heap)
                continue
            delay = t - time.time()
            if delay > 0:
                if kind in ("restore", "up?"):
                    time.sleep(min(delay, 0.5))
                else:
                    self._stop_workload.wait(min(delay, 0.5))
                continue
            heapq.heappop(heap)
            s = self.stores[i]
            try:
                if kind == "rfid":
                    s.rfid_tick(t)
                    push(t + wl.rfid_tick_s, i, "rfid")
                elif kind == "esl":
                    s.esl_change(t)
                    push(t + s.rng.expovariate(wl.esl_changes_per_s), i, "esl")
                elif kind == "traffic":
                    bucket_end = t - (t % wl.bucket_s)
                    s.traffic_flush(bucket_end - wl.bucket_s)
                    push(bucket_end + wl.bucket_s + s.rng.uniform(0, wl.flush_jitter_s), i, "traffic")
                elif kind == "cut":
                    s.cut(self.dead_port)
                    push(t + self.outages[s.store].duration_s, i, "restore")
                elif kind == "restore":
                    s.restore()
                    push(t + 0.1, i, "up?")
                elif kind == "up?":
                    if s.agent.uplink.connected:
                        s.rec.up_again_at = time.time()
                    else:
                        push(t + 0.1, i, "up?")
            except Exception as e:  # a store's failure is a finding, not a reason to stop the others
                log.exception("store %s: %s failed", s.store, kind)
                self.errors.append(f"{s.store} {kind}: {e!r}")

    def workload_done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def drained(self) -> int:
        """How many stores have nothing pending and nothing waiting for HQ's ack."""
        return sum(s.drained() for s in self.stores)

    def results(self, path: Path) -> Path:
        if self._rows is not None:
            self._rows.flush()
        out = {"stores": [s.result() for s in self.stores], "errors": self.errors,
               "records": {s.store: s.rec.done for s in self.stores}}
        path.write_text(json.dumps(out, separators=(",", ":")))
        return path

    def stop(self) -> None:
        self._stop_workload.set()
        if self._thread is not None:
            self._thread.join(5)
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda s: s.agent.stop(flush_timeout=0.2), self.stores))
        if self._rows is not None:
            self._rows.close()
        self._dead.close()


# ---------------------------------------------------------------- worker processes


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    stores: list[str]
    workdir: str
    port: int
    workload: dict[str, Any]
    seed: int
    outages: dict[str, tuple[float, float]]
    synchronous: str
    record_rows: bool
    idle_poll_s: float | None
    nice: int = 0


class _Tagged:
    """Replies carry the number of the command they answer, so a late one is never taken for the next."""

    def __init__(self, ctl: Any, n: int) -> None:
        self._ctl = getattr(ctl, "_ctl", ctl)
        self._n = n

    def send(self, value: Any) -> None:
        self._ctl.send((self._n, value))

    def recv(self) -> Any:
        return self._ctl.recv()


def _worker(spec: WorkerSpec, ctl: Connection) -> None:
    logging.basicConfig(level=logging.WARNING, format=f"fleet-{spec.index} %(levelname)s %(name)s: %(message)s")
    os.nice(spec.nice)  # before any thread starts: Linux's nice is per thread, and new threads inherit it
    group = StoreGroup(spec.stores, Path(spec.workdir), spec.port, Workload(**spec.workload), spec.seed,
                       {s: Outage(*o) for s, o in spec.outages.items()}, synchronous=spec.synchronous,
                       record_rows=spec.record_rows, idle_poll_s=spec.idle_poll_s)
    ctl.send(("built", os.getpid()))
    while True:
        n, cmd, arg = ctl.recv()
        ctl = _Tagged(ctl, n)  # type: ignore[assignment]
        if cmd == "start_agents":
            group.start_agents()
            ctl.send(True)
        elif cmd == "connected":
            ctl.send(group.connected())
        elif cmd == "go":
            group.start_workload(arg)
            ctl.send(True)
        elif cmd == "stop_workload":
            group.stop_workload()
            ctl.send(True)
        elif cmd == "drained":
            ctl.send((group.drained(), group.workload_done()))
        elif cmd == "results":
            ctl.send(str(group.results(Path(spec.workdir) / "results.json")))
        elif cmd == "stop":
            group.stop()
            ctl.send(True)
            return


class Fleet:
    """N stores in P worker processes (spawned), driven from here over pipes."""

    def __init__(self, n_stores: int, procs: int, port: int, workdir: Path, *, seed: int = 1,
                 workload: Workload = NOMINAL, outages: dict[str, Outage] | None = None,
                 synchronous: str = "NORMAL", record_rows: bool = False, idle_poll_s: float | None = 0.5,
                 nice: int = 0) -> None:
        self.stores = store_ids(n_stores)
        self.workdir = Path(workdir)
        self.outages = outages or {}
        self.procs: list[mp.process.BaseProcess] = []
        self.ctls: list[Connection] = []
        self.pids: list[int] = []
        self._n = 0
        ctx = mp.get_context("spawn")
        procs = max(1, min(procs, n_stores))
        for k in range(procs):
            mine = self.stores[k::procs]
            spec = WorkerSpec(k, mine, str(self.workdir / f"w{k}"), port, asdict(workload), seed,
                              {s: (o.start_s, o.duration_s) for s, o in self.outages.items() if s in mine},
                              synchronous, record_rows, idle_poll_s, nice)
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(spec, child), name=f"fleet-{k}", daemon=True)
            p.start()
            self.procs.append(p)
            self.ctls.append(parent)

    def _all(self, cmd: str, arg: Any = None, timeout: float = 120.0) -> list[Any]:
        self._n += 1
        for c in self.ctls:
            c.send((self._n, cmd, arg))
        out = []
        deadline = time.monotonic() + timeout
        for c in self.ctls:
            while True:
                if not c.poll(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"a fleet worker did not answer {cmd!r} within {timeout}s")
                n, value = c.recv()
                if n == self._n:  # else the late answer to an earlier command
                    out.append(value)
                    break
        return out

    def start(self, connect_timeout: float = 120.0) -> float:
        """Build every store, connect them all, start the workloads together; returns t0 (wall clock)."""
        for c in self.ctls:
            if not c.poll(300):
                raise TimeoutError("a fleet worker did not build its stores")
            self.pids.append(c.recv()[1])
        self._all("start_agents")
        deadline = time.monotonic() + connect_timeout
        while sum(self._all("connected")) < len(self.stores):
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {sum(self._all('connected'))} of {len(self.stores)} stores connected")
            time.sleep(0.2)
        t0 = time.time() + 0.5
        self._all("go", t0)
        return t0

    def stop_workload(self) -> None:
        self._all("stop_workload")

    def drained(self) -> tuple[int, bool]:
        answers = self._all("drained", timeout=300)
        return sum(a[0] for a in answers), all(a[1] for a in answers)

    def wait_drained(self, timeout: float, poll: float = 0.5,
                     on_poll: Callable[[int], None] | None = None) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            try:
                n, done = self.drained()
            except TimeoutError:  # a worker too busy to answer (an overloaded box) has not drained either
                n, done = 0, False
            if on_poll:
                on_poll(n)
            if n == len(self.stores) and done:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(poll)

    def results(self) -> dict[str, Any]:
        merged: dict[str, Any] = {"stores": [], "errors": [], "records": {}}
        for path in self._all("results", None, timeout=600):
            part = json.loads(Path(path).read_text())
            merged["stores"] += part["stores"]
            merged["errors"] += part["errors"]
            merged["records"].update(part["records"])
        return merged

    def rows_files(self) -> list[Path]:
        return [self.workdir / f"w{k}" / "rows.tsv" for k in range(len(self.ctls))]

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._all("stop", timeout=120)
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True, help="the broker's port on 127.0.0.1")
    p.add_argument("--stores", type=int, default=20)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--outage-share", type=float, default=0.1)
    p.add_argument("--workdir", default="var/fleet")
    a = p.parse_args()
    stores = store_ids(a.stores)
    fleet = Fleet(a.stores, a.procs, a.port, Path(a.workdir), seed=a.seed,
                  outages=plan_outages(stores, a.seed, a.outage_share, 10, 120, a.seconds))
    try:
        fleet.start()
        time.sleep(a.seconds)
        fleet.stop_workload()
        ok = fleet.wait_drained(300)
        res = fleet.results()
        print(json.dumps({"drained": ok, "stores": len(res["stores"]), "errors": res["errors"][:10]}))
    finally:
        fleet.stop()


if __name__ == "__main__":
    main()
