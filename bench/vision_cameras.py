"""Several cameras at once on this box: each camera in its own process (capture -> detect + track ->
analytics), the agent process draining their numbers into the outbox. Prints frames/s per camera.

The CAVIAR clip (../shared/data/caviar/) stands in for each camera's stream.

    python bench/vision_cameras.py --cameras 2          # target: >= 10 fps each
    python bench/vision_cameras.py --cameras 1          # target: >= 25 fps
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import emit, header, note

from edge_agent.clock import RealClock
from edge_agent.config import VisionConfig
from edge_agent.sync.outbox import Outbox
from edge_agent.vision.service import VisionService

CLIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "caviar" / "EnterExitCrossingPaths1cor.mpg"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cameras", type=int, default=2)
    ap.add_argument("--imgsz", type=int, default=VisionConfig().imgsz)
    a = ap.parse_args()
    header("vision_cameras", cameras=a.cameras, imgsz=a.imgsz)
    cams = [{"camera": f"cam{i}", "url": str(CLIP), "start_ts": 1_767_225_600.0,
             "homography": {"image": [[40, 288], [330, 288], [150, 40], [100, 40]],
                            "floor": [[0, 0], [6, 0], [6, 30], [0, 30]]}} for i in range(a.cameras)]
    work = Path(tempfile.mkdtemp(prefix="bench-cams-"))
    ob = Outbox(work / "outbox.db", RealClock())
    svc = VisionService(VisionConfig.model_validate({"enabled": True, "imgsz": a.imgsz, "cameras": cams}), ob)
    t0 = time.monotonic()
    svc.start()
    while len(svc.done) < a.cameras and time.monotonic() - t0 < 600:
        time.sleep(0.2)
    svc.stop()
    for i in range(a.cameras):
        f = svc.figures
        note(f"cam{i}: {f.get(f'vision.cam{i}.frames', 0):.0f} frames")
        emit(f"vision_cam{i}_fps", f.get(f"vision.cam{i}.fps", 0.0))
        emit(f"vision_cam{i}_detect_track_ms", f.get(f"vision.cam{i}.detect_track_ms", 0.0))
    ob.close()


if __name__ == "__main__":
    main()
