"""The ByteTrack port (edge_agent/vision/bytetrack.py): its rules, and the same tracks as ultralytics' tracker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.vision.bytetrack import ByteTracker, ByteTrackParams


def frame(*dets: tuple[float, float, float, float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detections (x1, y1, x2, y2, score), all of class 0."""
    a = np.array(dets, dtype=np.float32).reshape(-1, 5)
    return a[:, :4], a[:, 4], np.zeros(len(a), dtype=np.int64)


def walkers(seed: int, n_frames: int = 120) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """People walking across a 640x480 frame with jittery boxes, dropped detections, weak scores (the second
    stage's), people passing each other, arrivals and departures, and the odd false positive."""
    rng = np.random.default_rng(seed)
    people = []
    for _ in range(int(rng.integers(3, 7))):
        start = int(rng.integers(0, n_frames // 2))
        people.append({"start": start, "end": start + int(rng.integers(20, n_frames)),
                       "xy": rng.uniform([0, 100], [600, 400]), "v": rng.normal(0, 4, 2),
                       "wh": rng.uniform([30, 70], [60, 160])})
    out = []
    for f in range(n_frames):
        rows = []
        for p in people:
            if not p["start"] <= f < p["end"]:
                continue
            xy = p["xy"] + p["v"] * (f - p["start"])
            if rng.random() < 0.1:
                continue  # missed by the detector
            c = xy + rng.normal(0, 2, 2)
            wh = p["wh"] * rng.uniform(0.92, 1.08, 2)
            score = rng.uniform(0.12, 0.25) if rng.random() < 0.2 else rng.uniform(0.3, 0.95)
            rows.append((*(c - wh / 2), *(c + wh / 2), score))
        if rng.random() < 0.1:
            x, y = rng.uniform(0, 600), rng.uniform(0, 400)
            rows.append((x, y, x + 40, y + 90, rng.uniform(0.1, 0.5)))
        if rng.random() < 0.02:
            rows.append((10, 10, 10, 50, 0.9))  # no width: dropped
        rng.shuffle(rows)
        out.append(frame(*rows))
    return out


def test_params_are_ultralytics_bytetrack_yaml() -> None:
    pytest.importorskip("ultralytics")
    import ultralytics
    import yaml

    cfg = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg" / "trackers" / "bytetrack.yaml").read_text())
    cfg.pop("tracker_type")
    assert ByteTrackParams() == ByteTrackParams.with_overrides(cfg)
    with pytest.raises(ValueError, match="unknown ByteTrack keys"):
        ByteTrackParams.with_overrides({"proximity_thresh": 0.5})


def test_first_frame_tracks_at_once_later_births_wait_for_a_second_match() -> None:
    t = ByteTracker()
    assert [b.track_id for b in t.update(*frame((0, 0, 50, 100, 0.9)))] == [1]
    # A newcomer is reported from its second frame on, with the next id.
    assert [b.track_id for b in t.update(*frame((2, 0, 52, 100, 0.9), (300, 0, 350, 100, 0.8)))] == [1]
    got = t.update(*frame((4, 0, 54, 100, 0.9), (302, 0, 352, 100, 0.8)))
    assert sorted(b.track_id for b in got) == [1, 2]
    assert {b.det_index for b in got} == {0, 1} and all(b.cls == 0 for b in got)


def test_weak_boxes_extend_tracks_but_never_start_one() -> None:
    t = ByteTracker()
    t.update(*frame((0, 0, 50, 100, 0.9)))
    # Partly hidden: the score drops below track_high_thresh, the second stage keeps the track.
    assert [b.track_id for b in t.update(*frame((1, 0, 51, 100, 0.15)))] == [1]
    t2 = ByteTracker()
    for _ in range(5):
        assert t2.update(*frame((0, 0, 50, 100, 0.2))) == []


def test_a_lost_track_is_found_again_within_track_buffer_frames_then_removed() -> None:
    t = ByteTracker(ByteTrackParams(track_buffer=5))
    box = (100, 100, 150, 200, 0.9)
    t.update(*frame(box))
    for _ in range(4):
        assert t.update(*frame()) == []
    assert [b.track_id for b in t.update(*frame(box))] == [1]  # back under its id
    for _ in range(8):
        t.update(*frame())
    t.update(*frame(box))
    assert [b.track_id for b in t.update(*frame(box))] == [2]  # gone: a new person


def test_reported_box_is_the_kalman_estimate_and_reset_restarts_ids() -> None:
    t = ByteTracker()
    t.update(*frame((0, 0, 50, 100, 0.9)))
    b = t.update(*frame((10, 0, 60, 100, 0.9)))[0]
    assert 0 < b.box[0] < 10  # between where it was and where it is seen: filtered
    t.reset()
    assert [b.track_id for b in t.update(*frame((500, 0, 550, 100, 0.9)))] == [1]


@pytest.mark.parametrize("seed", range(8))
def test_same_tracks_as_ultralytics_bytetracker(seed: int) -> None:
    """Fed the same detections, frame after frame, the port reports what ultralytics' BYTETracker reports:
    the same ids, scores and detection indices, and boxes equal to float32 precision."""
    pytest.importorskip("ultralytics")
    import torch
    from ultralytics.engine.results import Boxes
    from ultralytics.trackers.byte_tracker import BYTETracker
    from ultralytics.utils import IterableSimpleNamespace

    overrides = {"track_buffer": 10, "track_high_thresh": 0.25, "new_track_thresh": 0.25, "track_low_thresh": 0.1}
    params = ByteTrackParams.with_overrides(overrides)
    ours = ByteTracker(params)
    theirs = BYTETracker(IterableSimpleNamespace(tracker_type="bytetrack", **{
        k: getattr(params, k) for k in ByteTrackParams.__dataclass_fields__}))
    reported = 0
    for xyxy, scores, classes in walkers(seed):
        data = np.concatenate([xyxy, scores[:, None], classes[:, None].astype(np.float32)], axis=1)
        ref = theirs.update(Boxes(torch.from_numpy(data).reshape(-1, 6), (480, 640)).cpu().numpy())
        got = ours.update(xyxy, scores, classes)
        assert [b.track_id for b in got] == [int(r[4]) for r in ref]
        assert [b.det_index for b in got] == [int(r[7]) for r in ref]
        if got:
            np.testing.assert_allclose([b.box for b in got], ref[:, :4], rtol=0, atol=1e-3)
            np.testing.assert_allclose([b.score for b in got], ref[:, 5], rtol=1e-6)
        reported += len(got)
    assert reported > 100  # the scenario exercised the tracker
