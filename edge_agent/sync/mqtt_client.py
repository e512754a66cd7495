"""Building a paho-mqtt 2.x client from config: protocol, persistent session, TLS, credentials."""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..config import MqttConfig
from ..retry import backoff_delay

log = logging.getLogger(__name__)


def make_client(cfg: MqttConfig, client_id: str) -> mqtt.Client:
    v5 = cfg.protocol == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        # v3.1.1 keeps the session through clean_session; v5 through clean_start + expiry at connect.
        clean_session=None if v5 else False,
    )
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.password.get_secret_value() if cfg.password else None)
    if cfg.tls.enabled:
        client.tls_set(
            ca_certs=str(cfg.tls.ca_file) if cfg.tls.ca_file else None,
            certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
            keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
        client.tls_insecure_set(cfg.tls.insecure)
    client.max_queued_messages_set(0)
    return client


def connect(client: mqtt.Client, cfg: MqttConfig) -> None:
    """Blocking TCP/TLS connect; CONNACK arrives later through on_connect."""
    if cfg.protocol == "5":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = cfg.session_expiry_s
        client.connect(cfg.host, cfg.port, cfg.keepalive_s, clean_start=False, properties=props)
    else:
        client.connect(cfg.host, cfg.port, cfg.keepalive_s)


class Connection:
    """One long-lived MQTT link: a fresh paho client per connection attempt, driven by our own
    network thread, with exponential backoff and jitter between attempts.

    A fresh client per attempt means no half-remembered in-flight state survives a drop: whoever owns
    durable state (the outbox) republishes it, and message ids of a dead connection can never be
    confused with those of the live one (each callback carries its connection number).
    """

    def __init__(
        self,
        cfg: MqttConfig,
        client_id: str,
        *,
        prepare: Callable[[mqtt.Client, int], None] | None = None,
        on_up: Callable[[mqtt.Client, int], None] | None = None,
        on_down: Callable[[int, str], None] | None = None,
        on_message: Callable[[mqtt.MQTTMessage], None] | None = None,
        on_ack: Callable[[int, int, bool], None] | None = None,
        rng: random.Random | None = None,
        name: str = "mqtt",
    ) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self._prepare = prepare
        self._on_up = on_up
        self._on_down = on_down
        self._on_message = on_message
        self._on_ack = on_ack
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._client: mqtt.Client | None = None
        self._before_close: Callable[[mqtt.Client], mqtt.MQTTMessageInfo | None] | None = None
        self.connection_no = 0
        self.connected = threading.Event()
        self.attempts = 0
        self.last_error = ""

    def start(self) -> None:
        self._thread.start()

    def stop(self, before_close: Callable[[mqtt.Client], mqtt.MQTTMessageInfo | None] | None = None,
             timeout: float = 5.0) -> None:
        """Stop; if connected, ``before_close`` may publish a last message that is flushed first."""
        self._before_close = before_close
        self._stop.set()
        self._thread.join(timeout)

    @property
    def client(self) -> mqtt.Client | None:
        return self._client if self.connected.is_set() else None

    def backoff(self, attempt: int) -> float:
        return backoff_delay(attempt, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s, self._rng)

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            no = self.connection_no + 1
            ok = self._session(no)
            if self._stop.is_set():
                break
            attempt = 0 if ok else attempt + 1
            self._stop.wait(self.backoff(attempt))

    def _session(self, no: int) -> bool:
        """Connect once and serve the link until it drops; True if it was ever up."""
        client = make_client(self.cfg, self.client_id)
        state = {"up": False, "failed": False}

        def on_connect(c, _u, _flags, rc, _props):  # type: ignore[no-untyped-def]
            if rc.is_failure:
                state["failed"] = True
                self.last_error = f"connection refused: {rc}"
                log.warning("%s: %s", self.client_id, self.last_error)
                return
            state["up"] = True
            self.connection_no = no
            self._client = c
            self.connected.set()
            log.info("%s: connected to %s:%d (connection %d)", self.client_id, self.cfg.host, self.cfg.port, no)
            if self._on_up:
                self._on_up(c, no)

        def on_publish(_c, _u, mid, rc, _props):  # type: ignore[no-untyped-def]
            if self._on_ack:
                self._on_ack(no, mid, not rc.is_failure)

        def on_message(_c, _u, msg):  # type: ignore[no-untyped-def]
            if self._on_message:
                self._on_message(msg)

        client.on_connect = on_connect
        client.on_publish = on_publish
        client.on_message = on_message
        if self._prepare:
            self._prepare(client, no)
        self.attempts += 1
        try:
            connect(client, self.cfg)
        except (OSError, ValueError, ssl.SSLError) as e:
            self.last_error = f"connect to {self.cfg.host}:{self.cfg.port} failed: {e}"
            log.info("%s: %s", self.client_id, self.last_error)
            return False
        deadline = time.monotonic() + self.cfg.connect_timeout_s
        reason = "stopped"
        while not self._stop.is_set():
            rc = client.loop(timeout=0.05)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                reason = f"link lost ({mqtt.error_string(rc)})"
                break
            if state["failed"] or (not state["up"] and time.monotonic() > deadline):
                reason = self.last_error or "no CONNACK in time"
                break
        if self._stop.is_set() and state["up"]:
            self._close_gracefully(client)
        else:
            client.disconnect()
        was_up = bool(state["up"])
        if was_up:
            self.connected.clear()
            self._client = None
            log.info("%s: disconnected (connection %d): %s", self.client_id, no, reason)
            if self._on_down:
                self._on_down(no, reason)
        return was_up

    def _close_gracefully(self, client: mqtt.Client) -> None:
        info = self._before_close(client) if self._before_close else None
        deadline = time.monotonic() + 2.0
        while info is not None and not info.is_published() and time.monotonic() < deadline:
            if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                break
        client.disconnect()
        for _ in range(3):
            client.loop(timeout=0.02)
