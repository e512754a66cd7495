"""The debug snapshot: off by default (a camera run writes no image anywhere), and when an operator turns
it on, one blurred JPEG per camera in which nobody can be recognised."""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edge_agent.config import VisionConfig
from edge_agent.vision.snapshot import OUTLINE_BGR, SnapshotWriter, privacy_blur

IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF", b"BM", b"\x00\x00\x00\x0cjP")


def _scene(**kw: Any) -> Any:
    camera = pytest.importorskip("simulators.camera")  # its people come from the ultralytics package
    return camera.CameraScene(camera.SceneConfig(**kw))


def _laplacian(img: np.ndarray) -> np.ndarray:
    return cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.CV_64F)


@pytest.fixture(scope="module")
def crowded() -> tuple[np.ndarray, list[tuple[float, float, float, float]]]:
    """The frame of a synthetic scene with the most people in full view, and their true boxes."""
    scene = _scene(seed=1, n_people=4, duration_s=12.0, fps=5.0, entry_gap_s=1.0)
    truth = scene.truth()
    best = max(truth["frames"], key=lambda f: sum(p["visible"] > 0.8 for p in f["people"]))
    image = next(img for ts, img in scene.frames() if ts == best["ts"])
    boxes = [tuple(p["box"]) for p in best["people"]]
    assert len(boxes) >= 3
    return image, boxes


def test_people_lose_the_detail_they_are_recognised_by(crowded: tuple[np.ndarray, list]) -> None:
    image, boxes = crowded
    before = image.copy()
    snap = privacy_blur(image, boxes)
    assert np.array_equal(image, before) and snap.shape == image.shape and snap.dtype == np.uint8
    # Measured away from the drawn outlines, which are the only sharp thing left on purpose.
    outlines = np.zeros(image.shape[:2], np.uint8)
    for x1, y1, x2, y2 in boxes:
        cv2.rectangle(outlines, (round(x1), round(y1)), (round(x2), round(y2)), 255, 2)
    away = cv2.dilate(outlines, np.ones((7, 7), np.uint8)) == 0
    lap_orig, lap_snap = _laplacian(image), _laplacian(snap)
    for x1, y1, x2, y2 in boxes:
        box = np.zeros_like(away)
        box[round(y1):round(y2), round(x1):round(x2)] = True
        box &= away
        assert lap_snap[box].var() < 0.05 * lap_orig[box].var()  # > 95 % of the fine detail is gone
        crop = (slice(round(y1), round(y2)), slice(round(x1), round(x2)))
        assert cv2.PSNR(image[crop], snap[crop]) < 15  # nowhere near a copy of the person
        # The face (top fifth of the box) matches nothing of the original's texture.
        face = (slice(round(y1), round(y1 + (y2 - y1) / 5)), crop[1])
        corr = np.corrcoef(lap_orig[face].ravel(), lap_snap[face].ravel())[0, 1]
        assert abs(corr) < 0.2
    assert cv2.PSNR(image, snap) < 20
    # The boxes are drawn for debugging.
    x1, y1, x2, _ = (round(v) for v in boxes[0])
    assert tuple(snap[y1, (x1 + x2) // 2]) == OUTLINE_BGR


def test_boxes_off_the_frame_or_empty_are_ignored() -> None:
    image = np.random.default_rng(1).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    snap = privacy_blur(image, [(-50, -50, -10, -10), (200, 10, 300, 50), (40, 40, 40, 90)])
    assert snap.shape == image.shape
    assert _laplacian(snap).var() < 0.05 * _laplacian(image).var()


def test_writer_writes_at_most_once_an_interval_and_replaces_the_file(tmp_path: Path) -> None:
    now = [0.0]
    w = SnapshotWriter(tmp_path / "snaps", "entrance", 10.0, clock=lambda: now[0])
    frame = np.full((90, 160, 3), 128, np.uint8)
    assert w.offer(frame, [])
    assert not w.offer(frame, [])
    now[0] = 9.9
    assert not w.offer(frame, [])
    now[0] = 10.0
    assert w.offer(frame, [(10, 10, 40, 80)])
    # One file per camera however often it is written; the temporary name is gone after each rename.
    assert [p.name for p in (tmp_path / "snaps").iterdir()] == ["entrance.jpg"]
    assert cv2.imread(str(w.path)).shape == frame.shape


def test_a_failed_write_is_logged_and_the_camera_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "not-a-dir").write_text("")
    w = SnapshotWriter(tmp_path / "not-a-dir", "entrance", 1.0)
    with caplog.at_level(logging.WARNING):
        assert not w.offer(np.zeros((20, 20, 3), np.uint8), [])
    assert "not written" in caplog.text


def test_config_is_off_by_default_and_camera_ids_must_be_file_names() -> None:
    cam = {"camera": "../etc/x", "url": "x.mp4",
           "homography": {"image": [[0, 0], [1, 0], [1, 1], [0, 1]], "floor": [[0, 0], [1, 0], [1, 1], [0, 1]]}}
    assert VisionConfig.model_validate({"cameras": [cam]}).debug_snapshot_dir is None
    with pytest.raises(ValueError, match="file names"):
        VisionConfig.model_validate({"cameras": [cam], "debug_snapshot_dir": "/tmp/snaps"})


# ---------------------------------------------------------------- a real camera run (model, tracker, analytics)


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    pytest.importorskip("ultralytics")
    scene = _scene(seed=2, n_people=2, duration_s=4.0, fps=5.0, entry_gap_s=1.0)
    path = scene.write_video(tmp_path_factory.mktemp("video") / "scene.avi")
    return path, scene.analytics_config() | {"url": str(path), "start_ts": scene.cfg.start_ts, "bucket_s": 5}


def _run_camera(video: tuple[Path, dict[str, Any]], **vision: Any) -> list[tuple]:
    """One camera process's work, in this process so the test can watch the disk."""
    from edge_agent.vision.service import run_camera

    vcfg = VisionConfig.model_validate({"enabled": True, "flush_s": 1.0, "cameras": [video[1]], **vision})
    out: queue.Queue[tuple] = queue.Queue()
    # The camera process sends its log records to the main process: here, to a queue nobody reads. It takes
    # over the root logger as a process of its own would, so the test puts this process's logging back.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        run_camera(vcfg.cameras[0], vcfg, out, threading.Event(), (queue.Queue(), logging.INFO), threading.Event())
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    msgs = [out.get_nowait() for _ in range(out.qsize())]
    assert msgs[-1][0] == "done" and msgs[-1][2]["frames"] == 20
    assert any(m[0] == "facts" for m in msgs)
    return msgs


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_a_camera_run_writes_no_image_by_default(video: tuple[Path, dict[str, Any]], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Everything the run could write without an absolute path lands under tmp_path: its working folder
    # and its temporary folder.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    watched = [tmp_path, video[0].parent]
    before = set().union(*(_files(d) for d in watched))
    _run_camera(video)
    for p in set().union(*(_files(d) for d in watched)) - before:
        assert p.suffix.lower() not in (".jpg", ".jpeg", ".png", ".bmp", ".webp"), p
        assert not p.read_bytes().startswith(IMAGE_MAGIC), p


def test_a_camera_run_with_the_snapshot_on_writes_one_blurred_jpeg(video: tuple[Path, dict[str, Any]],
                                                                  tmp_path: Path) -> None:
    snaps = tmp_path / "snaps"
    _run_camera(video, debug_snapshot_dir=str(snaps), debug_snapshot_interval_s=3600)
    assert [p.name for p in snaps.iterdir()] == ["sim-cam-1.jpg"]
    snap = cv2.imread(str(snaps / "sim-cam-1.jpg"))
    cap = cv2.VideoCapture(str(video[0]))
    ok, first = cap.read()  # the one interval of the run began with the first frame
    cap.release()
    assert ok and snap.shape == first.shape
    assert _laplacian(snap).var() < 0.05 * _laplacian(first).var()
    assert cv2.PSNR(first, snap) < 25
