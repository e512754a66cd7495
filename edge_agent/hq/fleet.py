"""The fleet view: one row per store, and the order in which they need someone's attention.

What each figure means (all times on HQ's clock unless said otherwise):

- ``link``: ``offline`` when the store's last status says so (its clean disconnect, or the MQTT will the
  broker publishes for it); ``lost`` when HQ has not heard from it for ``lost_after_s`` (three health
  intervals at the default 60 s) whatever its status says: a hung agent whose TCP session still stands,
  or a broker that has not noticed yet, must not look alive; ``online`` otherwise.
- ``last_heard_s``: seconds since HQ applied the store's newest ``health`` message (``streams.
  last_applied_at``), or since its last status when it has sent no health yet. Health is the heartbeat:
  the agent's main loop sends it every interval, so a store whose other streams still trickle in but
  whose health has stopped is hung.
- ``backlog``, ``unacked``, ``queued_bytes``: from the newest health body: facts waiting at the store to
  be sealed (``pending_facts``), messages sealed but not yet acknowledged by HQ (``sealed_messages``), and
  the bytes both take in the outbox. ``behind``: messages the store says it sealed (its high-water mark)
  that HQ has not applied, summed over its streams. ``oldest_unsent_s``: how long the oldest fact HQ had
  not acknowledged had waited when the store sent that health (``last_heard_s`` ago); None from an agent
  too old to say.
- ``lag_s``: the newest health message's send-to-apply delay, ``last_applied_at - last_sent``: the
  store's send time (its clock) to HQ's apply (HQ's clock). HQ does not keep when a message arrived, only
  when it applied it, so this is transit, broker queueing and any wait in HQ's reorder stash together;
  health goes out on every store every interval, so it is a steady probe of the whole path.
- ``alerts_open``: alerts raised in the last ``alert_window_s`` (an hour): HQ's own (rewinds, a cloned or
  rebuilt box) and those the store reported in its health messages. Alerts have no acknowledgement yet,
  so "open" means "recent".
- ``showing_hq_price`` / ``with_hq_price``: of the store's labels for whose product HQ has a price, how many
  show it (the store's ``matches_hq``); the difference is ``price_mismatches``.
- ``last_resync``: the newest inventory snapshot HQ took in (``outcome``: installed, verified, corrected,
  stale, foreign; ``mismatches``; ``age_s``); ``resync_pending_s``: how long HQ has waited for an asked-for
  snapshot, None when it waits for none.
- ``timezone``: the store's IANA time zone as its health says (``[store] timezone``), for showing its
  local times; None when the store has none configured. Every time HQ serves is UTC.

Attention, most urgent first: a store falls in the first band that applies, and within a band the larger
``magnitude`` comes first, then the store id:

  5  link offline or lost          magnitude: seconds since last heard (never heard: infinite)
  4  silent for ``silent_after_s``  magnitude: seconds since last heard (before it counts as lost)
  3  alerts open                   magnitude: how many
  2  data integrity                magnitude: labels not showing HQ's price, plus one for a resync that is
                                   pending or whose last snapshot was stale or foreign
  1  backlog                       magnitude: backlog + unacked + behind, when at least ``backlog_min``
  0  nothing to see                magnitude: 0

The reads are a fixed handful of queries over the whole chain (not one per store), in the SQL both
backends run; JSON bodies are decoded in Python. Two use ``LIKE`` on JSON text that HQ itself wrote
(compact, pydantic's ``model_dump_json``) as a filter: labels' ``"matches_hq":true``/``false``, and
health bodies whose ``"alerts"`` list is not empty; rows that pass the health filter are decoded.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from ..clock import parse_rfc3339
from .store import HqStore

HEALTH = "health"
Sort = Literal["attention", "id"]
SORTS: tuple[str, ...] = ("attention", "id")
_NO_ALERTS = '%"alerts":[]%'
# HQ writes label state compactly; a row written by hand (json.dumps) has a space after the colon.
_SHOWING = ('%"matches_hq":true%', '%"matches_hq": true%')
_NOT_SHOWING = ('%"matches_hq":false%', '%"matches_hq": false%')
_TROUBLED_RESYNC = frozenset({"stale", "foreign"})


@dataclass(frozen=True)
class FleetParams:
    lost_after_s: float = 180.0  # three health intervals at the default 60 s
    silent_after_s: float = 90.0  # one and a half: late, not yet lost
    alert_window_s: float = 3600.0  # an alert this recent is open
    backlog_min: int = 100  # backlog + unacked + behind below this is messages in flight, not a backlog
    # Health messages looked back per store for the alerts it reported (one every 5 s over an hour); the
    # window is also bounded by time, this bounds the rows read.
    health_scan: int = 720


@dataclass(slots=True)
class StoreFacts:
    """What HQ holds about one store, as read: the input of :func:`assess`."""

    store: str
    state: str | None = None  # status.state: online | offline; None before its first status
    status_at: float | None = None
    health_applied_at: float | None = None
    health_sent: float | None = None
    health: dict[str, Any] | None = None  # the newest health body
    behind: int = 0
    hq_alerts: int = 0
    store_alerts: int = 0
    showing: int = 0
    not_showing: int = 0
    snapshot: tuple[str, int, float] | None = None  # (outcome, mismatches, applied_at) of the newest
    resync_requested_at: float | None = None  # the oldest resync still waiting for its snapshot


@dataclass(frozen=True, slots=True)
class StoreRow:
    store: str
    link: Literal["online", "offline", "lost"]
    last_heard_s: float | None
    backlog: int | None
    unacked: int | None
    queued_bytes: int | None
    behind: int
    oldest_unsent_s: float | None
    timezone: str | None
    lag_s: float | None
    alerts_open: int
    showing_hq_price: int
    with_hq_price: int
    price_mismatches: int
    last_resync: dict[str, Any] | None
    resync_pending_s: float | None
    attention: int
    magnitude: float
    why: str
    alerts: list[dict[str, Any]] = field(default_factory=list)  # filled for one store's page only

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        if math.isinf(self.magnitude):
            d["magnitude"] = None  # JSON has no infinity
        if not self.alerts:
            del d["alerts"]
        return d


def _age(now: float, t: float | None) -> float | None:
    return None if t is None else round(max(0.0, now - t), 1)


def assess(f: StoreFacts, now: float, p: FleetParams = FleetParams()) -> StoreRow:
    """One store's row and its attention band (rules in the module docstring). Pure."""
    heard = _age(now, f.health_applied_at if f.health_applied_at is not None else f.status_at)
    if f.state == "offline":
        link = "offline"
    elif heard is None or heard > p.lost_after_s:
        link = "lost"
    else:
        link = "online"
    h = f.health or {}
    backlog, unacked = h.get("pending_facts"), h.get("sealed_messages")
    lag = None
    if f.health_applied_at is not None and f.health_sent is not None:
        lag = round(f.health_applied_at - f.health_sent, 3)
    alerts = f.hq_alerts + f.store_alerts
    mismatches = f.not_showing
    resync = None
    if f.snapshot is not None:
        outcome, n, at = f.snapshot
        resync = {"outcome": outcome, "mismatches": n, "age_s": _age(now, at)}
    pending = _age(now, f.resync_requested_at)
    resync_trouble = pending is not None or (resync is not None and resync["outcome"] in _TROUBLED_RESYNC)
    waiting = (backlog or 0) + (unacked or 0) + f.behind
    silence = math.inf if heard is None else heard
    if link != "online":
        band, size, why = 5, silence, f"{link}, " + ("never heard" if heard is None else f"last heard {heard:.0f} s ago")
    elif heard is not None and heard > p.silent_after_s:
        band, size, why = 4, silence, f"silent for {heard:.0f} s"
    elif alerts:
        band, size, why = 3, float(alerts), f"{alerts} alert{'s' * (alerts != 1)} open"
    elif mismatches or resync_trouble:
        band, size = 2, float(mismatches + resync_trouble)
        parts = [f"{mismatches} label{'s' * (mismatches != 1)} not showing HQ's price"] if mismatches else []
        if pending is not None:
            parts.append(f"resync pending {pending:.0f} s")
        elif resync_trouble:
            parts.append(f"last resync {resync['outcome']}")  # type: ignore[index]
        why = ", ".join(parts)
    elif waiting >= p.backlog_min:
        band, size, why = 1, float(waiting), f"backlog {waiting}"
        if (oldest := h.get("oldest_unsent_s")) is not None:
            why += f", oldest {oldest:.0f} s"
    else:
        band, size, why = 0, 0.0, ""
    return StoreRow(
        store=f.store, link=link, last_heard_s=heard, backlog=backlog, unacked=unacked,
        queued_bytes=h.get("queued_bytes"), behind=f.behind, oldest_unsent_s=h.get("oldest_unsent_s"),
        timezone=h.get("timezone"), lag_s=lag,
        alerts_open=alerts, showing_hq_price=f.showing, with_hq_price=f.showing + f.not_showing,
        price_mismatches=mismatches, last_resync=resync, resync_pending_s=pending,
        attention=band, magnitude=size, why=why,
    )


def _health_alerts(body: str, since: float) -> list[dict[str, Any]]:
    """The alerts a health body reports, raised at or after ``since``."""
    out = []
    for a in json.loads(body).get("alerts", []):
        try:
            if parse_rfc3339(a["ts"]) >= since:
                out.append(a)
        except (KeyError, TypeError, ValueError):
            continue
    return out


def read_facts(db: HqStore, now: float, p: FleetParams = FleetParams(), store: str | None = None) -> list[StoreFacts]:
    """Every store's facts (or the one ``store``'s), in eight queries whatever the number of stores."""
    one = "" if store is None else " AND store = ?"
    one_s = "" if store is None else " AND s.store = ?"
    arg: tuple[str, ...] = () if store is None else (store,)
    facts: dict[str, StoreFacts] = {}

    def of(s: str) -> StoreFacts:
        if s not in facts:
            facts[s] = StoreFacts(s)
        return facts[s]

    for s, state, at in db.read(f"SELECT store, state, at FROM status WHERE 1 = 1{one}", arg):
        f = of(s)
        f.state, f.status_at = state, at
    for s, stream, last_seq, hwm, last_sent, applied_at in db.read(
            f"SELECT store, stream, last_seq, hwm, last_sent, last_applied_at FROM streams WHERE 1 = 1{one}", arg):
        f = of(s)
        f.behind += max(0, hwm - last_seq)
        if stream == HEALTH:
            f.health_applied_at, f.health_sent = applied_at, last_sent
    # The newest health body per store: its stream row, then the message at the highest seq HQ holds of it
    # (a primary-key lookup per store on both backends; last_seq may name a seq skipped after a loss).
    for s, body in db.read(
            "SELECT m.store, m.body FROM streams AS s JOIN telemetry AS m ON m.store = s.store AND m.stream = s.stream"
            " AND m.seq = (SELECT max(x.seq) FROM telemetry AS x WHERE x.store = s.store AND x.stream = s.stream)"
            f" WHERE s.stream = ?{one_s}", (HEALTH, *arg)):
        of(s).health = json.loads(body)
    since = now - p.alert_window_s
    for s, n in db.read(f"SELECT store, count(*) FROM alerts WHERE at >= ?{one} GROUP BY store", (since, *arg)):
        of(s).hq_alerts = n
    for s, body in db.read(
            "SELECT m.store, m.body FROM streams AS s JOIN telemetry AS m ON m.store = s.store AND m.stream = s.stream"
            " AND m.seq > s.last_seq - ? WHERE s.stream = ? AND m.ts >= ? AND m.body NOT LIKE ?" + one_s,
            (p.health_scan, HEALTH, since, _NO_ALERTS, *arg)):
        of(s).store_alerts += len(_health_alerts(body, since))
    for s, showing, not_showing in db.read(
            "SELECT store, sum(CASE WHEN state LIKE ? OR state LIKE ? THEN 1 ELSE 0 END),"
            " sum(CASE WHEN state LIKE ? OR state LIKE ? THEN 1 ELSE 0 END)"
            f" FROM labels WHERE 1 = 1{one} GROUP BY store", (*_SHOWING, *_NOT_SHOWING, *arg)):
        f = of(s)
        f.showing, f.not_showing = int(showing or 0), int(not_showing or 0)
    for s, outcome, mismatches, at in db.read(
            "SELECT store, outcome, mismatches, applied_at FROM (SELECT store, outcome, mismatches, applied_at,"
            " row_number() OVER (PARTITION BY store ORDER BY applied_at DESC, snapshot_id DESC) AS n"
            f" FROM snapshots WHERE 1 = 1{one}) AS newest WHERE n = 1", arg):
        of(s).snapshot = (outcome, mismatches, at)
    for s, at in db.read(
            f"SELECT store, min(requested_at) FROM resyncs WHERE done_at IS NULL{one} GROUP BY store", arg):
        of(s).resync_requested_at = at
    return list(facts.values())


def fleet(db: HqStore, now: float, p: FleetParams = FleetParams()) -> list[StoreRow]:
    """Every store HQ knows, assessed, in store id order."""
    return sorted((assess(f, now, p) for f in read_facts(db, now, p)), key=lambda r: r.store)


def store_alerts(db: HqStore, store: str, now: float, p: FleetParams = FleetParams(),
                 limit: int = 50) -> list[dict[str, Any]]:
    """One store's alerts, newest first: HQ's newest ``limit`` (``open`` if within the window) and those
    the store reported in its health messages within the window."""
    since = now - p.alert_window_s
    out = [{"at": at, "source": "hq", "kind": kind, "message": message, "open": at >= since}
           for at, kind, message in db.read(
               "SELECT at, kind, message FROM alerts WHERE store = ? ORDER BY id DESC LIMIT ?", (store, limit))]
    for (body,) in db.read(
            "SELECT m.body FROM streams AS s JOIN telemetry AS m ON m.store = s.store AND m.stream = s.stream"
            " AND m.seq > s.last_seq - ? WHERE s.store = ? AND s.stream = ? AND m.ts >= ? AND m.body NOT LIKE ?",
            (p.health_scan, store, HEALTH, since, _NO_ALERTS)):
        out += [{"at": parse_rfc3339(a["ts"]), "source": "store", "kind": a.get("kind", ""),
                 "message": a.get("message", ""), "open": True} for a in _health_alerts(body, since)]
    out.sort(key=lambda a: a["at"], reverse=True)
    return out[:limit]


def one_store(db: HqStore, store: str, now: float, p: FleetParams = FleetParams()) -> StoreRow | None:
    """One store's row with its alerts (the dashboard's store page), or None if HQ knows no such store."""
    facts = read_facts(db, now, p, store)
    if not facts:
        return None
    row = assess(facts[0], now, p)
    return replace(row, alerts=store_alerts(db, store, now, p))


# ---------------------------------------------------------------- order and pages


def sort_key(r: StoreRow, sort: Sort) -> tuple:
    return (r.store,) if sort == "id" else (-r.attention, -r.magnitude, r.store)


def cursor_of(r: StoreRow, sort: Sort) -> str:
    """Where a page ends, as the key of its last row (store ids have no ':'): rows that change band
    between two pages may be seen twice or not at all on that walk, as in any keyset over live data."""
    return r.store if sort == "id" else f"{r.attention}:{r.magnitude!r}:{r.store}"


def _after(cursor: str, sort: Sort) -> tuple:
    if sort == "id":
        return (cursor,)
    band, size, store = cursor.split(":", 2)
    return (-int(band), -float(size), store)


def select(rows: Iterable[StoreRow], *, sort: Sort = "id", q: str = "", cursor: str | None = None,
           limit: int = 100) -> tuple[list[StoreRow], int]:
    """One page of ``rows`` whose id contains ``q`` (any case), in ``sort`` order after ``cursor``; and
    how many match ``q`` in all. ValueError for a cursor that is not one of this sort's."""
    needle = q.casefold()
    matching = sorted((r for r in rows if needle in r.store.casefold()), key=lambda r: sort_key(r, sort))
    if cursor:
        after = _after(cursor, sort)
        matching_after: Sequence[StoreRow] = [r for r in matching if sort_key(r, sort) > after]
    else:
        matching_after = matching
    return list(matching_after[:limit]), len(matching)


def bands(rows: Iterable[StoreRow]) -> dict[int, int]:
    """How many stores are in each attention band (for the fleet's headline)."""
    out: dict[int, int] = defaultdict(int)
    for r in rows:
        out[r.attention] += 1
    return dict(sorted(out.items(), reverse=True))
