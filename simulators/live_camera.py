"""A live camera on 127.0.0.1: MJPEG over HTTP (``multipart/x-mixed-replace``, what many IP cameras serve)
at a steady frame rate, for as long as it runs. The agent's capture treats an ``http://`` URL as a live
stream, so a camera process reading it runs until it is stopped or killed, paced by the clock, as it
would in a store: what supervision tests need, where a video file would be read to its end at full speed.

Frames come from a video file, looped (e.g. the CAVIAR clip), or, without one, a plain moving pattern.
Every client gets the stream from the first frame.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np

PATH = "/cam.mjpg"


def _frames(video: Path | None, size: tuple[int, int]) -> list[bytes]:
    images: list[np.ndarray] = []
    if video is not None:
        cap = cv2.VideoCapture(str(video))
        while (got := cap.read())[0]:
            images.append(got[1])
        cap.release()
        if not images:
            raise FileNotFoundError(f"no frames in {video}")
    else:
        w, h = size
        ramp = np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))
        images = [cv2.merge([np.roll(ramp, 8 * i, axis=1)] * 3) for i in range(50)]
    return [cv2.imencode(".jpg", im)[1].tobytes() for im in images]


class LiveCamera:
    def __init__(self, video: Path | None = None, fps: float = 10.0, size: tuple[int, int] = (320, 240),
                 port: int = 0) -> None:
        """``port``: 0 for any free one; a stopped camera's port to have it come back on the same address."""
        self.fps = fps
        self._jpegs = _frames(video, size)
        self._stop = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}{PATH}"

    def start(self) -> LiveCamera:
        threading.Thread(target=self.server.serve_forever, name="live-camera", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        cam = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path != PATH:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                due = time.monotonic()
                i = 0
                try:
                    while not cam._stop.is_set():
                        jpg = cam._jpegs[i % len(cam._jpegs)]
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%b\r\n"
                                         % (len(jpg), jpg))
                        i += 1
                        due += 1.0 / cam.fps
                        cam._stop.wait(max(0.0, due - time.monotonic()))
                except OSError:
                    pass  # the client went (a camera process killed, or stopping)

        return Handler
