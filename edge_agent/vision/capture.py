"""Frames from RTSP, USB or files through OpenCV, with stream timestamps, a rate cap and reconnects.

- Timestamps come from the stream: the container's position for live streams, frame index / fps for
  files (OpenCV's frame count is wrong for MPEG-1, so files are read until ``read()`` fails). Never
  the wall clock at arrival, which would smear a stalled stream's backlog over the wrong seconds.
- A frame-rate cap drops frames rather than queueing them; dropped frames are counted.
- A live stream that drops is reopened with exponential backoff; the gap is reported.
- A network stream (RTSP, HTTP) is opened through FFmpeg with an open and a read timeout, so a camera that
  accepts the connection and then says nothing costs seconds, not a hung camera process; RTSP may be told
  to use TCP (interleaved in the RTSP connection: no UDP ports to open through a firewall, no packet loss
  smearing frames). Files and devices open as before.
- The URL is logged only through ``redact_url``: a camera's URL usually carries its password.
Frames never leave the process that captured them.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..redact import redact_url
from ..retry import backoff_delay

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Frame:
    ts: float  # stream time, epoch seconds
    index: int  # frames read from the source so far (kept or not)
    image: np.ndarray = field(repr=False)  # BGR


@dataclass(frozen=True, slots=True)
class Gap:
    """The stream was lost from ``start`` to ``end`` (stream-clock estimate) and came back."""

    start: float
    end: float
    reason: str


@dataclass
class CaptureStats:
    read: int = 0
    kept: int = 0
    skipped: int = 0  # dropped by the rate cap
    failed_opens: int = 0
    gaps: int = 0
    gap_s: float = 0.0


NETWORK = ("rtsp://", "rtsps://", "http://", "https://")
# FFmpeg options OpenCV reads from the environment at each open ("key;value|key;value").
FFMPEG_OPTIONS = "OPENCV_FFMPEG_CAPTURE_OPTIONS"


def is_live(url: str | int) -> bool:
    return isinstance(url, int) or str(url).startswith((*NETWORK, "/dev/video"))


@dataclass(frozen=True, slots=True)
class NetworkOptions:
    """How a network stream is opened (only RTSP and HTTP URLs use these)."""

    open_timeout_s: float = 10.0
    read_timeout_s: float = 10.0
    rtsp_transport: str | None = None  # "tcp" or "udp"; None: FFmpeg's default (UDP, then TCP)


class FrameSource:
    def __init__(
        self,
        url: str | int,
        *,
        fps_cap: float = 0.0,
        start_ts: float | None = None,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        network: NetworkOptions = NetworkOptions(),
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.url = url
        self.shown = redact_url(url)  # what log lines and errors say
        self.live = is_live(url)
        self.network = network
        self.fps_cap = fps_cap
        self.start_ts = start_ts
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self._wall = wall
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.stats = CaptureStats()
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True

    def _open(self) -> cv2.VideoCapture | None:
        if isinstance(self.url, str) and self.url.startswith(NETWORK):
            if self.network.rtsp_transport:
                # One camera per process (vision/service.py), so setting the process's environment is safe.
                os.environ[FFMPEG_OPTIONS] = f"rtsp_transport;{self.network.rtsp_transport}"
            cap = cv2.VideoCapture(self.url, cv2.CAP_FFMPEG, [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, round(self.network.open_timeout_s * 1000),
                cv2.CAP_PROP_READ_TIMEOUT_MSEC, round(self.network.read_timeout_s * 1000)])
        else:
            cap = cv2.VideoCapture(self.url)
        if not cap.isOpened():
            cap.release()
            self.stats.failed_opens += 1
            return None
        return cap

    def frames(self) -> Iterator[Frame | Gap]:
        """Yield kept frames (and a Gap after a live stream came back); ends when a file ends."""
        attempt = 0
        next_due: float | None = None
        lost_at: float | None = None
        lost_reason = ""
        while not self._stopped:
            cap = self._open()
            if cap is None:
                if not self.live:
                    raise FileNotFoundError(f"cannot open video source {self.shown!r}")
                delay = backoff_delay(attempt, self.reconnect_min_s, self.reconnect_max_s, self._rng)
                attempt += 1
                log.warning("camera %s: cannot open; retrying in %.1fs", self.shown, delay)
                self._sleep(delay)
                continue
            attempt = 0
            opened_wall = self._wall()
            base = self.start_ts if self.start_ts is not None else opened_wall
            fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
            fps = fps if 1.0 <= fps <= 240.0 else 25.0
            if lost_at is not None:
                # Stream time restarts with the new session; the gap is measured on the wall clock
                # because that is the only clock that kept running while there was no stream.
                end = opened_wall
                self.stats.gaps += 1
                self.stats.gap_s += max(0.0, end - lost_at)
                yield Gap(lost_at, end, lost_reason)
                lost_at = None
            n_session = 0
            min_dt = 1.0 / self.fps_cap if self.fps_cap > 0 else 0.0
            while not self._stopped:
                if not cap.grab():
                    break
                self.stats.read += 1
                if self.live:
                    pos = cap.get(cv2.CAP_PROP_POS_MSEC)
                    ts = base + (pos / 1000.0 if pos and pos > 0 else n_session / fps)
                else:
                    ts = base + n_session / fps
                n_session += 1
                if next_due is not None and ts < next_due - 1e-6:
                    self.stats.skipped += 1
                    continue
                ok, image = cap.retrieve()
                if not ok or image is None:
                    self.stats.skipped += 1
                    continue
                # Due times advance on a fixed grid so the kept rate is the cap, not the cap rounded
                # down to a divisor of the source rate; after a stall the grid restarts from now.
                next_due = ts + min_dt if next_due is None or ts - next_due >= min_dt else next_due + min_dt
                self.stats.kept += 1
                yield Frame(ts, self.stats.read - 1, image)
            cap.release()
            if not self.live:
                return
            if not self._stopped:
                lost_at = self._wall()
                lost_reason = "stream ended or dropped"
                log.warning("camera %s: stream lost; reconnecting", self.shown)
                self._sleep(self.reconnect_min_s * self._rng.uniform(0.5, 1.0))
