"""Where reader payloads come in: an in-store MQTT broker the readers publish to, and HTTP POST.

Both hand raw bytes to one bounded intake queue drained by a single worker, so a burst from one
reader never blocks the network threads and the engines see one ordered stream.
"""

from __future__ import annotations

import logging
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import paho.mqtt.client as mqtt

from ..config import MqttConfig, ReaderHttpConfig, ReaderMqttConfig
from ..sync.mqtt_client import Connection
from .pipeline import RfidPipeline

log = logging.getLogger(__name__)

MAX_PAYLOAD = 8 * 1024 * 1024


class ReaderIntake:
    def __init__(self, pipeline: RfidPipeline, maxsize: int, tick_s: float) -> None:
        self.pipeline = pipeline
        self.tick_s = tick_s
        self._q: queue.Queue[tuple[bytes, str, str | None] | None] = queue.Queue(maxsize=maxsize)
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="rfid-intake", daemon=True)
        self._ticker = threading.Thread(target=self._tick, name="rfid-tick", daemon=True)
        self.dropped = 0

    def start(self) -> None:
        self._worker.start()
        self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        self._q.put(None)
        self._worker.join(10)
        self._ticker.join(5)

    def submit(self, payload: bytes, source: str, reader: str | None = None, timeout: float = 0.0) -> bool:
        item = (payload, source, reader)
        try:
            self._q.put(item, timeout=timeout) if timeout else self._q.put_nowait(item)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def _work(self) -> None:
        while (item := self._q.get()) is not None:
            try:
                self.pipeline.ingest(*item)
            except Exception:  # a bug on one payload must not stop RFID for the store
                log.exception("RFID payload from %s failed", item[1])

    def _tick(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.pipeline.tick()
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
        if not self.intake.submit(bytes(msg.payload), "rfid.mqtt", _reader_from_topic(self.cfg.topic, msg.topic),
                                  timeout=1.0):
            log.warning("RFID intake full; dropped a payload from %s", msg.topic)

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
        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("rfid http: " + fmt, *args)

        def _reply(self, code: int, text: str) -> None:
            data = (text + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            if self.path.split("?")[0] != src.cfg.path:
                self._reply(404, f"POST reader events to {src.cfg.path}")
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._reply(411, "Content-Length required")
                return
            if length > MAX_PAYLOAD:
                self._reply(413, f"payload over {MAX_PAYLOAD} bytes")
                return
            body = self.rfile.read(length)
            reader = parse_qs(urlparse(self.path).query).get("reader", [None])[0]
            if src.intake.submit(body, "rfid.http", reader):
                self._reply(202, "accepted")
            else:
                self._reply(503, "intake full; retry")

    return Handler
