"""Cameras in their own processes; only numbers come back.

Each camera runs capture -> detect + track -> analytics in a process of its own (two cores are used,
and a slow or stuck camera never stalls RFID or the uplink). The process sends back finished
traffic/stats and traffic/heatmap items (with the dwell seconds behind them, for the store-wide
median), stream gaps and per-stage timings over a bounded queue; the agent process merges the cameras'
buckets into store-wide ("*") items and enqueues both in the outbox. Frames never cross the process
boundary; the only image that ever leaves the analysis is the opt-in, blurred debug snapshot, which a
camera process writes to a local folder itself.

Items the store-wide merge has produced are held until the outbox takes them: while the disk refuses
writes the drain thread retries them and takes nothing new, so results wait in the bounded queue and
a camera that cannot hand one over within a second counts it in ``results_dropped``.

A camera process that dies is restarted by the agent's supervisor (``supervised``, see supervise.py).
Each process has a results queue of its own, made new at every start: a process killed while writing to
a shared queue would leave its lock taken for every other camera. What a killed camera had not handed
over yet (its open buckets) is lost with it.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

from ..clock import parse_rfc3339
from ..config import CameraConfig, VisionConfig
from ..logs import camera_log_listener, child_logging
from ..sync import compaction
from ..sync.diskstate import until_written
from ..sync.outbox import Fact, Outbox
from .storewide import STORE_WIDE, StoreWideTraffic

log = logging.getLogger(__name__)

PERF_EVERY_S = 2.0  # stream seconds between a camera's frame figures: how fresh "last frame" is on the status page


def run_camera(cam: CameraConfig, vcfg: VisionConfig, out: Any, stop: Any, logs: tuple[Any, int], record: Any) -> None:
    """The camera process: never returns frames, only messages of numbers. ``logs`` is (queue, level): its
    log records go to the main process, which writes them as it writes its own. While ``record`` (an event)
    is set, each frame's tracks are sent too, as numbers, for a recording."""
    import os

    child_logging(*logs, camera=cam.camera)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from .capture import Frame, FrameSource, NetworkOptions
    from .detector import PersonDetector
    from .feed import TrackFeed

    dropped = [0]  # results the agent could not take in time; reported with the frame figures

    def send(msg: tuple) -> None:
        try:
            out.put(msg, timeout=1.0)
        except queue.Full:
            dropped[0] += 1

    # ByteTrack keeps a lost track for track_buffer *frames*; the grace period is configured in
    # seconds, so it means the same whatever rate the camera is analysed at.
    fps = cam.fps_cap or 25.0
    detector = PersonDetector(vcfg.model, imgsz=vcfg.imgsz, conf=vcfg.conf, runtime=vcfg.runtime, tracker=vcfg.tracker,
                              tracker_overrides={"track_buffer": max(1, round(cam.track_grace_s * fps))})
    feed = TrackFeed(cam, vcfg.flush_s)
    src = FrameSource(cam.url.get_secret_value(), fps_cap=cam.fps_cap, start_ts=cam.start_ts,
                      network=NetworkOptions(cam.open_timeout_s, cam.read_timeout_s, cam.rtsp_transport))
    snapshot = None
    if vcfg.debug_snapshot_dir is not None:
        from .snapshot import SnapshotWriter

        snapshot = SnapshotWriter(vcfg.debug_snapshot_dir, cam.camera, vcfg.debug_snapshot_interval_s)
    last_report = None

    def perf() -> dict[str, float]:
        return {"frames": n, "fps": n / t_frames if t_frames else 0.0, "detect_track_ms": 1000 * t_detect / max(n, 1),
                "skipped": src.stats.skipped, "gaps": src.stats.gaps, "results_dropped": dropped[0]}

    t_detect = t_frames = 0.0
    n = 0
    t_prev = time.perf_counter()
    for item in src.frames():
        if stop.is_set():
            src.stop()
            break
        if not isinstance(item, Frame):
            send(("gap", cam.camera, item.start, item.end, item.reason))
            continue
        t0 = time.perf_counter()
        tracks = detector.track(item.image)
        t1 = time.perf_counter()
        if record.is_set():
            send(("tracks", cam.camera, item.ts, [(t.track_id, *t.box, t.conf) for t in tracks]))
        if (facts := feed.frame(item.ts, tracks)) is not None:
            send(facts)
        if snapshot is not None:
            snapshot.offer(item.image, [t.box for t in tracks])
        t_detect += t1 - t0
        t_frames += t1 - t_prev
        t_prev = time.perf_counter()
        n += 1
        if last_report is None or item.ts - last_report >= PERF_EVERY_S:
            last_report = item.ts
            send(("perf", cam.camera, perf()))
    # A file ended (or we are stopping): close every open bucket.
    if (facts := feed.end()) is not None:
        send(facts)
    send(("done", cam.camera, perf()))


class TracksTap(Protocol):
    def tracks(self, camera: str, ts: float, rows: Sequence[Sequence[float]]) -> None: ...
    def camera_done(self, camera: str) -> None: ...


class VisionService:
    def __init__(self, cfg: VisionConfig, outbox: Outbox, monotonic: Callable[[], float] = time.monotonic) -> None:
        """``monotonic``: the store-wide merge's deadlines (a replay gives its virtual clock)."""
        self.cfg = cfg
        self.outbox = outbox
        self._monotonic = monotonic
        self._ctx = mp.get_context("spawn")  # no forked copies of the agent's threads and sockets
        self._stop = self._ctx.Event()
        self._logs: Any = self._ctx.Queue()
        self._log_listener: Any = None
        self._record = self._ctx.Event()
        self._tracks_tap: TracksTap | None = None
        self._cams = {c.camera: c for c in cfg.cameras}
        self._procs: dict[str, Any] = {}
        self._queues: dict[str, Any] = {c.camera: self._ctx.Queue(maxsize=cfg.queue_max) for c in cfg.cameras}
        self._turn = 0  # which camera's queue is looked at first: a busy camera must not starve the others
        self._drain = threading.Thread(target=self._run, name="vision-drain", daemon=True)
        self._halt = threading.Event()
        # Only the drain thread touches it. Its deadline runs on the monotonic clock: the cameras' stream
        # times need not agree with each other or with the wall clock.
        self._storewide = StoreWideTraffic(cfg.cameras, wait_s=cfg.storewide_wait_s)
        self.figures: dict[str, float] = {}
        self.done: set[str] = set()
        self.last_frame: dict[str, float] = {}  # camera -> monotonic time its last frame figures arrived
        self.spawned: dict[str, float] = {}  # camera -> monotonic time its process was last started
        self.supervised = [CameraChild(self, c) for c in self._cams]  # restarted by the agent's supervisor

    def record_tracks(self, tap: TracksTap) -> None:
        """From now on the cameras also send every frame's tracks (numbers only), handed to ``tap``."""
        self._tracks_tap = tap
        self._record.set()

    def start(self) -> None:
        self._log_listener = camera_log_listener(self._logs)
        for camera in self._cams:
            self._spawn(camera)
        self._drain.start()

    def _spawn(self, camera: str) -> None:
        if camera in self._procs:  # a restart: the dead process's queue may be left locked or half written
            old = self._queues[camera]
            old.cancel_join_thread()
            old.close()
            self._queues[camera] = self._ctx.Queue(maxsize=self.cfg.queue_max)
        logs = (self._logs, logging.getLogger().getEffectiveLevel())
        p = self._ctx.Process(target=run_camera, name=f"camera-{camera}", daemon=True,
                              args=(self._cams[camera], self.cfg, self._queues[camera], self._stop, logs, self._record))
        self.spawned[camera] = time.monotonic()
        p.start()
        self._procs[camera] = p

    def pid(self, camera: str) -> int | None:
        p = self._procs.get(camera)
        return p.pid if p is not None else None

    def stop(self, timeout_s: float = 3.0) -> None:
        """Every camera process gets ``timeout_s`` in all (not each) to finish its bucket, then is killed:
        the agent must be gone within the 10 s a container engine or systemd gives after SIGTERM."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for p in self._procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1)
        self._halt.set()
        self._drain.join(5)
        if self._log_listener is not None:
            self._log_listener.stop()  # after the cameras: what they logged on the way out is written

    def _take(self, timeout: float) -> tuple | None:
        """The next message of any camera, or None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            queues = list(self._queues.values())
            for i in range(len(queues)):
                try:
                    msg = queues[(self._turn + i) % len(queues)].get_nowait()
                except (queue.Empty, OSError, EOFError, ValueError):  # empty, or closed by a restart just now
                    continue
                self._turn += 1
                return msg
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)  # no select over several multiprocessing queues; results are minute buckets

    def _run(self) -> None:
        while True:
            msg = self._take(0.2)
            if msg is None and self._halt.is_set():
                break  # the cameras have stopped and everything they sent has been taken
            try:
                self.take(msg)
            except Exception:
                log.exception("vision result %s could not be handled", msg[0] if msg else "(store-wide deadline)")
        self.finish()

    def take(self, msg: tuple | None) -> None:
        """One message from a camera (None: none came), then what the store-wide deadline makes due."""
        if msg is not None:
            self._handle(msg)
        self._enqueue(*self._storewide.due(self._monotonic()))

    def finish(self) -> None:
        """Every store-wide bucket still waiting (the agent is stopping)."""
        self._enqueue(*self._storewide.flush())

    def _handle(self, msg: tuple) -> None:
        kind, camera = msg[0], msg[1]
        if kind == "facts":
            _, _, stats, heat, dwells = msg
            # The store-wide items a camera's bucket completes go into the same transaction as the camera's.
            wide_stats, wide_heat = self._storewide.add(camera, stats, heat, dwells, self._monotonic())
            self._enqueue(stats + wide_stats, heat + wide_heat)
        elif kind == "tracks":
            if self._tracks_tap is not None:
                self._tracks_tap.tracks(camera, msg[2], msg[3])
        elif kind == "gap":
            _, _, start, end, reason = msg
            until_written(lambda: self.outbox.alert(
                "vision.stream_gap", f"camera {camera}: {reason}; no frames for {end - start:.1f} s"), self._halt)
        elif kind in ("perf", "done"):
            self.last_frame[camera] = time.monotonic()
            for k, v in msg[2].items():
                self.figures[f"vision.{camera}.{k}"] = float(v)
            if kind == "done":
                if self._tracks_tap is not None:
                    self._tracks_tap.camera_done(camera)
                self.done.add(camera)
                self._enqueue(*self._storewide.camera_done(camera))

    def _enqueue(self, stats: list[dict[str, Any]], heat: list[dict[str, Any]]) -> None:
        self.figures.update({f"vision.{STORE_WIDE}.{k}": float(v) for k, v in self._storewide.counters.items()})
        if stats or heat:
            # The merge has moved past these items: they exist only here until they are committed.
            until_written(lambda: self._write(stats, heat), self._halt)

    def _write(self, stats: list[dict[str, Any]], heat: list[dict[str, Any]]) -> None:
        with self.outbox.transaction() as tx:
            if stats:
                tx.enqueue("traffic/stats", [_fact(s, compaction.stats_key(s)) for s in stats])
            if heat:
                tx.enqueue("traffic/heatmap", [_fact(h, compaction.heatmap_key(h)) for h in heat])


def _fact(item: dict[str, Any], key: str) -> Fact:
    return Fact(ts=parse_rfc3339(item["bucket_start"]), body=json.dumps(item, separators=(",", ":")), key=key)


class CameraChild:
    """One camera's process, as the supervisor sees it: finished when it exited 0 (a video file ended; a
    live stream's process returns only when stopped), dead when killed or exited otherwise (an exception:
    a missing file, a model that does not load)."""

    alerts = ("vision.camera_down", "vision.camera_recovered")

    def __init__(self, service: VisionService, camera: str) -> None:
        self.service = service
        self.camera = camera
        self.name = f"camera-{camera}"

    def exit(self) -> tuple[Literal["running", "finished", "died"], str]:
        p = self.service._procs.get(self.camera)
        if p is None or p.exitcode is None:
            return "running", ""
        if p.exitcode == 0:
            return "finished", ""
        if p.exitcode < 0:
            return "died", f"killed by {_signal_name(-p.exitcode)}"
        return "died", f"exit code {p.exitcode}"

    def working(self) -> bool:
        """Frames analysed since this process started (its model loaded)."""
        return self.service.last_frame.get(self.camera, float("-inf")) > self.service.spawned.get(self.camera, 0.0)

    def restart(self) -> None:
        self.service.done.discard(self.camera)
        self.service._spawn(self.camera)


def _signal_name(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"
