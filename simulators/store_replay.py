"""The demo: a replayed simulated store, end to end, on this machine.

Starts a private mosquitto on a free loopback port, the HQ receiver (printing what it applies) and
the agent with a simulated inventory feed as separate processes; halfway it stops the broker for a
few seconds, then shows HQ draining the backlog (marked historical), asks the store for a resync,
and compares HQ's inventory with the feed's ground truth.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .inventory_feed import InventoryFeed
from .mosquitto import Mosquitto, free_port

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


def _hq_inventory(http: str) -> dict[tuple[str, str], int]:
    return {(r["zone"], r["gtin"]): r["qty"] for r in _get(f"{http}/inventory?store={STORE}")}  # type: ignore[index]


def run_demo(seconds: float = 20.0, workdir: Path = Path("var/demo"), facts: int = 20_000) -> int:
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.glob("*.db*"):
        old.unlink()
    rate = max(facts / max(seconds * 0.6, 1.0), 1.0)
    broker = Mosquitto(workdir=workdir / "mosquitto").start()
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
""",
    )
    hq_cfg = _write(
        workdir / "hq.toml",
        f"""[mqtt]
port = {broker.port}
[hq]
db_path = "hq.db"
http_port = {http_port}
reorder_window_s = 1.0
""",
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1", YOLO_OFFLINE="1")
    exe = [sys.executable, "-m", "edge_agent.cli"]
    agent_log = open(workdir / "agent.log", "ab")  # noqa: SIM115 - lives as long as the agent
    _say(f"mosquitto on 127.0.0.1:{broker.port}; HQ API on {http}; agent log in {workdir / 'agent.log'}")
    hq = subprocess.Popen([*exe, "hq", "-c", str(hq_cfg)], env=env, stderr=subprocess.DEVNULL)
    agent = subprocess.Popen([*exe, "run", "-c", str(agent_cfg)], env=env, stdout=agent_log, stderr=agent_log)
    truth = InventoryFeed(SEED, ZONES, GTINS).truth(facts)
    code = 1
    try:
        _say(f"store {STORE}: replaying {facts} inventory deltas at {rate:.0f}/s")
        time.sleep(seconds * 0.3)
        _say("cutting the uplink: broker stopped for 4 s (the agent keeps buffering in its outbox)")
        broker.stop()
        time.sleep(4)
        broker.start()
        _say("broker back: the backlog drains at full speed, marked historical")
        deadline = time.monotonic() + seconds + 30
        while time.monotonic() < deadline:
            try:
                if _hq_inventory(http) == truth:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        _say("asking the store for an inventory.resync from the HQ side (POST /cmd)")
        req = urllib.request.Request(
            f"{http}/cmd", data=json.dumps({"store": STORE, "name": "inventory.resync", "args": {}}).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )
        with urllib.request.urlopen(req, timeout=5):  # noqa: S310 - loopback only
            pass
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
        _say(f"HQ inventory vs ground truth: {exact}/{len(truth)} (zone, GTIN) counts exact, {extra} unexpected")
        code = 0 if exact == len(truth) and not extra else 1
        _say("OK: nothing lost, nothing applied twice" if code == 0 else "MISMATCH: see the logs in " + str(workdir))
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
    return code
