"""The local status server: ``/healthz``, ``/readyz``, ``/metrics``, ``/status.json`` and the page at ``/``.

- ``/healthz``: 200 while the main loop ticks, 503 once it has not for ``status.stale_after_s``.
- ``/readyz``: 200 when the database takes writes, the uplink is connected and no supervised child is
  down; 503 otherwise, with every check and why (JSON).
- ``/metrics``: Prometheus text (metrics.py). ``/status.json``: the snapshot the page and ``edge-agent
  status`` show.
- Bound to 127.0.0.1 by default. With ``status.token`` set (required beyond loopback, see config.py),
  everything but the page itself needs ``Authorization: Bearer <token>``; the page sends it from the
  ``#token=`` part of its address, which never reaches a server or a log.
- Only GETs, no request bodies. A port already taken costs the status server, never the agent: the
  store's data path matters more than its dashboard (the error says so in the log).
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..config import StatusConfig
from .metrics import registry
from .snapshot import StatusSource

log = logging.getLogger(__name__)

SAMPLE_EVERY_S = 1.0


class StatusServer:
    def __init__(self, cfg: StatusConfig, source: StatusSource) -> None:
        self.cfg = cfg
        self.source = source
        self.registry = registry(source.snapshot)
        self.http: ThreadingHTTPServer | None = None
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="status-sampler", daemon=True)

    @property
    def port(self) -> int | None:
        return self.http.server_address[1] if self.http is not None else None

    def start(self) -> None:
        try:
            self.http = ThreadingHTTPServer((self.cfg.host, self.cfg.port), _handler(self))
        except OSError as e:
            log.error("status server not started: cannot listen on %s:%d (%s); the agent runs on without "
                      "/healthz, /readyz, /metrics and the page", self.cfg.host, self.cfg.port, e.strerror or e)
            return
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, name="status-http", daemon=True).start()
        self._sampler.start()
        log.info("status page on http://%s:%d/ (%s)", self.cfg.host, self.port,
                 "token required" if self.cfg.token else "no token")

    def stop(self) -> None:
        self._stop.set()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self._sampler.join(5)

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            try:
                self.source.sample()
            except Exception:
                log.exception("status sample failed")

    def authorised(self, header: str | None) -> bool:
        if self.cfg.token is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                   self.cfg.token.get_secret_value().encode())


def _handler(srv: StatusServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # a client that stops mid-request frees its thread

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("status http: " + fmt, *args)

        def _send(self, code: int, body: bytes, ctype: str, extra: tuple[tuple[str, str], ...] = ()) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in extra:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj: Any) -> None:
            self._send(code, json.dumps(obj, separators=(",", ":")).encode(), "application/json")

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            try:
                if path == "/":
                    page = resources.files("edge_agent.status").joinpath("page.html").read_bytes()
                    self._send(200, page, "text/html; charset=utf-8",
                               (("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; "
                                 "style-src 'unsafe-inline'"),))
                elif path not in ("/healthz", "/readyz", "/metrics", "/status.json"):
                    self._json(404, {"error": "not found: GET /, /healthz, /readyz, /metrics or /status.json"})
                elif not srv.authorised(self.headers.get("Authorization")):
                    self._send(401, b'{"error":"token required"}', "application/json",
                               (("WWW-Authenticate", 'Bearer realm="edge-agent status"'),))
                elif path == "/healthz":
                    alive, age = srv.source.alive()
                    self._json(200 if alive else 503, {"alive": alive, "loop_age_s": round(age, 3)})
                elif path == "/readyz":
                    s = srv.source.snapshot()
                    self._json(200 if s.ready else 503, {"ready": s.ready, "checks": [c.model_dump() for c in s.checks]})
                elif path == "/metrics":
                    self._send(200, generate_latest(srv.registry), CONTENT_TYPE_LATEST)
                else:
                    self._send(200, srv.source.snapshot().model_dump_json().encode(), "application/json")
            except OSError as e:
                log.info("status http: %s from %s: the client went away (%s)", path, self.client_address[0], e)
            except Exception:
                log.exception("status http: %s failed", path)
                self._json(500, {"error": "internal error; see the agent's log"})

    return Handler
