"""Where reader payloads come in: an in-store MQTT broker the readers publish to, and HTTP POST.

Both hand raw bytes to one bounded intake queue drained by a single worker, so a burst from one
reader never blocks the network threads and the engines see one ordered stream.

While the disk refuses writes the worker holds the payload it has and tries it again (the pipeline
has rolled back), so the queue fills behind it: MQTT deliveries then wait up to a second for room (the
broker keeps queuing meanwhile) before they are dropped and counted (``rfid.intake_dropped``), and HTTP
readers are told 503 with ``Retry-After``. When space comes back the worker resumes by itself.

The HTTP intake is reachable from the store LAN, so it takes a payload only from a reader that proves who
it is, and reads no body before that (``rfid.http.tokens``; which readers can send what: README, "Reader
intake authentication"):

- no credentials, or a token that is no reader's: 401, with ``WWW-Authenticate`` challenges for Basic
  (firmware that sends basic auth only when challenged) and Bearer;
- a reader's token with ``?reader=`` naming another reader: 403 (the token's name is the reader's id, and
  what Zebra's events do not say, which reader read them, comes from it); reads in the payload naming
  another reader are quarantined by the pipeline (``only_reader``);
- a ``Content-Type`` other than JSON or NDJSON: 415;
- then the body rules of httpbody.py (411, 400, 413).
On loopback with no tokens configured the intake is open, for tools on the box; bound anywhere else
without tokens it refuses everyone (check-config warns).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import paho.mqtt.client as mqtt

from ..config import MqttConfig, ReaderHttpConfig, ReaderMqttConfig, is_loopback
from ..httpbody import HeadersInTime, read_body, refuse
from ..supervise import SupervisedThread
from ..sync.diskstate import WriteFailed, until_written
from ..sync.mqtt_client import Connection
from ..tokens import credential_owner
from .pipeline import RfidPipeline

log = logging.getLogger(__name__)

MAX_PAYLOAD = 8 * 1024 * 1024
RETRY_AFTER_S = 2  # what a reader told 503 is asked to wait
# What readers POST: a JSON array or object, or NDJSON (formats.py). Compared without parameters (charset).
CONTENT_TYPES = ("application/json", "application/x-ndjson")
CHALLENGES = (("WWW-Authenticate", 'Basic realm="rfid-intake", charset="UTF-8"'),
              ("WWW-Authenticate", 'Bearer realm="rfid-intake"'))


class ReaderIntake:
    def __init__(self, pipeline: RfidPipeline, maxsize: int, tick_s: float) -> None:
        self.pipeline = pipeline
        self.tick_s = tick_s
        # (payload, source, reader hint, the only reader it may speak for): pipeline.ingest's arguments
        self._q: queue.Queue[tuple[bytes, str, str | None, str | None] | None] = queue.Queue(maxsize=maxsize)
        self._stop = threading.Event()
        self._worker = SupervisedThread("rfid-intake", self._work)
        self._ticker = SupervisedThread("rfid-tick", self._tick)
        self.supervised = [self._worker, self._ticker]
        self.dropped = 0
        self._dropping = False  # logged once when dropping starts, once when it ends
        self.tap: Callable[[bytes, str, str | None], None] | None = None  # a recorder: each payload taken in

    def start(self) -> None:
        self._worker.start()
        self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        try:  # behind what is queued, so a normal stop takes it all in; a full disk gives it up
            self._q.put(None, timeout=10)
        except queue.Full:
            pass
        self._worker.join(10)
        self._ticker.join(5)

    @property
    def writes_failing(self) -> bool:
        return self.pipeline.outbox.write_failing

    def submit(self, payload: bytes, source: str, reader: str | None = None, timeout: float = 0.0,
               only_reader: str | None = None) -> bool:
        item = (payload, source, reader, only_reader)
        try:
            self._q.put(item, timeout=timeout) if timeout else self._q.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if not self._dropping:
                self._dropping = True
                log.warning("RFID intake full (%s): dropping payloads until it has room; counted in "
                            "rfid.intake_dropped", "the disk refuses writes" if self.writes_failing else "busy")
            return False
        if self.tap is not None:
            self.tap(payload, source, reader)
        if self._dropping:
            self._dropping = False
            log.info("RFID intake takes payloads again; %d dropped since the agent started", self.dropped)
        return True

    def _work(self) -> None:
        while (item := self._q.get()) is not None:
            try:
                if not until_written(functools.partial(self.pipeline.ingest, *item), self._stop):
                    return  # stopping while the disk refuses writes: what is queued is given up
            except Exception:  # a bug on one payload must not stop RFID for the store
                log.exception("RFID payload from %s failed", item[1])

    def _tick(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.pipeline.tick()
            except WriteFailed:
                pass  # rolled back; the next tick tries again (the outbox logs the episode)
            except Exception:
                log.exception("RFID tick failed")


class MqttReaderSource:
    def __init__(self, cfg: ReaderMqttConfig, intake: ReaderIntake, store: str) -> None:
        self.cfg = cfg
        self.intake = intake
        # The uplink's connection code, so the store broker gets the same TLS and credentials handling.
        mcfg = MqttConfig(host=cfg.host, port=cfg.port, username=cfg.username, password=cfg.password, tls=cfg.tls)
        self.conn = Connection(
            mcfg,
            cfg.client_id or f"edge-agent-{store}-readers",
            on_up=lambda c, _no: c.subscribe(cfg.topic, qos=1),
            on_message=self._on_message,
            name="rfid-mqtt",
        )

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        # Blocking briefly pushes back on the broker (it keeps queuing) rather than losing reads.
        self.intake.submit(bytes(msg.payload), "rfid.mqtt", _reader_from_topic(self.cfg.topic, msg.topic), timeout=1.0)

    def start(self) -> None:
        self.conn.start()

    def stop(self) -> None:
        self.conn.stop()


def _reader_from_topic(pattern: str, topic: str) -> str | None:
    """The topic level matched by the pattern's single-level wildcard, e.g. readers/+/events -> r1."""
    levels = pattern.split("/")
    if "+" not in levels:
        return None
    parts = topic.split("/")
    i = levels.index("+")
    return parts[i] if i < len(parts) else None


def needs_token(cfg: ReaderHttpConfig) -> bool:
    """Tokens configured, or bound where the store LAN reaches it."""
    return bool(cfg.tokens) or not is_loopback(cfg.host)


class HttpReaderSource:
    def __init__(self, cfg: ReaderHttpConfig, intake: ReaderIntake) -> None:
        self.cfg = cfg
        self.intake = intake
        self.auth_required = needs_token(cfg)
        self.server = ThreadingHTTPServer((cfg.host, cfg.port), _handler(self))
        self.port = self.server.server_address[1]

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, name="rfid-http", daemon=True).start()
        log.info("RFID HTTP intake on http://%s:%d%s", self.cfg.host, self.port, self.cfg.path)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(src: HttpReaderSource) -> type[BaseHTTPRequestHandler]:
    class Handler(HeadersInTime):
        timeout = 10  # a client that stops mid-request frees its thread

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("rfid http: " + fmt, *args)

        def _reply(self, code: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
            data = (text + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _retry_later(self, why: str) -> None:
            self._reply(503, f"{why}; retry", (("Retry-After", str(RETRY_AFTER_S)),))

        def _refuse(self, status: int, why: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
            refuse(self, status, why, lambda code, text: self._reply(code, text, headers))

        def do_POST(self) -> None:
            if self.path.split("?")[0] != src.cfg.path:
                self._reply(404, f"POST reader events to {src.cfg.path}")
                return
            reader = parse_qs(urlparse(self.path).query).get("reader", [None])[0]
            owner = None
            if src.auth_required:
                owner = credential_owner(self.headers.get("Authorization"), src.cfg.tokens)
                if owner is None:
                    self._refuse(401, "a reader token is required: Authorization: Bearer <token>, or basic auth "
                                 "with the reader's name and its token", CHALLENGES)
                    return
                if reader is not None and reader != owner:
                    self._refuse(403, f"this token is reader {owner}'s, not {reader[:64]}'s")
                    return
                reader = owner
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if content_type not in CONTENT_TYPES:
                self._refuse(415, f"Content-Type must be one of {', '.join(CONTENT_TYPES)}",
                             (("Accept-Post", ", ".join(CONTENT_TYPES)),))
                return
            body = read_body(self, MAX_PAYLOAD, self._reply)
            if body is None:
                return
            try:
                if src.intake.writes_failing:
                    # Taken in now, it would only wait in the queue; the reader keeps it better.
                    self._retry_later("the agent's disk refuses writes")
                elif src.intake.submit(body, "rfid.http", reader, only_reader=owner):
                    self._reply(202, "accepted")
                else:
                    self._retry_later("intake full")
            except OSError as e:
                log.info("RFID HTTP POST from %s: the client went away before its answer (%s)",
                         self.client_address[0], e)

    return Handler
