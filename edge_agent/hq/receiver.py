"""The reference HQ receiver process: MQTT in, the apply engine, a JSON status API, applied lines out.

Messages are taken from the broker in batches and acknowledged to it (MQTT PUBACK, paho's manual
acks) only once the batch's transaction committed: a receiver killed at any instant leaves every
message it had not committed unacknowledged in its session, and the broker sends them again. Several
receivers share a chain's traffic through an MQTT v5 shared subscription (``hq.share_group``), each
with its own client id; the applier keeps what they must share in the database.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, cast
from urllib.parse import parse_qs, urlparse

import paho.mqtt.client as mqtt
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from ulid import ULID

from ..authenticity import hq_encoder, uplink_check
from ..clock import Clock, RealClock, parse_rfc3339
from ..config import HqFileConfig
from ..contract import COMMAND_ARGS, STATUS_STREAM, STREAMS
from ..httpbody import HeadersInTime, read_body, refuse
from ..rfid.epcis import document as epcis_document
from ..sync.mqtt_client import Connection
from . import fleet
from .api import (
    MAX_PRICE_STORES,
    PAGE_DEFAULT,
    CommandRequest,
    PageQuery,
    PricesRequest,
    is_json,
    next_link,
    page_query,
    token_owner,
)
from .applier import Applied, HqApplier, Outgoing
from .metrics import HqMetrics
from .store import open_store

log = logging.getLogger(__name__)

SNAPSHOTS_PER_STORE = 10  # /state shows each store's newest snapshots, not its whole history
RETENTION_EVERY_S = 3600.0


def subscriptions(prefix: str) -> list[str]:
    """The stores' streams, one filter each: a wildcard over a store's whole topic tree would bring HQ's
    own acks and commands back to it (twice the broker's traffic at a chain's ack rate). A topic outside
    the contract reaches no receiver."""
    return [f"{prefix}/+/{stream}" for stream in (*STREAMS, STATUS_STREAM)]


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
        self.metrics = HqMetrics(self.db, lambda: self.conn.connected.is_set(), self.clock.now)
        self.applier = HqApplier(
            self.db,
            self.clock,
            prefix=cfg.mqtt.topic_prefix,
            reorder_window_s=cfg.hq.reorder_window_s,
            resync_retry_s=cfg.hq.resync_retry_s,
            max_seq_jump=cfg.hq.max_seq_jump,
            on_applied=self._applied,
            on_rejected=self.metrics.on_rejected,
            verify=uplink_check(cfg.hq.signing),
            sign=hq_encoder(cfg.hq.signing),
        )
        self._acked_at = 0.0
        self._hello = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # (connection it came on, when it came, the message): applied and acked by the apply thread.
        self._inbox: queue.Queue[tuple[int, float, mqtt.MQTTMessage]] = queue.Queue()
        self.conn = Connection(
            cfg.mqtt,
            cfg.hq.client_id,
            prepare=lambda client, _no: client.manual_ack_set(True),
            on_up=self._on_up,
            on_message=self._on_message,
            name="hq-mqtt",
        )
        self._ticker = threading.Thread(target=self._tick_loop, name="hq-ticker", daemon=True)
        self._applier_thread = threading.Thread(target=self._apply_loop, name="hq-apply", daemon=True)
        self.http: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.conn.start()
        self._ticker.start()
        self._applier_thread.start()
        if self.cfg.hq.http_port:
            self.http = ThreadingHTTPServer((self.cfg.hq.http_host, self.cfg.hq.http_port), _handler(self))
            threading.Thread(target=self.http.serve_forever, name="hq-http", daemon=True).start()
            log.info("HQ status API on http://%s:%d/", self.cfg.hq.http_host, self.http.server_address[1])

    def stop(self) -> None:
        self._stop.set()
        self._applier_thread.join(5)  # the batch in hand commits (and is acked) or is left to the broker
        self.conn.stop()
        self._ticker.join(2)
        if self.http:
            self.http.shutdown()
        with self._lock:
            self.db.close()

    # ------------------------------------------------------------ MQTT

    def _on_up(self, client: mqtt.Client, _no: int) -> None:
        share = f"$share/{self.cfg.hq.share_group}/" if self.cfg.hq.share_group else ""
        client.subscribe([(share + f, 1) for f in subscriptions(self.cfg.mqtt.topic_prefix)])
        # Tell every store where HQ stands as soon as it is back: what a store published while HQ was
        # away may be lost with the broker's session, and an ack after a silence makes it send again.
        self._hello = True

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        # Not acked here (manual acks): the apply thread acks it once its batch has committed.
        self._inbox.put((self.conn.connection_no, time.monotonic(), msg))

    def _apply_loop(self) -> None:
        """Group commit: whatever arrived while the last batch committed is the next batch."""
        while not self._stop.is_set():
            try:
                batch = [self._inbox.get(timeout=0.1)]
            except queue.Empty:
                continue
            while len(batch) < self.cfg.hq.batch_max:
                try:
                    batch.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            self._apply(batch)

    def _apply(self, batch: list[tuple[int, float, mqtt.MQTTMessage]]) -> None:
        delay = 0.1
        while True:
            try:
                with self._lock:
                    out = self.applier.receive_batch([(m.topic, bytes(m.payload), bool(m.retain)) for *_, m in batch])
                    if time.monotonic() - self._acked_at >= self.cfg.hq.ack_interval_s:
                        out += self._take_acks()
                break
            except Exception:
                # The database failed (lost connection, full disk): nothing of the batch committed and
                # nothing is acked; try again until it is back, or leave the batch to the broker.
                log.exception("HQ could not commit a batch of %d messages; retrying in %.1f s", len(batch), delay)
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, 5.0)
        done = time.monotonic()
        client, no = self.conn.client, self.conn.connection_no
        for conn_no, received, m in batch:
            self.metrics.apply_seconds.observe(done - received)
            # On a later connection the broker sends it again (the session kept it unacknowledged):
            # a duplicate, which the applier ignores.
            if client is not None and conn_no == no and m.qos > 0:
                client.ack(m.mid, m.qos)
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

    def send_command(self, store: str, name: str, args: dict[str, Any], *, who: str = "local",
                     request: str = "") -> str:
        """Issue an operator's command, audited under ``who`` (an API token's name; "local" in-process)."""
        with self._lock:
            o = self.applier.issue(store, name, args, who=who, request=request)
        self._send([o])
        return json.loads(o.payload)["id"]

    def _tick_loop(self) -> None:
        last_print = time.monotonic()
        retention_at = 0.0  # at start, then hourly: telemetry partitions made ahead, days past retention dropped
        while not self._stop.wait(0.1):
            try:
                if time.monotonic() >= retention_at:
                    retention_at = time.monotonic() + RETENTION_EVERY_S
                    self.db.ensure_partitions(self.clock.now())
                    log.info("telemetry retention: %s", self.db.expire(self.clock.now()))
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
        self.metrics.applied(a)
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

    def known_store(self, store: str) -> bool:
        """A store HQ has heard from, or holds a key of: commands to any other are refused."""
        return store in self.cfg.hq.signing.keys or bool(self.db.read(
            "SELECT 1 FROM status WHERE store = ? UNION ALL SELECT 1 FROM streams WHERE store = ? LIMIT 1",
            (store, store)))

    def state(self, *, after: str = "", limit: int = PAGE_DEFAULT, store: str | None = None) -> dict[str, Any]:
        """One page of stores (in id order, after ``after``), or the one ``store``: their status, streams
        and newest snapshots, with the chain's newest alerts. Bounded whatever the chain's history."""
        now = self.clock.now()
        with self._lock:
            if store is not None:
                stores = [store] if self.known_store(store) else []
            else:
                stores = self.db.store_ids(after=after, limit=limit)
            if not stores:  # and "IN ()", which PostgreSQL refuses, is never built
                return {"stores": [], "status": {}, "streams": [], "snapshots": [], "alerts": self.db.alerts(),
                        "rejected": self.applier.figures.rejected, "connected": self.conn.connected.is_set()}
            page = set(stores)
            marks = ",".join("?" * len(stores))
            streams = [s for s in self.db.stream_stats() if s["store"] in page]
            status = {r[0]: {"state": r[1], "boot_id": r[2], "connection": r[3], "instance": r[4],
                             "identity_conflicts": r[5]}
                      for r in self.db.read(
                          "SELECT store, state, boot_id, connection, instance, identity_conflicts FROM status"
                          f" WHERE store IN ({marks})", tuple(stores))}
            snapshots = [
                dict(zip(("store", "snapshot_id", "as_of_seq", "outcome", "mismatches"), r[:5], strict=True))
                for r in self.db.read(
                    "SELECT store, snapshot_id, as_of_seq, outcome, mismatches, applied_at FROM (SELECT *, row_number()"
                    " OVER (PARTITION BY store ORDER BY applied_at DESC) AS n FROM snapshots"
                    f" WHERE store IN ({marks})) AS newest WHERE n <= ? ORDER BY applied_at", (*stores, SNAPSHOTS_PER_STORE))
            ]
            alerts = self.db.alerts()
        for s in streams:
            s["lag_s"] = round(now - s["last_ts"], 3) if s["last_ts"] else None
            s["behind"] = max(0, s["hwm"] - s["last_seq"])  # sealed at the store, not yet applied here
        return {"stores": stores, "status": status, "streams": streams, "snapshots": snapshots,
                "alerts": alerts, "rejected": self.applier.figures.rejected,
                "connected": self.conn.connected.is_set()}

    def price_progress(self, request: str, before: int | None, limit: int) -> list[dict[str, Any]]:
        """Per store, for one POST /prices: its command's cmd-result and how many of the labels bound to
        the product show the price (and how many are still waiting for the label to take it)."""
        out = []
        with self._lock:
            for a in self.db.audit(before=before, limit=limit, request=request):
                price = a["args"]
                shown = [lb for lb in self.db.labels(a["store"]) if lb.get("gtin") == price.get("gtin")]
                out.append({"id": a["id"], "store": a["store"], "cmd_id": a["cmd_id"], "result": a["result"],
                            "labels": len(shown),
                            "showing": sum(lb.get("price") == price.get("price")
                                           and lb.get("currency") == price.get("currency") for lb in shown),
                            "pending": sum(bool(lb.get("pending_since")) for lb in shown)})
        return out


def _handler(rx: HqReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(HeadersInTime):
        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("http: " + fmt, *args)

        def _send(self, code: int, data: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _json(self, code: int, body: Any, headers: dict[str, str] | None = None) -> None:
            self._send(code, json.dumps(body, default=str).encode(), "application/json", headers)

        def _error(self, code: int, why: str) -> None:
            # A 401 says how to authenticate (RFC 6750); nothing else about the tokens.
            self._json(code, {"error": why}, {"WWW-Authenticate": 'Bearer realm="edge-hq"'} if code == 401 else None)

        def _paged(self, body: dict[str, Any], link: str | None) -> None:
            self._json(200, body | {"next": link}, {"Link": f'<{link}>; rel="next"'} if link else None)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            q = parse_qs(url.query)
            try:
                page = page_query(q)
            except ValidationError as e:
                self._json(400, {"error": f"bad limit/cursor: {e.errors()[0]['msg']}"})
                return
            if url.path in ("/", "/state"):
                st = rx.state(after=page.cursor or "", limit=page.limit, store=q["store"][0] if "store" in q else None)
                last = st["stores"][-1] if st["stores"] and "store" not in q else None
                self._paged(st, next_link("/state", q, page, len(st["stores"]), last))
            elif url.path == "/stores":
                self._stores(q, page)
            elif url.path == "/healthz":
                self._json(200 if rx.conn.connected.is_set() else 503, {"connected": rx.conn.connected.is_set()})
            elif url.path == "/metrics":
                self._send(200, generate_latest(rx.metrics.registry), CONTENT_TYPE_LATEST)
            elif url.path == "/inventory" and "store" in q:
                # The cursor is the last row's "zone<TAB>gtin"; the list itself stays the body, the next
                # page is in the Link header.
                zone, _, gtin = (page.cursor or "").partition("\t")
                rows = rx.db.read("SELECT zone, gtin, qty FROM inventory WHERE store = ? AND qty != 0"
                                  " AND (zone, gtin) > (?, ?) ORDER BY zone, gtin LIMIT ?",
                                  (q["store"][0], zone, gtin, page.limit))
                link = next_link("/inventory", q, page, len(rows), f"{rows[-1][0]}\t{rows[-1][1]}" if rows else None)
                self._json(200, [{"zone": z, "gtin": g, "qty": n} for z, g, n in rows],
                           {"Link": f'<{link}>; rel="next"'} if link else None)
            elif url.path == "/dashboard":
                page_html = resources.files("edge_agent.hq").joinpath("dashboard.html").read_bytes()
                self._send(200, page_html, "text/html; charset=utf-8")
            elif url.path == "/traffic" and "store" in q:
                with rx._lock:
                    traffic = rx.db.traffic(q["store"][0])
                self._json(200, traffic)
            elif url.path in ("/epcis", "/traffic/hourly", "/telemetry/hourly") and "store" in q:
                self._since_until(url.path, q, page)
            elif url.path == "/labels" and "store" in q:
                store = q["store"][0]
                labels = [json.loads(r[0]) for r in rx.db.read(
                    "SELECT state FROM labels WHERE store = ? AND label > ? ORDER BY label LIMIT ?",
                    (store, page.cursor or "", page.limit))]
                # The price-integrity figures are the whole store's, whichever page this is (counted here:
                # SQLite and PostgreSQL spell JSON access differently; a store has thousands of labels, not more).
                judged_all = [m for (state,) in rx.db.read("SELECT state FROM labels WHERE store = ?", (store,))
                              if (m := json.loads(state).get("matches_hq")) is not None]
                showing, judged = sum(m is True for m in judged_all), len(judged_all)
                link = next_link("/labels", q, page, len(labels), labels[-1]["label"] if labels else None)
                self._paged({"labels": labels, "showing_hq_price": showing, "with_hq_price": judged}, link)
            elif url.path in ("/audit", "/prices"):
                if url.path == "/prices" and "request" not in q:
                    self._json(400, {"error": "GET /prices needs ?request=<the id POST /prices answered>"})
                    return
                try:
                    before = int(page.cursor) if page.cursor else None
                except ValueError:
                    self._json(400, {"error": "bad cursor"})
                    return
                request = q["request"][0] if "request" in q else None
                if url.path == "/audit":
                    rows = rx.db.audit(before=before, limit=page.limit, request=request)
                else:
                    rows = rx.price_progress(str(request), before, page.limit)
                link = next_link(url.path, q, page, len(rows), str(rows[-1]["id"]) if rows else None)
                self._paged({"items": rows}, link)
            else:
                self._json(404, {"error": f"no such resource {url.path}"})

        def _since_until(self, path: str, q: dict[str, list[str]], page: PageQuery) -> None:
            """The record and the roll-ups, by time (``from``/``to``: RFC 3339) and in pages. ``/epcis``: an
            EPCISDocument of a page of the store's events (the cursor is the last event's message seq and
            index in it); ``/traffic/hourly``, ``/telemetry/hourly``: the hourly roll-ups, per camera or stream."""
            store = q["store"][0]
            try:
                since = parse_rfc3339(q["from"][0]) if "from" in q else -math.inf
                until = parse_rfc3339(q["to"][0]) if "to" in q else math.inf
                seq, _, idx = (page.cursor or "").partition(".")
                hour, _, name = (page.cursor or "").partition("\t")
                if path == "/epcis":
                    after: tuple[int, Any] = (int(seq), int(idx)) if page.cursor else (0, -1)
                else:
                    after = (int(hour), name) if page.cursor else (-1, "")
            except ValueError as e:
                self._json(400, {"error": f"bad from/to (RFC 3339 times) or cursor: {e}"})
                return
            if path == "/epcis":
                events, last = rx.db.epcis_events(store, since, until, after=after, limit=page.limit)
                link = next_link(path, q, page, len(events), f"{last[0]}.{last[1]}" if last else None)
                self._json(200, epcis_document(events, time.time()), {"Link": f'<{link}>; rel="next"'} if link else None)
                return
            rows = rx.db.hourly("traffic" if path == "/traffic/hourly" else "telemetry", store, since, until,
                                after=after, limit=page.limit)
            key = "camera" if path == "/traffic/hourly" else "stream"
            cursor = f"{int(parse_rfc3339(rows[-1]['hour']))}\t{rows[-1][key]}" if rows else None
            self._paged({"items": rows}, next_link(path, q, page, len(rows), cursor))

        def _stores(self, q: dict[str, list[str]], page: PageQuery) -> None:
            """The fleet (hq/fleet.py): every store's row, ``sort=id`` (the default: cursor = the last
            store id) or ``attention``, ``q`` a part of the id; ``store=S001``: that one store, with its alerts."""
            now = rx.clock.now()
            if "store" in q:
                row = fleet.one_store(rx.db, q["store"][0], now)
                self._json(200, {"stores": [row.as_json()] if row else [], "now": now, "next": None})
                return
            asked, needle = q.get("sort", ["id"])[0], q.get("q", [""])[0]
            if asked not in fleet.SORTS or len(needle) > 64:
                self._json(400, {"error": f"sort is one of {list(fleet.SORTS)}; q at most 64 characters"})
                return
            sort = cast(fleet.Sort, asked)
            rows = fleet.fleet(rx.db, now)
            try:
                shown, total = fleet.select(rows, sort=sort, q=needle, cursor=page.cursor, limit=page.limit)
            except ValueError:
                self._json(400, {"error": "bad cursor"})
                return
            link = next_link("/stores", q, page, len(shown), fleet.cursor_of(shown[-1], sort) if shown else None)
            self._paged({"stores": [r.as_json() for r in shown], "total": total, "bands": fleet.bands(rows),
                         "now": now}, link)

        def do_POST(self) -> None:
            url = urlparse(self.path)
            if url.path not in ("/cmd", "/prices"):
                self._json(404, {"error": f"no such resource {url.path}"})
                return
            # Who and what kind, before a byte of the body is read.
            who = token_owner(self.headers.get("Authorization"), rx.cfg.hq.api_tokens)
            if who is None:
                refuse(self, 401, "a valid API token is required: Authorization: Bearer <token>", self._error)
                return
            if not is_json(self.headers.get("Content-Type")):
                refuse(self, 415, "send Content-Type: application/json", self._error)
                return
            body = read_body(self, 1 << 20, self._error)
            if body is None:
                return
            model = CommandRequest if url.path == "/cmd" else PricesRequest
            try:
                req = model.model_validate_json(body)
            except ValidationError as e:
                bad_json = any(err["type"] == "json_invalid" for err in e.errors())
                self._error(400 if bad_json else 422, f"bad {url.path} request: {e.errors(include_url=False)}")
                return
            if isinstance(req, CommandRequest):
                self._command(req, who)
            else:
                self._prices(req, who)

        def _command(self, req: CommandRequest, who: str) -> None:
            if not rx.known_store(req.store):
                self._error(404, f"no store {req.store} is known to HQ")
                return
            args_model = COMMAND_ARGS.get(req.name)
            if args_model is None:
                self._error(422, f"no command {req.name!r}; the stores know {sorted(COMMAND_ARGS)}")
                return
            try:
                args_model.model_validate(req.args)
            except ValidationError as e:
                self._error(422, f"bad args for {req.name}: {e.errors(include_url=False)}")
                return
            request = str(ULID())
            cmd_id = rx.send_command(req.store, req.name, req.args, who=who, request=request)
            self._json(202, {"id": cmd_id, "request": request, "audit": f"/audit?request={request}"})

        def _prices(self, req: PricesRequest, who: str) -> None:
            stores = rx.db.store_ids(limit=MAX_PRICE_STORES) if req.stores == "all" else list(dict.fromkeys(req.stores))
            unknown = [s for s in stores if not rx.known_store(s)]
            if unknown or not stores:
                self._error(404, f"stores not known to HQ: {unknown[:20]}" if unknown else "HQ knows no store yet")
                return
            request = str(ULID())
            args = req.price.model_dump(mode="json", exclude_none=True)
            ids = [{"store": s, "id": rx.send_command(s, "price.set", args, who=who, request=request)} for s in stores]
            self._json(202, {"request": request, "commands": ids, "progress": f"/prices?request={request}"})

    return Handler
