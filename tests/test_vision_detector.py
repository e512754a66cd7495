"""The real people model (provisioned by models/provision.py, offline) and the camera process end to end."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path

import cv2
import pytest

pytest.importorskip("ultralytics")

from edge_agent.clock import RealClock  # noqa: E402
from edge_agent.config import VisionConfig  # noqa: E402
from edge_agent.contract import TrafficHeatmapItem, TrafficStatsItem  # noqa: E402
from edge_agent.sync.outbox import Outbox  # noqa: E402
from edge_agent.vision.capture import Frame, FrameSource  # noqa: E402
from edge_agent.vision.detector import PersonDetector  # noqa: E402
from edge_agent.vision.service import VisionService  # noqa: E402

CLIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "caviar" / "EnterExitCrossingPaths1cor.mpg"
needs_clip = pytest.mark.skipif(not CLIP.exists(), reason="the CAVIAR clip lives in ../shared/data")


def bus_jpg() -> Path:
    import ultralytics

    return Path(ultralytics.__file__).parent / "assets" / "bus.jpg"


@pytest.mark.parametrize("runtime", ["openvino", "onnx", "ultralytics"])
def test_packaged_model_finds_the_people_in_bus_jpg(runtime: str) -> None:
    det = PersonDetector(None, imgsz=320, conf=0.25, runtime=runtime)  # type: ignore[arg-type]
    assert det.backend == {"onnx": "onnx"}.get(runtime, "openvino")
    tracks = det.track(cv2.imread(str(bus_jpg())))
    assert 3 <= len(tracks) <= 6  # four people stand by the bus
    h, w = 1080, 810
    for t in tracks:
        x1, y1, x2, y2 = t.box
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and 0 < t.conf <= 1


def test_defaults_track_low_confidence_boxes_and_cap_low_conf_at_conf() -> None:
    det = PersonDetector(None, imgsz=320)
    assert (det.conf, det.low_conf, det.iou) == (0.25, 0.1, 0.55)
    assert VisionConfig().conf == det.conf  # a camera process passes the config's conf
    # A camera configured below the default low_conf keeps every box it asked for, no more.
    assert PersonDetector(None, imgsz=320, conf=0.05).low_conf == 0.05
    for bad in ({"low_conf": 0.0}, {"iou": 1.0}, {"conf": 1.0}):
        with pytest.raises(ValueError):
            PersonDetector(None, imgsz=320, **bad)


@needs_clip
def test_track_ids_persist_across_frames_of_real_cctv() -> None:
    det = PersonDetector(None, imgsz=320, conf=0.35)
    ids: list[set[int]] = []
    for item in FrameSource(str(CLIP), start_ts=0.0).frames():
        assert isinstance(item, Frame)
        ids.append({t.track_id for t in det.track(item.image)})
        if len(ids) == 50:
            break
    # The same people walk through all 50 frames (2 s): most ids of frame 10 are still there at 49.
    assert len(ids[10] & ids[49]) >= 2


@needs_clip
@pytest.mark.slow
def test_camera_process_sends_only_numbers_to_the_outbox(tmp_path: Path) -> None:
    cam = {
        "camera": "caviar", "url": str(CLIP), "start_ts": 1_767_225_600.0, "bucket_s": 5,
        "homography": {"image": [[40, 288], [330, 288], [150, 40], [100, 40]],
                       "floor": [[0, 0], [6, 0], [6, 30], [0, 30]]},
        "zones": {"corridor": [[0, 0], [6, 0], [6, 30], [0, 30]]},
        "heatmap": {"origin": [0, 0], "width_m": 6, "height_m": 30, "cell_m": 1.0},
    }
    vcfg = VisionConfig.model_validate({"enabled": True, "cameras": [cam], "flush_s": 1.0})
    ob = Outbox(tmp_path / "outbox.db", RealClock())
    svc = VisionService(vcfg, ob)
    svc.start()
    deadline = time.monotonic() + 120
    while "caviar" not in svc.done and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    svc.stop()
    assert "caviar" in svc.done, "the camera process did not finish the clip"
    stats = [json.loads(b) for (b,) in ob.read("SELECT body FROM pending WHERE stream = 'traffic/stats'")]
    heat = [json.loads(b) for (b,) in ob.read("SELECT body FROM pending WHERE stream = 'traffic/heatmap'")]
    assert stats and heat
    for s in stats:
        TrafficStatsItem.model_validate(s)
    for h in heat:
        TrafficHeatmapItem.model_validate(h)
    # People were seen: the corridor had 2-4 of them the whole clip.
    assert max(s["occupancy_max"] for s in stats if s["zone"] == "corridor") >= 2
    assert svc.figures["vision.caviar.frames"] == 383
    # The store-wide ("*") figures of a one-camera store are that camera's, bucket for bucket (the dwell
    # median too: the camera process sends the dwell seconds behind it).
    for items in (stats, heat):
        own = {(i["bucket_start"], i.get("zone")): i for i in items if i["camera"] == "caviar"}
        wide = {(i["bucket_start"], i.get("zone")): i | {"camera": "caviar"} for i in items if i["camera"] == "*"}
        assert wide == own
    ob.close()
    # Privacy: no image bytes anywhere in the database: no JPEG/PNG magic, no long binary or base64 runs.
    raw = (tmp_path / "outbox.db").read_bytes()
    assert b"\xff\xd8\xff" not in raw and b"\x89PNG" not in raw
    con = sqlite3.connect(tmp_path / "outbox.db")
    for table, in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
        for row in con.execute(f'SELECT * FROM "{table}"'):
            for v in row:
                assert not isinstance(v, bytes) or len(v) < 1024, f"binary blob in {table}"
                if isinstance(v, str):
                    assert not re.search(r"[A-Za-z0-9+/]{512,}", v), f"base64-like run in {table}"
    con.close()


IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF", b"\x00\x00\x00\x0cjP")
BASE64_RUN = re.compile(rb"[A-Za-z0-9+/=]{256,}")


@needs_clip
@pytest.mark.slow
def test_no_image_data_in_any_mqtt_payload_of_a_run(tmp_path: Path, broker) -> None:  # type: ignore[no-untyped-def]
    """Privacy: run the agent with a camera (the real clip through the real model) and record every MQTT
    message any client publishes on the broker: none may carry image bytes, crops or encodings."""
    import paho.mqtt.client as mqtt

    from .helpers import AgentProcess, agent_config, wait_for

    got: list[tuple[str, bytes]] = []
    spy = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="privacy-spy")
    spy.on_message = lambda _c, _u, m: got.append((m.topic, bytes(m.payload)))
    spy.connect("127.0.0.1", broker.port)
    spy.subscribe("#", qos=1)
    spy.loop_start()
    cfg = agent_config(tmp_path, broker.port, sim={"total": 200, "rate_per_s": 200, "batch": 20},
                       vision={"enabled": True, "conf": 0.25, "flush_s": 1.0})
    with cfg.open("a") as f:
        f.write(f'\n[[vision.cameras]]\ncamera = "caviar"\nurl = "{CLIP}"\nbucket_s = 5\n'
                "[vision.cameras.homography]\nimage = [[40, 288], [330, 288], [150, 40], [100, 40]]\n"
                "floor = [[0, 0], [6, 0], [6, 30], [0, 30]]\n"
                "[vision.cameras.heatmap]\norigin = [0, 0]\nwidth_m = 6.0\nheight_m = 30.0\ncell_m = 1.0\n")
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    try:
        wait_for(lambda: any(t.endswith("traffic/heatmap") for t, _ in got), 120, "the camera's heatmap on MQTT")
        wait_for(lambda: any(t.endswith("traffic/stats") for t, _ in got), 30, "the camera's stats on MQTT")
    finally:
        assert agent.terminate() == 0
        spy.loop_stop()
        spy.disconnect()
    assert len(got) >= 5
    for topic, payload in got:
        assert not any(m in payload for m in IMAGE_MAGIC), f"image bytes on {topic}"
        assert not BASE64_RUN.search(payload), f"an encoded blob on {topic}"
        body = json.loads(payload)  # every payload is JSON made of names and numbers
        assert isinstance(body, dict), topic
