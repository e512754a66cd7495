"""Uplink: drains the outbox to MQTT, QoS 1, deleting a sealed message only after its PUBACK.

A pump thread owns the publish side. Each round it republishes sealed messages the broker has not
acknowledged on this connection, then seals new ones, round-robin over streams in priority order
and, within a stream, alternately from the *backlog* (facts that were pending when this connection
came up) and the *live* tail, so a fresh fact is never stuck behind hours of backlog. At most
``inflight_window`` messages are unacknowledged at a time; while the window is full facts keep
accumulating, so messages grow towards the byte bound exactly when throughput needs it.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from ulid import ULID

from ..clock import Clock, rfc3339
from ..config import MqttConfig
from ..contract import CONTRACT_VERSION, STATUS_STREAM, STATUS_TYPE, STREAMS, uplink_topic
from .mqtt_client import Connection
from .outbox import Outbox, SealedMessage

log = logging.getLogger(__name__)

STREAM_ORDER = sorted(STREAMS, key=lambda s: (STREAMS[s].priority, s))


class Uplink:
    def __init__(
        self,
        cfg: MqttConfig,
        store: str,
        outbox: Outbox,
        clock: Clock,
        *,
        inflight_window: int = 32,
        boot_id: str | None = None,
        agent_version: str = "0",
    ) -> None:
        self.cfg = cfg
        self.store = store
        self._seq_floor = outbox.seq_floors()  # fixed once the outbox is open: read here, not on the network thread
        self.outbox = outbox
        self.clock = clock
        self.window = inflight_window
        self.boot_id = boot_id or str(ULID())
        self.agent_version = agent_version
        self._wake = threading.Event()
        self._events: queue.SimpleQueue[tuple[str, int, int, bool]] = queue.SimpleQueue()
        self._subscriptions: list[tuple[str, Callable[[mqtt.MQTTMessage], None]]] = []
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._pump_thread = threading.Thread(target=self._pump, name="uplink-pump", daemon=True)
        self.conn = Connection(
            cfg,
            cfg.client_id or f"edge-agent-{store}",
            prepare=self._prepare,
            on_up=self._on_up,
            on_down=lambda no, _r: self._post("down", no),
            on_message=self._route,
            on_ack=lambda no, mid, ok: self._post("ack", no, mid, ok),
            name="uplink-mqtt",
        )
        # Pump-thread state for the current connection.
        self._conn_no = 0
        self._connected_at = 0.0
        self._live_from_id = 0
        self._inflight: dict[int, tuple[str, int]] = {}
        self._published: dict[str, int] = {}
        self._resend: set[str] = set()
        # Streams that may hold pending facts, so an idle pump does not query every stream's lanes.
        self._live: set[str] = set()
        self._backlog: set[str] = set()
        # Figures read by health and benchmarks.
        self.published_messages = 0
        self.acked_messages = 0
        self.failed_acks = 0
        outbox.on_enqueue(self._wake.set)

    # ------------------------------------------------------------ lifecycle

    def subscribe(self, topic: str, handler: Callable[[mqtt.MQTTMessage], None]) -> None:
        """Subscribed again on every connection (the broker may have lost the session)."""
        self._subscriptions.append((topic, handler))

    def start(self) -> None:
        self._pump_thread.start()
        self.conn.start()

    @property
    def connected(self) -> bool:
        return self.conn.connected.is_set()

    def stop(self, flush_timeout: float = 5.0) -> bool:
        """Flush what can be flushed within ``flush_timeout``, say goodbye, disconnect. True if drained."""
        self._draining.set()
        deadline = time.monotonic() + flush_timeout
        drained = False
        while time.monotonic() < deadline:
            if self.connected and self.outbox.pending_count() == 0 and self.outbox.sealed_count() == 0:
                drained = True
                break
            if not self.connected and time.monotonic() > deadline - flush_timeout / 2:
                break
            time.sleep(0.02)
        self._stop.set()
        self._wake.set()
        self._pump_thread.join(5)
        self.conn.stop(before_close=lambda c: c.publish(*self._status_msg("offline"), qos=1, retain=True))
        return drained

    def notify(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------ MQTT callbacks (network thread)

    def _status_msg(self, state: str, no: int | None = None) -> tuple[str, bytes]:
        no = self.conn.connection_no if no is None else no
        now = rfc3339(self.clock.now())
        body = {"state": state, "agent_version": self.agent_version, "boot_id": self.boot_id, "connection": no,
                "seq_floor": self._seq_floor}
        env = {"v": CONTRACT_VERSION, "type": STATUS_TYPE, "store": self.store, "stream": STATUS_STREAM,
               "seq": no, "id": str(ULID()), "ts": now, "sent": now, "historical": False, "body": body}
        return uplink_topic(self.cfg.topic_prefix, self.store, STATUS_STREAM), json.dumps(env).encode()

    def _prepare(self, client: mqtt.Client, no: int) -> None:
        # The will is fixed at connect time; it tells HQ which connection went away.
        client.will_set(*self._status_msg("offline", no), qos=1, retain=True)
        client.max_inflight_messages_set(self.window + 8)

    def _on_up(self, client: mqtt.Client, no: int) -> None:
        client.publish(*self._status_msg("online"), qos=1, retain=True)
        for topic, _ in self._subscriptions:
            client.subscribe(topic, qos=1)
        self._post("up", no)

    def _route(self, msg: mqtt.MQTTMessage) -> None:
        for topic, handler in self._subscriptions:
            if mqtt.topic_matches_sub(topic, msg.topic):
                handler(msg)
                return

    def _post(self, kind: str, no: int, mid: int = 0, ok: bool = True) -> None:
        self._events.put((kind, no, mid, ok))
        self._wake.set()

    # ------------------------------------------------------------ pump thread

    def _pump(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.1)
            self._wake.clear()
            try:
                self._handle_events()
                if self._conn_no and self.conn.connected.is_set():
                    self._fill()
            except Exception:  # the pump must outlive any one bad round
                log.exception("uplink pump round failed")
                time.sleep(0.2)

    def _handle_events(self) -> None:
        acked: list[tuple[str, int]] = []
        while True:
            try:
                kind, no, mid, ok = self._events.get_nowait()
            except queue.Empty:
                break
            if kind == "up":
                self._begin_connection(no)
            elif kind == "down":
                if no == self._conn_no:
                    self._conn_no = 0
                    self._inflight.clear()
            elif kind == "ack" and no == self._conn_no:
                key = self._inflight.pop(mid, None)
                if key is None:
                    # The status birth and anything published outside the pump land here.
                    continue
                if ok:
                    acked.append(key)
                else:
                    self.failed_acks += 1
                    log.error("broker refused %s seq %d; will resend after reconnect", *key)
                    if (c := self.conn.client) is not None:
                        c.disconnect()
        if acked:
            self.outbox.ack(acked)
            self.acked_messages += len(acked)

    def _begin_connection(self, no: int) -> None:
        self._conn_no = no
        self._connected_at = self.clock.now()
        self._live_from_id = self.outbox.max_pending_id()
        self._inflight.clear()
        self._published.clear()
        self._resend = set(self.outbox.sealed_streams())
        self._backlog = set(self.outbox.streams_with_pending())
        self._live = set(STREAMS)

    def _publish(self, msg: SealedMessage) -> bool:
        client = self.conn.client
        if client is None:
            return False
        payload = msg.payload(self.store, self.clock.now(), historical=msg.oldest_created < self._connected_at)
        info = client.publish(uplink_topic(self.cfg.topic_prefix, self.store, msg.stream), payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        self._inflight[info.mid] = (msg.stream, msg.seq)
        self._published[msg.stream] = msg.seq
        self.published_messages += 1
        return True

    def _fill(self) -> None:
        room = self.window - len(self._inflight)
        for stream in [s for s in STREAM_ORDER if s in self._resend]:
            if room <= 0:
                return
            msgs = self.outbox.sealed_after(stream, self._published.get(stream, 0), room)
            if len(msgs) < room:
                self._resend.discard(stream)
            for m in msgs:
                if not self._publish(m):
                    return
                room -= 1
        self._live |= self.outbox.take_dirty()
        while room > 0:
            progressed = False
            for stream in STREAM_ORDER:
                if stream in self._resend:
                    continue
                for lane in (self._live, self._backlog):
                    if stream not in lane:
                        continue
                    if lane is self._live:
                        msg = self.outbox.seal(stream, after_id=self._live_from_id)
                    else:
                        msg = self.outbox.seal(stream, up_to_id=self._live_from_id)
                    if msg is None:
                        lane.discard(stream)
                        continue
                    progressed = True
                    if not self._publish(msg):
                        return
                    room -= 1
                    if room <= 0:
                        return
            if not progressed:
                return
