"""Adapter for an OpenEPaperLink (OEPL) access point, through the AP's own HTTP API.

Shapes are the firmware's, read from OpenEPaperLink/OpenEPaperLink, ``ESP32_AP-Flasher/``:

* ``src/web.cpp``: ``GET /get_db?pos=N`` lists the tag database one page at a time, ``GET /get_db?mac=MAC``
  returns one tag (``{"tags": []}`` if unknown, ``{"error": "malformatted parameter"}`` for a bad MAC).
  ``POST /jsonupload`` (form fields ``mac`` and ``json``, optional ``ttl``) stores a drawing template for a
  tag and sets its ``contentMode`` to 19; it answers 200 "Ok, saved", 400 "mac not found in tagDB" or
  "Missing parameters", and 409 "come back later" while the AP is not running.
* ``src/tag_db.cpp``: ``tagDBtoJson`` ends a page once its JSON passes 5000 bytes and then adds
  ``"continu": <index of the next record>``; the last page has no ``continu``. ``fillNode`` names the fields:
  ``mac`` (``mac2hex``: 16 upper-case hex), ``hash`` (32 hex), ``lastseen`` (unix seconds, uint32),
  ``nextupdate``, ``nextcheckin``, ``pending``, ``alias``, ``contentMode``, ``LQI``, ``RSSI``, ``temperature``,
  ``batteryMv``, ``hwType``, ``wakeupReason``, ``capabilities``, ``modecfgjson``, ``isexternal``, ``apip``,
  ``rotate``, ``lut``, ``invert``, ``updatecount``, ``updatelast``, ``ch``, ``ver``.
* ``include/tag_db.h`` (older firmware): ``pending`` was a bool; current firmware sends ``pendingCount``.
* ``data/www/main.js`` and ``wwwroot/main.js`` ``loadTags``: follow ``continu`` only while it is past ``pos``.
* ``src/contentmanager.cpp`` ``drawElement`` and the project wiki page "Json template": the drawing
  commands ``{"text": [x, y, text, font, color, align, size, bgcolor]}`` and ``{"box": [x, y, w, h, color]}``,
  colors 0 white, 1 black, 2 red; ``data/tagtypes/01.json``: the 296x128 2.9" tag and its fonts.
* OpenEPaperLink/Home_Assistant_Integration: ``hub.py`` reads the same field names; ``upload.py`` posts
  rendered JPEGs to ``/imgupload`` (multipart). Here the AP draws the text itself from a ``/jsonupload``
  template, so the agent needs no image library and the upload stays a few hundred bytes.

Firmware facts the adapter and the engine depend on:

* ``web.cpp`` parses ``pos`` into a ``uint8_t``, so on an AP with more than ~255 tags a later page wraps
  round to the start. ``poll`` notices (``continu`` not past ``pos``), quarantines that page and stops.
* Firmware on ArduinoJson 6 builds a page in a ``DynamicJsonDocument(5000)``: a 5,000-byte memory pool
  (``tag_db.cpp`` ``tagDBtoJson``, e.g. in ``jjwbruijn/OpenEPaperLink`` and ``skiphansen/OpenEPaperLink``).
  A page ends when the pool is nearly full, and a record that does not fit loses its trailing fields
  silently, ``"continu"`` included. Only the fields ``fillNode`` writes first (``mac``, ``hash``,
  ``lastseen``, ``pending``) are required; battery, radio and counters may be missing (unknown). A page
  whose last record was cut and that has no ``continu`` is followed on at the next record all the same.
* ``newproto.cpp`` ``processXferComplete`` sets ``hash`` when the tag confirms a transfer: 8 bytes of the
  queued item's ``dataVer`` and 8 zero bytes, and adds one to ``updatecount``. For an image ``dataVer`` is
  its md5; for a tag command (``sendTagCommand``, e.g. the ``/tag_cmd`` LED flashes) it is the command's
  payload, so a completed LED flash puts a fixed, known value in ``hash``. ``processDataReq`` zeroes the
  hash when a tag boots (``wakeupReason`` 0xE0 and up) with nothing pending, and ``updateContent`` (the
  ``refresh`` command) zeroes it too. Neither a zero hash nor a command's payload is content: the report
  carries ``content_hash=None`` for both, and ``rebooted`` while a boot reason stands.
* The AP renders a template asynchronously after ``/jsonupload``. So the hash read back right after an
  upload is still the previous content's; ``send`` returns it and the update count as ``hash_before`` and
  ``count_before``, and each upload carries a small reference so that its image, and hash, are new.
* ``processDataReq`` takes ``RSSI``/``LQI`` only from a packet with a non-zero RSSI: ``RSSI 0`` is "no
  reading" (a tag that never checked in), not 0 dBm.
* ``lastseen`` and ``updatelast`` are the AP's ``time()``: before NTP or ``/set_time`` (after every AP
  reboot without a network) that is seconds since 1970. Such a report is kept with ``last_seen`` unknown
  and ``clock_unset`` set, for the service's ``esl.ap_clock_unset`` alert.
* ``doJsonUpload`` and ``/tag_cmd`` send no HTTP answer at all for a MAC ``hex2mac`` refuses (the handler
  just returns): a malformed MAC costs the client its whole timeout. ``send`` checks the MAC first.

Text in a template goes through the AP's ``{variable}`` substitution, so braces in a promo are not drawn
literally.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import re
import secrets
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from pydantic import ValidationError
from websockets.exceptions import WebSocketException
from websockets.sync.client import connect as ws_connect

from ..redact import redact_url
from ..retry import backoff_delay
from .controller import ControllerError, LabelContent, LabelReport, PollResult, Rejected, SendReceipt

__all__ = ["OpenEPaperLinkController", "parse_push", "parse_tag", "parse_template", "render_template"]

log = logging.getLogger(__name__)

MAX_RAW = 2000  # characters of a bad record or page kept for the quarantine
MAX_BODY = 1 << 20  # a page is ~5 kB; a longer answer is garbage, cut so it cannot exhaust memory
EARLIEST_LASTSEEN = 1_577_836_800  # 2020-01-01: before that the AP's clock was not set (no NTP, no /set_time)
UINT32_MAX = 2**32 - 1  # lastseen is a uint32_t in tagRecord
REQUIRED_FIELDS = ("mac", "hash", "lastseen", "pending")  # fillNode writes these first: a full pool keeps them
LAST_FIELD = "ver"  # fillNode's last field: a record without it was cut short by the pool
WAKEUP_BOOT = 0xE0  # processDataReq: wakeup reasons from here up are boots (first boot, watchdog, failed OTA...)


def _led_payload(mode: int, duration: int, *phases: tuple[int, int, int, int]) -> bytes:
    """The first 8 bytes of web.cpp's ``struct ledFlash`` (mode and flashDuration share a byte, as do each
    phase's flashCount and flashSpeed), which sendTagCommand puts in ``dataVer``."""
    out = bytearray([mode | duration << 4])
    for color, count, speed, delay in phases:
        out += bytes([color, count | speed << 4, delay])
    return bytes(out + bytes(8))[:8]


# What ``hash`` becomes when each of web.cpp's ``/tag_cmd`` LED commands completes (8 payload bytes, 8 zero).
COMMAND_HASHES = frozenset(
    (p.hex() + "0" * 16) for p in (
        _led_payload(1, 8, (0x3C, 3, 1, 10), (0xE4, 3, 5, 10), (0x03, 3, 10, 10)),  # ledflash
        _led_payload(1, 1, (0xE4, 3, 3, 50)),  # ledflash_long, the PICK flash
    )
)
ZERO_HASH = "0" * 32  # also ledflash_stop's and every command without a payload (reboot, scan...)

_MAC = re.compile(r"[0-9A-Fa-f]{12}|[0-9A-Fa-f]{16}")
_HASH = re.compile(r"[0-9A-Fa-f]{32}")

# ---------------------------------------------------------------- the drawing template

WHITE, BLACK, RED = 0, 1, 2
LEFT, CENTER, RIGHT = 0, 1, 2
# One slot per LabelContent field: (x, y, font, color, align) on a 296x128 tag. Decoding looks a text
# element up by (x, y, font), so render_template and parse_template cannot drift apart.
_SLOTS: dict[str, tuple[int, int, str, int, int]] = {
    "promo": (5, 5, "fonts/bahnschrift20", RED, LEFT),
    "price": (240, 28, "fonts/calibrib80", BLACK, RIGHT),
    "currency": (246, 60, "fonts/bahnschrift30", BLACK, LEFT),
    "gtin": (5, 114, "glasstown_nbp_tf", BLACK, LEFT),
    "stock_note": (291, 114, "glasstown_nbp_tf", RED, RIGHT),
}
_REF_TEXT = [150, 118, "glasstown_nbp_tf", BLACK, CENTER]  # x, y, (ref), font, color, align
_PICK = "PICK"
_PICK_BOX = [206, 0, 90, 26, RED]
_PICK_TEXT = [251, 3, _PICK, "fonts/bahnschrift20", WHITE, CENTER, 0, RED]  # white on the red box


def render_template(content: LabelContent, ref: str | None = None) -> str:
    """The ``json`` form field of ``/jsonupload`` that draws ``content``, compact. ``ref``, a few
    characters printed small in a corner (as shelf labels print a revision code), makes every send a
    new image: the AP changes a tag's hash only when a new image is transferred, so a changed hash is
    then proof that this very send reached the label."""
    elements: list[dict[str, list[Any]]] = []
    if ref is not None:
        elements.append({"text": _REF_TEXT[:2] + [ref] + _REF_TEXT[2:]})
    if content.pick:
        elements += [{"box": _PICK_BOX}, {"text": _PICK_TEXT}]
    for name, (x, y, font, color, align) in _SLOTS.items():
        value = getattr(content, name)
        if value is not None:
            elements.append({"text": [x, y, value, font, color, align]})
    return json.dumps(elements, ensure_ascii=False, separators=(",", ":"))


def parse_template(body: str) -> LabelContent | None:
    """The content a template drawn by ``render_template`` shows; None for anything else."""
    try:
        elements = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(elements, list):
        return None
    by_place = {(x, y, font): name for name, (x, y, font, _, _) in _SLOTS.items()}
    pick_place = (_PICK_TEXT[0], _PICK_TEXT[1], _PICK_TEXT[3])
    fields: dict[str, Any] = {}
    for el in elements:
        text = el.get("text") if isinstance(el, dict) else None
        if not isinstance(text, list) or len(text) < 4:
            continue
        try:
            place = (text[0], text[1], text[3])
            name = by_place.get(place)
        except TypeError:  # an unhashable coordinate: not one of ours
            continue
        if place == pick_place and text[2] == _PICK:
            fields["pick"] = True
        elif name is not None:
            fields[name] = text[2]
    try:
        return LabelContent.model_validate(fields)
    except ValidationError:
        return None


# ---------------------------------------------------------------- tag records


class _Bad(ValueError):
    """A tag record field the adapter cannot accept; the message names the field."""


def _short(v: object) -> str:
    s = json.dumps(v) if isinstance(v, (str, int, float, bool, type(None))) else type(v).__name__
    return s if len(s) <= 40 else s[:37] + "..."


def _int(rec: dict[str, Any], name: str, lo: int, hi: int) -> int:
    v = rec[name]
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Bad(f"{name} is not an integer: {_short(v)}")
    if not lo <= v <= hi:
        raise _Bad(f"{name} {v} out of range {lo}..{hi}")
    return v


def _raw_text(raw: object) -> str:
    try:
        text = json.dumps(raw, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        text = repr(raw)
    return text[:MAX_RAW]


def _optional(rec: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    return _int(rec, name, lo, hi) if name in rec else None


def _report(rec: object) -> LabelReport:
    if not isinstance(rec, dict):
        raise _Bad(f"tag record is not a JSON object: {_short(rec)}")
    missing = [f for f in REQUIRED_FIELDS if f not in rec]
    if missing:
        raise _Bad("missing field" + ("s " if len(missing) > 1 else " ") + ", ".join(missing))
    mac = rec["mac"]
    if not isinstance(mac, str) or not _MAC.fullmatch(mac):
        raise _Bad(f"mac is not 12 or 16 hex digits: {_short(mac)}")
    content_hash = rec["hash"]
    if not isinstance(content_hash, str) or not _HASH.fullmatch(content_hash):
        raise _Bad(f"hash is not 32 hex digits: {_short(content_hash)}")
    content_hash = content_hash.lower()
    lastseen = _int(rec, "lastseen", 0, UINT32_MAX)
    clock_unset = 0 < lastseen < EARLIEST_LASTSEEN
    pending = rec["pending"]
    if not isinstance(pending, bool):  # older firmware: a bool; current: pendingCount
        pending = _int(rec, "pending", 0, 65_535) > 0
    battery = _optional(rec, "batteryMv", 0, 10_000)
    rssi = _optional(rec, "RSSI", -128, 20)
    lqi = _optional(rec, "LQI", 0, 255)
    wakeup = _optional(rec, "wakeupReason", 0, 255)
    return LabelReport(
        label=mac.upper(),
        last_seen=datetime.fromtimestamp(lastseen, UTC) if lastseen and not clock_unset else None,  # 0: never seen
        battery_mv=battery or None,  # 0: the tag has not reported one yet
        rssi=rssi or None,  # 0: no packet heard yet (processDataReq ignores RSSI 0), and then no LQI either
        lqi=lqi if rssi else None,
        pending=pending,
        content_hash=None if content_hash == ZERO_HASH or content_hash in COMMAND_HASHES else content_hash,
        update_count=_optional(rec, "updatecount", 0, UINT32_MAX),
        rebooted=wakeup is not None and wakeup >= WAKEUP_BOOT,
        clock_unset=clock_unset,
    )


def parse_tag(raw: object) -> LabelReport | Rejected:
    """One record of a ``get_db`` page as a report, or why not. Never raises."""
    try:
        return _report(raw)
    except _Bad as e:
        return Rejected(_raw_text(raw), str(e))
    except ValidationError as e:
        err = e.errors()[0]
        return Rejected(_raw_text(raw), f"{'.'.join(map(str, err['loc']))}: {err['msg']}")


def _decode_page(body: bytes) -> tuple[dict[str, Any] | None, str]:
    """A ``get_db`` answer as ``({"tags": [...], ...}, "")``, or ``(None, why not)``."""
    try:
        page = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 ({e.reason})"
    except (ValueError, RecursionError) as e:
        return None, f"not JSON ({e})"
    if isinstance(page, dict) and "error" in page:
        return None, f"the AP answered an error: {_short(page['error'])}"
    if not isinstance(page, dict) or not isinstance(page.get("tags"), list):
        return None, "not an object with a 'tags' list"
    return page, ""


def parse_push(message: str | bytes) -> PollResult | None:
    """One message of the AP's websocket as reports, or None if it is not about tags (the AP also
    pushes system info, log lines and upload progress on the same socket). Never raises."""
    body = message.encode("utf-8", "replace") if isinstance(message, str) else message
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        return PollResult(rejected=[Rejected(_snippet(body), f"/ws: message is not JSON ({e})")])
    if not isinstance(data, dict) or "tags" not in data:
        return None
    page, why = _decode_page(body)
    if page is None:
        return PollResult(rejected=[Rejected(_snippet(body), f"/ws: {why}")])
    result = PollResult()
    for raw in page["tags"]:
        r = parse_tag(raw)
        if isinstance(r, LabelReport):
            result.reports.append(r)
        else:
            result.rejected.append(r)
    return result


def _cut(records: list[Any]) -> bool:
    """Whether a page's last record lost its trailing fields to the AP's JSON pool."""
    return bool(records) and isinstance(records[-1], dict) and LAST_FIELD not in records[-1]


def _snippet(body: bytes) -> str:
    return body[:MAX_RAW].decode("utf-8", "replace")


# ---------------------------------------------------------------- the controller


class ApTap(Protocol):
    def ap_http(self, ap: str, method: Literal["GET", "POST"], path: str, body: bytes | None,
                error: str | None) -> None: ...

    def ap_push(self, ap: str, message: bytes | str) -> None: ...


class OpenEPaperLinkController:
    """``EslController`` for one OEPL access point at ``base_url`` (e.g. ``http://192.168.1.20``)."""

    def __init__(self, base_url: str, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        # The AP is on the store LAN: never route it through a proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.tap: ApTap | None = None  # a recorder: every answer and push, as the AP sent it

    def listen(self, on_result: Callable[[PollResult], None], stop: threading.Event) -> None:
        """Follow the AP's websocket until ``stop`` is set. The firmware pushes ``tagDBtoJson(mac)``, the
        same ``{"tags": [record]}`` as ``get_db?mac``, whenever a tag checks in or changes
        (``wsSendTaginfo``), so label state arrives within a second instead of at the next poll.
        Reconnects with backoff; polling keeps going whatever happens here."""
        url = "ws" + self.base_url.removeprefix("http") + "/ws"
        rng = random.Random()
        attempt = 0
        while not stop.is_set():
            try:
                with ws_connect(url, open_timeout=self.timeout, proxy=None, compression=None,
                                max_size=MAX_BODY) as ws:
                    attempt = 0
                    while not stop.is_set():
                        try:
                            message = ws.recv(timeout=0.5)
                        except TimeoutError:
                            continue
                        if self.tap is not None:
                            self.tap.ap_push(self.base_url, message)
                        result = parse_push(message)
                        if result is not None:
                            on_result(result)
            except (OSError, WebSocketException) as e:
                delay = backoff_delay(attempt, 0.5, 30.0, rng)
                attempt += 1
                log.info("OEPL websocket %s: %s; again in %.1f s", redact_url(url), e, delay)
                stop.wait(delay)

    def poll(self) -> PollResult:
        result = PollResult()
        reports: dict[str, LabelReport] = {}  # a record can repeat if the AP's database shifts mid-walk
        pos = 0
        while True:
            path = f"/get_db?pos={pos}"
            body = self._request(path)
            page, why = _decode_page(body)
            if page is None:
                result.rejected.append(Rejected(_snippet(body), f"{path}: {why}; polling stopped"))
                break
            for raw in page["tags"]:
                r = parse_tag(raw)
                if isinstance(r, LabelReport):
                    reports[r.label] = r
                else:
                    result.rejected.append(r)
            nxt = page.get("continu")
            if (nxt is None or nxt == 0) and _cut(page["tags"]):
                nxt = pos + len(page["tags"])  # the pool ran out before "continu": a later record may repeat
            if nxt is None or nxt == 0:  # the last page has none (0 from some AP builds)
                break
            if isinstance(nxt, bool) or not isinstance(nxt, int) or nxt <= pos:
                result.rejected.append(Rejected(_snippet(body), (
                    f"{path}: continu {_short(nxt)} does not move past pos {pos}; polling stopped (the firmware "
                    "reads pos as a uint8_t, so an AP with more than 255 tags cannot list the rest)")))
                break
            pos = nxt
        result.reports = list(reports.values())
        return result

    def send(self, label: str, content: LabelContent, flash: bool = False) -> SendReceipt:
        if not _MAC.fullmatch(label):  # the AP would not answer at all, only the timeout would
            raise ControllerError(f"label {label!r} is not a MAC of 12 or 16 hex digits; not sent to the AP")
        if flash:
            # Before the content: the AP queues the command ahead of the image it has yet to render, so the
            # command's payload is never the last hash the label reports for this send (see _led_payload).
            try:
                self._request("/tag_cmd", urllib.parse.urlencode({"mac": label, "cmd": "ledflash_long"}).encode())
            except ControllerError as e:
                log.info("LED flash for %s not sent: %s", label, e)
        form = urllib.parse.urlencode({"mac": label, "json": render_template(content, secrets.token_hex(2))}).encode()
        self._request("/jsonupload", form)
        path = "/get_db?" + urllib.parse.urlencode({"mac": label})
        page, why = _decode_page(self._request(path))
        if page is None:
            raise ControllerError(f"{path}: {why}")
        if not page["tags"]:
            raise ControllerError(f"{path}: the AP accepted content for {label} but no longer lists it")
        r = parse_tag(page["tags"][0])
        if isinstance(r, Rejected):
            raise ControllerError(f"{path}: {r.reason}")
        # The AP sets a tag's hash only when the tag confirms a transfer (processXferComplete), so what it
        # reports now is what the label had: the engine waits for a transfer after this one.
        return SendReceipt(label, None, hash_before=r.content_hash, count_before=r.update_count)

    def _request(self, path: str, form: bytes | None = None) -> bytes:
        method: Literal["GET", "POST"] = "GET" if form is None else "POST"
        try:
            body = self._fetch(method, path, form)
        except ControllerError as e:
            if self.tap is not None:
                self.tap.ap_http(self.base_url, method, path, None, str(e))
            raise
        if self.tap is not None:
            self.tap.ap_http(self.base_url, method, path, body, None)
        return body

    def _fetch(self, method: Literal["GET", "POST"], path: str, form: bytes | None) -> bytes:
        req = urllib.request.Request(self.base_url + path, data=form, method=method)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return resp.read(MAX_BODY)
        except urllib.error.HTTPError as e:
            snippet = e.read(200).decode("utf-8", "replace")
            raise ControllerError(f"{method} {path}: HTTP {e.code} {snippet!r}") from e
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, malformed answer
            raise ControllerError(f"{method} {path}: {e}") from e
