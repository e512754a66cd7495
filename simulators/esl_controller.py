"""A simulated OpenEPaperLink access point: the AP's HTTP API over N e-paper labels, with ground truth.

It serves, on 127.0.0.1, the endpoints ``edge_agent.esl.openepaperlink`` uses, in the firmware's shapes
(sources listed there): ``GET /get_db?pos=N`` (pages that end once their JSON passes 5000 bytes, with
``"continu"`` while more remain), ``GET /get_db?mac=MAC`` and ``POST /jsonupload`` (form fields ``mac``, ``json``).
Anything else is a 404, like the firmware's ``onNotFound``.

Labels:

* each wakes every ``checkin_s`` (times a per-label factor 0.9-1.1, at a per-label phase), like a real tag;
* an upload makes the AP hold new content for the label: ``pending`` is 1. At the label's next check-in the
  transfer fails with ``transfer_fail_rate`` (the label stays pending and retries at its next check-in) or
  succeeds: ``hash`` becomes the new content's, as the firmware's ``processXferComplete`` sets it, and
  ``refresh_s`` later the e-paper shows the content and ``pending`` drops to 0. Uploading what a label already shows changes nothing (the firmware's "new image
  is the same as current image");
* ``silent`` labels stopped checking in hours to days ago; ``low_battery`` ones report 2100-2399 mV;
* ``upload_fail_rate``: ``/jsonupload`` answers 409 "come back later", as the firmware does while busy.

``hash`` stands in for the AP's hash of the rendered image: the first 8 bytes of the md5 of the uploaded
``json`` field, zero-padded to 16 bytes as ``processXferComplete`` stores it.

Time only moves when the clock does: every request (and ``tick()``) first processes the check-ins up to
``clock.now()``. ``lastseen`` is computed from each label's phase and period, so only labels with pending
content cost work; a simulated day of 1,000 labels is as fast as the requests made in it.

Ground truth: ``displayed(mac)`` is what the label's e-paper physically shows, decoded with the adapter's own
``parse_template``. ``inject_garbage`` makes the next ``/get_db`` answers bad JSON, odd records or absurd
values; ``stats()`` counts uploads, transfers and failures.

CLI::

    python -m simulators.esl_controller --labels 1000 --port 0 --speed 60 --seed 1

prints the AP's URL, serves until SIGINT/SIGTERM, then prints the counters as JSON on stderr.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import heapq
import json
import math
import random
import re
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, cast
from urllib.parse import parse_qs, urlsplit

from edge_agent.clock import Clock, RealClock
from edge_agent.esl.controller import LabelContent
from edge_agent.esl.openepaperlink import parse_template, render_template

__all__ = ["GARBAGE_KINDS", "ApStats", "GarbageKind", "ScaledClock", "SimulatedAccessPoint", "label_macs", "main"]

GarbageKind = Literal["bad_json", "odd_records", "absurd_values"]
GARBAGE_KINDS: tuple[GarbageKind, ...] = ("bad_json", "odd_records", "absurd_values")

PAGE_BYTES = 5000  # tagDBtoJson: a page ends once its JSON is longer than this
ZERO_HASH = "0" * 32  # what the AP reports for a tag it holds no content for
HW_TYPE = 0x01  # tagtypes/01.json: ST-GR29000, 296x128, the layout render_template draws for
CHANNEL = 11
TAG_FW = 30
LOW_BATTERY_MV = (2100, 2399)
GOOD_BATTERY_MV = (2600, 3100)
_MAC = re.compile(r"[0-9A-Fa-f]{12}|[0-9A-Fa-f]{16}")
_ATOI = re.compile(r"\s*([+-]?\d+)")
_CHECKIN, _REDRAWN = 0, 1


def label_macs(labels: int, seed: int | str = 0) -> list[str]:
    """The MACs a simulator with this many labels and this seed has, in order (to set up tests before it)."""
    rng = random.Random(f"{seed}:macs")
    macs: dict[str, None] = {}
    while len(macs) < labels:
        macs[f"0000{rng.getrandbits(48):012X}"] = None  # 6-byte MACs print as 16 hex digits (mac2hex)
    return list(macs)


def _ap_hash(body: str) -> str:
    return hashlib.md5(body.encode()).hexdigest()[:16] + "0" * 16


def _atoi(s: str) -> int:
    m = _ATOI.match(s)
    return int(m.group(1)) if m else 0


@dataclass
class ApStats:
    uploads: int = 0  # /jsonupload answered 200
    upload_failures: int = 0  # /jsonupload answered 409
    transfers: int = 0  # a label fetched its pending content
    transfer_failures: int = 0  # a label's fetch failed; it stays pending
    redraws: int = 0  # a label finished drawing new content
    db_requests: int = 0  # /get_db answers
    garbage_served: int = 0
    pushes: int = 0  # websocket messages sent
    led_commands: int = 0


@dataclass
class _Tag:
    mac: str
    period: float
    phase: float  # one check-in time; the others are phase + k * period
    silent_since: float | None  # the last check-in of a label that stopped checking in
    battery_mv: int
    rssi: int
    lqi: int
    temperature: int
    body: str | None = None  # the template the AP holds for the label
    hash: str = ZERO_HASH
    pending: int = 0
    content_mode: int = 0
    modecfg: str = ""
    drawing: str | None = None  # the template the label fetched and is drawing
    shown: str | None = None  # what the e-paper shows
    checkin_queued: bool = False
    update_count: int = 0
    update_last: int = 0
    shown_at: float | None = None  # when the e-paper last finished drawing

    def last_checkin(self, t: float) -> float:
        if self.silent_since is not None:
            return self.silent_since
        return self.phase + math.floor((t - self.phase) / self.period) * self.period

    def next_checkin(self, t: float) -> float:
        """The first check-in after ``t`` (a silent label's stays in the past)."""
        nxt = self.last_checkin(t) + self.period
        # t is often itself a check-in time, which float rounding can put a hair before or after
        return nxt + self.period if self.silent_since is None and nxt <= t + 1e-6 else nxt


class ScaledClock:
    """Wall-clock time running ``speed`` times faster from now on (for the CLI)."""

    def __init__(self, speed: float) -> None:
        self._t0 = time.time()
        self._m0 = time.monotonic()
        self.speed = speed

    def now(self) -> float:
        return self._t0 + (time.monotonic() - self._m0) * self.speed


class SimulatedAccessPoint:
    def __init__(
        self,
        labels: int,
        seed: int | str = 0,
        clock: Clock | None = None,
        *,
        checkin_s: float = 40.0,
        refresh_s: float = 4.0,
        transfer_fail_rate: float = 0.0,
        upload_fail_rate: float = 0.0,
        silent: float | Collection[str] = 0.0,
        low_battery: float | Collection[str] = 0.0,
        initial: Mapping[str, LabelContent] | None = None,
        pos_u8: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """``silent`` and ``low_battery``: a fraction of the labels or their MACs (see ``label_macs``).
        ``initial``: what labels show (and the AP holds) at the start, by MAC. ``pos_u8``: read ``pos`` into
        a uint8_t as the firmware does, so listing more than 255 tags wraps round."""
        self.clock: Clock = clock or RealClock()
        self.refresh_s = refresh_s
        self.transfer_fail_rate = transfer_fail_rate
        self.upload_fail_rate = upload_fail_rate
        self.pos_u8 = pos_u8
        self._lock = threading.Lock()
        self._world = random.Random(f"{seed}:world")  # transfers: not shifted by how often clients call
        self._http = random.Random(f"{seed}:http")  # upload refusals and garbage
        self._events: list[tuple[float, int, int, int]] = []  # (time, seq, kind, tag index)
        self._seq = 0
        self._garbage: deque[GarbageKind] = deque()
        self._stats = ApStats()
        self._ws_clients: set[_WsClient] = set()
        self._flashing: dict[str, bool] = {}
        self._ticking = threading.Event()

        macs = label_macs(labels, seed)
        setup = random.Random(f"{seed}:setup")
        silent_set = self._pick(macs, silent, setup, "silent")
        low_set = self._pick(macs, low_battery, setup, "low_battery")
        t0 = self.clock.now()
        self._tags: list[_Tag] = []
        for mac in macs:
            period = checkin_s * setup.uniform(0.9, 1.1)
            self._tags.append(_Tag(
                mac=mac,
                period=period,
                phase=t0 - setup.uniform(0.0, period),
                silent_since=t0 - setup.uniform(3600.0, 3 * 86400.0) if mac in silent_set else None,
                battery_mv=setup.randint(*(LOW_BATTERY_MV if mac in low_set else GOOD_BATTERY_MV)),
                rssi=setup.randint(-85, -45),
                lqi=setup.randint(40, 120),
                temperature=setup.randint(18, 24),
            ))
        self._by_mac = {tag.mac: i for i, tag in enumerate(self._tags)}
        for mac, content in (initial or {}).items():
            tag = self._tags[self._index(mac)]
            self._hold(tag, render_template(content))
            tag.shown, tag.pending, tag.hash = tag.body, 0, _ap_hash(tag.body)

        self._server = _Server((host, port), self)
        self._thread: threading.Thread | None = None
        self.url = f"http://{host}:{self._server.server_address[1]}"

    @staticmethod
    def _pick(macs: list[str], which: float | Collection[str], rng: random.Random, name: str) -> set[str]:
        if isinstance(which, (int, float)):
            return set(rng.sample(macs, round(which * len(macs))))
        unknown = set(which) - set(macs)
        if unknown:
            raise ValueError(f"{name}: unknown MACs {sorted(unknown)}")
        return set(which)

    def _index(self, mac: str) -> int:
        try:
            return self._by_mac[mac]
        except KeyError:
            raise ValueError(f"unknown MAC {mac}") from None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> SimulatedAccessPoint:
        if self._thread is None:
            # A short poll interval: stop() (and every test teardown) waits for it.
            self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="oepl-ap",
                                            daemon=True)
            self._thread.start()
            # Labels check in on their own: on a running clock, process check-ins (and push them) as they
            # happen rather than only when a client asks.
            self._ticking.clear()
            threading.Thread(target=self._tick_loop, name="oepl-ap-tick", daemon=True).start()
        return self

    def _tick_loop(self) -> None:
        while not self._ticking.wait(0.1):
            self.tick()

    def stop(self) -> None:
        """Stop serving and close the port: clients get connection refused, websockets are dropped."""
        self._ticking.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        with self._lock:
            for client in self._ws_clients:
                try:
                    client.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._ws_clients.clear()
        self._server.server_close()

    def __enter__(self) -> SimulatedAccessPoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- ground truth and test hooks

    def macs(self) -> list[str]:
        return [tag.mac for tag in self._tags]

    def displayed(self, mac: str) -> dict[str, Any] | None:
        """What the label's e-paper shows now (LabelContent fields), None if nothing we can read."""
        with self._lock:
            self._advance(self.clock.now())
            shown = self._tags[self._index(mac)].shown
        content = parse_template(shown) if shown is not None else None
        return content.model_dump(mode="json") if content is not None else None

    def shown_at(self, mac: str) -> float | None:
        """When the label finished drawing what it shows (None: since the start)."""
        with self._lock:
            self._advance(self.clock.now())
            return self._tags[self._index(mac)].shown_at

    def silent_macs(self) -> set[str]:
        return {tag.mac for tag in self._tags if tag.silent_since is not None}

    def tick(self) -> None:
        """Process every check-in and redraw up to ``clock.now()``."""
        with self._lock:
            self._advance(self.clock.now())

    def inject_garbage(self, kind: GarbageKind, count: int = 1) -> None:
        """Make the next ``count`` ``/get_db`` answers garbage of this kind."""
        if kind not in GARBAGE_KINDS:
            raise ValueError(f"garbage kind must be one of {GARBAGE_KINDS}")
        with self._lock:
            self._garbage.extend([kind] * count)

    def stats(self) -> ApStats:
        with self._lock:
            return ApStats(**asdict(self._stats))

    # ---------------------------------------------------------------- the labels

    def _schedule(self, t: float, kind: int, tag: _Tag) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, self._by_mac[tag.mac]))

    def _queue_checkin(self, tag: _Tag, after: float) -> None:
        if tag.silent_since is None and not tag.checkin_queued and tag.drawing is None:
            tag.checkin_queued = True
            self._schedule(tag.next_checkin(after), _CHECKIN, tag)

    def _advance(self, now: float) -> None:
        while self._events and self._events[0][0] <= now:
            t, _, kind, i = heapq.heappop(self._events)
            tag = self._tags[i]
            if kind == _CHECKIN:
                self._checkin(tag, t)
            else:
                self._redrawn(tag, t)

    def _checkin(self, tag: _Tag, t: float) -> None:
        tag.checkin_queued = False
        if not tag.pending:
            return
        if self._world.random() < self.transfer_fail_rate:
            self._stats.transfer_failures += 1
            self._queue_checkin(tag, t)
        else:
            self._stats.transfers += 1
            tag.drawing = tag.body
            tag.hash = _ap_hash(tag.body)
            self._schedule(t + self.refresh_s, _REDRAWN, tag)
        self._push(tag, t)

    def _redrawn(self, tag: _Tag, t: float) -> None:
        tag.shown, tag.drawing, tag.shown_at = tag.drawing, None, t
        tag.update_count += 1
        tag.update_last = int(t)
        self._stats.redraws += 1
        if tag.body == tag.shown:
            tag.pending = 0
        else:  # newer content arrived while it was drawing: fetch that at the next check-in
            self._queue_checkin(tag, t)
        self._push(tag, t)

    # ---------------------------------------------------------------- the websocket (/ws)

    def _push(self, tag: _Tag, t: float) -> None:
        """What the firmware's wsSendTaginfo sends when a tag changes: ``tagDBtoJson(mac)``."""
        if not self._ws_clients:
            return
        frame = json.dumps({"tags": [self._record(tag, t)]}, separators=(",", ":")).encode()
        for client in list(self._ws_clients):
            try:
                client.send(0x1, frame)
                self._stats.pushes += 1
            except OSError:
                self._ws_clients.discard(client)

    def _ws_join(self, client: _WsClient) -> None:
        with self._lock:
            self._ws_clients.add(client)

    def _ws_leave(self, client: _WsClient) -> None:
        with self._lock:
            self._ws_clients.discard(client)

    def _hold(self, tag: _Tag, body: str) -> None:
        tag.body, tag.pending = body, 1
        tag.content_mode = 19  # web.cpp doJsonUpload
        tag.modecfg = json.dumps({"filename": f"/current/{tag.mac}.json", "interval": "0"}, separators=(",", ":"))

    # ---------------------------------------------------------------- the HTTP API

    def get_db(self, query: dict[str, list[str]]) -> bytes:
        with self._lock:
            now = self.clock.now()
            self._advance(now)
            self._stats.db_requests += 1
            if "mac" in query:
                mac = query["mac"][0]
                if not _MAC.fullmatch(mac):
                    return b'{"error": "malformatted parameter"}'
                i = self._by_mac.get(mac.upper().rjust(16, "0"))
                records = [] if i is None else [self._record(self._tags[i], now)]
                continu = None
            else:
                pos = _atoi(query.get("pos", ["0"])[0])
                records, continu = self._page(pos % 256 if self.pos_u8 else max(pos, 0), now)
            kind = self._garbage.popleft() if self._garbage else None
            if kind is not None:
                self._stats.garbage_served += 1
                self._spoil(records, kind)
        page: dict[str, Any] = {"tags": records}
        if continu is not None:
            page["continu"] = continu
        body = json.dumps(page, separators=(",", ":")).encode()
        return body[: len(body) // 2] if kind == "bad_json" else body  # cut off, as by a dropped connection

    def _page(self, start: int, now: float) -> tuple[list[dict[str, Any]], int | None]:
        records: list[dict[str, Any]] = []
        size = len('{"tags":[]}')
        for c in range(start, len(self._tags)):
            rec = self._record(self._tags[c], now)
            records.append(rec)
            size += len(json.dumps(rec, separators=(",", ":"))) + (len(records) > 1)
            if size > PAGE_BYTES:
                return records, c + 1
        return records, None

    def _record(self, tag: _Tag, now: float) -> dict[str, Any]:
        return {  # fillNode's fields, in its order
            "mac": tag.mac,
            "hash": tag.hash,
            "lastseen": int(tag.last_checkin(now)),
            "nextupdate": 0,
            "nextcheckin": int(tag.next_checkin(now)),
            "pending": tag.pending,
            "alias": "",
            "contentMode": tag.content_mode,
            "LQI": tag.lqi,
            "RSSI": tag.rssi,
            "temperature": tag.temperature,
            "batteryMv": tag.battery_mv,
            "hwType": HW_TYPE,
            "wakeupReason": 0,
            "capabilities": 0,
            "modecfgjson": tag.modecfg,
            "isexternal": False,
            "apip": "0.0.0.0",
            "rotate": 0,
            "lut": 0,
            "invert": 0,
            "updatecount": tag.update_count,
            "updatelast": tag.update_last,
            "ch": CHANNEL,
            "ver": TAG_FW,
        }

    def _spoil(self, records: list[Any], kind: GarbageKind) -> None:
        """Corrupt the first records of a page; the rest stay valid. Every other record of an odd page gains
        a field no firmware sends, which must be tolerated (newer firmware adds fields)."""
        if kind == "odd_records":
            for i in range(1, len(records), 2):
                records[i]["fieldFromTheFuture"] = {"x": [1, 2]}
            spoilers: list[Any] = [
                lambda r: 42,
                lambda r: {k: v for k, v in r.items() if k != "mac"},
                lambda r: {**r, "mac": "NOT-A-MAC!"},
                lambda r: {**r, "pending": "yes"},
            ]
        elif kind == "absurd_values":
            spoilers = [
                lambda r: {**r, "batteryMv": 900_000},
                lambda r: {**r, "lastseen": 32_503_680_000},  # the year 3000
                lambda r: {**r, "RSSI": 500},
                lambda r: {**r, "LQI": -7},
            ]
        else:
            return
        for i, spoil in enumerate(spoilers[: len(records)]):
            records[i] = spoil(records[i])

    def jsonupload(self, form: dict[str, list[str]]) -> tuple[int, str]:
        with self._lock:
            self._advance(self.clock.now())
            if self._http.random() < self.upload_fail_rate:
                self._stats.upload_failures += 1
                return 409, "come back later"
            if "mac" not in form or "json" not in form:
                return 400, "Missing parameters"
            mac = form["mac"][0]
            if not _MAC.fullmatch(mac):
                return 400, "malformatted mac"  # the firmware sends no answer at all here
            i = self._by_mac.get(mac.upper().rjust(16, "0"))
            if i is None:
                return 400, "mac not found in tagDB"
            tag, body = self._tags[i], form["json"][0]
            self._stats.uploads += 1
            self._hold(tag, body)
            if tag.shown == body and tag.drawing is None:
                tag.pending = 0  # the image the label shows: the firmware does not queue it
            else:
                self._queue_checkin(tag, self.clock.now())
            self._push(tag, self.clock.now())
            return 200, "Ok, saved"

    def tag_cmd(self, form: dict[str, list[str]]) -> tuple[int, str]:
        """``POST /tag_cmd`` (``mac``, ``cmd``): only the LED commands matter here; the rest are accepted."""
        with self._lock:
            if "mac" not in form or "cmd" not in form:
                return 500, "param error"
            i = self._by_mac.get(form["mac"][0].upper().rjust(16, "0"))
            if i is None:
                return 400, "Error: mac not found"
            cmd = form["cmd"][0]
            if cmd.startswith("ledflash"):
                self._flashing[self._tags[i].mac] = cmd != "ledflash_stop"
                self._stats.led_commands += 1
            return 200, "Ok, done"

    def flashing(self, mac: str) -> bool:
        """Whether the label's LED was last told to flash."""
        with self._lock:
            return self._flashing.get(mac, False)


_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3


class _WsClient:
    """One websocket client of the AP's ``/ws``: server-side RFC 6455 framing, just what the AP does
    (text frames out, pings answered, close honoured)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()

    def send(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        head = bytes([0x80 | opcode]) + (bytes([n]) if n < 126 else
                                          bytes([126]) + n.to_bytes(2, "big") if n < 65536 else
                                          bytes([127]) + n.to_bytes(8, "big"))
        with self._lock:
            self.sock.sendall(head + payload)

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("client went away")
            buf += chunk
        return buf

    def serve(self) -> None:
        """Answer the client's frames until it closes or the socket does."""
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = int.from_bytes(self._read(2), "big")
            elif n == 127:
                n = int.from_bytes(self._read(8), "big")
            mask = self._read(4) if b1 & 0x80 else b"\0\0\0\0"
            data = bytes(c ^ mask[i % 4] for i, c in enumerate(self._read(n)))
            if opcode == 0x8:  # close: echo it, as RFC 6455 asks
                self.send(0x8, data[:2])
                return
            if opcode == 0x9:
                self.send(0xA, data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], ap: SimulatedAccessPoint) -> None:
        super().__init__(address, _Handler)
        self.ap = ap


class _Handler(BaseHTTPRequestHandler):

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests and benchmarks make thousands
        pass

    def _answer(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            self._websocket()
            return
        if url.path != "/get_db":
            self._answer(404, b"", "text/plain")
            return
        self._answer(200, cast(_Server, self.server).ap.get_db(parse_qs(url.query)), "application/json")

    def _websocket(self) -> None:
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        self.protocol_version = "HTTP/1.1"  # an upgrade is HTTP/1.1 only
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        client = _WsClient(self.connection)
        ap = cast(_Server, self.server).ap
        ap._ws_join(client)
        try:
            client.serve()
        except OSError:
            pass
        finally:
            ap._ws_leave(client)
            self.close_connection = True

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
        path = urlsplit(self.path).path
        ap = cast(_Server, self.server).ap
        if path == "/jsonupload":
            status, text = ap.jsonupload(form)
        elif path == "/tag_cmd":
            status, text = ap.tag_cmd(form)
        else:
            status, text = 404, ""
        self._answer(status, text.encode(), "text/plain")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulators.esl_controller", description=__doc__.split("\n")[0])
    ap.add_argument("--labels", type=int, default=1000)
    ap.add_argument("--seed", default="1")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument("--speed", type=float, default=1.0, help="simulated seconds per wall-clock second")
    ap.add_argument("--checkin-s", type=float, default=40.0)
    ap.add_argument("--refresh-s", type=float, default=4.0)
    ap.add_argument("--transfer-fail-rate", type=float, default=0.05)
    ap.add_argument("--upload-fail-rate", type=float, default=0.0)
    ap.add_argument("--silent", type=float, default=0.01, help="fraction of labels that never check in")
    ap.add_argument("--low-battery", type=float, default=0.02, help="fraction of labels under 2400 mV")
    args = ap.parse_args(argv)
    sim = SimulatedAccessPoint(
        args.labels, args.seed, ScaledClock(args.speed), checkin_s=args.checkin_s, refresh_s=args.refresh_s,
        transfer_fail_rate=args.transfer_fail_rate, upload_fail_rate=args.upload_fail_rate, silent=args.silent,
        low_battery=args.low_battery, host=args.host, port=args.port,
    ).start()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(sim.url, flush=True)
    done.wait()
    sim.stop()
    print(json.dumps(asdict(sim.stats())), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
