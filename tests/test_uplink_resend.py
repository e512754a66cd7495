"""The uplink's resend rule against a real mosquitto: while HQ is silent it publishes its unacknowledged
messages again once, not once per doubled timeout, and seals nothing new (facts wait, to go out packed);
HQ's next word (any ack, even one that moves nothing) re-arms both. Before this rule, a 10-minute HQ outage left about six copies of every message in
HQ's persistent broker session (README, "drain"), and the drain spent its time on them.

The HQ here is a bare MQTT client with a persistent session that counts what reaches it (a witness
that resubscribes on every connect); its acks are the contract's ``Ack``.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.clock import RealClock, rfc3339
from edge_agent.config import MqttConfig, OutboxConfig
from edge_agent.contract import ack_topic
from edge_agent.sync.outbox import Fact, Outbox
from edge_agent.sync.uplink import Uplink
from simulators.mosquitto import Mosquitto

from .helpers import wait_for

STORE = "S001"
STREAM = "inventory/delta"
PREFIX = "retail/v1"


class Witness:
    """HQ's side: a persistent session on the store's delta stream, counting each (seq) it is handed."""

    def __init__(self, port: int) -> None:
        self.copies: Counter[int] = Counter()
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="witness-hq", protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe(f"{PREFIX}/+/{STREAM}", qos=1)
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.copies[json.loads(msg.payload)["seq"]] += 1

    def counts(self) -> Counter[int]:
        with self._lock:
            return Counter(self.copies)

    def say(self, seq: int, msg_id: str = "") -> None:
        """An ack from HQ: its position in the stream (seq 0 moves nothing: a hello after HQ's reconnect)."""
        ack = {"v": 1, "type": "ack", "store": STORE, "ts": rfc3339(time.time()),
               "streams": {STREAM: {"seq": seq, "id": msg_id}}}
        self.client.publish(ack_topic(PREFIX, STORE), json.dumps(ack), qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_a_silent_hq_gets_one_resend_not_one_per_timeout(tmp_path: Path, broker: Mosquitto) -> None:
    witness = Witness(broker.port)
    outbox = Outbox(tmp_path / "outbox.db", RealClock())
    up = Uplink(MqttConfig(port=broker.port, topic_prefix=PREFIX), STORE, outbox, RealClock(),
                windows=OutboxConfig(resend_after_s=0.3, resend_max_s=0.6, hold_when_silent_s=1.0))
    up.start()
    try:
        outbox.enqueue(STREAM, [Fact(time.time(), json.dumps({"epc": f"e{i}", "zone": "z", "d": 1}))
                                for i in range(3)])
        wait_for(lambda: sum(witness.counts().values()) >= 1, 10, "the first publication")
        # HQ stays silent for ten resend timeouts: one resend round, then nothing more.
        wait_for(lambda: up.resent_rounds >= 1, 5, "the first resend")
        time.sleep(3.0)
        silent = witness.counts()
        assert up.resent_rounds == 1, f"{up.resent_rounds} resend rounds while HQ said nothing"
        assert set(silent.values()) == {2}, f"copies per seq while HQ was silent: {dict(silent)}"

        # Facts made while HQ is silent stay pending: no small messages queue for it meanwhile.
        sealed = outbox.sealed_count()
        for i in range(40):
            outbox.enqueue(STREAM, [Fact(time.time(), json.dumps({"epc": f"late{i}", "zone": "z", "d": 1}))])
            time.sleep(0.02)
        time.sleep(0.5)
        assert (outbox.sealed_count(), outbox.pending_count()) == (sealed, 40)

        # HQ speaks (a hello that moves nothing): the stream is re-armed, the 40 facts go out in one
        # message, and the resend timer fires once more for what HQ still lacks.
        witness.say(0)
        wait_for(lambda: up.resent_rounds == 2, 5, "a resend after HQ's hello")
        time.sleep(2.0)
        assert up.resent_rounds == 2
        assert outbox.sealed_count() == sealed + 1 and outbox.pending_count() == 0
        copies = witness.counts()
        assert [copies[s] for s in sorted(copies)] == [3, 2], dict(copies)  # the new message: sent, then resent

        # HQ acks everything: nothing is left to send, and the outbox forgets it.
        last = outbox.read("SELECT seq, id FROM sealed WHERE stream = ? ORDER BY seq DESC LIMIT 1", (STREAM,))[0]
        witness.say(last[0], last[1])
        wait_for(lambda: outbox.unacked() == 0, 5, "the outbox to take HQ's ack")
    finally:
        up.stop()
        witness.close()
        outbox.close()
