"""Where reader payloads come in: an in-store MQTT broker the readers publish to, and HTTP POST.

Both hand raw bytes to one bounded intake queue drained by a single worker, so a burst from one
reader never blocks the network threads and the engines see one ordered stream.

While the disk refuses writes the worker holds the payload it has and tries it again (the pipeline
has rolled back), so the queue fills behind it: MQTT deliveries then wait up to a second for room (the
broker keeps queuing meanwhile) before they are dropped and counted (``rfid.intake_dropped``), and HTTP
readers are told 503 with ``Retry-After``. When space comes back the worker resumes by itself.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import paho.mqtt.client as mqtt

from ..config import MqttConfig, ReaderHttpConfig, ReaderMqttConfig
from ..httpbody import read_body
from ..supervise import SupervisedThread
from ..sync.diskstate import WriteFailed, until_written
from ..sync.mqtt_client import Connection
from .pipeline import RfidPipeline

log = logging.getLogger(__name__)

MAX_PAYLOAD = 8 * 1024 * 1024
RETRY_AFTER_S = 2  # what a reader told 503 is asked to wait


class ReaderIntake:
    def __init__(self, pipeline: RfidPipeline, maxsize: int, tick_s: float) -> None:
        self.pipeline = pipeline
        self.tick_s = tick_s
        self._q: queue.Queue[tuple[bytes, str, str | None] | None] = queue.Queue(maxsize=maxsize)
        self._stop = threading.Event()
        self._worker = SupervisedThread("rfid-intake", self._work)
        self._ticker = SupervisedThread("rfid-tick", self._tick)
        self.supervised = [self._worker, self._ticker]
        self.dropped = 0
        self._dropping = False  # logged once when dropping starts, once when it ends

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

    def submit(self, payload: bytes, source: str, reader: str | None = None, timeout: float = 0.0) -> bool:
        item = (payload, source, reader)
        try:
            self._q.put(item, timeout=timeout) if timeout else self._q.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if not self._dropping:
                self._dropping = True
                log.warning("RFID intake full (%s): dropping payloads until it has room; counted in "
                            "rfid.intake_dropped", "the disk refuses writes" if self.writes_failing else "busy")
            return False
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
        mcfg = MqttConfig(host=cfg.host, port=cfg.port, username=cfg.username, password=cfg.password)
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


class HttpReaderSource:
    def __init__(self, cfg: ReaderHttpConfig, intake: ReaderIntake) -> None:
        self.cfg = cfg
        self.intake = intake
        self.server = ThreadingHTTPServer((cfg.host, cfg.port), _handler(self))
        self.port = self.server.server_address[1]

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, name="rfid-http", daemon=True).start()
        log.info("RFID HTTP intake on http://%s:%d%s", self.cfg.host, self.port, self.cfg.path)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(src: HttpReaderSource) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
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

        def do_POST(self) -> None:
            if self.path.split("?")[0] != src.cfg.path:
                self._reply(404, f"POST reader events to {src.cfg.path}")
                return
            body = read_body(self, MAX_PAYLOAD, self._reply)
            if body is None:
                return
            reader = parse_qs(urlparse(self.path).query).get("reader", [None])[0]
            try:
                if src.intake.writes_failing:
                    # Taken in now, it would only wait in the queue; the reader keeps it better.
                    self._retry_later("the agent's disk refuses writes")
                elif src.intake.submit(body, "rfid.http", reader):
                    self._reply(202, "accepted")
                else:
                    self._retry_later("intake full")
            except OSError as e:
                log.info("RFID HTTP POST from %s: the client went away before its answer (%s)",
                         self.client_address[0], e)

    return Handler
