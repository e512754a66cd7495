"""No secret in any log line: a real agent at DEBUG level given one secret of every kind, each by a
different route (environment, ``*_FILE``, systemd credentials directory), made to use or refuse each of
them; its whole log, and check-config's output, must show none. tests/conftest.py then scans every log
of the run for the same canaries (and those of the other tests)."""

from __future__ import annotations

import base64
import http.client
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.tokens import token_hash
from simulators.mosquitto import Mosquitto, free_port

from .conftest import CANARY
from .helpers import REPO, AgentProcess, agent_config, wait_for
from .test_rfid_pipeline import EPCS, generic
from .test_vision_capture import SilentServer

UPLINK_PASSWORD = "upl-canary-8c2d41-uplink"
STORE_BROKER_PASSWORD = "brk-canary-3a9e57-store"
READER_TOKEN = "rdr-canary-e41b06-reader"
WRONG_TOKEN = "rdr-canary-00ff00-wrong"
CAMERA_PASSWORD = "cam-canary-7b13c9-camera"
STATUS_TOKEN = "sts-canary-5d1e2f-status"
ALL = (UPLINK_PASSWORD, STORE_BROKER_PASSWORD, READER_TOKEN, WRONG_TOKEN, CAMERA_PASSWORD, STATUS_TOKEN)


@pytest.fixture
def store_broker(tmp_path: Path) -> Mosquitto:
    work = tmp_path / "store-broker"
    work.mkdir()
    pw = work / "passwd"
    pw.touch()
    os.chmod(pw, 0o600)
    subprocess.run(["mosquitto_passwd", "-b", str(pw), "agent", STORE_BROKER_PASSWORD], check=True, capture_output=True)
    b = Mosquitto(workdir=work, anonymous=False, listener_conf=f"password_file {pw}\n").start()
    yield b  # type: ignore[misc]
    b.kill()


def post(port: int, events: list[dict], authorization: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/rfid/events", body=json.dumps(events).encode(),
                 headers={"Content-Type": "application/json", "Authorization": authorization})
    status = conn.getresponse().status
    conn.close()
    return status


@pytest.mark.slow
def test_no_secret_in_the_agent_log(tmp_path: Path, broker: Mosquitto, store_broker: Mosquitto,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    camera = SilentServer()  # a camera that accepts and never answers: the agent logs its URL, redacted
    http_port, status_port = free_port(), free_port()
    cfg = agent_config(
        tmp_path, broker.port, mqtt={"username": "S001"}, status={"port": status_port},
        log={"level": "DEBUG"},
        rfid={"enabled": True, "antennas": [{"reader": "r1", "port": 1, "zone": "salesfloor"}]},
        rfid__mqtt={"enabled": True, "port": store_broker.port, "username": "agent"},
        rfid__http={"enabled": True, "port": http_port},
        rfid__http__tokens={"r1": token_hash(READER_TOKEN)},
        vision={"enabled": True},
    )
    with cfg.open("a") as f:
        f.write('\n[[vision.cameras]]\ncamera = "door"\nurl = "rtsp://placeholder/"\nopen_timeout_s = 1.0\n'
                "[vision.cameras.homography]\nimage = [[0, 0], [100, 0], [100, 100], [0, 100]]\n"
                "floor = [[0, 0], [1, 0], [1, 1], [0, 1]]\n")
    secret_file = tmp_path / "secrets" / "store-broker"
    secret_file.parent.mkdir()
    secret_file.write_text(STORE_BROKER_PASSWORD + "\n")
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "vision.cameras.0.url").write_text(f"rtsp://admin:{CAMERA_PASSWORD}@127.0.0.1:{camera.port}/stream")
    monkeypatch.setenv("EDGE_AGENT_MQTT_PASSWORD", UPLINK_PASSWORD)
    monkeypatch.setenv("EDGE_AGENT_RFID_MQTT_PASSWORD_FILE", str(secret_file))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("EDGE_AGENT_STATUS_TOKEN", STATUS_TOKEN)
    assert not any(s in cfg.read_text() for s in ALL)

    check = subprocess.run([sys.executable, "-m", "edge_agent.cli", "check-config", str(cfg)],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
    assert check.returncode == 0, check.stderr
    log = tmp_path / "agent.log"
    agent = AgentProcess(cfg, log).start()
    try:
        wait_for(lambda: "edge-agent-S001-readers: connected" in log.read_text(), 60,
                 "the agent on the password-protected store broker")
        wait_for(lambda: f"rtsp://admin:***@127.0.0.1:{camera.port}/stream" in log.read_text(), 120,
                 "the camera's open to time out, logged with its URL redacted")
        event = [generic(EPCS[0], 1, 1_767_225_600.0)]
        wait_for(lambda: _accepting(http_port), 30, "the HTTP intake")
        assert post(http_port, event, f"Bearer {READER_TOKEN}") == 202
        basic = base64.b64encode(f"r1:{READER_TOKEN}".encode()).decode()
        assert post(http_port, event, f"Basic {basic}") == 202
        assert post(http_port, event, f"Bearer {WRONG_TOKEN}") == 401
        wait_for(lambda: "401" in log.read_text(), 10, "the refusal logged")
        assert _status(status_port, STATUS_TOKEN) == 200 and _status(status_port, WRONG_TOKEN) == 401
    finally:
        assert agent.terminate() == 0
        camera.close()
    text = log.read_text() + check.stdout + check.stderr
    assert "connected to 127.0.0.1" in text  # the lines that name brokers and URLs were written
    leaks = sorted({m.group() for m in CANARY.finditer(text)})
    assert leaks == [], f"secrets in the agent's log: {leaks}"


def _accepting(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _status(port: int, token: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
    status = conn.getresponse().status
    conn.close()
    return status
