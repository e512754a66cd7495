"""Traffic analytics accuracy on synthetic store scenes (simulators/camera.py) against their exact truth.

Each seeded scene is rendered frame by frame and run through the agent's own pipeline, set up as a
camera process sets it up (edge_agent.vision.service.run_camera): PersonDetector with the VisionConfig
defaults and ``track_buffer = track_grace_s * fps``, then TrafficAnalytics with the scene's calibration,
zones, door line and heatmap grid (``CameraScene.analytics_config()``, every other key at its default).
Rendering is not timed. Figures, over all scenes:

- ``scenes_entry_exit_accuracy``: 1 - (missed + extra) / truth events, the counts of door crossings
  compared per scene, line and direction (missed: truth minus counted where fewer were counted, extra:
  the excess where more were), so errors in different scenes or directions never cancel out. Target
  >= 0.98. ``scenes_entry_exit_accuracy_timed`` is stricter: a counted crossing must also match a truth
  crossing at most ``MATCH_S`` seconds away, one to one (as many pairs as possible), so a crossing
  counted for the wrong person or long after it happened is one missed and one extra.
  ``scenes_entries`` / ``scenes_exits`` are the raw counts beside ``scenes_truth_entries`` / ``_exits``.
- ``scenes_dwell_error_median_pct``: median over the truth visits that the analytics should report (zone
  visits of at least ``min_dwell_s``) of |reported - true| / true seconds, in %. Each truth visit is
  matched to the reported visit of the same zone that overlaps it most in time (one to one); a truth
  visit left unmatched counts as a 100% error. Target < 5. ``scenes_visits_missed`` and
  ``scenes_visits_extra`` (reported visits matching no truth visit) say how many were not matched.
- ``scenes_heatmap_corr_mean`` / ``_min``: Pearson correlation, over the floor grid's cells, of the
  person-seconds painted by the analytics (all buckets of a scene summed) with the truth's; the mean and
  the worst over the scenes. Target >= 0.9.
- ``scenes_heatmap_corr_2x_cells_mean``: the same with cells twice as wide (2 x 2 blocks summed), to
  tell position error from missed people: a person standing still a few centimetres from a cell edge
  lands in the neighbouring cell for a 5-10 cm foot-point error, which the 0.5 m grid punishes in full.
- ``scenes_heatmap_corr_truth_jitter_{2,5}cm``: the reference for the two above. The truth itself,
  with every person's floor point moved by a fixed random offset (normal, 2 or 5 cm per axis) for each
  stretch of their visit (walking, each stop), as a perfect tracker with that foot-point accuracy would
  paint it; the mean over the scenes of ``JITTER_DRAWS`` draws each. A stop that sits within an offset
  of a cell edge moves whole into the neighbour, so 0.5 m cells ask for about 2 cm.
- ``scenes_floor_error_median_m``: median distance between the analytics' floor point of a person in full
  view and the truth (the detector's box matched to the person's at IoU >= 0.6).
- ``scenes_count_mae``: mean absolute error of the people count per frame (tracks reported by the
  detector against the people in the scene, hidden ones included).
- ``scenes_fps``: frames per second of detect + track + analytics for one camera.

Each figure but the truth-jitter references is printed once per runtime of ``--runtimes`` (``_openvino``,
``_ultralytics``, ...: default the lean OpenVINO runtime and ultralytics, each rendered frame fed to both in
turn), then ``scenes_fps_ratio`` (the first runtime's over the last's).

    python bench/vision_scenes.py                    # 12 scenes of 60 s, 6 people each, 10 fps
    python bench/vision_scenes.py --seeds 1 2 --seconds 30
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from _common import emit, header, note

from edge_agent.config import VisionConfig
from edge_agent.vision.analytics import Crossing, TrafficAnalytics, TrafficAnalyticsConfig, Visit
from edge_agent.vision.detector import RUNTIMES, PersonDetector
from edge_agent.vision.floor import box_areas, box_intersections, foot_points
from simulators.camera import POSES, CameraScene, SceneConfig, paint_heatmap

MATCH_S = 2.0  # a counted crossing this close in time to a truth crossing (same line, direction) is that one
JITTER_DRAWS = 10


def match_crossings(truth: list[dict[str, Any]], got: list[Crossing]) -> tuple[int, int]:
    """(missed, extra) after matching counted crossings to truth crossings one to one.

    Every truth crossing, in time order, takes the earliest free counted one of its line and direction
    within MATCH_S: with windows of one width this pairs as many as any matching can (nearest-first
    would not: it can take the one a later truth crossing needed)."""
    missed = 0
    free = sorted(got, key=lambda c: c.ts)
    for t in sorted(truth, key=lambda x: x["ts"]):
        c = next((c for c in free if c.line == t["line"] and c.direction == t["direction"]
                  and abs(c.ts - t["ts"]) <= MATCH_S), None)
        if c is None:
            missed += 1
        else:
            free.remove(c)
    return missed, len(free)


def match_visits(truth: list[dict[str, Any]], got: list[Visit]) -> tuple[list[float], int, int]:
    """(relative dwell errors of the truth visits, 1.0 for a missed one; missed; extra)."""
    pairs = []
    for i, t in enumerate(truth):
        for j, v in enumerate(got):
            overlap = min(t["leave_ts"], v.leave_ts) - max(t["enter_ts"], v.enter_ts)
            if v.zone == t["zone"] and overlap > 0:
                pairs.append((overlap, i, j))
    errors: dict[int, float] = {}
    used: set[int] = set()
    for _, i, j in sorted(pairs, reverse=True):
        if i not in errors and j not in used:
            errors[i] = abs(got[j].seconds - truth[i]["seconds"]) / truth[i]["seconds"]
            used.add(j)
    missed = len(truth) - len(errors)
    return [errors.get(i, 1.0) for i in range(len(truth))], missed, len(got) - len(used)


def jittered_heatmap_corr(truth: dict[str, Any], sigma: float, rng: np.random.Generator) -> float:
    """Correlation with the truth heatmap of the truth painted with a fixed offset (normal, ``sigma``
    metres per axis) per person and stretch of their visit; see the module's docstring."""
    offsets: dict[tuple[int, tuple[str, ...]], np.ndarray] = {}

    def shift(q: dict[str, Any]) -> np.ndarray:
        return offsets.setdefault((q["id"], tuple(q["zones"])), rng.normal(0.0, sigma, 2))

    hm = truth["heatmap"]
    painted = paint_heatmap(truth["frames"], hm, truth["config"]["fps"], shift)
    return float(np.corrcoef(painted, hm["cells"])[0, 1])


def floor_errors(truth_frames: list[dict[str, Any]], seen: list[list[tuple[tuple[float, ...], np.ndarray]]]) -> list[float]:
    """Distances (m) from the truth of each person in full view to the floor point of the detector box
    that matches theirs at IoU >= 0.6; ``seen`` holds per frame the (box, floor point) of each track,
    the floor point mapped from the box's foot point as the analytics maps that of a person in view."""
    out = []
    for f, tracks in zip(truth_frames, seen, strict=True):
        for q in f["people"]:
            if q["visible"] < 0.99 or not tracks:
                continue
            boxes = np.array([b for b, _ in tracks])
            inter = box_intersections(boxes, q["box"])[:, 0]
            iou = inter / (box_areas(boxes) + box_areas(q["box"]) - inter)
            k = int(np.argmax(iou))
            if iou[k] >= 0.6:
                out.append(float(np.hypot(*(tracks[k][1] - np.asarray(q["floor"])))))
    return out


def _coarsen(cells: Any, rows: int, cols: int) -> np.ndarray:
    """Sum 2 x 2 blocks of a row-major grid (padded with zeros to even sides)."""
    g = np.zeros((rows + rows % 2, cols + cols % 2))
    g[:rows, :cols] = np.asarray(cells, dtype=np.float64).reshape(rows, cols)
    return g.reshape(g.shape[0] // 2, 2, g.shape[1] // 2, 2).sum(axis=(1, 3)).ravel()


@dataclass
class Score:
    """One runtime's detector, its tallies over the scenes, and the figures they give."""

    det: PersonDetector
    truth_events: int = 0
    missed_events: int = 0
    extra_events: int = 0
    count_errors_events: int = 0
    entries: int = 0
    exits: int = 0
    truth_entries: int = 0
    truth_exits: int = 0
    dwell_errors: list[float] = field(default_factory=list)
    visits_missed: int = 0
    visits_extra: int = 0
    corrs: list[float] = field(default_factory=list)
    corrs_2x: list[float] = field(default_factory=list)
    floor_errs: list[float] = field(default_factory=list)
    count_errors: list[int] = field(default_factory=list)
    n_frames: int = 0
    busy: float = 0.0
    # The scene under way (start() sets them).
    analytics: TrafficAnalytics = field(init=False)
    seen: list[list[tuple[tuple[float, ...], np.ndarray]]] = field(init=False)
    counts: list[int] = field(init=False)

    def start(self, cam: TrafficAnalyticsConfig) -> None:
        self.det.reset()
        self.analytics = TrafficAnalytics(cam)
        self.seen = []
        self.counts = []

    def frame(self, ts: float, image: np.ndarray, homography: Any, vp: Any) -> None:
        t0 = time.perf_counter()
        tracks = self.det.track(image)
        self.analytics.update(ts, tracks)
        self.busy += time.perf_counter() - t0
        self.counts.append(len(tracks))
        boxes = np.array([t.box for t in tracks], dtype=np.float64).reshape(-1, 4)
        self.seen.append(list(zip([t.box for t in tracks], homography.to_floor(foot_points(boxes, vp)), strict=True)))

    def finish(self, seed: int, cam: TrafficAnalyticsConfig, truth: dict[str, Any], ts: float) -> None:
        heat = self.analytics.flush(ts + cam.bucket_s + cam.track_grace_s + 1)[1]
        counts = self.counts
        self.n_frames += len(counts)
        self.count_errors += [abs(n - len(f["people"])) for n, f in zip(counts, truth["frames"], strict=True)]

        crossings = self.analytics.pop_crossings()
        missed, extra = match_crossings(truth["crossings"], crossings)
        self.truth_events += len(truth["crossings"])
        self.missed_events += missed
        self.extra_events += extra
        for line in cam.lines:
            for direction in ("in", "out"):
                want = sum(c["line"] == line and c["direction"] == direction for c in truth["crossings"])
                self.count_errors_events += abs(want - sum(c.line == line and c.direction == direction
                                                           for c in crossings))
        got_in = sum(c.direction == "in" for c in crossings)
        self.entries += got_in
        self.exits += len(crossings) - got_in
        self.truth_entries += truth["entries"]
        self.truth_exits += truth["exits"]

        due = [v for v in truth["visits"] if v["seconds"] >= cam.min_dwell_s]
        visits = self.analytics.pop_visits()
        errs, v_missed, v_extra = match_visits(due, visits)
        self.dwell_errors += errs
        self.visits_missed += v_missed
        self.visits_extra += v_extra

        painted = np.sum([h["cells"] for h in heat], axis=0) if heat else np.zeros(len(truth["heatmap"]["cells"]))
        corr = float(np.corrcoef(painted, truth["heatmap"]["cells"])[0, 1])
        self.corrs.append(corr)
        rows, cols = truth["heatmap"]["rows"], truth["heatmap"]["cols"]
        self.floor_errs += floor_errors(truth["frames"], self.seen)
        self.corrs_2x.append(float(np.corrcoef(_coarsen(painted, rows, cols),
                                               _coarsen(truth["heatmap"]["cells"], rows, cols))[0, 1]))
        note(f"{self.det.runtime} seed {seed}: crossings {got_in} in / {len(crossings) - got_in} out against "
             f"{truth['entries']} / {truth['exits']} (missed {missed}, extra {extra}); visits {len(visits)} against "
             f"{len(due)} (missed {v_missed}, extra {v_extra}), dwell errors % "
             f"{[round(100 * e, 1) for e in errs]}; heatmap r {corr:.3f}; "
             f"count MAE {statistics.fmean(self.count_errors[-len(counts):]):.3f}")

    def figures(self) -> dict[str, float]:
        return {
            "scenes_entry_exit_accuracy": 1.0 - self.count_errors_events / self.truth_events,
            "scenes_entry_exit_accuracy_timed": 1.0 - (self.missed_events + self.extra_events) / self.truth_events,
            "scenes_entries": self.entries,
            "scenes_truth_entries": self.truth_entries,
            "scenes_exits": self.exits,
            "scenes_truth_exits": self.truth_exits,
            "scenes_dwell_error_median_pct": 100 * statistics.median(self.dwell_errors),
            "scenes_visits": len(self.dwell_errors),
            "scenes_visits_missed": self.visits_missed,
            "scenes_visits_extra": self.visits_extra,
            "scenes_heatmap_corr_mean": statistics.fmean(self.corrs),
            "scenes_heatmap_corr_min": min(self.corrs),
            "scenes_heatmap_corr_2x_cells_mean": statistics.fmean(self.corrs_2x),
            "scenes_floor_error_median_m": statistics.median(self.floor_errs),
            "scenes_count_mae": statistics.fmean(self.count_errors),
            "scenes_fps": self.n_frames / self.busy,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(1, 13)))
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--people", type=int, default=6)
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--pose", choices=sorted(POSES), default=SceneConfig.pose, help="the simulated camera's mount")
    ap.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=["openvino", "ultralytics"])
    ap.add_argument("--imgsz", type=int, default=None, help="default: VisionConfig's")
    ap.add_argument("--conf", type=float, default=None, help="default: VisionConfig's")
    ap.add_argument("--iou", type=float, default=None, help="NMS overlap (default: the detector's)")
    a = ap.parse_args()
    vcfg = VisionConfig()
    imgsz = a.imgsz or vcfg.imgsz
    conf = a.conf or vcfg.conf
    header("vision_scenes", pose=a.pose, seeds=a.seeds, seconds=a.seconds, people=a.people, fps=a.fps, imgsz=imgsz,
           conf=conf, runtimes=",".join(a.runtimes))
    scores: dict[str, Score] = {}
    jitter_corrs: dict[int, list[float]] = {2: [], 5: []}
    for seed in a.seeds:
        scene = CameraScene(SceneConfig(seed=seed, n_people=a.people, duration_s=a.seconds, fps=a.fps, pose=a.pose))
        cam = TrafficAnalyticsConfig.model_validate(scene.analytics_config())
        if not scores:
            overrides = {"track_buffer": max(1, round(cam.track_grace_s * a.fps))}
            nms = {"iou": a.iou} if a.iou is not None else {}
            for rt in a.runtimes:
                scores[rt] = Score(PersonDetector(vcfg.model, imgsz=imgsz, conf=conf, runtime=rt, tracker=vcfg.tracker,
                                                  tracker_overrides=overrides, **nms))
                note(repr(scores[rt].det))
        for sc in scores.values():
            sc.start(cam)
        homography, uprights = cam.homography.build(), cam.homography.uprights()
        vp = None if uprights is None else uprights.vanishing_point
        ts = 0.0
        # Each rendered frame goes to every runtime in turn: the same frames, under the same load.
        for ts, image in scene.frames():
            for sc in scores.values():
                sc.frame(ts, image, homography, vp)
        truth = scene.truth()
        for sc in scores.values():
            sc.finish(seed, cam, truth, ts)
        rng = np.random.default_rng(seed)
        for cm, got in jitter_corrs.items():
            got.append(statistics.fmean(jittered_heatmap_corr(truth, cm / 100, rng) for _ in range(JITTER_DRAWS)))
    for cm, got in jitter_corrs.items():
        emit(f"scenes_heatmap_corr_truth_jitter_{cm}cm", statistics.fmean(got))
    figures = {rt: sc.figures() for rt, sc in scores.items()}
    for rt, f in figures.items():
        for name, value in f.items():
            emit(f"{name}_{rt}", value)
    if len(figures) > 1:
        emit("scenes_fps_ratio", figures[a.runtimes[0]]["scenes_fps"] / figures[a.runtimes[-1]]["scenes_fps"])


if __name__ == "__main__":
    main()
