"""The lean vision runtime (edge_agent/vision/yolo.py behind PersonDetector): ultralytics' pre- and
post-processing without torch, the same people as the ultralytics runtime on real CCTV, and no torch imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from edge_agent.config import VisionConfig
from edge_agent.vision.detector import default_model_path, person_classes
from edge_agent.vision.yolo import ModelInfo, letterbox, nms

REPO = Path(__file__).resolve().parents[1]
CLIP = REPO.parent / "shared" / "data" / "caviar" / "EnterExitCrossingPaths1cor.mpg"
needs_clip = pytest.mark.skipif(not CLIP.exists(), reason="the CAVIAR clip lives in ../shared/data")


def _export(runtime: str) -> Path:
    try:
        return default_model_path(480, runtime=runtime)  # type: ignore[arg-type]
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize(("hw", "auto", "want", "pad"), [
    ((288, 384), True, (384, 480), (0, 12)),    # CAVIAR: 480x360, padded to the stride's 384
    ((1080, 1920), True, (288, 480), (0, 9)),   # 16:9: 480x270 -> 480x288
    ((1080, 1920), False, (480, 480), (0, 105)),  # a fixed export: its square
    ((100, 30), True, (480, 160), (8, 0)),      # tall: 144 wide -> 160
])
def test_letterbox_keeps_the_aspect_and_pads_to_the_stride(hw: tuple[int, int], auto: bool, want: tuple[int, int],
                                                           pad: tuple[int, int]) -> None:
    img = np.full((*hw, 3), 7, dtype=np.uint8)
    out, gain, (left, top) = letterbox(img, (480, 480), 32, auto=auto)
    assert out.shape == (*want, 3) and (left, top) == pad
    assert gain[0] == pytest.approx(gain[1], rel=0.02)
    assert out[top + 1, left + 1, 0] == 7 and (top == 0 or out[0, 0, 0] == 114)


def test_nms_drops_only_boxes_overlapping_a_better_one_beyond_iou() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.95, 0.7], dtype=np.float32)
    assert nms(boxes, scores, 0.55).tolist() == [2, 3]
    assert nms(boxes, scores, 0.9).tolist() == [2, 1, 3]  # IoU 0.82 stays below 0.9
    assert nms(boxes[:0], scores[:0], 0.5).tolist() == []


def test_model_info_from_ultralytics_metadata() -> None:
    meta = {"task": "detect", "stride": 32, "imgsz": [480, 480], "names": {0: "Normal", 1: "Fall"},
            "args": {"dynamic": True}, "end2end": False, "author": "Ultralytics"}
    info = ModelInfo.from_metadata(meta)
    assert (info.dynamic, info.imgsz, info.names[1]) == (True, (480, 480), "Fall")
    for bad in ({"task": "segment"}, {"end2end": True}):
        with pytest.raises(ValidationError):
            ModelInfo.from_metadata(meta | bad)


def test_vision_config_runtime() -> None:
    assert VisionConfig().runtime == "openvino"
    assert VisionConfig(runtime="ultralytics", tracker="botsort.yaml").tracker == "botsort.yaml"
    with pytest.raises(ValidationError, match="needs runtime"):
        VisionConfig(tracker="botsort.yaml")
    with pytest.raises(ValidationError):
        VisionConfig(runtime="tensorrt")  # type: ignore[arg-type]


def test_person_classes_come_from_the_stamp_of_a_provisioned_model(tmp_path: Path) -> None:
    (tmp_path / "best_openvino_model").mkdir()
    names = {0: "Normal", 1: "Fall"}
    assert person_classes(tmp_path / "best_openvino_model", names) is None  # no stamp: every class
    assert person_classes(tmp_path / "x.onnx", {0: "person", 1: "car"}) == [0]
    (tmp_path / "provisioned.json").write_text(json.dumps(
        {"person_classes": [1], "exports": {"openvino": {"path": "best_openvino_model"}}}))
    assert person_classes(tmp_path / "best_openvino_model", names) == [1]


def _frames(n: int, step: int) -> list[np.ndarray]:
    from edge_agent.vision.capture import Frame, FrameSource

    out = []
    for item in FrameSource(str(CLIP), start_ts=0.0).frames():
        assert isinstance(item, Frame)
        if item.index % step == 0:
            out.append(item.image)
        if len(out) == n:
            break
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[:, :2])
    rb = np.minimum(a[:, None, 2:], b[:, 2:])
    inter = np.prod((rb - lt).clip(0), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b) - inter)


@needs_clip
@pytest.mark.parametrize("runtime", ["openvino", "onnx"])
def test_lean_detector_finds_the_people_ultralytics_finds_on_real_cctv(runtime: str) -> None:
    """Same export, same frames (every 12th of the CAVIAR clip): the same boxes as ultralytics' predict."""
    pytest.importorskip("ultralytics")
    pytest.importorskip(runtime if runtime == "openvino" else "onnxruntime")
    from ultralytics import YOLO

    from edge_agent.vision.yolo import YoloDetector

    path = _export(runtime)
    lean = YoloDetector(path, runtime, 480, conf=0.1, iou=0.55)  # type: ignore[arg-type]
    ref = YOLO(str(path), task="detect")
    total = 0
    for img in _frames(32, 12):
        got = lean.detect(img)
        want = ref.predict(img, imgsz=480, conf=0.1, iou=0.55, verbose=False)[0].boxes
        assert len(got) == len(want)
        if len(got):
            iou = _iou(got.xyxy, want.xyxy.numpy())
            assert iou.max(axis=1).min() > 0.99, iou  # every box has its twin
            np.testing.assert_allclose(np.sort(got.conf), np.sort(want.conf.numpy()), atol=1e-3)
        total += len(got)
    assert total >= 64  # 2-4 people in every frame


@needs_clip
def test_lean_and_ultralytics_runtimes_track_alike_on_real_cctv() -> None:
    """The whole PersonDetector (detect + ByteTrack) on 100 consecutive frames: the same ids and boxes."""
    pytest.importorskip("ultralytics")
    from edge_agent.vision.detector import PersonDetector

    path = _export("openvino")
    lean = PersonDetector(path, imgsz=480, runtime="openvino", tracker_overrides={"track_buffer": 25})
    ref = PersonDetector(path, imgsz=480, runtime="ultralytics", tracker_overrides={"track_buffer": 25})
    assert lean.classes == ref.classes
    for img in _frames(100, 1):
        a, b = lean.track(img), ref.track(img)
        assert [t.track_id for t in a] == [t.track_id for t in b]
        np.testing.assert_allclose([t.box for t in a], [t.box for t in b], atol=0.5)


LEAN_RUN = """
import sys
import numpy as np
from edge_agent.vision.detector import PersonDetector
from edge_agent.vision.service import run_camera  # the camera process's module too
det = PersonDetector(None, imgsz=320, runtime=sys.argv[1])
for _ in range(3):
    det.track(np.zeros((240, 320, 3), dtype=np.uint8))
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "torchvision", "ultralytics"})
print(",".join(heavy) or "none")
"""


@pytest.mark.parametrize("runtime", ["openvino", "onnx"])
def test_the_lean_runtime_never_imports_torch_or_ultralytics(runtime: str) -> None:
    pytest.importorskip(runtime if runtime == "openvino" else "onnxruntime")
    _export(runtime)
    out = subprocess.run([sys.executable, "-c", LEAN_RUN, runtime], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={"PATH": "/usr/bin:/bin", "YOLO_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "none"
