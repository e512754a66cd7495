"""The ultralytics runtime: YOLO's predict with its own ByteTrack (or BoT-SORT) tracker; needs torch.

The alternative to the lean runtime (yolo.py + bytetrack.py), kept for models only ultralytics can load
(a ``.pt`` file), for BoT-SORT, and as the reference the lean runtime is measured against. Any model
ultralytics loads runs here: ``.pt`` (PyTorch, about 3x slower than OpenVINO on the 2-core box), ``.onnx``
(ONNX Runtime) or an OpenVINO export folder. ``detector.offline_env()`` must have run before this module
is imported.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .analytics import Track

log = logging.getLogger(__name__)


class UltralyticsEngine:
    def __init__(self, path: Path, backend: str, imgsz: int, conf: float, iou: float, device: str, tracker: str,
                 overrides: Mapping[str, Any]) -> None:
        from ultralytics import YOLO

        self.path = path
        self.backend = backend
        self.imgsz = imgsz
        self.conf = conf
        self.iou = iou
        self.device = device
        self.classes: list[int] | None = None
        self.last_speed: dict[str, float] = {}
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self.tracker = self._tracker_config(tracker, overrides)
        self._model = YOLO(str(path), task="detect")
        # Load the backend once and warm it up; this also sets the predictor (and tracker) up.
        self.track(np.zeros((imgsz, imgsz, 3), dtype=np.uint8))
        backend_model = self._model.predictor.model
        self.names: dict[int, str] = {int(k): str(v) for k, v in backend_model.names.items()}
        self._check_imgsz(getattr(backend_model, "metadata", None) or {})

    def _tracker_config(self, tracker: str, overrides: Mapping[str, Any]) -> str:
        if not overrides:
            return tracker
        import yaml
        from ultralytics.utils.checks import check_yaml

        cfg = yaml.safe_load(Path(check_yaml(tracker)).read_text())
        unknown = set(overrides) - set(cfg)
        if unknown:
            raise ValueError(f"unknown {tracker} keys {sorted(unknown)}; it has {sorted(cfg)}")
        cfg.update(overrides)
        self._tmpdir = tempfile.TemporaryDirectory(prefix="edge-agent-tracker-")
        out = Path(self._tmpdir.name) / Path(tracker).name
        out.write_text(yaml.safe_dump(cfg))
        return str(out)

    def _check_imgsz(self, meta: Mapping[str, Any]) -> None:
        """An exported model has a fixed input size; ultralytics silently uses it, so say so."""
        fixed = meta.get("imgsz")
        dynamic = (meta.get("args") or {}).get("dynamic")
        if self.backend != "pytorch" and fixed and not dynamic:
            size = [int(s) for s in fixed] if isinstance(fixed, (list, tuple)) else [int(fixed)] * 2
            if size != [self.imgsz, self.imgsz]:
                log.warning("%s was exported at %s px; running it at that size, not %d "
                            "(export again with `python models/provision.py --imgsz %d`)",
                            self.path, size, self.imgsz, self.imgsz)
                self.imgsz = max(size)

    def track(self, frame_bgr: np.ndarray) -> list[Track]:
        r = self._model.track(frame_bgr, persist=True, tracker=self.tracker, imgsz=self.imgsz, conf=self.conf,
                              iou=self.iou, classes=self.classes, device=self.device, verbose=False)[0]
        self.last_speed = dict(r.speed)
        boxes = r.boxes
        if boxes is None or boxes.id is None or len(boxes) == 0:
            return []
        return [Track(track_id=int(tid), box=tuple(float(v) for v in box), conf=float(c))  # type: ignore[arg-type]
                for tid, box, c in zip(boxes.id.int().tolist(), boxes.xyxy.tolist(), boxes.conf.tolist(), strict=True)]

    def reset(self) -> None:
        for t in getattr(self._model.predictor, "trackers", None) or ():
            t.reset()

    def close(self) -> None:
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None
