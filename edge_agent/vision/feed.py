"""What follows the detector in a camera process: a camera's tracks -> analytics -> the ``facts`` messages
the process sends the agent (finished traffic items and the dwell seconds behind them). A replay runs the
same feed on recorded tracks."""

from __future__ import annotations

from collections.abc import Sequence

from ..config import CameraConfig
from .analytics import Track, TrafficAnalytics
from .storewide import DwellCarry


class TrackFeed:
    def __init__(self, cam: CameraConfig, flush_s: float) -> None:
        self.camera = cam.camera
        self.analytics = TrafficAnalytics(cam)
        self._dwells = DwellCarry(cam.bucket_s)
        self._flush_s = flush_s
        # Past the last frame, every bucket is closed once tracks still in their grace period have ended.
        self._close_after = cam.bucket_s + cam.track_grace_s + 1
        self._last_flush: float | None = None
        self.last_ts = 0.0

    def frame(self, ts: float, tracks: Sequence[Track]) -> tuple | None:
        """Take one frame's tracks; the ``facts`` message due now, if any."""
        self.analytics.update(ts, tracks)
        self.last_ts = ts
        if self._last_flush is None or ts - self._last_flush >= self._flush_s:
            self._last_flush = ts
            return self._facts(ts)
        return None

    def end(self) -> tuple | None:
        """The stream ended (or the camera is stopping): every open bucket, closed."""
        return self._facts(self.last_ts + self._close_after)

    def _facts(self, until_ts: float) -> tuple | None:
        stats, heat = self.analytics.flush(until_ts)
        self._dwells.add(self.analytics.pop_visits())
        if stats or heat:
            return ("facts", self.camera, stats, heat, self._dwells.take(stats))
        return None
