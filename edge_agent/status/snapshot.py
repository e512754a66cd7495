"""What the agent is doing right now, in one model: the page, ``edge-agent status``, /readyz and /metrics
all read it, so they never disagree.

Everything is read at the moment it is asked for, from what the components already hold: the outbox's
counters and alerts, the uplink's figures, the RFID pipeline's per-antenna counts, the cameras' frame
figures, the labels' states and the supervisor's children. Nothing here writes, and nothing holds a
lock of the data path for long: the one costly figure, the bytes waiting to be sent (SQLite walks the
pages for it), is refreshed at most every ``QUEUED_BYTES_EVERY_S``. No image, EPC or price leaves
through here; labels are named by their id and GTIN only.

Ready means: the database takes writes, the uplink is connected, and every supervised child (camera
process, source thread) is up or has finished. Alive means: the main loop (housekeeping) has ticked
within ``status.stale_after_s``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

from pydantic import BaseModel

from .. import __version__
from ..clock import rfc3339

if TYPE_CHECKING:
    from ..agent import Agent

QUEUED_BYTES_EVERY_S = 15.0
RATE_WINDOW_S = 10.0
ALERTS_SHOWN = 20
LABELS_SHOWN = 50


class Check(BaseModel):
    name: str  # database, uplink, sources
    ok: bool
    detail: str


class Child(BaseModel):
    name: str  # camera-<id>, rfid-intake, esl, ...
    state: str  # up, down, finished
    restarts: int
    reason: str  # why it last died
    down_s: float | None  # how long the current episode has lasted
    restart_in_s: float | None


class Antenna(BaseModel):
    reader: str
    antenna: str  # the port, or the name antennas are identified by
    zone: str
    reads: int
    reads_per_s: float | None  # over the last RATE_WINDOW_S; None until two samples exist
    last_read_age_s: float | None  # None: no read since the agent started


class Camera(BaseModel):
    camera: str
    state: str  # up, down, finished
    pid: int | None  # its process
    restarts: int
    fps: float | None
    inference_ms: float | None  # detect + track per frame
    frames: int | None  # since the process last started
    skipped: int | None  # dropped by the rate cap
    last_frame_age_s: float | None


class Label(BaseModel):
    label: str
    gtin: str | None
    alerts: list[str]  # price_mismatch, stuck_pending, low_battery, label_silent
    wrong_for_s: float | None  # not showing what it should since


class Labels(BaseModel):
    known: int
    price_integrity: float  # labels showing HQ's price / labels HQ has a price for
    attention_count: int
    attention: list[Label]  # the first LABELS_SHOWN, longest wrong first


class OutboxStatus(BaseModel):
    writable: bool
    pending_facts: int
    sealed_messages: int
    queued_bytes: int
    db_bytes: int
    cap_bytes: int
    oldest_age_s: float | None  # the oldest fact not yet acknowledged by HQ
    facts_enqueued: int  # since the agent started
    facts_sealed: int
    dropped: dict[str, int]  # by stream, ever
    compacted: int
    coarsened: int
    quarantined: dict[str, int]  # by source, ever


class UplinkStatus(BaseModel):
    connected: bool
    published_messages: int
    acked_messages: int
    unacked_messages: int
    unacked_age_s: float


class Alert(BaseModel):
    ts: str
    kind: str
    message: str
    reported: bool  # in a health message to HQ already


class Status(BaseModel):
    store: str
    version: str
    boot_id: str
    uptime_s: float
    alive: bool
    loop_age_s: float
    ready: bool
    checks: list[Check]
    uplink: UplinkStatus
    outbox: OutboxStatus
    antennas: list[Antenna]
    rfid_bad: dict[str, int]  # reads quarantined, by the first word of their reason
    cameras: list[Camera]
    labels: Labels | None  # None without ESL
    children: list[Child]
    alerts: list[Alert]  # newest first


class Rates:
    """Per-key rates of counters over a sliding window of samples (pure: time comes in)."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, dict[Hashable, int]]] = deque()

    def add(self, t: float, counts: dict[Hashable, int]) -> None:
        self._samples.append((t, counts))
        # Keep one sample at least a window old, so the rate always spans the whole window once it can.
        while len(self._samples) > 2 and t - self._samples[1][0] >= self.window_s:
            self._samples.popleft()

    def rate(self, key: Hashable) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, first), (t1, last) = self._samples[0], self._samples[-1]
        return (last.get(key, 0) - first.get(key, 0)) / (t1 - t0) if t1 > t0 else None


class StatusSource:
    def __init__(self, agent: Agent, mono: Callable[[], float] = time.monotonic) -> None:
        self.agent = agent
        self.mono = mono
        self.started = mono()
        self.rates = Rates()
        self._lock = threading.Lock()
        self._queued: tuple[float, int] | None = None  # (when, bytes)

    def sample(self) -> None:
        """Take a sample of the per-antenna read counts (the status server does, every second)."""
        if self.agent.rfid is not None:
            counts: dict[Hashable, int] = {(r, str(a)): n for r, a, _z, n, _t in self.agent.rfid.antennas()}
            with self._lock:
                self.rates.add(self.mono(), counts)

    def alive(self) -> tuple[bool, float]:
        age = self.mono() - self.agent.heartbeat
        return age < self.agent.cfg.status.stale_after_s, age

    def snapshot(self) -> Status:
        a = self.agent
        now_mono = self.mono()
        alive, loop_age = self.alive()
        children = self._children(now_mono)
        outbox = self._outbox()
        up = a.uplink.figures()
        uplink = UplinkStatus(connected=a.uplink.connected, published_messages=int(up["published_messages"]),
                        acked_messages=int(up["acked_messages"]), unacked_messages=int(up["unacked_messages"]),
                        unacked_age_s=float(up["unacked_age_s"]))
        down = [c.name for c in children if c.state == "down"]
        checks = [
            Check(name="database", ok=outbox.writable,
                  detail="takes writes" if outbox.writable else "the disk refuses writes (full or failing)"),
            Check(name="uplink", ok=uplink.connected, detail=f"{'connected' if uplink.connected else 'not connected'}"
                  f" to {a.cfg.mqtt.host}:{a.cfg.mqtt.port}"),
            Check(name="sources", ok=not down,
                  detail=f"down: {', '.join(down)}" if down else f"{len(children)} supervised, none down"),
        ]
        return Status(
            store=a.cfg.store.id, version=__version__, boot_id=a.boot_id, uptime_s=round(now_mono - self.started, 1),
            alive=alive, loop_age_s=round(loop_age, 3), ready=all(c.ok for c in checks), checks=checks,
            uplink=uplink, outbox=outbox, antennas=self._antennas(), rfid_bad=self._rfid_bad(),
            cameras=self._cameras(children, now_mono), labels=self._labels(), children=children,
            alerts=[Alert(ts=rfc3339(ts), kind=k, message=m, reported=bool(r)) for ts, k, m, r in a.outbox.read(
                "SELECT ts, kind, message, reported FROM alerts ORDER BY id DESC LIMIT ?", (ALERTS_SHOWN,))],
        )

    def _children(self, now: float) -> list[Child]:
        sup = self.agent.supervisor
        return [Child(name=c.name, state=c.state, restarts=c.restarts, reason=c.last_reason,
                      down_s=round(now - c.down_since, 1) if c.down_since is not None else None,
                      restart_in_s=round(max(0.0, c.restart_at - now), 1) if c.restart_at is not None else None)
                for c in sup.states()]

    def _outbox(self) -> OutboxStatus:
        ob = self.agent.outbox
        counters = ob.counters()
        now = ob.clock.now()
        oldest = [t for (t,) in ob.read("SELECT created FROM pending ORDER BY id LIMIT 1")]
        oldest += [t for (t,) in ob.read("SELECT min(oldest_created) FROM sealed") if t is not None]
        with self._lock:
            if self._queued is None or self.mono() - self._queued[0] >= QUEUED_BYTES_EVERY_S:
                self._queued = (self.mono(), ob.disk_use().queued)
            queued = self._queued[1]
        return OutboxStatus(
            writable=not ob.write_failing, pending_facts=ob.pending_count(), sealed_messages=ob.sealed_count(),
            queued_bytes=queued, db_bytes=ob.used_bytes(), cap_bytes=ob.cap_bytes,
            oldest_age_s=round(max(0.0, now - min(oldest)), 3) if oldest else None,
            facts_enqueued=ob.facts_enqueued, facts_sealed=ob.facts_sealed,
            dropped=_prefixed(counters, "dropped."), compacted=counters.get("compacted", 0),
            coarsened=counters.get("coarsened", 0), quarantined=_prefixed(counters, "quarantined."),
        )

    def _antennas(self) -> list[Antenna]:
        rfid = self.agent.rfid
        if rfid is None:
            return []
        now = rfid.clock.now()
        with self._lock:
            rate = self.rates.rate
            return [Antenna(reader=r, antenna=str(ant), zone=z, reads=n,
                            reads_per_s=None if (v := rate((r, str(ant)))) is None else round(v, 2),
                            # The pipeline starts every antenna's silence clock at start-up: no read is "never".
                            last_read_age_s=round(max(0.0, now - t), 1) if t is not None and n else None)
                    for r, ant, z, n, t in rfid.antennas()]

    def _rfid_bad(self) -> dict[str, int]:
        rfid = self.agent.rfid
        if rfid is None:
            return {}
        with rfid.lock:
            return dict(rfid.bad_by_reason)

    def _cameras(self, children: list[Child], now: float) -> list[Camera]:
        vision = self.agent.vision
        if vision is None:
            return []
        by_name = {c.name: c for c in children}
        out = []
        for cam in (c.camera for c in vision.cfg.cameras):
            f = {k[len(f"vision.{cam}."):]: v for k, v in list(vision.figures.items()) if k.startswith(f"vision.{cam}.")}
            child = by_name.get(f"camera-{cam}")
            seen = vision.last_frame.get(cam)
            out.append(Camera(
                camera=cam, state=child.state if child else "up", pid=vision.pid(cam),
                restarts=child.restarts if child else 0,
                fps=_round(f.get("fps"), 1), inference_ms=_round(f.get("detect_track_ms"), 1),
                frames=_int(f.get("frames")), skipped=_int(f.get("skipped")),
                last_frame_age_s=round(now - seen, 1) if seen is not None else None))
        return out

    def _labels(self) -> Labels | None:
        esl = self.agent.esl
        if esl is None:
            return None
        f = esl.figures()
        count, rows = esl.attention(LABELS_SHOWN)
        now = esl.clock.now()
        return Labels(known=int(f["esl.labels"]), price_integrity=round(f["esl.price_integrity"], 4),
                      attention_count=count,
                      attention=[Label(label=lb, gtin=g, alerts=k, wrong_for_s=round(now - w, 0) if w is not None else None)
                                 for lb, g, k, w in rows])


def _prefixed(counters: dict[str, int], prefix: str) -> dict[str, int]:
    return {k[len(prefix):]: v for k, v in counters.items() if k.startswith(prefix)}


def _round(v: float | None, nd: int) -> float | None:
    return None if v is None else round(v, nd)


def _int(v: float | None) -> int | None:
    return None if v is None else int(v)
