"""Online latency: a tag read at the exit -> its inventory delta applied at HQ.

Agent in this process (real clock, RFID pipeline, outbox, uplink); HQ receiver in its own process
(bench/_hq_probe.py logs every applied message); real mosquitto. Tags are first read into the
salesfloor; then, one every ``--interval`` seconds, a tag is read at the exit, while a background
thread keeps the salesfloor antennas reading at ``--background`` reads/s. A read at the exit departs
the tag at once (the configured departure rule adds nothing), so the figure is the pipeline plus the
spine: ingest -> presence -> outbox -> MQTT -> HQ apply committed. Both processes share the wall
clock; message timestamps carry milliseconds, so figures are +-1 ms.

    python bench/rfid_latency.py                       # 500 exits
    python bench/rfid_latency.py --exits 50            # CI size
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from _common import HqProcess, emit, header, mqtt_table, note, percentile, wait_for

from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from edge_agent.rfid.epc import encode_sgtin96
from simulators.mosquitto import Mosquitto

GTINS = ["80614141123458", "00614141000005"]


def read(epc: str, antenna: int) -> dict:
    return {"epc": epc, "antenna": antenna, "rssi": -55.0, "ts": time.time(), "reader": "r1"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exits", type=int, default=500)
    ap.add_argument("--interval", type=float, default=0.02)
    ap.add_argument("--background", type=float, default=2000.0, help="salesfloor reads/s meanwhile")
    a = ap.parse_args()
    header("rfid_latency", exits=a.exits, interval_s=a.interval, background_reads_per_s=a.background)
    work = Path(tempfile.mkdtemp(prefix="bench-rfid-lat-"))
    broker = Mosquitto(workdir=work / "mosquitto").start()
    hq = HqProcess(work, broker.port, probe=True).start()
    cfg = AgentConfig.model_validate({
        "store": {"id": "S001"},
        "mqtt": mqtt_table(broker.port),
        "outbox": {"path": str(work / "outbox.db")},
        "log": {"level": "WARNING"},
        "rfid": {"enabled": True, "snapshot_interval_s": 0, "silent_antenna_s": 3600,
                 "antennas": [{"reader": "r1", "port": 1, "zone": "salesfloor"},
                              {"reader": "r1", "port": 2, "zone": "exit"}]},
    })
    agent = Agent(cfg)
    agent.start()
    pipe = agent.rfid
    assert pipe is not None
    stay = [encode_sgtin96(GTINS[0], n) for n in range(1, 501)]
    leave = [encode_sgtin96(GTINS[1], n) for n in range(1, a.exits + 1)]
    stop = threading.Event()
    try:
        wait_for(lambda: agent.uplink.connected and hq.online(), 20, "agent and HQ online")
        for _ in range(2):  # two sightings a second apart: every tag arrives in the salesfloor
            for chunk in range(0, len(stay + leave), 200):
                pipe.ingest(json.dumps([read(e, 1) for e in (stay + leave)[chunk:chunk + 200]]).encode())
            time.sleep(1.0)
        n_present = len(pipe.engine.present())
        wait_for(lambda: sum(hq.inventory().values()) == n_present, 30, "HQ to apply the arrivals")

        def background() -> None:
            i, batch = 0, 50
            while not stop.is_set():
                pipe.ingest(json.dumps([read(stay[(i + k) % len(stay)], 1) for k in range(batch)]).encode())
                i += batch
                stop.wait(batch / a.background)

        bg = threading.Thread(target=background, daemon=True)
        bg.start()
        start = time.time()
        for epc in leave:
            pipe.ingest(json.dumps([read(epc, 2)]).encode())
            time.sleep(a.interval)
        wait_for(lambda: sum(hq.inventory().values()) == len(stay), 30, "HQ to apply every departure")
        stop.set()
        bg.join(5)
    finally:
        agent.stop(flush_timeout=2)
        hq.stop()
        broker.stop()
    lat = []
    for line in hq.applied_path.read_text().splitlines():
        stream, _seq, _facts, ts, _at, done = line.split()
        if stream == "inventory/delta" and float(ts) >= start - 0.001:
            lat.append((float(done) - float(ts)) * 1000)
    lat.sort()
    note(f"{len(lat)} departure messages measured; background {a.background:.0f} reads/s")
    emit("rfid_exit_to_hq_p50_ms", percentile(lat, 50))
    emit("rfid_exit_to_hq_p99_ms", percentile(lat, 99))
    emit("rfid_exit_to_hq_max_ms", lat[-1] if lat else float("nan"))


if __name__ == "__main__":
    main()
