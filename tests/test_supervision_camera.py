"""A real agent process (`edge-agent run`) with one camera reading a live MJPEG stream (simulators/live_camera.py,
real footage when the CAVIAR clip is there), a real mosquitto and HQ: its camera process, SIGKILLed, is
back within its backoff; /readyz says which camera is down meanwhile; the vision.camera_down alert and
the recovered note reach HQ; `edge-agent status` shows the restart."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from edge_agent.cli import main as cli
from simulators.mosquitto import Mosquitto, free_port

from .helpers import AgentProcess, agent_config, live_door_camera, local_status, start_hq, wait_for

pytest.importorskip("ultralytics")
pytestmark = pytest.mark.slow

BACKOFF_S = 3.0  # restart_min_s: the first restart's wait
STABLE_S = 4.0


def camera(port: int) -> dict[str, Any]:
    code, s = local_status(port)
    assert code == 200, (code, s)
    [cam] = s["cameras"]
    return cam


def hq_alerts(rx: Any, kind: str) -> list[dict[str, Any]]:
    return [a for (body,) in rx.db.read("SELECT body FROM telemetry WHERE store = 'S001' AND stream = 'health'")
            for a in json.loads(body)["alerts"] if a["kind"] == kind]


def test_a_camera_process_killed_with_sigkill_is_back_within_its_backoff_and_hq_is_told(
        tmp_path: Path, broker: Mosquitto, capsys: pytest.CaptureFixture[str]) -> None:
    live, vision = live_door_camera()
    port = free_port()
    cfg = agent_config(tmp_path, broker.port, vision=vision, status={"port": port}, health={"interval_s": 2.0},
                       supervision={"restart_min_s": BACKOFF_S, "restart_max_s": 10.0, "stable_s": STABLE_S})
    rx = start_hq(tmp_path, broker.port)
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    try:
        # Up: the model loaded, frames analysed and fresh.
        wait_for(lambda: local_status(port)[0] == 200 and (c := camera(port))["frames"] and c["last_frame_age_s"] < 3,
                 120, "the camera's first frames")
        cam = camera(port)
        assert cam["state"] == "up" and cam["restarts"] == 0 and cam["fps"] > 0 and cam["inference_ms"] > 0
        first = psutil.Process(cam["pid"])
        assert first.ppid() == agent.proc.pid  # type: ignore[union-attr]

        os.kill(cam["pid"], signal.SIGKILL)
        killed = time.monotonic()
        # Down: /readyz names it while it waits for its restart.
        wait_for(lambda: local_status(port, "/readyz")[0] == 503, BACKOFF_S, "/readyz to say the camera is down")
        checks = {c["name"]: c for c in local_status(port, "/readyz")[1]["checks"]}
        assert not checks["sources"]["ok"] and "camera-door" in checks["sources"]["detail"]
        down = camera(port)
        assert down["state"] == "down" and down["last_frame_age_s"] is not None
        [child] = [c for c in local_status(port)[1]["children"] if c["name"] == "camera-door"]
        assert child["reason"] == "killed by SIGKILL" and 0 < child["restart_in_s"] <= BACKOFF_S

        # Back within its backoff: a new process, restarted once, not before the backoff and not long after.
        wait_for(lambda: camera(port)["restarts"] == 1, BACKOFF_S + 2.0, "the camera's restart")
        restarted = time.monotonic() - killed
        assert BACKOFF_S - 0.5 <= restarted <= BACKOFF_S + 2.0, restarted
        again = camera(port)
        assert again["state"] == "up" and again["pid"] != cam["pid"] and psutil.pid_exists(again["pid"])
        assert local_status(port, "/readyz")[0] == 200
        assert not psutil.pid_exists(cam["pid"]) or psutil.Process(cam["pid"]).status() != psutil.STATUS_ZOMBIE
        # ... and analysing frames again (its model loaded anew).
        wait_for(lambda: (c := camera(port))["frames"] and c["last_frame_age_s"] < 3 and c["pid"] == again["pid"],
                 120, "frames from the restarted camera")

        # HQ got the alert (in a health message, through the outbox), then the recovered note.
        wait_for(lambda: bool(hq_alerts(rx, "vision.camera_down")), 30, "the vision.camera_down alert at HQ")
        [alert] = hq_alerts(rx, "vision.camera_down")
        assert "camera-door died (killed by SIGKILL)" in alert["message"]
        wait_for(lambda: bool(hq_alerts(rx, "vision.camera_recovered")), STABLE_S + 30, "the recovered note at HQ")
        [note] = hq_alerts(rx, "vision.camera_recovered")
        assert "camera-door is back: working for" in note["message"] and "after 1 restart" in note["message"]
        assert note["ts"] > alert["ts"]

        assert cli(["status", "-c", str(cfg)]) == 0
        out = capsys.readouterr().out
        assert "vision.camera_down" in out and "camera-door" in out
        assert any(line.startswith("door ") and " up " in line for line in out.splitlines()), out
    finally:
        code = agent.terminate()
        rx.stop()
        live.stop()
    assert code == 0
    log = (tmp_path / "agent.log").read_text()
    assert "camera-door restarted (restart 1)" in log
