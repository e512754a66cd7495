"""Record and replay: a live simulated store recorded through the agent's taps, replayed on the virtual clock.

The golden files (tests/golden/) are a recording of such a session, the config it ran with and the output
its replay gives. After a change that is meant to change the output (main's doors on the heatmap did),
write the new output and review its diff::

    edge-agent replay tests/golden/store.rec.jsonl.gz -c tests/golden/store.toml --out tests/golden/store.out.jsonl

and to record a new session as well: ``EDGE_AGENT_REGEN_GOLDEN=1 pytest tests/test_replay.py -k live``.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edge_agent import __version__
from edge_agent.agent import Agent
from edge_agent.clock import rfc3339
from edge_agent.config import AgentConfig, load_config
from edge_agent.contract import DEFAULT_PREFIX, command_topic
from edge_agent.replay.player import Player, replay
from edge_agent.replay.recording import Recorder, Tracks, read_recording
from edge_agent.replay.taps import attach
from simulators.esl_controller import SimulatedAccessPoint
from simulators.esl_store import cents
from simulators.esl_store import gtin as esl_gtin
from simulators.mosquitto import Mosquitto, free_port
from simulators.rfid_reader import SimConfig, StoreSim
from simulators.store_replay import _camera_toml

from .helpers import wait_for

GOLDEN = Path(__file__).parent / "golden"
RECORDING, CONFIG, OUTPUT = GOLDEN / "store.rec.jsonl.gz", GOLDEN / "store.toml", GOLDEN / "store.out.jsonl"
STORE = "S001"
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"/9j/", b"iVBORw0KGgo")  # JPEG and PNG, raw and in base64


def replayed(cfg: AgentConfig, recording: Path, work: Path) -> str:
    out = work / "out.jsonl"
    replay(cfg, recording, work, out)
    return out.read_text()


def no_image_bytes(recording: Path) -> None:
    raw = gzip.decompress(recording.read_bytes()) if recording.name.endswith(".gz") else recording.read_bytes()
    assert not [m for m in IMAGE_MAGIC if m in raw]
    tracks = [e for e in read_recording(recording) if isinstance(e, Tracks)]
    # Numbers only: the model admits nothing else, and every row is (id, x1, y1, x2, y2, score).
    assert all(len(r) == 6 and all(isinstance(v, (int, float)) for v in r) for e in tracks for r in e.tracks)


def test_the_golden_recording_replays_to_the_golden_output(tmp_path: Path) -> None:
    cfg = load_config(CONFIG)
    runs = [replayed(cfg, RECORDING, tmp_path / run) for run in ("a", "b")]
    assert runs[0] == runs[1], "two replays of one recording differ"
    assert runs[0] == OUTPUT.read_text(), "the replay no longer gives the golden output"
    kinds = {json.loads(line).get("stream", "quarantine") for line in runs[0].splitlines()}
    assert {"inventory/delta", "esl/state", "traffic/stats", "traffic/heatmap", "cmd-result", "quarantine"} <= kinds
    no_image_bytes(RECORDING)


@pytest.fixture
def cli_logging() -> Iterator[None]:
    """The commands set up this process's logging, on a stream that ends with the test: put it back."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    yield
    for h in root.handlers:
        h.close()
    root.handlers[:], root.level = saved, level


def test_replay_command_writes_the_output_and_refuses_what_it_cannot_replay(tmp_path: Path, cli_logging: None) -> None:
    from edge_agent.cli import main

    out = tmp_path / "out.jsonl"
    args = ["-c", str(CONFIG), "--speed", "max", "--out", str(out)]
    assert main(["replay", str(RECORDING), *args, "--workdir", str(tmp_path / "w")]) == 0
    assert out.read_text() == OUTPUT.read_text()
    assert main(["replay", str(RECORDING), *args, "--workdir", str(tmp_path / "w")]) == 2  # it holds a replay
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["replay", str(tmp_path / "empty.jsonl"), *args]) == 2
    assert main(["replay", str(CONFIG), *args]) == 2  # not a recording at all


def test_recording_keeps_bytes_exactly_and_no_credentials(tmp_path: Path) -> None:
    from edge_agent.clock import VirtualClock
    from edge_agent.replay.recording import RecordingError

    path = tmp_path / "r.jsonl.gz"
    rec = Recorder(path, VirtualClock(), STORE, "test")
    rec.reader(b"\xff\x00 not UTF-8", "rfid.mqtt", "r1")
    rec.reader('{"epc": "é"}'.encode(), "rfid.http", None)
    rec.ap_http("http://admin:secret@10.0.0.5:8080", "GET", "/get_db?pos=0", None, "refused")
    rec.tracks("door", 12.5, [(3, 1.0, 2.0, 3.0, 4.0, 0.9)])
    rec.close()
    rec.reader(b"after the end", "rfid.mqtt", None)  # an input while the agent stops: not written, no error
    entries = list(read_recording(path))
    assert [e.data for e in entries[1:3]] == [b"\xff\x00 not UTF-8", '{"epc": "é"}'.encode()]  # type: ignore[union-attr]
    assert entries[3].ap == "http://10.0.0.5:8080" and b"secret" not in gzip.decompress(path.read_bytes())  # type: ignore[union-attr]
    assert len(entries) == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text(gzip.decompress(path.read_bytes()).decode()
                   + '{"kind": "tracks", "t": 1, "camera": "door", "ts": 1, "tracks": [], "jpeg": "/9j/4AAQ"}\n')
    with pytest.raises(RecordingError, match=r"bad.jsonl:6"):  # a field the format does not have
        list(read_recording(bad))


def test_record_command_records_until_sigterm(tmp_path: Path, broker: Mosquitto) -> None:
    """`edge-agent record` is `edge-agent run` with the recorder: a payload POSTed is in the file it closes."""
    port = free_port()
    cfg = tmp_path / "store.toml"
    cfg.write_text(f"""[store]
id = "{STORE}"
[mqtt]
port = {broker.port}
[outbox]
path = "{tmp_path / 'outbox.db'}"
[rfid]
enabled = true
[rfid.http]
enabled = true
port = {port}
[[rfid.antennas]]
reader = "r1"
port = 1
zone = "salesfloor"
""")
    rec = tmp_path / "rec.jsonl"
    with open(tmp_path / "agent.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "record", "-c", str(cfg), "--out", str(rec)],
                                stdout=log, stderr=log, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        payload = b'[{"epc": "30340242201d8840009efdf7", "antenna": 1, "rssi": -50, "ts": 1767225600}]'

        def posted() -> bool:
            try:
                post(f"http://127.0.0.1:{port}/rfid/events", "r1", payload)
                return True
            except OSError:
                return False

        wait_for(posted, 30, "the agent's HTTP intake")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    entries = list(read_recording(rec))
    assert [e.kind for e in entries] == ["start", "reader"]
    assert entries[1].data == payload and entries[1].reader == "r1"  # type: ignore[union-attr]
    lines = [json.loads(x) for x in (tmp_path / "agent.log").read_text().splitlines() if x.startswith("{")]
    assert any("recording" in x["msg"] and x["priority"] == 6 for x in lines)


# ---------------------------------------------------------------- a live store, recorded


class Readers(threading.Thread):
    """The simulated readers POSTing their payloads to the agent's HTTP intake, 40 store seconds a second."""

    def __init__(self, url: str, sim: StoreSim, cycles: int) -> None:
        super().__init__(name="readers", daemon=True)
        self.url, self.sim, self.cycles = url, sim, cycles

    def run(self) -> None:
        post(self.url, "r1", b'{"epc": "not hex", "antenna": 1, "ts": 0}')  # garbage is an input too: quarantined
        for _ in range(self.cycles):
            for reader, payload in self.sim.step_by_reader():
                post(self.url, reader, payload)
            time.sleep(0.05)


def post(url: str, reader: str, payload: bytes) -> None:
    req = urllib.request.Request(f"{url}?reader={reader}", data=payload, method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=5).close()


def command(client: mqtt.Client, n: int, name: str, args: dict[str, Any]) -> None:
    payload = json.dumps({"v": 1, "id": f"c{n}", "name": name, "store": STORE, "ts": rfc3339(time.time()),
                          "args": args})
    client.publish(command_topic(DEFAULT_PREFIX, STORE, name), payload, qos=1).wait_for_publish(5)


def record_store(work: Path, broker: Mosquitto) -> tuple[Path, Path]:
    """About ten seconds of a small simulated store, live: readers over HTTP, HQ's label commands over MQTT,
    an OpenEPaperLink access point, a camera process running the real detector on a synthetic scene."""
    from simulators.camera import CameraScene, SceneConfig

    sim = StoreSim(SimConfig(seed=3, n_items=30, n_gtins=6, read_cycle_s=2.0, purchase_per_h=400, tryon_per_h=200,
                             restock_per_h=100))
    ap = SimulatedAccessPoint(8, seed=5, checkin_s=1.0, refresh_s=0.3, upload_fail_rate=0.1).start()
    scene = CameraScene(SceneConfig(seed=3, n_people=2, duration_s=10.0, fps=5.0, size=(480, 270)))
    scene.write_video(work / "camera.avi")
    camera = scene.analytics_config() | {"url": str(work / "camera.avi"), "start_ts": 1_767_225_600.0,
                                         "bucket_s": 10, "min_dwell_s": 2.0}
    http_port = free_port()
    antennas = "".join(f'[[rfid.antennas]]\nreader = "{a["reader"]}"\nport = {a["port"]}\nzone = "{a["zone"]}"\n'
                       for a in sim.layout())
    cfg_path = work / "store.toml"
    cfg_path.write_text(f"""[store]
id = "{STORE}"
[mqtt]
port = {broker.port}
reconnect_min_s = 0.1
[outbox]
path = "outbox.db"
[rfid]
enabled = true
clock = "reads"
departure_timeout_s = 30.0
snapshot_interval_s = 0
[rfid.http]
enabled = true
port = {http_port}
{antennas}
[esl]
enabled = true
urls = ["{ap.url}"]
poll_interval_s = 1.0
resend_after_s = 3.0
[vision]
enabled = true
flush_s = 1.0
{_camera_toml(camera)}""")
    cfg = load_config(cfg_path)
    agent = Agent(cfg)
    recording = work / "store.rec.jsonl.gz"
    recorder = Recorder(recording, agent.clock, STORE, __version__)
    attach(agent, recorder)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="hq-test")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        agent.start()
        wait_for(lambda: agent.uplink.connected, 15, "the agent's uplink")
        time.sleep(0.5)  # its command subscription
        gtin_of = {m: esl_gtin(i % 4) for i, m in enumerate(ap.macs())}
        command(client, 1, "esl.bind", {"items": [{"label": m, "gtin": g} for m, g in gtin_of.items()]})
        for i, g in enumerate(sorted(set(gtin_of.values()))):
            command(client, 2 + i, "price.set", {"gtin": g, "price": cents(199 + 100 * i), "currency": "EUR",
                                                 "version": 1})
        readers = Readers(f"http://127.0.0.1:{http_port}/rfid/events", sim, cycles=120)
        readers.start()
        readers.join(60)
        assert agent.vision is not None
        wait_for(lambda: agent.vision.done == {camera["camera"]}, 300, "the camera to finish its clip")  # type: ignore[union-attr]
        time.sleep(1.5)  # a last ESL poll and RFID tick
    finally:
        agent.stop()
        recorder.close()
        client.loop_stop()
        client.disconnect()
        ap.stop()
    return recording, cfg_path


def live_facts(db: Path, stream: str) -> list[dict[str, Any]]:
    """What the live agent sealed (and left pending) of a stream, fact by fact, in order."""
    con = sqlite3.connect(db)
    try:
        sealed = [item for (body,) in con.execute("SELECT body FROM sealed WHERE stream = ? ORDER BY seq", (stream,))
                  for item in json.loads(body)["items"]]
        pending = [json.loads(b) for (b,) in con.execute("SELECT body FROM pending WHERE stream = ? ORDER BY id",
                                                         (stream,))]
    finally:
        con.close()
    return sealed + pending


def live_levels(db: Path) -> dict[tuple[str, str], int]:
    con = sqlite3.connect(db)
    try:
        return {(z, g): q for z, g, q in con.execute("SELECT zone, gtin, qty FROM stock")}
    finally:
        con.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_live_store_recorded_replays_identically(tmp_path: Path, broker: Mosquitto) -> None:
    recording, cfg_path = record_store(tmp_path, broker)
    kinds = {e.kind for e in read_recording(recording)}
    assert kinds == {"start", "reader", "command", "ap.http", "tracks", "camera.done"} | (kinds & {"ap.push"})
    no_image_bytes(recording)

    cfg = load_config(cfg_path)
    runs = [replayed(cfg, recording, tmp_path / run) for run in ("a", "b")]
    assert runs[0] == runs[1], "two replays of one recording differ"

    # The same pipeline gives what the live store gave: the camera's traffic, item for item, and the book.
    player = Player(cfg, recording, tmp_path / "c")
    player.run()
    out = [o for o in player.output() if "stream" in o]
    for stream in ("traffic/stats", "traffic/heatmap"):
        assert [o["body"] for o in out if o["stream"] == stream] == live_facts(tmp_path / "outbox.db", stream)
    book = live_levels(tmp_path / "outbox.db")
    assert player.agent.book.levels() == book and any(book.values())
    player.close()

    if os.environ.get("EDGE_AGENT_REGEN_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        shutil.copy(recording, RECORDING)
        CONFIG.write_text(cfg_path.read_text().replace(f"{tmp_path}/", ""))  # the clip's path: never opened
        OUTPUT.write_text(runs[0])
