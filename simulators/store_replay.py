"""The demo: a replayed simulated store, end to end, on this machine.

Two private mosquittos on free loopback ports: the store's own (the RFID readers publish to it) and
HQ's (the agent's uplink). The HQ receiver (printing what it applies) and the agent run as separate
processes; the agent takes a simulated inventory feed and the RFID traffic of a simulated store
(readers, shoppers, noise) replayed 60x faster than real time. A third of the way in, HQ's broker
stops for a few seconds: the agent keeps working and buffering, then drains the backlog (marked
historical). At closing time HQ asks the store for a resync, and HQ's inventory is compared with the
exact ground truth of both simulators. Meanwhile HQ binds 200 shelf labels (behind a simulated
OpenEPaperLink access point) to products and sets their prices, then changes 30% of them; the demo
checks what every simulated e-paper label shows against HQ's prices.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt

from edge_agent.hq.api import new_token, token_hash

from .esl_controller import SimulatedAccessPoint
from .esl_store import cents
from .esl_store import gtin as esl_gtin
from .inventory_feed import InventoryFeed
from .mosquitto import Mosquitto, free_port
from .rfid_reader import SimConfig, StoreSim
from .toml_files import toml_value

ZONES = ["backroom", "salesfloor", "fitting-room", "pos"]
GTINS = 60
SEED = 42
STORE = "S001"


def _say(msg: str) -> None:
    print(f"\033[1mdemo\033[0m {msg}", flush=True)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback only
        return json.loads(r.read())


# The demo's operator: HQ's config holds only this token's hash (hq.api_tokens), as in production.
TOKEN = new_token()


def _post(http: str, path: str, body: dict) -> None:
    req = urllib.request.Request(
        f"{http}{path}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}, method="POST",
    )
    with urllib.request.urlopen(req, timeout=5):  # noqa: S310 - loopback only
        pass


def _post_cmd(http: str, name: str, args: dict) -> None:
    _post(http, "/cmd", {"store": STORE, "name": name, "args": args})


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return True
        except OSError:
            pass
        time.sleep(0.25)
    return False


def _hq_inventory(http: str) -> dict[tuple[str, str], int]:
    """Every page of HQ's /inventory (the next one is named in the Link header)."""
    out: dict[tuple[str, str], int] = {}
    url: str | None = f"{http}/inventory?store={STORE}&limit=500"
    while url:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback only
            out |= {(it["zone"], it["gtin"]): it["qty"] for it in json.loads(r.read())}
            link = r.headers.get("Link")
        url = f"{http}{link[1:link.index('>')]}" if link else None
    return out


RFID_SPEED = 60.0  # virtual seconds per real second
RFID_SIM = SimConfig(seed=7, n_items=1000, n_gtins=80, read_cycle_s=2.0, tryon_minutes=(1.0, 3.0),
                     pos_seconds=(10.0, 30.0), purchase_per_h=120, tryon_per_h=60, restock_per_h=40)
RFID_CLOSED_S = 360.0  # store time after closing for what is under way to settle


class RfidReplay(threading.Thread):
    """Publishes the simulated readers' payloads to the store broker, paced on the virtual clock."""

    def __init__(self, port: int, open_s: float) -> None:
        super().__init__(name="rfid-replay", daemon=True)
        self.sim = StoreSim(RFID_SIM)
        self.open_s = open_s
        self.payloads = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="demo-readers")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def run(self) -> None:
        sim, t0, real0 = self.sim, self.sim.now, time.monotonic()
        cycles = int((self.open_s + RFID_CLOSED_S) / RFID_SIM.read_cycle_s)
        for k in range(cycles):
            if k * RFID_SIM.read_cycle_s >= self.open_s:
                sim.close()
            delay = real0 + (sim.now - t0) / RFID_SPEED - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            for reader, payload in sim.step_by_reader():
                self.client.publish(f"readers/{reader}/events", payload, qos=1)
                self.payloads += 1
        time.sleep(1.0)
        self.client.loop_stop()
        self.client.disconnect()

    def truth(self) -> dict[tuple[str, str], int]:
        return self.sim.stock_truth()


class ShelfLabels:
    """The store's e-paper labels behind a simulated OpenEPaperLink access point (real HTTP), checking in
    every 2 s instead of 40 s so that the demo is short; 2% of uploads and transfers fail."""

    def __init__(self, n: int = 200, gtins: int = 100) -> None:
        self.ap = SimulatedAccessPoint(n, seed=5, checkin_s=2.0, refresh_s=0.5, transfer_fail_rate=0.02,
                                       upload_fail_rate=0.02).start()
        self.gtin_of = {m: esl_gtin(i % gtins) for i, m in enumerate(self.ap.macs())}
        self.rng = random.Random(5)
        self.price_of: dict[str, str] = {}

    def toml(self) -> str:
        return (f'[esl]\nenabled = true\nurls = ["{self.ap.url}"]\npoll_interval_s = 1.0\nresend_after_s = 10.0\n'
                "mismatch_deadline_s = 30.0\n")

    def set_prices(self, http: str, gtins: list[str], version: int) -> None:
        for g in gtins:  # POST /prices: one call per price, for every store that carries it (here, one)
            self.price_of[g] = cents(self.rng.randint(100, 5000))
            _post(http, "/prices", {"stores": [STORE], "price": {"gtin": g, "price": self.price_of[g],
                                                                  "currency": "EUR", "version": version}})

    def wrong(self) -> int:
        return sum((self.ap.displayed(m) or {}).get("price") != self.price_of.get(g) for m, g in self.gtin_of.items())


def _camera_toml(cam: dict) -> str:
    """[[vision.cameras]] with its sub-tables (homography, zones, lines.NAME, heatmap)."""
    flat = {k: v for k, v in cam.items() if not isinstance(v, dict)}
    out = ["[[vision.cameras]]"] + [f"{k} = {toml_value(v)}" for k, v in flat.items()]
    for name, sub in cam.items():
        if not isinstance(sub, dict):
            continue
        nested = {k: v for k, v in sub.items() if isinstance(v, dict)}
        out.append(f"[vision.cameras.{name}]")
        out += [f"{k} = {toml_value(v)}" for k, v in sub.items() if not isinstance(v, dict)]
        for k, v in nested.items():
            out.append(f"[vision.cameras.{name}.{k}]")
            out += [f"{kk} = {toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(out) + "\n"


def _traffic_summary(hq_db: Path) -> list[str]:
    import sqlite3

    con = sqlite3.connect(f"file:{hq_db}?mode=ro", uri=True)
    lines = []
    try:
        stats = [json.loads(b) for (b,) in con.execute(
            "SELECT body FROM telemetry WHERE stream = 'traffic/stats' ORDER BY seq")]
        heat = [json.loads(b) for (b,) in con.execute(
            "SELECT body FROM telemetry WHERE stream = 'traffic/heatmap' ORDER BY seq")]
    finally:
        con.close()
    items = [i for b in stats for i in b["items"] if i["camera"] != "*"]  # one camera: "*" repeats its figures
    entries = sum(i["entries"] for i in items if i["zone"] is None)
    exits = sum(i["exits"] for i in items if i["zone"] is None)
    wide = sum(1 for b in stats for i in b["items"] if i["camera"] == "*")
    lines.append(f"camera at HQ: {len(stats)} traffic/stats messages, entries {entries}, exits {exits} "
                 f"({wide} store-wide items)")
    for zone in sorted({i["zone"] for i in items if i["zone"]}):
        z = [i for i in items if i["zone"] == zone]
        med = [i["dwell_median_s"] for i in z if i["dwell_median_s"] is not None]
        lines.append(f"  zone {zone:<9} visits {sum(i['visits'] for i in z)}, occupancy max "
                     f"{max(i['occupancy_max'] for i in z):.0f}, dwell median {med[-1] if med else '-'} s")
    cells = [c for b in heat for i in b["items"] if i["camera"] != "*" for c in i["cells"]]
    lines.append(f"  heatmap: {len(heat)} messages, {sum(cells):.1f} person-seconds on the floor grid")
    return lines


def run_demo(seconds: float = 20.0, workdir: Path = Path("var/demo"), facts: int = 20_000, linger: float = 0.0) -> int:
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.glob("*.db*"):
        old.unlink()
    rate = max(facts / max(seconds * 0.6, 1.0), 1.0)
    broker = Mosquitto(workdir=workdir / "mosquitto").start()
    store_broker = Mosquitto(workdir=workdir / "mosquitto-store").start()
    rfid = RfidReplay(store_broker.port, open_s=seconds * RFID_SPEED)
    from .camera import CameraScene, SceneConfig

    scene = CameraScene(SceneConfig(seed=1, n_people=4, duration_s=max(seconds, 20.0), fps=10))
    scene.write_video(workdir / "camera.mp4")
    camera = scene.analytics_config() | {"url": str(workdir / "camera.mp4"), "start_ts": time.time(),
                                         "bucket_s": 10, "min_dwell_s": 2.0}
    truth_cam = scene.truth()
    labels = ShelfLabels()
    antennas = "".join(
        f'[[rfid.antennas]]\nreader = "{a["reader"]}"\nport = {a["port"]}\nzone = "{a["zone"]}"\n'
        for a in rfid.sim.layout()
    )
    http_port = free_port()
    http = f"http://127.0.0.1:{http_port}"
    agent_cfg = _write(
        workdir / "agent.toml",
        f"""[store]
id = "{STORE}"
[mqtt]
port = {broker.port}
reconnect_min_s = 0.1
reconnect_max_s = 1.0
[outbox]
path = "outbox.db"
[health]
interval_s = 5.0
[sources.simulated_inventory]
enabled = true
seed = {SEED}
zones = {json.dumps(ZONES)}
gtins = {GTINS}
rate_per_s = {rate:.1f}
batch = 50
total = {facts}
[rfid]
enabled = true
clock = "reads"
departure_timeout_s = 60.0
snapshot_interval_s = 0
company_prefixes = {json.dumps(list(RFID_SIM.company_prefixes))}
[rfid.mqtt]
enabled = true
port = {store_broker.port}
topic = "readers/+/events"
{antennas}
[vision]
enabled = true
conf = 0.25
flush_s = 1.0
{_camera_toml(camera)}
{labels.toml()}""",
    )
    hq_cfg = _write(
        workdir / "hq.toml",
        f"""[mqtt]
port = {broker.port}
[hq]
db_path = "hq.db"
http_port = {http_port}
reorder_window_s = 1.0
[hq.api_tokens]
demo = "{token_hash(TOKEN)}"
""",
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1", YOLO_OFFLINE="1")
    exe = [sys.executable, "-m", "edge_agent.cli"]
    agent_log = open(workdir / "agent.log", "ab")  # noqa: SIM115 - lives as long as the agent
    _say(f"mosquitto on 127.0.0.1:{broker.port}; HQ API on {http}; agent log in {workdir / 'agent.log'}")
    _say(f"HQ dashboard: {http}/dashboard (open it in a browser; --linger 600 keeps it up after the checks)")
    hq = subprocess.Popen([*exe, "hq", "-c", str(hq_cfg)], env=env, stderr=subprocess.DEVNULL)
    agent = subprocess.Popen([*exe, "run", "-c", str(agent_cfg)], env=env, stdout=agent_log, stderr=agent_log)
    feed_truth = InventoryFeed(SEED, ZONES, GTINS).truth(facts)
    code = 1
    try:
        _say(f"store {STORE}: replaying {facts} inventory deltas at {rate:.0f}/s, and {seconds * RFID_SPEED / 60:.0f} "
             f"min of RFID traffic ({RFID_SIM.n_items} tagged items, 5 readers, {RFID_SIM.miss_rate:.0%} missed "
             f"reads, cross-reads, ghosts) at {RFID_SPEED:.0f}x on the store broker :{store_broker.port}")
        _wait(lambda: _get(f"{http}/state")["status"].get(STORE, {}).get("state") == "online", 30)
        rfid.start()
        _say(f"shelf labels: HQ binds {len(labels.gtin_of)} e-paper labels to {len(set(labels.gtin_of.values()))} "
             f"products and sets their prices (POST /cmd esl.bind, POST /prices); the labels sit behind a simulated "
             f"OpenEPaperLink access point at {labels.ap.url}")
        _post_cmd(http, "esl.bind", {"items": [{"label": m, "gtin": g} for m, g in labels.gtin_of.items()]})
        _wait(lambda: any(s["stream"] == "cmd-result" for s in _get(f"{http}/state")["streams"]), 30)
        gtins = sorted(set(labels.gtin_of.values()))
        labels.set_prices(http, gtins, 1)
        time.sleep(seconds * 0.3)
        _say("cutting the uplink: HQ's broker stopped for 4 s (the agent keeps working and buffering)")
        broker.stop()
        time.sleep(4)
        broker.start()
        _say("HQ's broker back: the backlog drains at full speed, marked historical")
        rfid.join(seconds + RFID_CLOSED_S / RFID_SPEED + 30)
        _say(f"store closed: {rfid.payloads} reader payloads, {rfid.sim.stats['events']} tag reads replayed")
        labels_ok = _wait(lambda: labels.wrong() == 0, 60)
        changed = labels.rng.sample(gtins, k=len(gtins) * 3 // 10)
        t_change = time.monotonic()
        _say(f"HQ changes the price of {len(changed)} products (30%) with price.set version 2")
        labels.set_prices(http, changed, 2)
        labels_ok = _wait(lambda: labels.wrong() == 0, 60) and labels_ok
        took = time.monotonic() - t_change
        truth = feed_truth | rfid.truth()
        _wait(lambda: _hq_inventory(http) == truth, 60)
        _say("asking the store for an inventory.resync from the HQ side (POST /cmd) to verify HQ's copy")
        _post_cmd(http, "inventory.resync", {})
        time.sleep(3)
        state = _get(f"{http}/state")
        got = _hq_inventory(http)
        exact = sum(1 for k, v in truth.items() if got.get(k) == v)
        extra = sum(1 for k in got if k not in truth)
        for s in state["streams"]:
            _say(
                f"  {s['store']} {s['stream']:<20} last_seq={s['last_seq']:<6} applied={s['applied']:<6} "
                f"facts={s['facts']:<7} historical={s['historical']:<5} duplicates={s['duplicates']} gaps={s['gaps']}"
            )
        rfid_exact = sum(1 for k, v in rfid.truth().items() if got.get(k) == v)
        _say(f"HQ inventory vs ground truth: {exact}/{len(truth)} (zone, GTIN) counts exact, {extra} unexpected "
             f"(RFID store: {rfid_exact}/{len(rfid.truth())}, feed: {exact - rfid_exact}/{len(feed_truth)})")
        for line in _traffic_summary(workdir / "hq.db"):
            _say(line)
        _say(f"  camera truth: entries {truth_cam['entries']}, exits {truth_cam['exits']}, "
             f"{len(truth_cam['visits'])} zone visits (simulated scene, {workdir / 'camera.mp4'})")
        st = labels.ap.stats()
        _say(f"shelf labels: {len(labels.gtin_of) - labels.wrong()}/{len(labels.gtin_of)} e-paper labels show HQ's "
             f"price (simulated e-paper truth), the change displayed everywhere {took:.1f} s after HQ sent it; "
             f"{st.uploads} uploads, {st.upload_failures} refused and {st.transfer_failures} failed transfers retried")
        _wait(lambda: _get(f"{http}/labels?store={STORE}")["showing_hq_price"] == len(labels.gtin_of), 15)
        view = _get(f"{http}/labels?store={STORE}")
        _say(f"  HQ's label view (GET /labels): {view['showing_hq_price']}/{view['with_hq_price']} labels report "
             f"showing HQ's price")
        snaps = _get(f"{http}/state").get("snapshots", [])
        for snap in snaps:
            _say(f"  snapshot {snap['snapshot_id']} as of seq {snap['as_of_seq']}: {snap['outcome']}, "
                 f"{snap['mismatches']} keys differed")
        code = 0 if exact == len(truth) and not extra and labels_ok else 1
        _say("OK: nothing lost, nothing applied twice, every label shows HQ's price" if code == 0 else "MISMATCH: see the logs in " + str(workdir))
        if linger > 0:
            _say(f"lingering {linger:.0f} s: the dashboard stays at {http}/dashboard (Ctrl-C ends it)")
            time.sleep(linger)
    finally:
        for p in (agent, hq):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (agent, hq):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        agent_log.close()
        broker.stop()
        store_broker.stop()
        labels.ap.stop()
    return code
