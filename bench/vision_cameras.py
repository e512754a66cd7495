"""Several cameras at once on this box: each camera in its own process (capture -> detect + track ->
analytics), the agent process draining their numbers into the outbox. Prints frames/s per camera, for
each runtime of ``--runtimes`` in turn (default the lean OpenVINO runtime, then ultralytics), and the
ratio of the first runtime's mean over the last's.

The CAVIAR clip (../shared/data/caviar/) stands in for each camera's stream.

    python bench/vision_cameras.py --cameras 2          # target: >= 10 fps each
    python bench/vision_cameras.py --cameras 1          # target: >= 25 fps
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import emit, header, note

from edge_agent.clock import RealClock
from edge_agent.config import VisionConfig
from edge_agent.sync.outbox import Outbox
from edge_agent.vision.detector import RUNTIMES
from edge_agent.vision.service import VisionService

CLIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "caviar" / "EnterExitCrossingPaths1cor.mpg"


def run(runtime: str, n_cameras: int, imgsz: int, work: Path) -> list[float]:
    cams = [{"camera": f"cam{i}", "url": str(CLIP), "start_ts": 1_767_225_600.0,
             "homography": {"image": [[40, 288], [330, 288], [150, 40], [100, 40]],
                            "floor": [[0, 0], [6, 0], [6, 30], [0, 30]]}} for i in range(n_cameras)]
    ob = Outbox(work / f"outbox-{runtime}.db", RealClock())
    svc = VisionService(VisionConfig.model_validate({"enabled": True, "imgsz": imgsz, "runtime": runtime,
                                                     "cameras": cams}), ob)
    t0 = time.monotonic()
    svc.start()
    while len(svc.done) < n_cameras and time.monotonic() - t0 < 600:
        time.sleep(0.2)
    svc.stop()
    fps = []
    f = svc.figures
    for i in range(n_cameras):
        note(f"{runtime} cam{i}: {f.get(f'vision.cam{i}.frames', 0):.0f} frames")
        fps.append(f.get(f"vision.cam{i}.fps", 0.0))
        emit(f"vision_cam{i}_fps_{runtime}", fps[-1])
        emit(f"vision_cam{i}_detect_track_ms_{runtime}", f.get(f"vision.cam{i}.detect_track_ms", 0.0))
    ob.close()
    return fps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cameras", type=int, default=2)
    ap.add_argument("--imgsz", type=int, default=VisionConfig().imgsz)
    ap.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=["openvino", "ultralytics"])
    a = ap.parse_args()
    header("vision_cameras", cameras=a.cameras, imgsz=a.imgsz, runtimes=",".join(a.runtimes))
    work = Path(tempfile.mkdtemp(prefix="bench-cams-"))
    fps = {rt: run(rt, a.cameras, a.imgsz, work) for rt in a.runtimes}
    if len(fps) > 1:
        emit("vision_fps_ratio", statistics.fmean(fps[a.runtimes[0]]) / statistics.fmean(fps[a.runtimes[-1]]))


if __name__ == "__main__":
    main()
