"""The broker dies the hard way (SIGKILL: its queues unsaved), over and over, and nothing is lost.

mosquitto writes its persistence file only on a clean exit or every ``autosave_interval`` (1,800 s by
default), so a SIGKILL loses every message it held for an offline session, and a PUBACK proves
nothing. These tests kill it at seeded moments (mid-stream, during a drain after an outage, right
after a stream's last message), with persistence on and off, with HQ reconnecting before and after
the agent, and check that every message of every stream reaches HQ's store exactly once: inventory
(deltas, snapshots), cmd-result, health, traffic and ESL state.

The judge is a witness of our own on HQ's broker: a persistent session that subscribes again on
every connect, so a broker that forgot its session cannot make it deaf. The agent and HQ reach the
broker through a relay whose gate stays shut after a restart until the witness has subscribed, so
nothing can pass while the witness is not listening.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.agent import Agent
from edge_agent.clock import rfc3339
from edge_agent.config import AgentConfig
from edge_agent.hq.receiver import HqReceiver
from edge_agent.sync.outbox import Fact
from simulators.inventory_feed import InventoryFeed
from simulators.mosquitto import Mosquitto

from .helpers import CuttableLink, HqBackend, start_hq, wait_for

ZONES = ["backroom", "salesfloor", "fitting-room", "pos"]
STORE = "S001"
T0 = 1_767_225_600.0


class Witness:
    """Records every uplink message it sees as (stream, seq) -> ids; resubscribes on every connect."""

    def __init__(self, port: int) -> None:
        self.seen: dict[tuple[str, int], set[str]] = defaultdict(set)
        self.subscribed = threading.Event()
        self.connects = 0
        self._lock = threading.Lock()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="witness", protocol=mqtt.MQTTv5)
        c.on_connect = self._on_connect
        c.on_subscribe = lambda *_a: self.subscribed.set()
        c.on_disconnect = lambda *_a: self.subscribed.clear()
        c.on_message = self._on_message
        c.reconnect_delay_set(0.01, 0.05)  # type: ignore[arg-type]  # back before anyone else
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect_async("127.0.0.1", port, 5, clean_start=False, properties=props)
        c.loop_start()
        self.client = c

    def _on_connect(self, c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if not rc.is_failure:
            self.connects += 1
            c.subscribe("retail/v1/+/#", qos=1)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            env = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(env, dict) and env.get("stream") not in (None, "status") and "seq" in env:
            with self._lock:
                self.seen[(env["stream"], env["seq"])].add(env["id"])

    def seqs(self, stream: str) -> set[int]:
        with self._lock:
            return {seq for (s, seq) in self.seen if s == stream}

    def two_contents(self) -> list[tuple[str, int]]:
        with self._lock:
            return [k for k, ids in self.seen.items() if len(ids) > 1]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def stats_fact(i: int) -> Fact:
    item = {"camera": f"cam-{i % 3}", "zone": "z1", "bucket_start": rfc3339(T0 + 60 * i), "bucket_s": 60,
            "entries": i, "exits": 0, "occupancy_min": 0.0, "occupancy_avg": 1.0, "occupancy_max": 2.0, "visits": i}
    return Fact(ts=T0 + 60 * i, body=json.dumps(item, separators=(",", ":")))


def label_fact(i: int) -> Fact:
    item = {"ts": rfc3339(T0 + i), "label": f"0000000000{i:02X}"[-12:], "gtin": "04000000000006",
            "price": f"{i}.99", "currency": "EUR", "matches_hq": True}
    return Fact(ts=T0 + i, body=json.dumps(item, separators=(",", ":")))


def hq_items(hq: HqReceiver, stream: str) -> list[dict[str, Any]]:
    return [it for b in hq.db.bodies(stream, STORE)
            for it in json.loads(b)["items"]]


class Harness:
    def __init__(self, tmp: Path, persistence: bool, total: int, hq: dict[str, Any]) -> None:
        self.hq_keys = hq  # HQ's database: HqBackend.config()
        self.tmp = tmp
        self.broker = Mosquitto(workdir=tmp / "mosquitto", persistence=persistence).start()
        self.link = CuttableLink(self.broker.port)
        self.witness = Witness(self.broker.port)
        wait_for(self.witness.subscribed.is_set, 10, "the witness to subscribe")
        self.cfg = AgentConfig.model_validate({
            "store": {"id": STORE},
            "mqtt": {"port": self.link.port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5,
                     "connect_timeout_s": 2.0},
            "outbox": {"path": str(tmp / "outbox.db"), "resend_after_s": 1.0, "resend_max_s": 4.0},
            "health": {"interval_s": 2.0},
            "sources": {"simulated_inventory": {"enabled": True, "seed": 7, "total": total, "rate_per_s": 2_500,
                                                "batch": 50, "zones": ZONES, "gtins": 40}},
        })
        self.hq: HqReceiver | None = self.start_hq()
        wait_for(lambda: self.hq is not None and self.hq.conn.connected.is_set(), 10, "HQ to connect")
        self.agent = Agent(self.cfg)
        self.agent.start()
        self.stats = self.labels = self.commands = 0
        self.cmd_ids: list[str] = []

    def start_hq(self) -> HqReceiver:
        return start_hq(self.tmp, self.link.port, reorder_window_s=0.5, resync_retry_s=2.0, **self.hq_keys)

    def other_streams(self) -> None:
        """A traffic bucket, a label state and a command (answered on cmd-result, with a snapshot)."""
        self.agent.outbox.enqueue("traffic/stats", [stats_fact(self.stats)])
        self.agent.outbox.enqueue("esl/state", [label_fact(self.labels)])
        self.stats += 1
        self.labels += 1
        if self.hq is not None and self.hq.conn.connected.is_set():
            self.cmd_ids.append(self.hq.send_command(STORE, "inventory.resync", {"reason": "test"}))

    def crash_broker(self, down_s: float) -> None:
        self.link.gate.clear()
        self.broker.kill()  # the relayed links see EOF from the broker and close
        time.sleep(down_s)
        self.broker.start()
        wait_for(self.witness.subscribed.is_set, 10, "the witness to subscribe again")
        self.link.gate.set()

    def close(self) -> None:
        self.agent.stop(flush_timeout=2.0)
        if self.hq is not None:
            self.hq.stop()
        self.witness.close()
        self.link.close()
        self.broker.kill()


def check_everything_once(h: Harness, total: int) -> None:
    hq = h.hq
    assert hq is not None
    truth = InventoryFeed(7, ZONES, 40).truth(total)
    wait_for(lambda: hq.db.inventory(STORE) == truth, 60, "HQ inventory to equal the ground truth")
    # Stop the agent when HQ has acknowledged all it sealed (stop() waits for that), then compare.
    wait_for(lambda: h.agent.outbox.pending_count() == 0 and h.agent.outbox.sealed_count() == 0, 60,
             "HQ to acknowledge every sealed message")
    hwm = {s: m["seq"] for s, m in h.agent.outbox.high_water().items()}
    stats = {s["stream"]: s for s in hq.db.stream_stats() if s["store"] == STORE}
    for stream, last in hwm.items():
        st = stats[stream]
        # Every seq applied once, in order: as many applies as seqs, none skipped, none counted lost.
        assert (st["last_seq"], st["applied"], st["gaps"], st["lost"]) == (last, last, 0, 0), (stream, st)
        assert h.witness.seqs(stream) >= set(range(1, last + 1)), f"the witness missed part of {stream}"
    assert h.witness.two_contents() == []
    assert stats["inventory/delta"]["facts"] == total  # each delta of the feed applied exactly once
    stats_items = hq_items(hq, "traffic/stats")
    assert sorted(it["entries"] for it in stats_items) == list(range(h.stats))
    assert sorted(int(it["label"], 16) for it in hq_items(hq, "esl/state")) == list(range(h.labels))
    results = [it["cmd_id"] for it in hq_items(hq, "cmd-result") if it["name"] == "inventory.resync"]
    assert sorted(results) == sorted(h.cmd_ids)  # every command answered exactly once
    outcomes = {o for (o,) in hq.db.read("SELECT outcome FROM snapshots WHERE store = ?", (STORE,))}
    assert outcomes <= {"verified", "corrected", "stale"}, outcomes
    assert hq.db.read("SELECT count(*) FROM rejected")[0][0] == 0
    state = hq.state()
    assert all(s["lost"] == 0 for s in state["streams"])


@pytest.mark.slow
@pytest.mark.parametrize("persistence", [False, True], ids=["persistence-off", "persistence-on"])
def test_broker_sigkill_loses_nothing(tmp_path: Path, persistence: bool, hq_backend: HqBackend) -> None:
    rng = random.Random(1207 + persistence)
    total = 40_000
    h = Harness(tmp_path, persistence, total, hq_backend.config())
    kills = 0
    try:
        wait_for(lambda: h.agent.outbox.last_seq("inventory/delta") > 5, 20, "deltas flowing")
        for round_no in range(9):
            h.other_streams()
            time.sleep(rng.uniform(0.1, 1.2))  # mid-stream
            hq_away = rng.random() < 0.4
            if hq_away and h.hq is not None:  # HQ comes back after the agent this time
                h.hq.stop()
                h.hq = None
            if round_no == 4:  # a longer outage, then a crash while the backlog drains
                h.crash_broker(2.5)
                time.sleep(rng.uniform(0.2, 0.6))
            h.crash_broker(rng.uniform(0.1, 0.8))
            kills += 1 + (round_no == 4)
            if h.hq is None:
                time.sleep(rng.uniform(0.5, 2.0))
                h.hq = h.start_hq()
        wait_for(lambda: h.agent.sources[0].done.is_set(), 60, "the feed to finish")  # type: ignore[attr-defined]
        # Right after the last message of a stream: HQ away, the broker holds it for HQ's session, dies.
        assert h.hq is not None
        h.hq.stop()
        h.hq = None
        h.other_streams()
        def last_label_at_broker() -> bool:
            pending = h.agent.outbox.read("SELECT count(*) FROM pending WHERE stream = 'esl/state'")[0][0]
            return not pending and ("esl/state", h.agent.outbox.last_seq("esl/state")) in h.witness.seen

        wait_for(last_label_at_broker, 10, "the last label state to reach the broker")
        h.crash_broker(0.2)
        kills += 1
        time.sleep(1.0)  # the agent is back first and publishes what HQ's lost session will never get
        h.hq = h.start_hq()
        back = time.monotonic()
        wait_for(lambda: len(hq_items(h.hq, "esl/state")) == h.labels, 30,  # type: ignore[arg-type]
                 "HQ to get the lost tail")
        repaired_s = time.monotonic() - back
        assert repaired_s <= 2 * h.cfg.health.interval_s, repaired_s  # within two health intervals
        assert kills >= 10
        check_everything_once(h, total)
    finally:
        h.close()
