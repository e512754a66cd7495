"""The opt-in debug snapshot: a frame nobody can be recognised in, for checking a camera's aim and boxes.

The whole frame is averaged down to a coarse grid and smoothed back up; inside every person box (with
a margin) it is averaged down much further, to a few cells across the largest person, so a face is
part of one cell's colour. Track boxes are drawn on top as outlines. Averaging throws the detail away,
so unlike a light blur it cannot be undone by deconvolution. The writer keeps one file per camera,
replaced atomically, in a local folder; nothing here publishes or stores anything else.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in image pixels

FRAME_CELLS = 48  # cells along the frame's longer side: the layout of the shop stays readable, people do not
MIN_CELL_PX = 8
BOX_CELLS = 3  # cells across the shorter side of the largest person box
BOX_MARGIN = 0.15  # of the box size on every side: hair, hands and loose boxes
OUTLINE_BGR = (0, 255, 0)
JPEG_QUALITY = 80


def _coarsen(image: np.ndarray, cell: float) -> np.ndarray:
    h, w = image.shape[:2]
    small = cv2.resize(image, (max(1, math.ceil(w / cell)), max(1, math.ceil(h / cell))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def privacy_blur(image: np.ndarray, boxes: Sequence[Box]) -> np.ndarray:
    """A blurred copy of a BGR frame with every box pixelated heavily and outlined; the input is not changed."""
    h, w = image.shape[:2]
    frame_cell = max(MIN_CELL_PX, max(h, w) / FRAME_CELLS)
    out = _coarsen(image, frame_cell)
    inside = np.zeros((h, w), dtype=bool)
    outlines = []
    box_cell = 2 * frame_cell
    for x1, y1, x2, y2 in boxes:
        mx, my = (x2 - x1) * BOX_MARGIN, (y2 - y1) * BOX_MARGIN
        px1, py1 = max(0, math.floor(x1 - mx)), max(0, math.floor(y1 - my))
        px2, py2 = min(w, math.ceil(x2 + mx)), min(h, math.ceil(y2 + my))
        if px2 <= px1 or py2 <= py1:
            continue
        inside[py1:py2, px1:px2] = True
        box_cell = max(box_cell, min(x2 - x1, y2 - y1) / BOX_CELLS)
        outlines.append((max(0, round(x1)), max(0, round(y1)), min(w - 1, round(x2)), min(h - 1, round(y2))))
    # One cell size for every person (the largest box's): people overlap, and per-box cells would leave
    # hard seams where their boxes meet. A last smoothing hides the seam between the two coarse grids.
    if outlines:
        out[inside] = _coarsen(image, box_cell)[inside]
    out = cv2.GaussianBlur(out, (0, 0), frame_cell / 2)
    for x1, y1, x2, y2 in outlines:
        cv2.rectangle(out, (x1, y1), (x2, y2), OUTLINE_BGR, 2)
    return out


class SnapshotWriter:
    """Writes ``<directory>/<camera>.jpg`` at most once per ``interval_s`` (of ``clock``), replacing it.

    The image goes to a fixed temporary name first and is renamed over the old one, so a reader never
    sees half a file and the folder holds at most two files per camera, however long it runs or however
    often it is killed mid-write. A write that fails (disk full, folder gone) is logged and skipped: a
    debug aid never stops a camera.
    """

    def __init__(self, directory: Path, camera: str, interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = Path(directory)
        self.path = self.directory / f"{camera}.jpg"
        self._tmp = self.directory / f".{camera}.jpg.tmp"
        self.interval_s = interval_s
        self._clock = clock
        self._last: float | None = None

    def offer(self, image: np.ndarray, boxes: Sequence[Box]) -> bool:
        """Write this frame if the interval has passed since the last attempt; True if it was written."""
        now = self._clock()
        if self._last is not None and now - self._last < self.interval_s:
            return False
        self._last = now
        ok, jpeg = cv2.imencode(".jpg", privacy_blur(image, boxes), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            log.warning("debug snapshot %s: JPEG encoding failed", self.path)
            return False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._tmp.write_bytes(jpeg.tobytes())
            os.replace(self._tmp, self.path)
        except OSError as e:
            log.warning("debug snapshot %s not written: %s", self.path, e)
            return False
        return True
