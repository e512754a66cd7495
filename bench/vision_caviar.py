"""People counting on real CCTV: the CAVIAR shopping-centre clip (../shared/data/caviar/, CC BY-SA,
EC Funded CAVIAR project/IST 2001 37540), against its ground truth.

Decode (OpenCV) -> detect + track (the packaged people model at the default size with ByteTrack, on each
runtime of ``--runtimes``: default the lean OpenVINO one and ultralytics, fed the same decoded frames in
turn, so both see the same load on a shared box) -> analytics (floor mapping, shop-entrance line). Prints,
each figure once per runtime (``_openvino``, ``_ultralytics``, ...), then ``_ratio`` lines (the first
runtime over the last):

- ``caviar_count_mae`` mean absolute error of the people count per ground-truth second, the count of a
  second being the median of its frames' counts (target <= 0.3); ``caviar_count_mae_single_frame``
  uses only the frame at the sampled instant
- ``caviar_entries`` / ``caviar_exits`` counted across the shop-front line, against the ground truth's
- ``caviar_fps`` and per-stage milliseconds (decode, detect+track, analytics) for one camera

The detector is set up as a camera process sets it up: VisionConfig's defaults (imgsz, conf) and
PersonDetector's (iou, low_conf), ``track_buffer`` = track_grace_s at 25 fps.

    python bench/vision_caviar.py [--runtimes openvino ultralytics] [--imgsz 480] [--conf 0.25] [--model PATH]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

from _common import emit, header, note

from edge_agent.config import VisionConfig
from edge_agent.vision.analytics import TrafficAnalytics, TrafficAnalyticsConfig
from edge_agent.vision.capture import Frame, FrameSource
from edge_agent.vision.detector import RUNTIMES, PersonDetector

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "caviar"
CLIP = DATA / "EnterExitCrossingPaths1cor.mpg"

# A rough floor calibration of the corridor (image pixels -> metres): the near floor edge and the far
# end of the corridor. The shop of the clip's script is the near one on the left wall; its door line runs
# a little inside its front, which ends about 10 m down the corridor (farther along are other shops,
# whose traffic the ground truth leaves out).
CAVIAR_CAMERA = {
    "camera": "caviar",
    "homography": {"image": [[40, 288], [330, 288], [150, 40], [100, 40]], "floor": [[0, 0], [6, 0], [6, 30], [0, 30]]},
    "lines": {"shop": {"a": [0.9, 0], "b": [0.9, 10], "inside": [-1, 5]}},
    "min_dwell_s": 1.0,
    "line_hysteresis_m": 0.1,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    vcfg = VisionConfig()
    ap.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=["openvino", "ultralytics"])
    ap.add_argument("--imgsz", type=int, default=vcfg.imgsz)
    ap.add_argument("--conf", type=float, default=vcfg.conf)
    ap.add_argument("--model", type=Path, default=vcfg.model, help="default: each runtime's provisioned export")
    ap.add_argument("--iou", type=float, default=None, help="NMS overlap (default: the detector's)")
    a = ap.parse_args()
    header("vision_caviar", imgsz=a.imgsz, conf=a.conf, runtimes=",".join(a.runtimes))
    gt = {round(float(r["video_time_s"])): int(r["people_in_frame"])
          for r in csv.DictReader(open(DATA / "EnterExitCrossingPaths1cor_gt_people.csv"))}
    gt_dir = [r["direction"] for r in csv.DictReader(open(DATA / "EnterExitCrossingPaths1cor_gt_entries.csv"))]
    cam = TrafficAnalyticsConfig.model_validate(CAVIAR_CAMERA)
    nms = {"iou": a.iou} if a.iou is not None else {}
    runs = {}
    for rt in a.runtimes:
        det = PersonDetector(a.model, imgsz=a.imgsz, conf=a.conf, runtime=rt, tracker=vcfg.tracker,
                             tracker_overrides={"track_buffer": round(cam.track_grace_s * 25)}, **nms)
        note(repr(det))
        runs[rt] = {"det": det, "analytics": TrafficAnalytics(cam), "counts": {}, "detect": 0.0, "analytics_s": 0.0}
    t_decode = 0.0
    src = FrameSource(str(CLIP), start_ts=0.0)
    it = src.frames()
    n = 0
    while True:
        ta = time.perf_counter()
        item = next(it, None)
        t_decode += time.perf_counter() - ta
        if item is None:
            break
        assert isinstance(item, Frame)
        for run in runs.values():
            tb = time.perf_counter()
            tracks = run["det"].track(item.image)
            tc = time.perf_counter()
            run["analytics"].update(item.ts, tracks)
            run["detect"] += tc - tb
            run["analytics_s"] += time.perf_counter() - tc
            run["counts"][item.index] = len(tracks)
        n += 1
    emit("caviar_truth_entries", gt_dir.count("in"))
    emit("caviar_truth_exits", gt_dir.count("out"))
    emit("caviar_decode_ms", 1000 * t_decode / n)
    figures = {rt: score(run, gt, n, t_decode) for rt, run in runs.items()}
    for rt, f in figures.items():
        for name, value in f.items():
            emit(f"{name}_{rt}", value)
    if len(figures) > 1:
        first, last = figures[a.runtimes[0]], figures[a.runtimes[-1]]
        for name in ("caviar_fps", "caviar_detect_track_ms"):
            emit(f"{name}_ratio", first[name] / last[name])


def score(run: dict, gt: dict[int, int], n: int, t_decode: float) -> dict[str, float]:
    counts = run["counts"]
    run["analytics"].flush(1e12)
    errors = [abs(counts.get(round(s * 25), 0) - want) for s, want in sorted(gt.items())]
    # The people count of a second: the median over its frames, so one frame's missed or doubled box
    # does not decide it.
    per_second = {s: statistics.median([counts[i] for i in range(round((s - 0.5) * 25), round((s + 0.5) * 25) + 1)
                                        if i in counts]) for s in gt}
    errors_1s = [abs(per_second[s] - want) for s, want in sorted(gt.items())]
    crossings = run["analytics"].pop_crossings()
    note(f"{run['det'].runtime}: {n} frames; per second: predicted {[per_second[s] for s in sorted(gt)]}, "
         f"truth {[gt[s] for s in sorted(gt)]}; crossings {[(round(c.ts, 2), c.direction) for c in crossings]}")
    return {
        "caviar_count_mae": statistics.fmean(errors_1s),
        "caviar_count_mae_single_frame": statistics.fmean(errors),
        "caviar_entries": sum(c.direction == "in" for c in crossings),
        "caviar_exits": sum(c.direction == "out" for c in crossings),
        # One camera's frame rate: decode + this runtime's detect + track + analytics.
        "caviar_fps": n / (t_decode + run["detect"] + run["analytics_s"]),
        "caviar_detect_track_ms": 1000 * run["detect"] / n,
        "caviar_analytics_ms": 1000 * run["analytics_s"] / n,
    }


if __name__ == "__main__":
    main()
