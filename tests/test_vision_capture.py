"""Capture: the real CCTV file read to its end with stream timestamps, the rate cap, and a live MJPEG
stream over local HTTP (simulators/live_camera.py) that a test stops and restarts (the source reconnects and reports the gap)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.vision.capture import Frame, FrameSource, Gap
from simulators.live_camera import LiveCamera

CLIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "caviar" / "EnterExitCrossingPaths1cor.mpg"


@pytest.mark.skipif(not CLIP.exists(), reason="the CAVIAR clip lives in ../shared/data")
def test_file_read_to_the_end_with_frame_index_timestamps() -> None:
    src = FrameSource(str(CLIP), start_ts=1000.0)
    frames = [f for f in src.frames() if isinstance(f, Frame)]
    assert len(frames) == 383  # OpenCV's CAP_PROP_FRAME_COUNT says 4 for this MPEG-1 file
    assert frames[0].ts == 1000.0 and frames[-1].ts == pytest.approx(1000.0 + 382 / 25)
    assert frames[0].image.shape == (288, 384, 3)


@pytest.mark.skipif(not CLIP.exists(), reason="the CAVIAR clip lives in ../shared/data")
def test_rate_cap_drops_frames_and_counts_them() -> None:
    src = FrameSource(str(CLIP), start_ts=0.0, fps_cap=10)
    frames = [f for f in src.frames() if isinstance(f, Frame)]
    assert 150 <= len(frames) <= 155
    assert src.stats.skipped == 383 - len(frames)
    gaps = np.diff([f.ts for f in frames])
    assert gaps.min() >= 0.08 - 1e-9 and gaps.max() <= 0.12 + 1e-9


@pytest.mark.slow
def test_live_stream_lost_and_back_reports_the_gap() -> None:
    server = LiveCamera(fps=25.0, size=(160, 120)).start()
    port = server.port
    src = FrameSource(server.url, reconnect_min_s=0.2, reconnect_max_s=0.5)
    seen: list[Frame | Gap] = []
    deadline = time.monotonic() + 60

    def consume() -> None:
        for item in src.frames():
            seen.append(item)
            if any(isinstance(x, Gap) for x in seen) and isinstance(item, Frame):
                n_after = sum(1 for x in seen[seen.index(next(g for g in seen if isinstance(g, Gap))):]
                              if isinstance(x, Frame))
                if n_after >= 5:
                    src.stop()
            if time.monotonic() > deadline:
                src.stop()

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    while sum(isinstance(x, Frame) for x in seen) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.stop()  # the camera goes away
    time.sleep(1.5)
    server = LiveCamera(fps=25.0, size=(160, 120), port=port).start()  # and comes back on the same address
    t.join(60)
    server.stop()
    gaps = [x for x in seen if isinstance(x, Gap)]
    assert len(gaps) == 1, seen[-3:]
    assert gaps[0].end - gaps[0].start >= 1.0
    assert src.stats.gaps == 1 and src.stats.gap_s >= 1.0
    frames_after = seen[seen.index(gaps[0]) + 1:]
    assert sum(isinstance(x, Frame) for x in frames_after) >= 5
