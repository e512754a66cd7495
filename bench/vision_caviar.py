"""People counting on real CCTV: the CAVIAR shopping-centre clip (../shared/data/caviar/, CC BY-SA,
EC Funded CAVIAR project/IST 2001 37540), against its ground truth.

Decode (OpenCV) -> detect + track (ultralytics YOLO + ByteTrack, the packaged people model, default
OpenVINO at the default size) -> analytics (floor mapping, shop-entrance line). Prints:

- ``caviar_count_mae`` mean absolute error of the people count per ground-truth second, the count of a
  second being the median of its frames' counts (target <= 0.3); ``caviar_count_mae_single_frame``
  uses only the frame at the sampled instant
- ``caviar_entries`` / ``caviar_exits`` counted across the shop-front line, against the ground truth's
- ``caviar_fps`` and per-stage milliseconds (decode, detect+track, analytics) for one camera

The detector is set up as a camera process sets it up: VisionConfig's defaults (imgsz, conf) and
PersonDetector's (iou, low_conf), ``track_buffer`` = track_grace_s at 25 fps.

    python bench/vision_caviar.py [--imgsz 480] [--conf 0.25] [--model PATH]
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
from edge_agent.vision.detector import PersonDetector

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
    ap.add_argument("--imgsz", type=int, default=vcfg.imgsz)
    ap.add_argument("--conf", type=float, default=vcfg.conf)
    ap.add_argument("--model", type=Path, default=vcfg.model)
    ap.add_argument("--iou", type=float, default=None, help="NMS overlap (default: the detector's)")
    a = ap.parse_args()
    header("vision_caviar", imgsz=a.imgsz, conf=a.conf)
    gt = {round(float(r["video_time_s"])): int(r["people_in_frame"])
          for r in csv.DictReader(open(DATA / "EnterExitCrossingPaths1cor_gt_people.csv"))}
    gt_dir = [r["direction"] for r in csv.DictReader(open(DATA / "EnterExitCrossingPaths1cor_gt_entries.csv"))]
    cam = TrafficAnalyticsConfig.model_validate(CAVIAR_CAMERA)
    nms = {"iou": a.iou} if a.iou is not None else {}
    det = PersonDetector(a.model, imgsz=a.imgsz, conf=a.conf, tracker=vcfg.tracker,
                         tracker_overrides={"track_buffer": round(cam.track_grace_s * 25)}, **nms)
    note(repr(det))
    analytics = TrafficAnalytics(cam)
    counts: dict[int, int] = {}
    t_decode = t_detect = t_analytics = 0.0
    src = FrameSource(str(CLIP), start_ts=0.0)
    it = src.frames()
    t0 = time.perf_counter()
    n = 0
    while True:
        ta = time.perf_counter()
        item = next(it, None)
        tb = time.perf_counter()
        if item is None:
            break
        assert isinstance(item, Frame)
        tracks = det.track(item.image)
        tc = time.perf_counter()
        analytics.update(item.ts, tracks)
        td = time.perf_counter()
        t_decode += tb - ta
        t_detect += tc - tb
        t_analytics += td - tc
        n += 1
        counts[item.index] = len(tracks)
    wall = time.perf_counter() - t0
    analytics.flush(1e12)
    errors = [abs(counts.get(round(s * 25), 0) - want) for s, want in sorted(gt.items())]
    # The people count of a second: the median over its frames, so one frame's missed or doubled box
    # does not decide it.
    per_second = {s: statistics.median([counts[i] for i in range(round((s - 0.5) * 25), round((s + 0.5) * 25) + 1)
                                        if i in counts]) for s in gt}
    errors_1s = [abs(per_second[s] - want) for s, want in sorted(gt.items())]
    crossings = analytics.pop_crossings()
    note(f"{n} frames; per second: predicted {[per_second[s] for s in sorted(gt)]}, "
         f"truth {[gt[s] for s in sorted(gt)]}; crossings {[(round(c.ts, 2), c.direction) for c in crossings]}")
    emit("caviar_count_mae", statistics.fmean(errors_1s))
    emit("caviar_count_mae_single_frame", statistics.fmean(errors))
    emit("caviar_entries", sum(c.direction == "in" for c in crossings))
    emit("caviar_exits", sum(c.direction == "out" for c in crossings))
    emit("caviar_truth_entries", gt_dir.count("in"))
    emit("caviar_truth_exits", gt_dir.count("out"))
    emit("caviar_fps", n / wall)
    emit("caviar_decode_ms", 1000 * t_decode / n)
    emit("caviar_detect_track_ms", 1000 * t_detect / n)
    emit("caviar_analytics_ms", 1000 * t_analytics / n)


if __name__ == "__main__":
    main()
