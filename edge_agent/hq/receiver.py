"""The reference HQ receiver process: MQTT in, the apply engine, a JSON status API, applied lines out."""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlparse

import paho.mqtt.client as mqtt

from ..authenticity import hq_encoder, uplink_check
from ..clock import Clock, RealClock, parse_rfc3339
from ..config import HqFileConfig
from ..httpbody import read_body
from ..rfid.epcis import document as epcis_document
from ..sync.mqtt_client import Connection
from .applier import Applied, HqApplier, Outgoing
from .store import open_store

log = logging.getLogger(__name__)


class HqReceiver:
    def __init__(
        self,
        cfg: HqFileConfig,
        clock: Clock | None = None,
        on_applied: Callable[[Applied], None] | None = None,
        out: Any = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock or RealClock()
        self.db = open_store(cfg.hq)
        self._out = out if out is not None else sys.stdout
        self._extra_on_applied = on_applied
        self._window: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self.applier = HqApplier(
            self.db,
            self.clock,
            prefix=cfg.mqtt.topic_prefix,
            reorder_window_s=cfg.hq.reorder_window_s,
            resync_retry_s=cfg.hq.resync_retry_s,
            max_seq_jump=cfg.hq.max_seq_jump,
            on_applied=self._applied,
            verify=uplink_check(cfg.hq.signing),
            sign=hq_encoder(cfg.hq.signing),
        )
        self._acked_at = 0.0
        self._hello = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.conn = Connection(
            cfg.mqtt,
            cfg.hq.client_id,
            on_up=self._on_up,
            on_message=self._on_message,
            name="hq-mqtt",
        )
        self._ticker = threading.Thread(target=self._tick_loop, name="hq-ticker", daemon=True)
        self.http: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.conn.start()
        self._ticker.start()
        if self.cfg.hq.http_port:
            self.http = ThreadingHTTPServer((self.cfg.hq.http_host, self.cfg.hq.http_port), _handler(self))
            threading.Thread(target=self.http.serve_forever, name="hq-http", daemon=True).start()
            log.info("HQ status API on http://%s:%d/", self.cfg.hq.http_host, self.http.server_address[1])

    def stop(self) -> None:
        self._stop.set()
        self.conn.stop()
        self._ticker.join(2)
        if self.http:
            self.http.shutdown()
        with self._lock:
            self.db.close()

    # ------------------------------------------------------------ MQTT

    def _on_up(self, client: mqtt.Client, _no: int) -> None:
        client.subscribe(f"{self.cfg.mqtt.topic_prefix}/+/#", qos=1)
        # Tell every store where HQ stands as soon as it is back: what a store published while HQ was
        # away may be lost with the broker's session, and an ack after a silence makes it send again.
        self._hello = True

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        # Applied before paho sends the PUBACK (it acks after this callback returns), so a crash
        # here means redelivery, never loss.
        with self._lock:
            out = self.applier.receive(msg.topic, bytes(msg.payload), retained=bool(msg.retain))
            if time.monotonic() - self._acked_at >= self.cfg.hq.ack_interval_s:
                out += self._take_acks()
        self._send(out)

    def _take_acks(self) -> list[Outgoing]:
        """Acks for the stores whose position moved; called with the lock held, after their commits."""
        self._acked_at = time.monotonic()
        return self.applier.acks()

    def _send(self, out: list[Outgoing]) -> None:
        client = self.conn.client
        for o in out:
            if client is None:
                log.warning("not connected; %s not sent (will retry)", o.topic)
                continue
            client.publish(o.topic, o.payload, qos=1)

    def send_command(self, store: str, name: str, args: dict[str, Any]) -> str:
        with self._lock:
            o = self.applier.issue(store, name, args)
        self._send([o])
        return json.loads(o.payload)["id"]

    def _tick_loop(self) -> None:
        last_print = time.monotonic()
        while not self._stop.wait(0.1):
            try:
                with self._lock:
                    out = self.applier.tick()
                    if self._hello:
                        self._hello = False
                        self.applier.ack_due |= {r[0] for r in self.db.read("SELECT DISTINCT store FROM streams")}
                    out += self._take_acks()
                self._send(out)
                if self.cfg.hq.print_applied and time.monotonic() - last_print >= 1.0:
                    last_print = time.monotonic()
                    self._print_window()
            except Exception:
                log.exception("HQ tick failed")

    # ------------------------------------------------------------ output

    def _applied(self, a: Applied) -> None:
        w = self._window[(a.store, a.stream)]
        w[0] += 1
        w[1] += a.facts
        w[2] += int(a.historical)
        w[3] = a.seq
        if self._extra_on_applied:
            self._extra_on_applied(a)

    def _print_window(self) -> None:
        if not self._window:
            return
        for (store, stream), (msgs, facts, hist, seq) in sorted(self._window.items()):
            print(
                f"hq applied {store} {stream:<20} msgs={msgs:<5} facts={facts:<7} historical={hist:<5} last_seq={seq}",
                file=self._out,
                flush=True,
            )
        self._window.clear()

    def state(self) -> dict[str, Any]:
        now = self.clock.now()
        with self._lock:
            streams = self.db.stream_stats()
            status = {r[0]: {"state": r[1], "boot_id": r[2], "connection": r[3], "instance": r[4],
                             "identity_conflicts": r[5]}
                      for r in self.db.read(
                          "SELECT store, state, boot_id, connection, instance, identity_conflicts FROM status")}
            stores = sorted({s["store"] for s in streams} | set(status))
            snapshots = [
                dict(zip(("store", "snapshot_id", "as_of_seq", "outcome", "mismatches"), r, strict=True))
                for r in self.db.read(
                    "SELECT store, snapshot_id, as_of_seq, outcome, mismatches FROM snapshots ORDER BY applied_at"
                )
            ]
            alerts = self.db.alerts()
        for s in streams:
            s["lag_s"] = round(now - s["last_ts"], 3) if s["last_ts"] else None
            s["behind"] = max(0, s["hwm"] - s["last_seq"])  # sealed at the store, not yet applied here
        return {"stores": stores, "status": status, "streams": streams, "snapshots": snapshots,
                "alerts": alerts, "rejected": self.applier.figures.rejected,
                "connected": self.conn.connected.is_set()}


def _handler(rx: HqReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("http: " + fmt, *args)

        def _send(self, code: int, data: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _json(self, code: int, body: Any) -> None:
            self._send(code, json.dumps(body, default=str).encode(), "application/json")

        def do_GET(self) -> None:
            url = urlparse(self.path)
            q = parse_qs(url.query)
            if url.path in ("/", "/state"):
                self._json(200, rx.state())
            elif url.path == "/healthz":
                self._json(200 if rx.conn.connected.is_set() else 503, {"connected": rx.conn.connected.is_set()})
            elif url.path == "/inventory" and "store" in q:
                with rx._lock:
                    inv = rx.db.inventory(q["store"][0])
                self._json(200, [{"zone": z, "gtin": g, "qty": n} for (z, g), n in sorted(inv.items())])
            elif url.path == "/dashboard":
                page = resources.files("edge_agent.hq").joinpath("dashboard.html").read_bytes()
                self._send(200, page, "text/html; charset=utf-8")
            elif url.path == "/traffic" and "store" in q:
                with rx._lock:
                    traffic = rx.db.traffic(q["store"][0])
                self._json(200, traffic)
            elif url.path == "/epcis" and "store" in q:  # an EPCISDocument: ?store=S001[&from=T][&to=T]
                try:
                    since = parse_rfc3339(q["from"][0]) if "from" in q else 0.0
                    until = parse_rfc3339(q["to"][0]) if "to" in q else math.inf
                except ValueError as e:
                    self._json(400, {"error": f"bad from/to (RFC 3339 times): {e}"})
                    return
                with rx._lock:
                    events = rx.db.epcis_events(q["store"][0], since, until)
                self._json(200, epcis_document(events, time.time()))
            elif url.path == "/labels" and "store" in q:
                with rx._lock:
                    labels = rx.db.labels(q["store"][0])
                judged = [lb["matches_hq"] for lb in labels if lb.get("matches_hq") is not None]
                self._json(200, {"labels": labels, "showing_hq_price": sum(judged), "with_hq_price": len(judged)})
            else:
                self._json(404, {"error": f"no such resource {url.path}"})

        def do_POST(self) -> None:
            url = urlparse(self.path)
            if url.path != "/cmd":
                self._json(404, {"error": f"no such resource {url.path}"})
                return
            try:
                body = read_body(self, 1 << 20, lambda code, why: self._json(code, {"error": why}))
                if body is None:
                    return
                req = json.loads(body)
                cmd_id = rx.send_command(str(req["store"]), str(req["name"]), dict(req.get("args", {})))
            except (ValueError, KeyError, TypeError) as e:
                self._json(400, {"error": f"bad command request: {e}"})
                return
            self._json(202, {"id": cmd_id})

    return Handler
