"""Only a store speaks for itself: with signatures on, every forgery of the audit is refused, counted,
and leaves HQ's state byte for byte as it was; forged commands and acks change nothing at the store.

The broker here is anonymous on purpose (anyone may publish anything): the ACL is the first fence
(tests/test_security.py), signatures the one that holds when the first fails.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent import signing
from edge_agent.clock import rfc3339
from edge_agent.hq.store import HqStore
from edge_agent.sync.outbox import SealedMessage
from simulators.inventory_feed import InventoryFeed
from simulators.mosquitto import Mosquitto

from .helpers import AgentProcess, HqBackend, agent_config, start_hq, wait_for

ZONES = ["backroom", "salesfloor"]
SIM = {"seed": 5, "total": 2_000, "rate_per_s": 4_000, "batch": 100, "zones": ZONES, "gtins": 10}
T0 = 1_767_225_600.0
# What HQ knows and keeps: every table but the log of what it refused.
STATE_TABLES = ("streams", "inventory", "stash", "snapshot_parts", "snapshots", "messages", "telemetry",
                "telemetry_hourly", "traffic_hourly", "status", "resyncs", "floors", "labels", "inv_journal", "alerts",
                "commands_out")


def dump(db: HqStore) -> list[tuple[str, list[tuple[Any, ...]]]]:
    return [(t, [tuple(r) for r in db.read(f"SELECT * FROM {t} ORDER BY 1, 2")]) for t in STATE_TABLES]


def publish_all(port: int, msgs: list[tuple[str, bytes]]) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="forger", protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        for topic, payload in msgs:
            c.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        c.loop_stop()
        c.disconnect()


def uplink(key: Any, stream: str, type_: str, seq: int, body: dict[str, Any], prev: str = "",
           store: str = "S001", msg_id: str = "01JE0000000000000000000000") -> bytes:
    text = json.dumps(body, separators=(",", ":"))
    sig = None
    if key is not None:
        preimage = signing.uplink_preimage(type_, store, stream, seq, msg_id, prev, rfc3339(T0), text.encode())
        sig = signing.sign(key, preimage)
    msg = SealedMessage(stream, seq, msg_id, type_, T0, T0, 1, text, prev=prev, sig=sig)
    return msg.payload(store, T0, False)


@pytest.mark.slow
def test_every_forgery_is_refused_and_hq_is_unchanged(
    tmp_path: Path, broker: Mosquitto, hq_backend: HqBackend
) -> None:
    keys = tmp_path / "keys"
    _, _, s001_pub = signing.write_keypair(keys, "S001")
    signing.write_keypair(keys, "S002")
    _, _, hq_pub = signing.write_keypair(keys, "hq")
    cfg = agent_config(tmp_path, broker.port, sim=SIM, health={"interval_s": 3600.0},
                       signing={"key_file": str(keys / "S001.key"), "hq_public_key": hq_pub,
                                "require_signed_commands": True})
    hq = start_hq(tmp_path, broker.port, signing={"key_file": str(keys / "hq.key"), "keys": {"S001": s001_pub},
                                                   "require_signatures": True}, **hq_backend.config())
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    truth = InventoryFeed(5, ZONES, 10).truth(2_000)
    prefix = "retail/v1/S001"
    try:
        wait_for(lambda: hq.db.inventory("S001") == truth, 60, "HQ inventory from signed messages")
        assert hq.db.read("SELECT count(*) FROM rejected")[0][0] == 0  # every genuine message verified

        # Forged commands and acks at the store: refused, nothing done.
        snapshots_before = hq.db.read("SELECT count(*) FROM streams WHERE stream = 'inventory/snapshot'")[0][0]
        cmd = {"v": 1, "id": "forged-1", "name": "inventory.resync", "store": "S001", "ts": rfc3339(T0), "args": {}}
        other_hq = signing.load_private_key(keys / "S002.key")
        ack = {"v": 1, "type": "ack", "store": "S001", "ts": rfc3339(T0),
               "streams": {"inventory/delta": {"seq": 10**6, "id": "01JE0000000000000000000000"}}}
        publish_all(broker.port, [
            (f"{prefix}/cmd/inventory.resync", json.dumps(cmd).encode()),
            (f"{prefix}/cmd/inventory.resync", signing.sign_json({**cmd, "id": "forged-2"}, other_hq)),
            (f"{prefix}/ack", json.dumps(ack).encode()),
            (f"{prefix}/ack", signing.sign_json(ack, other_hq)),
        ])

        def results() -> dict[str, dict[str, Any]]:
            return {it["cmd_id"]: it for (b,) in hq.db.read("SELECT body FROM messages WHERE stream = 'cmd-result'")
                    for it in json.loads(b)["items"]}

        wait_for(lambda: {"forged-1", "forged-2"} <= results().keys(), 30, "error results for the forged commands")
        assert results()["forged-1"]["status"] == "error" and "unsigned" in results()["forged-1"]["reason"]
        assert "bad signature" in results()["forged-2"]["reason"]
        assert hq.db.read("SELECT count(*) FROM streams WHERE stream = 'inventory/snapshot'")[0][0] == snapshots_before
        agent_db = tmp_path / "outbox-S001.db"
        conn = sqlite3.connect(agent_db)
        quarantined = conn.execute("SELECT reason FROM quarantine WHERE source = 'uplink.ack'").fetchall()
        rewinds = conn.execute("SELECT value FROM counters WHERE name = 'rewinds'").fetchall()
        conn.close()
        assert len(quarantined) == 2 and rewinds == [], (quarantined, rewinds)
        # A genuine, signed command still runs.
        hq.send_command("S001", "inventory.resync", {"reason": "genuine"})
        wait_for(lambda: bool(hq.db.read("SELECT 1 FROM snapshots")), 30, "the genuine resync's snapshot")

        assert agent.terminate() == 0
        wait_for(lambda: hq.db.read("SELECT state FROM status")[0][0] == "offline", 10, "the store's goodbye")
        before = dump(hq.db)
        rejected_before = hq.db.read("SELECT count(*) FROM rejected")[0][0]
        last, last_id = hq.db.read("SELECT last_seq, last_id FROM streams WHERE stream = 'inventory/delta'")[0]
        s002 = signing.load_private_key(keys / "S002.key")
        item = {"ts": rfc3339(T0), "zone": "backroom", "gtin": "04000000000006", "delta": 1000}
        forgeries = [
            # the next delta, chained on correctly, unsigned / signed by another store's key
            ("inventory/delta", uplink(None, "inventory/delta", "inventory.delta", last + 1, {"items": [item]}, last_id)),
            ("inventory/delta", uplink(s002, "inventory/delta", "inventory.delta", last + 1, {"items": [item]}, last_id)),
            # a snapshot as of seq 10^15 that would replace the whole inventory
            ("inventory/snapshot", uplink(None, "inventory/snapshot", "inventory.snapshot", 1,
                                          {"snapshot_id": "x", "as_of_seq": 10**15, "part": 1, "parts": 1,
                                           "reason": "forged", "items": []})),
            # a health message with seq 2^62
            ("health", uplink(s002, "health", "health", 2**62, {
                "uptime_s": 1, "connected": True, "pending_facts": 0, "sealed_messages": 0, "db_bytes": 0,
                "cap_bytes": 1, "compacted_facts": 0, "coarsened_facts": 0, "dropped_facts": {}, "quarantined": {}})),
            # a status birth
            ("status", uplink(None, "status", "status", 99, {"state": "online", "agent_version": "x",
                                                               "boot_id": "forged", "connection": 99})),
        ]
        # A genuine message with its body changed after signing.
        genuine = uplink(signing.load_private_key(keys / "S001.key"), "inventory/delta", "inventory.delta", last + 1,
                         {"items": [item]}, last_id)
        forgeries.append(("inventory/delta", genuine.replace(b'"delta":1000', b'"delta":9999')))
        publish_all(broker.port, [(f"{prefix}/{stream}", p) for stream, p in forgeries])
        wait_for(lambda: hq.db.read("SELECT count(*) FROM rejected")[0][0] == rejected_before + len(forgeries), 15,
                 "every forgery refused")
        reasons = [r for (r,) in hq.db.read("SELECT reason FROM rejected ORDER BY id")][-len(forgeries):]
        assert all(r.startswith("signature:") for r in reasons), reasons
        assert dump(hq.db) == before  # HQ's state, byte for byte
        assert hq.db.inventory("S001") == truth
    finally:
        if agent.alive:
            agent.terminate()
        hq.stop()
