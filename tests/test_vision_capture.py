"""Capture: the real CCTV file read to its end with stream timestamps, the rate cap, and a live MJPEG
stream over local HTTP that a test stops and restarts (the source reconnects and reports the gap)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.vision.capture import Frame, FrameSource, Gap, NetworkOptions

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


class MjpegServer:
    """A multipart MJPEG stream on 127.0.0.1, like many IP cameras' HTTP streams."""

    def __init__(self, port: int = 0) -> None:
        self.stop_event = threading.Event()
        img = np.zeros((120, 160, 3), np.uint8)
        img[40:80, 60:100] = (0, 255, 0)
        self.jpeg = cv2.imencode(".jpg", img)[1].tobytes()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_a: object) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    while not server.stop_event.is_set():
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                         + str(len(server.jpeg)).encode() + b"\r\n\r\n" + server.jpeg + b"\r\n")
                        time.sleep(0.04)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop_event.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.slow
def test_live_stream_lost_and_back_reports_the_gap() -> None:
    server = MjpegServer()
    port = server.port
    src = FrameSource(f"http://127.0.0.1:{port}/stream.mjpg", reconnect_min_s=0.2, reconnect_max_s=0.5)
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
    server.close()  # the camera goes away
    time.sleep(1.5)
    server = MjpegServer(port)  # and comes back on the same address
    t.join(60)
    server.close()
    gaps = [x for x in seen if isinstance(x, Gap)]
    assert len(gaps) == 1, seen[-3:]
    assert gaps[0].end - gaps[0].start >= 1.0
    assert src.stats.gaps == 1 and src.stats.gap_s >= 1.0
    frames_after = seen[seen.index(gaps[0]) + 1:]
    assert sum(isinstance(x, Frame) for x in frames_after) >= 5


# ---------------------------------------------------------------- network timeouts, redaction

CAM_PASSWORD = "cam-canary-31f7a0"  # a canary: tests/conftest.py fails the run if a log line shows it


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never says a word: a camera that hangs."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[object] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            while True:
                self.accepted.append(self.sock.accept()[0])
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for c in self.accepted:
            c.close()  # type: ignore[attr-defined]


def test_open_timeout_against_a_camera_that_never_answers(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the timeout, FFmpeg's RTSP open waits on this socket for as long as it stays open."""
    monkeypatch.delenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", raising=False)
    server = SilentServer()
    url = f"rtsp://admin:{CAM_PASSWORD}@127.0.0.1:{server.port}/stream"
    src = FrameSource(url, reconnect_min_s=0.1, reconnect_max_s=0.1,
                      network=NetworkOptions(open_timeout_s=1.0, read_timeout_s=1.0, rtsp_transport="tcp"))
    t0 = time.monotonic()
    done = threading.Event()

    def consume() -> None:
        for _ in src.frames():
            pass
        done.set()

    try:
        with caplog.at_level("WARNING", logger="edge_agent.vision.capture"):
            threading.Thread(target=consume, daemon=True).start()
            while src.stats.failed_opens < 2 and time.monotonic() - t0 < 20:
                time.sleep(0.05)
            src.stop()
            assert done.wait(10), "the source did not stop"
        took = time.monotonic() - t0
        assert src.stats.failed_opens >= 2 and took < 8, (src.stats, took)  # ~1 s each, then 0.1 s backoff
        assert server.accepted, "FFmpeg never connected: the test did not test the timeout"
        assert __import__("os").environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] == "rtsp_transport;tcp"
        lines = [r.getMessage() for r in caplog.records]
        assert any(f"rtsp://admin:***@127.0.0.1:{server.port}/stream" in m for m in lines), lines
        assert not any(CAM_PASSWORD in m for m in lines)
    finally:
        server.close()


class StallingMjpeg(MjpegServer):
    """Sends a few frames, then holds the connection open and silent, as a wedged camera does."""

    def __init__(self, frames: int = 5) -> None:
        super().__init__()
        server = self
        handler = self.httpd.RequestHandlerClass

        def do_GET(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            h.end_headers()
            try:
                for _ in range(frames):
                    h.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                  + str(len(server.jpeg)).encode() + b"\r\n\r\n" + server.jpeg + b"\r\n")
                    h.wfile.flush()
                    time.sleep(0.04)
                server.stop_event.wait(60)
            except (BrokenPipeError, ConnectionResetError):
                pass

        handler.do_GET = do_GET  # type: ignore[attr-defined]


@pytest.mark.slow
def test_read_timeout_drops_a_silent_stream_and_reconnects() -> None:
    server = StallingMjpeg()
    src = FrameSource(f"http://127.0.0.1:{server.port}/stream.mjpg", reconnect_min_s=0.1, reconnect_max_s=0.2,
                      network=NetworkOptions(open_timeout_s=2.0, read_timeout_s=1.0))
    seen: list[Frame | Gap] = []
    t0 = time.monotonic()

    def consume() -> None:
        for item in src.frames():
            seen.append(item)
            if isinstance(item, Gap) or time.monotonic() - t0 > 30:
                src.stop()

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    t.join(40)
    server.close()
    assert any(isinstance(x, Gap) for x in seen), (src.stats, seen[-3:])
    assert sum(isinstance(x, Frame) for x in seen) >= 1
    assert time.monotonic() - t0 < 15
