"""Uplink: drains the outbox to MQTT, QoS 1; a sealed message is forgotten only when HQ's ack covers it.

A pump thread owns the publish side. Each round it republishes sealed messages that HQ has not
acknowledged and the broker has not had on this connection, then seals new ones, round-robin over
streams in priority order and, within a stream, alternately from the *backlog* (facts that were
pending when this connection came up) and the *live* tail, so a fresh fact is never stuck behind
hours of backlog. Two windows bound the work: at most ``inflight_window`` messages await a PUBACK,
and at most ``ack_window`` per stream await HQ's ack; while either is full facts keep accumulating
as pending, so messages grow towards the byte bound exactly when throughput needs it.

A PUBACK only says the broker has a message. HQ's ack (``{prefix}/{store}/ack``) says what it has
applied; if it stops making progress for ``resend_after_s`` (a broker that crashed with the message
unsaved, an HQ that was away), the stream's unacknowledged messages are published again, same seq,
same id, same bytes, and HQ ignores those it has. Again only once HQ has been heard since: a silent HQ's
broker session already holds the first copy, and more copies would stand in front of its backlog when
it returns (HQ acks every store when it connects, which re-arms the timer). Meanwhile such a stalled
stream seals nothing new: its facts stay pending and go out packed into full messages once HQ speaks,
not as hundreds of small ones queued for it. HQ can also ask with the ``replay`` command.
Intervals run on the monotonic clock: a wall-clock step changes no timer and no ``historical`` flag.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from pydantic import ValidationError
from ulid import ULID

from ..clock import Clock, rfc3339
from ..config import MqttConfig, OutboxConfig
from ..contract import CONTRACT_VERSION, STATUS_STREAM, STATUS_TYPE, STREAMS, Ack, ack_topic, uplink_topic
from .diskstate import refusal_kind
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
        windows: OutboxConfig | None = None,
        boot_id: str | None = None,
        agent_version: str = "0",
        on_rewind: Callable[[str], None] | None = None,
        check_ack: Callable[[bytes], str | None] | None = None,
        sign_status: Callable[[str, str, int, str, str, str, bytes], str] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        w = windows or OutboxConfig()
        self.cfg = cfg
        self.store = store
        self._seq_floor = outbox.seq_floors()  # fixed once the outbox is open: read here, not on the network thread
        self.outbox = outbox
        self.clock = clock
        self.window = w.inflight_window
        self.ack_window = w.ack_window
        self.resend_after_s = w.resend_after_s
        self.resend_max_s = w.resend_max_s
        self.hq_silent_alert_s = w.hq_silent_alert_s
        self.hold_when_silent_s = w.hold_when_silent_s
        self.boot_id = boot_id or str(ULID())
        self.agent_version = agent_version
        self._on_rewind = on_rewind or (lambda _stream: None)
        self._check_ack = check_ack  # signature check of HQ's acks: None if good, else the reason
        self._sign_status = sign_status
        self._mono = monotonic
        self.ack_topic = ack_topic(cfg.topic_prefix, store)
        self._wake = threading.Event()
        self._events: queue.SimpleQueue[tuple[str, int, Any]] = queue.SimpleQueue()
        self._subscriptions: list[tuple[str, Callable[[mqtt.MQTTMessage], None]]] = [(self.ack_topic, self._on_ack_msg)]
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
            on_ack=lambda no, mid, ok: self._post("puback", no, (mid, ok)),
            name="uplink-mqtt",
        )
        # Pump-thread state for the current connection.
        self._conn_no = 0
        self._live_from_id = 0
        self._inflight: dict[int, tuple[str, int]] = {}
        self._published: dict[str, int] = {}  # per stream, the highest seq published on this connection
        self._resend: set[str] = set()
        self._first_live_seq: dict[str, int] = {}  # seqs below were sealed before this connection: historical
        self._backlog_seqs: set[tuple[str, int]] = set()  # sealed on this connection from the backlog
        # Streams that may hold pending facts, so an idle pump does not query every stream's lanes.
        self._live: set[str] = set()
        self._backlog: set[str] = set()
        # Per stream with unacknowledged messages: when HQ last made progress, and the resend timeout.
        self._progress_at: dict[str, float] = {}
        self._rto: dict[str, float] = {}
        # When each stream was last published again, and when HQ was last heard: while HQ has said nothing
        # since a resend, another copy would only queue behind the first in its broker session.
        self._resent_at: dict[str, float] = {}
        self._heard_at = monotonic()  # HQ is presumed there at start: the first seals go out at once
        self._silent_alerted = False
        self._taken: dict[str, tuple[int, str]] = {}  # the last ack mark applied, per stream
        self._last_ack_at = monotonic()  # a (re)connection sends everything again anyway
        # Figures read by health and benchmarks.
        self.published_messages = 0
        self.acked_messages = 0  # forgotten on HQ's ack
        self.pubacks = 0
        self.failed_acks = 0
        self.resent_rounds = 0
        self.rewinds = 0
        self.bad_acks = 0
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
        """Flush what can be flushed within ``flush_timeout`` (HQ acknowledging it), say goodbye,
        disconnect. True if drained."""
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

    def replay(self, stream: str, from_seq: int) -> dict[str, Any]:
        """HQ's ``replay`` command: publish ``stream`` again from ``from_seq`` (what is still held)."""
        if stream not in STREAMS:
            raise ValueError(f"unknown stream {stream!r}")
        held = self.outbox.read("SELECT min(seq), max(seq) FROM sealed WHERE stream = ?", (stream,))[0]
        self._post("replay", 0, (stream, from_seq))
        return {"stream": stream, "from_seq": from_seq, "held_from": held[0], "held_to": held[1],
                "last_sealed": self.outbox.last_seq(stream)}

    def figures(self) -> dict[str, float]:
        now = self._mono()
        waiting = [now - t for s, t in list(self._progress_at.items()) if self.outbox.unacked(s)]
        return {
            "published_messages": self.published_messages,
            "acked_messages": self.acked_messages,
            "pubacks": self.pubacks,
            "failed_acks": self.failed_acks,
            "resent_rounds": self.resent_rounds,
            "rewinds": self.rewinds,
            "bad_acks": self.bad_acks,
            "unacked_messages": self.outbox.unacked(),
            "unacked_age_s": round(max(waiting, default=0.0), 3),
            "mqtt_connect_attempts": self.conn.attempts,
        }

    # ------------------------------------------------------------ MQTT callbacks (network thread)

    def _status_msg(self, state: str, no: int | None = None) -> tuple[str, bytes]:
        no = self.conn.connection_no if no is None else no
        now = rfc3339(self.clock.now())
        body = {"state": state, "agent_version": self.agent_version, "boot_id": self.boot_id, "connection": no,
                "seq_floor": self._seq_floor, "hwm": self.outbox.high_water(), "instance": self.outbox.instance}
        body_text = json.dumps(body, separators=(",", ":"))
        msg_id = str(ULID())
        head: dict[str, Any] = {"v": CONTRACT_VERSION, "type": STATUS_TYPE, "store": self.store,
                                "stream": STATUS_STREAM, "seq": no, "id": msg_id, "ts": now, "sent": now,
                                "historical": False}
        if self._sign_status is not None:
            head["sig"] = self._sign_status(STATUS_TYPE, STATUS_STREAM, no, msg_id, "", now, body_text.encode())
        # Laid out as every uplink message: compact, "body" last (what a verifier splits on).
        payload = json.dumps(head, separators=(",", ":"))[:-1] + ',"body":' + body_text + "}"
        return uplink_topic(self.cfg.topic_prefix, self.store, STATUS_STREAM), payload.encode()

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

    def _on_ack_msg(self, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        try:
            ack = Ack.model_validate_json(payload)
            if ack.store != self.store:
                raise ValueError(f"ack names store {ack.store!r}")
            reason = self._check_ack(payload) if self._check_ack else None
            if reason:
                raise ValueError(reason)
        except (ValueError, ValidationError) as e:
            self.bad_acks += 1
            self.outbox.quarantine("uplink.ack", f"{msg.topic}: {str(e)[:500]}", payload)
            return
        self._post("hqack", 0, ack)

    def _post(self, kind: str, no: int, data: Any = None) -> None:
        self._events.put((kind, no, data))
        self._wake.set()

    # ------------------------------------------------------------ pump thread

    def _pump(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.1)
            self._wake.clear()
            try:
                self._handle_events()
                if self._conn_no and self.conn.connected.is_set():
                    self._check_resend()
                    self._fill()
                self._check_silent()
            except sqlite3.Error as e:
                if (kind := refusal_kind(e)) is None:
                    log.exception("uplink pump round failed")
                elif self.outbox.disk.refused(kind, self.clock.now(), str(e)):
                    # Sealing and forgetting acked messages write too; they wait like the sources do, and
                    # the episode is one line here and one alert when a transaction commits again.
                    log.error("outbox write refused while sealing or taking an ack (%s); the uplink waits", e)
                time.sleep(0.5)
            except Exception:  # the pump must outlive any one bad round
                log.exception("uplink pump round failed")
                time.sleep(0.2)

    def _handle_events(self) -> None:
        while True:
            try:
                kind, no, data = self._events.get_nowait()
            except queue.Empty:
                break
            if kind == "up":
                self._begin_connection(no)
            elif kind == "down":
                if no == self._conn_no:
                    self._conn_no = 0
                    self._inflight.clear()
            elif kind == "puback" and no == self._conn_no:
                mid, ok = data
                key = self._inflight.pop(mid, None)
                if key is None:
                    continue  # the status birth and anything published outside the pump land here
                if ok:
                    self.pubacks += 1
                else:
                    self.failed_acks += 1
                    log.error("broker refused %s seq %d; will resend after reconnect", *key)
                    if (c := self.conn.client) is not None:
                        c.disconnect()
            elif kind == "hqack":
                self._apply_hq_ack(data)
            elif kind == "replay":
                stream, from_seq = data
                self._published[stream] = min(self._published.get(stream, 0), from_seq - 1)
                self._resend.add(stream)

    def _apply_hq_ack(self, ack: Ack) -> None:
        now = self._mono()
        moved: set[str] = set()  # streams this ack made progress on (or rewound)
        for stream, mark in ack.streams.items():
            # HQ repeats its whole position in every ack; a mark already taken changes nothing (this
            # outbox only moves forward while the process lives), so it costs no transaction.
            if stream not in STREAMS or self._taken.get(stream) == (mark.seq, mark.id):
                continue
            self._taken[stream] = (mark.seq, mark.id)
            result = self.outbox.ack_through(stream, mark.seq, mark.id)
            if result.rewind:
                moved.add(stream)
                self.rewinds += 1
                self._published.pop(stream, None)
                self._first_live_seq[stream] = self.outbox.last_seq(stream) + 1
                self._resend.discard(stream)
                self._backlog.add(stream)  # the facts put back to pending wait there now
                self._progress_at.pop(stream, None)
                self._on_rewind(stream)
            elif result.deleted:
                moved.add(stream)
                self.acked_messages += result.deleted
                self._rto[stream] = self.resend_after_s
                if self.outbox.unacked(stream):
                    self._progress_at[stream] = now
                else:
                    self._progress_at.pop(stream, None)
        # The first ack after a silence: HQ is back (or the link to it). Its broker session may still hold
        # all it missed, so a stream this ack does not move gets one fresh, short timer: HQ's acks moving
        # it while it drains keep that timer off; a stream that stays still (its copies died with a
        # broker's session) is published again within resend_after_s, not after its doubled timeout.
        if now - self._last_ack_at >= self.resend_after_s:
            for stream in STREAM_ORDER:
                self._rto[stream] = self.resend_after_s
                if stream not in moved and self.outbox.unacked(stream):
                    self._progress_at[stream] = now
        self._last_ack_at = self._heard_at = now

    def _check_resend(self) -> None:
        """Publish again what HQ has not acknowledged for too long (the broker may have lost it)."""
        now = self._mono()
        for stream in STREAM_ORDER:
            if not self.outbox.unacked(stream):
                self._progress_at.pop(stream, None)
                continue
            since = self._progress_at.setdefault(stream, now)
            rto = self._rto.setdefault(stream, self.resend_after_s)
            if stream in self._resend or now - since < rto or self._heard_at < self._resent_at.get(stream, self._heard_at):
                continue
            log.info("%s: no ack from HQ for %.1fs; publishing %d unacknowledged messages again", stream,
                     now - since, self.outbox.unacked(stream))
            self._published[stream] = 0
            self._resend.add(stream)
            self._progress_at[stream] = self._resent_at[stream] = now
            self._rto[stream] = min(rto * 2, self.resend_max_s)
            self.resent_rounds += 1

    def _stalled(self, stream: str, now: float) -> bool:
        """HQ has said nothing for hold_when_silent_s and this stream waits for its ack: seal nothing more of
        it until HQ speaks. Its facts wait as pending, where the next seal packs a message full, instead of going
        out a few at a time to queue in a silent HQ's broker session (each small message then costs HQ a
        transaction when it returns). Any ack ends it, a hello that moves nothing included. A stream stuck
        while HQ talks (its message lost in a broker) keeps sealing: the resend timer deals with it."""
        return now - self._heard_at >= self.hold_when_silent_s and self.outbox.unacked(stream) > 0

    def _check_silent(self) -> None:
        now = self._mono()
        oldest = min((t for s, t in self._progress_at.items() if self.outbox.unacked(s)), default=None)
        if oldest is None or now - oldest < self.hq_silent_alert_s:
            self._silent_alerted = False
        elif not self._silent_alerted:
            self._silent_alerted = True
            self.outbox.alert("uplink.hq_silent", f"HQ has acknowledged nothing for {now - oldest:.0f}s; "
                              f"{self.outbox.unacked()} messages wait for its ack (facts stay buffered)")

    def _begin_connection(self, no: int) -> None:
        self._conn_no = no
        self._live_from_id = self.outbox.max_pending_id()
        self._inflight.clear()
        self._published.clear()
        self._backlog_seqs.clear()
        self._last_ack_at = self._mono()
        self._first_live_seq = {s: self.outbox.last_seq(s) + 1 for s in STREAMS}
        self._resend = set(self.outbox.sealed_streams())
        self._backlog = set(self.outbox.streams_with_pending())
        self._live = set(STREAMS)
        now = self._mono()
        for s in self._resend:
            self._progress_at[s] = self._resent_at[s] = now

    def _publish(self, msg: SealedMessage) -> bool:
        client = self.conn.client
        if client is None:
            return False
        historical = msg.seq < self._first_live_seq.get(msg.stream, 0) or (msg.stream, msg.seq) in self._backlog_seqs
        payload = msg.payload(self.store, self.clock.now(), historical=historical)
        info = client.publish(uplink_topic(self.cfg.topic_prefix, self.store, msg.stream), payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        self._inflight[info.mid] = (msg.stream, msg.seq)
        self._published[msg.stream] = max(self._published.get(msg.stream, 0), msg.seq)
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
        now = self._mono()
        while room > 0:
            progressed = False
            for stream in STREAM_ORDER:
                if stream in self._resend or self.outbox.unacked(stream) >= self.ack_window or self._stalled(stream, now):
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
                    if lane is self._backlog:
                        self._backlog_seqs.add((stream, msg.seq))
                    if not self._publish(msg):
                        return
                    room -= 1
                    if room <= 0 or self.outbox.unacked(stream) >= self.ack_window:
                        break
                if room <= 0:
                    return
            if not progressed:
                return
