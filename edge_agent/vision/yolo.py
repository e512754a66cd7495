"""An exported YOLO detector run without torch or ultralytics: OpenVINO or ONNX Runtime, numpy and OpenCV.

The export (``models/provision.py``: an OpenVINO folder with its ``metadata.yaml``, or an ``.onnx`` file with
the same metadata inside) is run with the pre- and post-processing of ultralytics' own predict for a
detection model (8.4.190: data/augment.py LetterBox, engine/predictor.py, utils/nms.py, utils/ops.py
scale_boxes), so that both runtimes find the same boxes on the same frame (tests/test_vision_yolo.py):

- **Letterbox.** The frame is scaled by r = min(H / h, W / w) to round(w r) x round(h r) (OpenCV, bilinear)
  and padded with grey 114, evenly (the odd pixel at the bottom or right). An export with a dynamic input
  shape is padded only up to the next multiple of its stride, so each frame keeps its aspect (a 384 x 288
  frame runs at 480 x 384 for imgsz 480); a fixed one is padded to its square. The input is RGB, CHW,
  float32 in [0, 1].
- **Boxes.** The output is (1, 4 + classes, anchors): centre x, y, width, height and a score per class. A
  box's class is its best-scoring one and its confidence that score; it is kept above ``conf`` when its
  class is one of ``classes`` (None: any).
- **NMS.** Per class (ultralytics offsets each class's boxes by 7,680 px, so they never overlap another
  class's), greedy by confidence: a box overlapping a kept one at IoU > ``iou`` goes; at most 300 stay.
- **Back to the frame.** Padding off, divided by the gain of each axis, clipped to the frame.

Runs on the CPU. Frames stay in memory: nothing here writes an image anywhere.
"""

from __future__ import annotations

import ast
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, field_validator

__all__ = ["Detections", "ModelInfo", "YoloDetector", "letterbox", "nms"]

log = logging.getLogger(__name__)

LeanRuntime = Literal["openvino", "onnx"]
PAD_VALUE = 114
MAX_WH = 7680  # ultralytics' per-class offset for class-aware NMS
MAX_NMS = 30000  # boxes going into NMS at most (the most confident)
MAX_DET = 300  # boxes kept at most


class ModelInfo(BaseModel):
    """What the runtime needs of ultralytics' export metadata (metadata.yaml, or the ONNX file's own)."""

    model_config = ConfigDict(extra="ignore")

    task: Literal["detect"]
    stride: int
    imgsz: tuple[int, int]  # the export's (height, width); the input size itself when not dynamic
    names: dict[int, str]
    dynamic: bool = False
    end2end: bool = False

    @field_validator("end2end")
    @classmethod
    def _nms_outside(cls, v: bool) -> bool:
        if v:
            raise ValueError("end-to-end (NMS-free) exports are not supported: export with end2end=False")
        return v

    @classmethod
    def from_metadata(cls, meta: dict[str, object]) -> ModelInfo:
        args = meta.get("args")
        dynamic = bool(args.get("dynamic")) if isinstance(args, dict) else False
        return cls.model_validate({**meta, "dynamic": dynamic})


@dataclass(frozen=True, slots=True)
class Detections:
    xyxy: NDArray[np.float32]  # (n, 4) frame pixels
    conf: NDArray[np.float32]  # (n,)
    cls: NDArray[np.int64]  # (n,)

    def __len__(self) -> int:
        return len(self.conf)


def letterbox(frame: NDArray[np.uint8], shape: tuple[int, int], stride: int,
              auto: bool) -> tuple[NDArray[np.uint8], tuple[float, float], tuple[int, int]]:
    """The frame scaled into ``shape`` (h, w) and padded; with the gain (y, x) and padding (left, top) applied."""
    h0, w0 = frame.shape[:2]
    r = min(shape[0] / h0, shape[1] / w0)
    new_w, new_h = max(round(w0 * r), 1), max(round(h0 * r), 1)
    dw, dh = shape[1] - new_w, shape[0] - new_h
    if auto:  # the smallest rectangle the stride allows
        dw, dh = dw % stride, dh % stride
    left, top = round(dw / 2 - 0.1), round(dh / 2 - 0.1)
    right, bottom = round(dw / 2 + 0.1), round(dh / 2 + 0.1)
    if (w0, h0) != (new_w, new_h):
        frame = cv2.resize(frame, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    out = cv2.copyMakeBorder(frame, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return out, (new_h / h0, new_w / w0), (left, top)


def nms(boxes: NDArray[np.float32], scores: NDArray[np.float32], iou: float) -> NDArray[np.intp]:
    """Indices of the boxes kept, most confident first: each drops the later ones it overlaps at IoU > ``iou``."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        inter = ((np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])).clip(0)
                 * (np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])).clip(0))
        order = rest[inter / (areas[i] + areas[rest] - inter) <= iou]
    return np.asarray(keep, dtype=np.intp)


def _openvino(path: Path) -> tuple[Callable[[NDArray[np.float32]], NDArray[np.float32]], ModelInfo]:
    import openvino as ov  # after detector.offline_env()
    import yaml

    xml = path if path.suffix == ".xml" else next(path.glob("*.xml"), None)
    if xml is None or not (xml.parent / "metadata.yaml").is_file():
        raise FileNotFoundError(f"{path} is not an OpenVINO export of ultralytics (an .xml with metadata.yaml beside it)")
    info = ModelInfo.from_metadata(yaml.safe_load((xml.parent / "metadata.yaml").read_text()))
    core = ov.Core()
    # ultralytics' settings for one frame at a time: LATENCY, synchronous; the CPU device, always.
    compiled = core.compile_model(core.read_model(xml), "CPU", {"PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def infer(x: NDArray[np.float32]) -> NDArray[np.float32]:
        request.infer({0: x})
        return request.get_output_tensor(0).data

    return infer, info


def _onnx(path: Path) -> tuple[Callable[[NDArray[np.float32]], NDArray[np.float32]], ModelInfo]:
    import onnxruntime as ort  # after detector.offline_env()

    if path.suffix.lower() != ".onnx" or not path.is_file():
        raise FileNotFoundError(f"{path} is not an .onnx file")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # ultralytics writes its metadata into the ONNX file as Python literals.
    raw = session.get_modelmeta().custom_metadata_map
    meta: dict[str, object] = {}
    for k, v in raw.items():
        try:
            meta[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            meta[k] = v
    name = session.get_inputs()[0].name

    def infer(x: NDArray[np.float32]) -> NDArray[np.float32]:
        return session.run(None, {name: x})[0]

    return infer, ModelInfo.from_metadata(meta)


class YoloDetector:
    """Boxes of one frame at a time; see the module's rules. ``last_speed`` has the stages' milliseconds."""

    def __init__(self, path: Path, runtime: LeanRuntime, imgsz: int, conf: float, iou: float,
                 classes: Sequence[int] | None = None) -> None:
        self._infer, self.info = {"openvino": _openvino, "onnx": _onnx}[runtime](path)
        stride = self.info.stride
        if self.info.dynamic:
            size = max(math.ceil(imgsz / stride) * stride, stride)
            if size != imgsz:
                log.warning("imgsz %d must be a multiple of the stride %d: using %d", imgsz, stride, size)
            self.shape = (size, size)
        else:
            self.shape = self.info.imgsz
            if self.shape != (imgsz, imgsz):
                log.warning("%s was exported at %s px; running it at that size, not %d "
                            "(export again with `python models/provision.py --imgsz %d`)", path, self.shape, imgsz, imgsz)
        self.names = self.info.names
        self.conf = conf
        self.iou = iou
        self.classes = classes
        self.last_speed: dict[str, float] = {}

    @property
    def imgsz(self) -> int:
        return max(self.shape)

    def detect(self, frame: NDArray[np.uint8]) -> Detections:
        t0 = time.perf_counter()
        img, gain, pad = letterbox(frame, self.shape, self.info.stride, auto=self.info.dynamic)
        x = np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1)[None], dtype=np.float32) / 255
        t1 = time.perf_counter()
        out = self._infer(x)[0]  # (4 + classes, anchors)
        t2 = time.perf_counter()
        found = self._postprocess(out, frame.shape[:2], gain, pad)
        self.last_speed = {"preprocess": 1000 * (t1 - t0), "inference": 1000 * (t2 - t1),
                           "postprocess": 1000 * (time.perf_counter() - t2)}
        return found

    def _postprocess(self, out: NDArray[np.float32], frame_hw: tuple[int, int], gain: tuple[float, float],
                     pad: tuple[int, int]) -> Detections:
        scores = out[4:]
        best = scores.max(axis=0)
        keep = best > self.conf
        cand = out[:, keep].T  # (n, 4 + classes)
        conf = best[keep]
        cls = scores[:, keep].argmax(axis=0)
        if self.classes is not None:
            wanted = np.isin(cls, self.classes)
            cand, conf, cls = cand[wanted], conf[wanted], cls[wanted]
        if len(conf) > MAX_NMS:
            top = np.argsort(-conf, kind="stable")[:MAX_NMS]
            cand, conf, cls = cand[top], conf[top], cls[top]
        xy, wh = cand[:, :2], cand[:, 2:4]
        boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
        kept = nms(boxes + (cls[:, None] * MAX_WH).astype(np.float32), conf, self.iou)[:MAX_DET]
        boxes, conf, cls = boxes[kept], conf[kept], cls[kept]
        boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - pad[0]) / gain[1]).clip(0, frame_hw[1])
        boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - pad[1]) / gain[0]).clip(0, frame_hw[0])
        return Detections(boxes.astype(np.float32), conf.astype(np.float32), cls.astype(np.int64))
