"""A simulated OpenEPaperLink access point: the AP's HTTP API over N e-paper labels, with ground truth.

It serves, on 127.0.0.1, the endpoints ``edge_agent.esl.openepaperlink`` uses, in the firmware's shapes
(sources listed there): ``GET /get_db?pos=N``, ``GET /get_db?mac=MAC``, ``POST /jsonupload`` (form fields
``mac``, ``json``), ``POST /tag_cmd`` and the ``/ws`` websocket. Anything else is a 404, like the firmware's
``onNotFound``.

The labels follow the firmware's paths (``ESP32_AP-Flasher/src/newproto.cpp``, ``web.cpp``, ``tag_db.cpp`` of
OpenEPaperLink), including the ones that change a tag's hash for reasons other than new content:

* each wakes every ``checkin_s`` (times a per-label factor 0.9-1.1, at a per-label phase), like a real tag;
* an upload stores the template; ``render_s`` later the AP has drawn it and queued the image, unless its md5
  is the tag's hash already; a new image replaces images already queued (``queueDataAvail``). ``pending`` is
  the queue's length;
* at a check-in the label fetches the first queued item: the fetch fails (``transfer_fail_rate``, retried at
  the next check-in), times out (``timeout_rate``: ``processXferTimeout`` drops the whole queue and leaves the
  hash) or succeeds: ``refresh_s`` later the e-paper shows the image and the tag reports the transfer
  complete (``processXferComplete``): the hash becomes the first queued item's (8 bytes of its md5 or of a
  command's payload, zero-padded), ``updatecount`` goes up and that item leaves the queue;
* ``/tag_cmd``: ``refresh`` zeroes the hash and has the template drawn again (``updateContent``); the LED
  commands queue a command whose payload becomes the hash once the tag has run it;
* a label reboots (``reboot_tag``, or ``reboots_per_day`` on its own): it checks in with wakeup reason 0xFC and
  shows its boot screen; with nothing queued the AP zeroes its hash and draws its template again;
* ``reboot_ap``: the pending queue (RAM) is lost, the hashes (saved database) are not, and until NTP sets the
  clock again the AP stamps seconds since its boot;
* ``/get_db`` pages are built in ArduinoJson 6's 5,000-byte pool (``json_pool``): about 8 records a page, and a
  record that does not fit loses its trailing fields (``"continu"`` too);
* a MAC ``hex2mac`` refuses on ``/jsonupload`` or ``/tag_cmd`` gets no HTTP answer at all;
* ``silent`` labels stopped checking in hours to days ago; ``never_seen`` ones are in the database but were
  never heard (``lastseen``, ``RSSI``, ``LQI``, ``batteryMv`` all 0); ``low_battery`` ones report 2100-2399 mV;
* ``upload_fail_rate``: ``/jsonupload`` answers 409 "come back later", as the firmware does while busy.

``hash`` stands in for the AP's hash of the rendered image: the first 8 bytes of the md5 of the uploaded
``json`` field, zero-padded to 16 bytes as ``processXferComplete`` stores it.

Time only moves when the clock does: every request (and ``tick()``) first processes the events up to
``clock.now()``. ``lastseen`` is computed from each label's phase and period, so only labels with something
queued cost work; a simulated day of 1,000 labels is as fast as the requests made in it.

Ground truth: ``displayed(mac)`` is what the label's e-paper physically shows, decoded with the adapter's own
``parse_template`` (None for a boot screen). ``inject_garbage`` makes the next ``/get_db`` answers bad JSON,
odd records or absurd values; ``stats()`` counts uploads, transfers, reboots and failures.

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
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, cast
from urllib.parse import parse_qs, urlsplit

from edge_agent.clock import Clock, RealClock
from edge_agent.esl.controller import LabelContent
from edge_agent.esl.openepaperlink import parse_template, render_template

__all__ = ["GARBAGE_KINDS", "ApStats", "GarbageKind", "ScaledClock", "SimulatedAccessPoint", "label_macs", "main"]

GarbageKind = Literal["bad_json", "odd_records", "absurd_values"]
GARBAGE_KINDS: tuple[GarbageKind, ...] = ("bad_json", "odd_records", "absurd_values")

PAGE_BYTES = 5000  # tagDBtoJson (ArduinoJson 7 firmware): a page ends once its JSON is longer than this
POOL_BYTES = 5000  # tagDBtoJson (ArduinoJson 6 firmware): DynamicJsonDocument doc(5000)
SLOT = 16  # bytes of one ArduinoJson 6 variant slot on the ESP32 (32-bit, double-precision floats)
QUEUE_NEXT_S = 5.0  # checkQueue: nextCheckIn = 5 | 0x8000 (seconds) while more is queued for the tag
NO_ANSWER_S = 60.0  # how long an unanswered request is held open (the client times out first)
BOOT_SCREEN = "<the tag's boot screen>"
WAKEUP_BOOT = 0xE0  # processDataReq: reasons from here up are boots
WAKEUP_FIRSTBOOT = 0xFC
# web.cpp /tag_cmd: the first 8 bytes of each LED command's struct ledFlash, which become dataVer:
# ledflash: mode 1 | flashDuration 8 << 4, green 0x3C x3 speed 1 delay 10, red 0xE4 x3 speed 5, blue 0x03
# ledflash_long: mode 1 | duration 1 << 4, red 0xE4 x3 speed 3 delay 50; ledflash_stop: mode 0, all zero.
COMMAND_PAYLOADS = {"ledflash": "813c130ae4530a03", "ledflash_long": "11e4333200000000",
                    "ledflash_stop": "0" * 16}
ZERO_HASH = "0" * 32  # what the AP reports for a tag it holds no content for
HW_TYPE = 0x01  # tagtypes/01.json: ST-GR29000, 296x128, the layout render_template draws for
CHANNEL = 11
TAG_FW = 30
LOW_BATTERY_MV = (2100, 2399)
GOOD_BATTERY_MV = (2600, 3100)
_MAC = re.compile(r"[0-9A-Fa-f]{12}|[0-9A-Fa-f]{16}")
_ATOI = re.compile(r"\s*([+-]?\d+)")
_CHECKIN, _DONE, _RENDER, _BOOT = 0, 1, 2, 3


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
    unanswered: int = 0  # requests left without an answer (a MAC hex2mac refuses)
    renders: int = 0  # templates the AP drew into an image and queued
    transfers: int = 0  # a label fetched a queued item (image or command)
    transfer_failures: int = 0  # a label's fetch failed; the item stays queued
    transfer_timeouts: int = 0  # processXferTimeout: the AP gave up and dropped the label's queue
    redraws: int = 0  # a label finished drawing new content
    tag_reboots: int = 0
    refreshes: int = 0  # /tag_cmd refresh (updateContent)
    ap_reboots: int = 0
    commands_done: int = 0  # tag commands (LED flashes) completed: their payload became the hash
    db_requests: int = 0  # /get_db answers
    cut_records: int = 0  # records that lost fields to the page's JSON pool
    garbage_served: int = 0
    pushes: int = 0  # websocket messages sent
    led_commands: int = 0


@dataclass
class _Item:
    """One entry of the AP's pending queue for a tag (newproto.cpp ``PendingItem``)."""

    kind: Literal["image", "command"]
    hash: str  # what processXferComplete puts in the tag's hash: dataVer, zero-padded
    body: str | None = None  # an image's template
    command: str | None = None


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
    alias: str = ""
    never_seen: bool = False  # in the AP's database but never heard: lastseen, RSSI, LQI and battery all 0
    body: str | None = None  # the template the AP holds for the label (/current/<mac>.json)
    hash: str = ZERO_HASH
    queue: list[_Item] = field(default_factory=list)
    content_mode: int = 0
    modecfg: str = ""
    wakeup: int = 0  # wakeupReason of the last check-in; processXferComplete resets it
    drawing: _Item | None = None  # the item the label fetched and is drawing (or running)
    shown: str | None = None  # what the e-paper shows (BOOT_SCREEN after a reboot)
    checkin_queued: bool = False
    render_queued: bool = False
    update_count: int = 0
    update_last: int = 0
    clock_unset_seen: int | None = None  # the lastseen an unset AP clock gave the last check-in
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
        render_s: float = 0.0,
        transfer_fail_rate: float = 0.0,
        timeout_rate: float = 0.0,
        upload_fail_rate: float = 0.0,
        reboots_per_day: float = 0.0,
        silent: float | Collection[str] = 0.0,
        never_seen: float | Collection[str] = 0.0,
        low_battery: float | Collection[str] = 0.0,
        aliases: Mapping[str, str] | None = None,
        initial: Mapping[str, LabelContent] | None = None,
        pos_u8: bool = False,
        json_pool: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """``silent``, ``never_seen`` and ``low_battery``: a fraction of the labels or their MACs (see
        ``label_macs``). ``render_s``: how long after an upload (or a refresh) the AP's content manager has the
        template drawn and queued. ``transfer_fail_rate``: a fetch that fails and is retried at the next
        check-in; ``timeout_rate``: one after which the AP gives up and drops the label's queue
        (``processXferTimeout``). ``reboots_per_day``: how often each label restarts on its own (battery
        contact, watchdog). ``initial``: what labels show (and the AP holds) at the start, by MAC. ``pos_u8``:
        read ``pos`` into a uint8_t as the firmware does. ``json_pool``: build ``/get_db`` pages in a 5,000-byte
        ArduinoJson 6 pool as the firmware does (False: the newer firmware's 5,000 serialized bytes)."""
        self.clock: Clock = clock or RealClock()
        self.refresh_s = refresh_s
        self.render_s = render_s
        self.transfer_fail_rate = transfer_fail_rate
        self.timeout_rate = timeout_rate
        self.upload_fail_rate = upload_fail_rate
        self.reboots_per_day = reboots_per_day
        self.pos_u8 = pos_u8
        self.json_pool = json_pool
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
        self._closing = threading.Event()
        self._booted_at = -math.inf  # the AP's last restart ...
        self._clock_set_at = -math.inf  # ... and when its clock was set again (NTP) after it

        macs = label_macs(labels, seed)
        setup = random.Random(f"{seed}:setup")
        silent_set = self._pick(macs, silent, setup, "silent")
        unseen_set = self._pick(macs, never_seen, setup, "never_seen")
        low_set = self._pick(macs, low_battery, setup, "low_battery")
        t0 = self.clock.now()
        self._tags: list[_Tag] = []
        for mac in macs:
            period = checkin_s * setup.uniform(0.9, 1.1)
            quiet = mac in silent_set or mac in unseen_set
            self._tags.append(_Tag(
                mac=mac,
                period=period,
                phase=t0 - setup.uniform(0.0, period),
                silent_since=t0 - setup.uniform(3600.0, 3 * 86400.0) if quiet else None,
                battery_mv=setup.randint(*(LOW_BATTERY_MV if mac in low_set else GOOD_BATTERY_MV)),
                rssi=setup.randint(-85, -45),
                lqi=setup.randint(40, 120),
                temperature=setup.randint(18, 24),
                alias=(aliases or {}).get(mac, ""),
                never_seen=mac in unseen_set,
            ))
        self._by_mac = {tag.mac: i for i, tag in enumerate(self._tags)}
        for mac, content in (initial or {}).items():
            tag = self._tags[self._index(mac)]
            self._store_template(tag, render_template(content))
            tag.shown, tag.hash = tag.body, _ap_hash(tag.body or "")
        if reboots_per_day > 0:
            for tag in self._tags:
                if tag.silent_since is None:
                    self._schedule(t0 + self._world.expovariate(reboots_per_day / 86400.0), _BOOT, tag)

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
            self._closing.clear()
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
        self._closing.set()
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
        """What the label's e-paper shows now (LabelContent fields), None if nothing we can read (nothing
        yet, someone else's image, or the tag's boot screen)."""
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

    def reboot_tag(self, mac: str) -> None:
        """The label restarts now (a battery swap, a watchdog) and checks in with a boot reason."""
        with self._lock:
            now = self.clock.now()
            self._advance(now)
            tag = self._tags[self._index(mac)]
            self._heard(tag, now, WAKEUP_FIRSTBOOT)
            self._push(tag, now)

    def reboot_ap(self, clock_unset_s: float = 0.0) -> None:
        """The AP restarts now: its pending queue is in RAM and gone (``loadDB`` sets every ``pendingCount`` to
        0, hashes and counts come back from the saved database), and for ``clock_unset_s`` its clock runs from
        1970 until NTP sets it, so what it stamps meanwhile is seconds since its boot."""
        with self._lock:
            now = self.clock.now()
            self._advance(now)
            self._stats.ap_reboots += 1
            self._booted_at, self._clock_set_at = now, now + clock_unset_s
            for tag in self._tags:
                tag.queue.clear()
                tag.render_queued = False

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
        if tag.silent_since is None and not tag.checkin_queued and tag.drawing is None and tag.queue:
            tag.checkin_queued = True
            self._schedule(tag.next_checkin(after), _CHECKIN, tag)

    def _queue_render(self, tag: _Tag, t: float) -> None:
        """``nextupdate = 0``: the content manager draws the tag's template again soon."""
        if tag.body is None or tag.render_queued:
            return
        if self.render_s > 0:
            tag.render_queued = True
            self._schedule(t + self.render_s, _RENDER, tag)
        else:
            self._render(tag, t)

    def _advance(self, now: float) -> None:
        while self._events and self._events[0][0] <= now:
            t, _, kind, i = heapq.heappop(self._events)
            tag = self._tags[i]
            if kind == _CHECKIN:
                tag.checkin_queued = False
                self._heard(tag, t, 0)
            elif kind == _DONE:
                self._xfer_complete(tag, t)
            elif kind == _RENDER:
                if tag.render_queued:  # an AP reboot forgets what it was about to draw
                    tag.render_queued = False
                    self._render(tag, t)
            else:  # _BOOT
                self._heard(tag, t, WAKEUP_FIRSTBOOT)
                self._schedule(t + self._world.expovariate(self.reboots_per_day / 86400.0), _BOOT, tag)
            self._push(tag, t)

    def _render(self, tag: _Tag, t: float) -> None:
        """contentmanager.cpp draws the template and prepareDataAvail queues the image, unless its md5 is the
        tag's current hash ("new image is the same as current image"); queueDataAvail drops the images
        already queued for the tag (commands stay)."""
        item = _Item("image", _ap_hash(tag.body or ""), body=tag.body)
        if item.hash[:16] == tag.hash[:16]:
            return
        self._stats.renders += 1
        tag.queue = [q for q in tag.queue if q.kind != "image"] + [item]
        self._queue_checkin(tag, t)

    def _heard(self, tag: _Tag, t: float, wakeup: int) -> None:
        """processDataReq: the tag checks in. A boot (reason 0xE0 and up) with nothing queued zeroes the hash
        and has the template drawn again; the tag's boot screen replaces what its e-paper showed."""
        tag.wakeup = wakeup
        tag.never_seen = False
        if wakeup >= WAKEUP_BOOT:
            self._stats.tag_reboots += 1
            tag.shown, tag.shown_at, tag.drawing = BOOT_SCREEN, t, None
            if not tag.queue:
                tag.hash = ZERO_HASH
                self._queue_render(tag, t)
        if not tag.queue or tag.drawing is not None:
            return
        roll = self._world.random()
        if roll < self.timeout_rate:  # processXferTimeout: the AP drops the whole queue, the hash stays
            self._stats.transfer_timeouts += 1
            tag.queue.clear()
        elif roll < self.timeout_rate + self.transfer_fail_rate:
            self._stats.transfer_failures += 1
            self._queue_checkin(tag, t)
        else:
            self._stats.transfers += 1
            tag.drawing = tag.queue[0]
            self._schedule(t + (self.refresh_s if tag.drawing.kind == "image" else 0.0), _DONE, tag)

    def _xfer_complete(self, tag: _Tag, t: float) -> None:
        """processXferComplete, which the tag sends once it has drawn the image (or run the command): the hash
        becomes the *first queued item's* dataVer (usually the one transferred; a newer image queued meanwhile
        takes its place, as in the firmware) and that item is dequeued."""
        item = tag.drawing
        if item is None:  # the tag rebooted while drawing
            return
        tag.drawing = None
        if item.kind == "image":
            tag.shown, tag.shown_at = item.body, t
            self._stats.redraws += 1
        else:
            self._stats.commands_done += 1
            if item.command is not None and item.command.startswith("ledflash"):
                self._flashing[tag.mac] = item.command != "ledflash_stop"
        tag.hash = (tag.queue[0] if tag.queue else item).hash
        if tag.queue:
            tag.queue.pop(0)
        tag.update_count += 1
        tag.update_last = self._ap_time(t)
        tag.wakeup = 0
        if tag.queue and tag.silent_since is None:  # checkQueue: with more queued, the tag is told to be back in 5 s
            tag.checkin_queued = True
            self._schedule(t + QUEUE_NEXT_S, _CHECKIN, tag)

    def _ap_time(self, t: float) -> int:
        """What the AP's time() says for the moment ``t``."""
        return int(t - self._booted_at) if self._booted_at <= t < self._clock_set_at else int(t)

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

    def _store_template(self, tag: _Tag, body: str) -> None:
        tag.body = body
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
        if not self.json_pool:  # newer firmware (ArduinoJson 7): measureJson(doc) > 5000 ends a page
            records: list[dict[str, Any]] = []
            size = len('{"tags":[]}')
            for c in range(start, len(self._tags)):
                rec = self._record(self._tags[c], now)
                records.append(rec)
                size += len(json.dumps(rec, separators=(",", ":"))) + (len(records) > 1)
                if size > PAGE_BYTES:
                    return records, c + 1
            return records, None
        # ArduinoJson 6: DynamicJsonDocument doc(5000). A member takes a slot, a String value a copy of itself;
        # what does not fit is left out silently. The page ends when what is left is less than an average
        # record (the firmware divides by the record's index, not by the page's count) plus 500 bytes.
        records = []
        used = SLOT  # the "tags" member
        for c in range(start, len(self._tags)):
            if used + SLOT > POOL_BYTES:
                self._stats.cut_records += 1
                break
            used += SLOT
            rec: dict[str, Any] = {}
            full = self._record(self._tags[c], now)
            for k, v in full.items():
                need = SLOT + (len(v.encode()) + 1 if isinstance(v, str) else 0)
                if used + need <= POOL_BYTES:
                    rec[k] = v
                    used += need
            if len(rec) < len(full):
                self._stats.cut_records += 1
            records.append(rec)
            if POOL_BYTES - used < used // (c + 1) + 500:
                return records, (c + 1 if used + SLOT <= POOL_BYTES else None)  # "continu" may not fit either
        return records, None

    def _record(self, tag: _Tag, now: float) -> dict[str, Any]:
        heard = not tag.never_seen
        last = tag.last_checkin(now)
        return {  # fillNode's fields, in its order
            "mac": tag.mac,
            "hash": tag.hash,
            "lastseen": self._ap_time(last) if heard else 0,
            "nextupdate": 0,
            "nextcheckin": self._ap_time(tag.next_checkin(now)) if heard else 0,
            "pending": len(tag.queue),
            "alias": tag.alias,
            "contentMode": tag.content_mode,
            "LQI": tag.lqi if heard else 0,
            "RSSI": tag.rssi if heard else 0,  # processDataReq stores them only from a packet with RSSI != 0
            "temperature": tag.temperature if heard else 0,
            "batteryMv": tag.battery_mv if heard else 0,
            "hwType": HW_TYPE if heard else 0,
            "wakeupReason": tag.wakeup,
            "capabilities": 0,
            "modecfgjson": tag.modecfg,
            "isexternal": False,
            "apip": "0.0.0.0",
            "rotate": 0,
            "lut": 0,
            "invert": 0,
            "updatecount": tag.update_count,
            "updatelast": tag.update_last,
            "ch": CHANNEL if heard else 0,
            "ver": TAG_FW if heard else 0,
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

    def jsonupload(self, form: dict[str, list[str]]) -> tuple[int, str] | None:
        """``POST /jsonupload``; None: the firmware sends no answer at all (a MAC hex2mac refuses)."""
        with self._lock:
            now = self.clock.now()
            self._advance(now)
            if self._http.random() < self.upload_fail_rate:
                self._stats.upload_failures += 1
                return 409, "come back later"
            if "mac" not in form or "json" not in form:
                return 400, "Missing parameters"
            mac = form["mac"][0]
            if not _MAC.fullmatch(mac):
                self._stats.unanswered += 1
                return None
            i = self._by_mac.get(mac.upper().rjust(16, "0"))
            if i is None:
                return 400, "mac not found in tagDB"
            tag = self._tags[i]
            self._stats.uploads += 1
            self._store_template(tag, form["json"][0])
            self._queue_render(tag, now)
            self._push(tag, now)
            return 200, "Ok, saved"

    def tag_cmd(self, form: dict[str, list[str]]) -> tuple[int, str] | None:
        """``POST /tag_cmd`` (``mac``, ``cmd``), as web.cpp handles it: ``refresh`` zeroes the hash and has the
        template drawn again (updateContent), ``clear`` drops the queue, ``reboot`` and the LED commands queue a
        command whose payload becomes the hash when the tag has run it. None: no answer (a bad MAC)."""
        with self._lock:
            now = self.clock.now()
            self._advance(now)
            if "mac" not in form or "cmd" not in form:
                return 500, "param error"
            if not _MAC.fullmatch(form["mac"][0]):
                self._stats.unanswered += 1
                return None
            i = self._by_mac.get(form["mac"][0].upper().rjust(16, "0"))
            if i is None:
                return 400, "Error: mac not found"
            tag, cmd = self._tags[i], form["cmd"][0]
            if cmd == "refresh":
                self._stats.refreshes += 1
                tag.hash = ZERO_HASH
                self._queue_render(tag, now)
            elif cmd == "clear":
                tag.queue.clear()
            elif cmd in COMMAND_PAYLOADS:
                self._stats.led_commands += cmd.startswith("ledflash")
                tag.queue.append(_Item("command", COMMAND_PAYLOADS[cmd] + "0" * 16, command=cmd))
                self._queue_checkin(tag, now)
            self._push(tag, now)
            return 200, "Ok, done"

    def flashing(self, mac: str) -> bool:
        """Whether the label's LED was last told to flash, and has run the command."""
        with self._lock:
            self._advance(self.clock.now())
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
        answer: tuple[int, str] | None = (404, "")
        if path == "/jsonupload":
            answer = ap.jsonupload(form)
        elif path == "/tag_cmd":
            answer = ap.tag_cmd(form)
        if answer is None:  # the handler returned without request->send: the client waits for its timeout
            ap._closing.wait(NO_ANSWER_S)
            self.close_connection = True
            return
        self._answer(answer[0], answer[1].encode(), "text/plain")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulators.esl_controller", description=__doc__.split("\n")[0])
    ap.add_argument("--labels", type=int, default=1000)
    ap.add_argument("--seed", default="1")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument("--speed", type=float, default=1.0, help="simulated seconds per wall-clock second")
    ap.add_argument("--checkin-s", type=float, default=40.0)
    ap.add_argument("--refresh-s", type=float, default=4.0)
    ap.add_argument("--render-s", type=float, default=1.0)
    ap.add_argument("--transfer-fail-rate", type=float, default=0.05)
    ap.add_argument("--timeout-rate", type=float, default=0.01)
    ap.add_argument("--reboots-per-day", type=float, default=0.05, help="per label")
    ap.add_argument("--upload-fail-rate", type=float, default=0.0)
    ap.add_argument("--silent", type=float, default=0.01, help="fraction of labels that never check in")
    ap.add_argument("--low-battery", type=float, default=0.02, help="fraction of labels under 2400 mV")
    args = ap.parse_args(argv)
    sim = SimulatedAccessPoint(
        args.labels, args.seed, ScaledClock(args.speed), checkin_s=args.checkin_s, refresh_s=args.refresh_s,
        render_s=args.render_s, transfer_fail_rate=args.transfer_fail_rate, timeout_rate=args.timeout_rate,
        reboots_per_day=args.reboots_per_day, upload_fail_rate=args.upload_fail_rate, silent=args.silent,
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
