"""The agent's status page in a real headless Chromium (the tooling of test_hq_dashboard_browser.py): a real
agent process with RFID readers publishing to a real mosquitto, shelf labels behind a simulated access point
(three with low batteries) and a camera reading a live MJPEG stream. The page shows the antennas' reads/s,
the camera's fps and last frame, the labels needing attention and the outbox; the camera's process killed,
it shows the camera down, not ready, and the alert. Screenshots in test-artifacts/."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By

from simulators.esl_controller import SimulatedAccessPoint
from simulators.mosquitto import Mosquitto, free_port
from simulators.rfid_reader import sgtin96_hex

from .browser import save, until
from .helpers import AgentProcess, agent_config, live_door_camera, local_status, start_hq, wait_for

pytest.importorskip("ultralytics")
pytestmark = pytest.mark.slow

EPCS = [sgtin96_hex("0614141", "812345", n) for n in range(1, 21)]
ANTENNAS = [{"reader": "r1", "port": 1, "zone": "salesfloor"}, {"reader": "r1", "port": 2, "zone": "backroom"},
            {"reader": "r2", "port": 1, "zone": "exit"}]  # r2 never reads: "never" on the page


def publish_reads(port: int, stop: threading.Event) -> None:
    """Reader r1 sends a batch of 10 reads on its two antennas five times a second."""
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="readers")
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    try:
        i = 0
        while not stop.wait(0.2):
            batch = [{"epc": EPCS[(i + k) % len(EPCS)], "antenna": 1 + k % 2, "rssi": -55.0, "ts": time.time(),
                      "reader": "r1"} for k in range(10)]
            pub.publish("readers/r1/events", json.dumps(batch), qos=1)
            i += 10
    finally:
        pub.loop_stop()
        pub.disconnect()


def camera(port: int) -> dict:
    """The one camera's row of /status.json ({} while the agent is not answering yet)."""
    code, s = local_status(port)
    return s["cameras"][0] if code == 200 else {}


def cells(d: webdriver.Chrome, table: str, key: str) -> list[str]:
    return d.execute_script(
        "const tr = document.querySelector(`#${arguments[0]} tr[data-key='${arguments[1]}']`);"
        "return tr ? [...tr.cells].map(td => td.textContent) : [];", table, key)


def test_the_status_page_shows_readers_cameras_labels_and_a_camera_going_down(
        tmp_path: Path, broker: Mosquitto, browser: webdriver.Chrome) -> None:
    browser.tmp = tmp_path  # type: ignore[attr-defined]
    ap = SimulatedAccessPoint(12, seed=5, checkin_s=1.0, refresh_s=0.2, low_battery=0.25).start()
    live, vision = live_door_camera()
    port = free_port()
    cfg = agent_config(
        tmp_path, broker.port,
        rfid={"enabled": True, "antennas": ANTENNAS, "mqtt": {"enabled": True, "port": broker.port}},
        esl={"enabled": True, "urls": [ap.url], "poll_interval_s": 0.5}, vision=vision,
        supervision={"restart_min_s": 120.0, "restart_max_s": 120.0},  # stays down for the screenshot
        status={"port": port})
    rx = start_hq(tmp_path, broker.port)
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    stop = threading.Event()
    readers = threading.Thread(target=publish_reads, args=(broker.port, stop), daemon=True)
    readers.start()
    try:
        wait_for(lambda: bool(camera(port).get("frames")), 120, "the camera's frames")
        browser.get(f"http://127.0.0.1:{port}/")
        until(browser, "the ready badge", 20, lambda d: d.find_element(By.ID, "ready").text == "ready")
        assert browser.find_element(By.ID, "store").text == "S001"
        assert browser.find_element(By.ID, "alive").text == "alive"

        # Readers: r1's antennas read about 25 a second each; r2 never has.
        until(browser, "r1's reads/s", 20, lambda d: (c := cells(d, "antennas", "r1/1")) and c[3] not in ("–", "0"))
        r1 = cells(browser, "antennas", "r1/1")
        assert r1[:3] == ["r1", "1", "salesfloor"] and 5 <= float(r1[3]) <= 50 and r1[4].endswith("s ago"), r1
        assert cells(browser, "antennas", "r2/1")[3:5] == ["0", "never"]
        # The camera: its fps, inference time and last frame.
        door = cells(browser, "cameras", "door")
        assert door[1] == "up" and float(door[2]) > 0 and float(door[3]) > 0 and door[4].endswith("s ago"), door
        # Labels: the three with low batteries need attention.
        until(browser, "the low-battery labels", 20,
              lambda d: d.find_element(By.ID, "labels-note").text.startswith("3 of 12"))
        rows = browser.find_elements(By.CSS_SELECTOR, "#labels tbody tr")
        assert len(rows) == 3 and all("low_battery" in r.text for r in rows)
        outbox = browser.find_element(By.ID, "outbox").text
        assert "uplink connected" in outbox and "database takes writes" in outbox
        save(browser, tmp_path, "status-page.png")

        # The camera's process is killed: down (restart in ~2 min), not ready, the alert at the top.
        os.kill(camera(port)["pid"], signal.SIGKILL)
        until(browser, "the camera down", 10, lambda d: cells(d, "cameras", "door")[1:2] == ["down"])
        until(browser, "not ready", 10, lambda d: d.find_element(By.ID, "ready").text == "not ready")
        until(browser, "the alert", 10, lambda d: "vision.camera_down" in d.find_element(By.ID, "alerts").text)
        first_alert = browser.find_element(By.CSS_SELECTOR, "#alerts tbody tr").text
        assert "camera-door died (killed by SIGKILL)" in first_alert, first_alert
        checks = browser.find_element(By.ID, "checks").text
        assert "down: camera-door" in checks, checks
        child = cells(browser, "children", "camera-door")
        assert child[1].startswith("down (restart in") and child[3] == "killed by SIGKILL", child
        top = {i: browser.find_element(By.ID, i).location["y"] for i in ("alerts", "cameras", "antennas")}
        assert top["alerts"] < top["cameras"] < top["antennas"], top
        save(browser, tmp_path, "status-page-camera-down.png")
    finally:
        stop.set()
        readers.join(5)
        code = agent.terminate()
        rx.stop()
        live.stop()
        ap.stop()
    assert code == 0

