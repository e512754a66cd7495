"""The fleet view (edge_agent/hq/fleet.py): each store's figures and the attention order, on both stores of
record; and GET /stores over real HTTP (sorts, search, pages, one store with its alerts)."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from edge_agent.clock import rfc3339
from edge_agent.contract import HealthBody
from edge_agent.hq import fleet
from edge_agent.hq.store import HqStore
from simulators.mosquitto import Mosquitto, free_port

from .helpers import HqBackend, start_hq

NOW = 1_767_225_600.0


def health(pending: int = 0, sealed: int = 0, alerts: list[dict[str, str]] | None = None, **more: Any) -> HealthBody:
    """A health body, kept as the applier keeps it (HqStore.record_messages)."""
    return HealthBody(uptime_s=100, connected=True, pending_facts=pending, sealed_messages=sealed, db_bytes=4096,
                      cap_bytes=1 << 20, queued_bytes=pending * 10, compacted_facts=0, coarsened_facts=0,
                      dropped_facts={}, quarantined={}, alerts=alerts or [], **more)


def label(n: int, matches: bool | None) -> tuple[str, str]:
    state = {"ts": "2026-01-01T00:00:00.000Z", "label": f"L{n:04d}", "gtin": "09506000134352", "price": "2.99",
             "currency": "EUR", "matches_hq": matches}
    return f"L{n:04d}", json.dumps(state, separators=(",", ":"))


def seed(db: HqStore, now: float) -> list[str]:
    """Ten stores in different states; returns their ids in the attention order fleet.py documents."""
    status = {"S001": ("online", 30), "S002": ("offline", 500), "S003": ("online", 2000), "S004": ("online", 300),
              "S005": ("online", 30), "S006": ("online", 30), "S007": ("online", 30), "S008": ("online", 30),
              "S009": ("online", 30)}  # S010 never sent a status: heard through its health alone
    heard = {"S001": 10, "S002": 500, "S003": 1000, "S004": 120, "S005": 5, "S006": 5, "S007": 5, "S008": 5,
             "S009": 5, "S010": 20}
    body = {s: health(sealed=2) for s in heard}
    body["S009"] = health(pending=5000, sealed=40, oldest_unsent_s=754.2, timezone="America/New_York")
    body["S006"] = health(alerts=[{"ts": rfc3339(now - 60), "kind": "outbox.disk_full", "message": "disk full"}])
    with db.tx() as c:
        c.executemany("INSERT INTO status(store, state, at) VALUES (?,?,?)",
                      [(s, st, now - ago) for s, (st, ago) in status.items()])
        c.executemany("INSERT INTO streams(store, stream, last_seq, hwm, last_ts, last_sent, last_applied_at)"
                      " VALUES (?,'health',3,?,?,?,?)",
                      [(s, 9 if s == "S009" else 3, now - ago - 1, now - ago - 0.25, now - ago) for s, ago in heard.items()])
        # Older health messages too: only the newest body counts for the backlog; S005's old one had an alert
        # two hours ago (no longer open).
        old_alert = [{"ts": rfc3339(now - 7200), "kind": "old", "message": "long ago"}]
        db.record_messages(c, [(s, "health", seq, now - heard[s] - 60 * (3 - seq), False,
                                body[s] if seq == 3 else health(pending=999_999, alerts=old_alert if s == "S005" else None))
                               for s in heard for seq in (1, 2, 3)], now)
        c.executemany("INSERT INTO alerts(at, store, kind, message) VALUES (?,?,?,?)",
                      [(now - 600, "S005", "store.rewind", "inventory/delta went back in time"),
                       (now - 7200, "S005", "store.rewind", "an old one"),
                       (now - 300, "S006", "store.new_outbox", "a rebuilt box")])
        c.executemany("INSERT INTO labels(store, label, ts, state) VALUES ('S007',?,0,?)",
                      [label(1, True), label(2, True), label(3, False), label(4, None)])
        c.execute("INSERT INTO labels(store, label, ts, state) VALUES ('S001',?,0,?)", label(1, True))
        c.execute("INSERT INTO resyncs(store, cmd_id, requested_at) VALUES ('S008','c1',?)", (now - 45,))
        c.executemany("INSERT INTO snapshots(store, snapshot_id, as_of_seq, applied_at, outcome, mismatches)"
                      " VALUES (?,?,1,?,?,?)",
                      [("S001", "a", now - 900, "stale", 0), ("S001", "b", now - 100, "verified", 0),
                       ("S008", "x", now - 5000, "corrected", 3)])
    return ["S003", "S002", "S004", "S006", "S005", "S007", "S008", "S009", "S001", "S010"]


def test_each_store_s_figures_and_the_attention_order(hq_backend: HqBackend) -> None:
    db = hq_backend.store()
    order = seed(db, NOW)
    rows = {r.store: r for r in fleet.fleet(db, NOW)}
    assert sorted(rows) == sorted(order)
    assert [r.store for r in sorted(rows.values(), key=lambda r: fleet.sort_key(r, "attention"))] == order
    assert [(s, rows[s].attention) for s in order] == [
        ("S003", 5), ("S002", 5), ("S004", 4), ("S006", 3), ("S005", 3), ("S007", 2), ("S008", 2), ("S009", 1),
        ("S001", 0), ("S010", 0)]
    # Link: S003's status says online, but it has been silent past lost_after_s: a hung agent is not alive.
    assert {s: r.link for s, r in rows.items() if r.link != "online"} == {"S002": "offline", "S003": "lost"}
    assert rows["S003"].last_heard_s == 1000 and rows["S003"].why == "lost, last heard 1000 s ago"
    assert rows["S010"].link == "online" and rows["S010"].last_heard_s == 20
    # The newest health body only; the send-to-apply lag of that message.
    assert (rows["S009"].backlog, rows["S009"].unacked, rows["S009"].queued_bytes) == (5000, 40, 50000)
    assert rows["S009"].behind == 6 and rows["S009"].why == "backlog 5046, oldest 754 s"
    assert (rows["S009"].oldest_unsent_s, rows["S009"].timezone) == (754.2, "America/New_York")
    # An agent too old to say: no age, no zone.
    assert (rows["S001"].backlog, rows["S001"].lag_s, rows["S001"].oldest_unsent_s, rows["S001"].timezone) == (
        0, 0.25, None, None)
    # Alerts open: HQ's and the store's own within the hour; the two-hour-old ones are closed.
    assert (rows["S005"].alerts_open, rows["S006"].alerts_open) == (1, 2)
    assert rows["S006"].why == "2 alerts open"
    assert (rows["S007"].showing_hq_price, rows["S007"].with_hq_price, rows["S007"].price_mismatches) == (2, 3, 1)
    assert (rows["S001"].showing_hq_price, rows["S001"].with_hq_price) == (1, 1)
    # The newest snapshot's outcome; a resync asked for and not yet answered.
    assert rows["S001"].last_resync == {"outcome": "verified", "mismatches": 0, "age_s": 100.0}
    assert rows["S008"].resync_pending_s == 45 and rows["S008"].why == "resync pending 45 s"
    assert rows["S008"].last_resync == {"outcome": "corrected", "mismatches": 3, "age_s": 5000.0}


def test_one_store_has_its_alerts_newest_first(hq_backend: HqBackend) -> None:
    db = hq_backend.store()
    seed(db, NOW)
    row = fleet.one_store(db, "S006", NOW)
    assert row is not None and row.attention == 3
    assert [(a["source"], a["kind"], a["open"]) for a in row.alerts] == [
        ("store", "outbox.disk_full", True), ("hq", "store.new_outbox", True)]
    five = fleet.one_store(db, "S005", NOW)
    assert five is not None and [(a["message"], a["open"]) for a in five.alerts] == [
        ("inventory/delta went back in time", True), ("an old one", False)]
    assert fleet.one_store(db, "S999", NOW) is None


def test_the_fleet_is_a_fixed_handful_of_queries_at_600_stores(hq_backend: HqBackend) -> None:
    db = hq_backend.store(synchronous="OFF")
    stores = [f"S{i:04d}" for i in range(600)]
    with db.tx() as c:
        c.executemany("INSERT INTO status(store, state, at) VALUES (?, 'online', ?)", [(s, NOW - 5) for s in stores])
        c.executemany("INSERT INTO streams(store, stream, last_seq, hwm, last_sent, last_applied_at)"
                      " VALUES (?, 'health', 10, 10, ?, ?)", [(s, NOW - 6, NOW - 5) for s in stores])
        db.record_messages(c, [(s, "health", q, NOW - 600 + 60 * q, False, health(pending=i % 7 * 100))
                               for i, s in enumerate(stores) for q in range(1, 11)], NOW)
        c.executemany("INSERT INTO labels(store, label, ts, state) VALUES (?,?,0,?)",
                      [(s, *label(n, n % 9 != 0)) for s in stores for n in range(20)])
    reads = 0
    real_read = db.read

    def counting(sql: str, params: Any = ()) -> list[tuple]:
        nonlocal reads
        reads += 1
        return real_read(sql, params)

    db.read = counting  # type: ignore[method-assign]
    t0 = time.perf_counter()
    rows = fleet.fleet(db, NOW)
    took = time.perf_counter() - t0
    assert len(rows) == 600 and reads == 8, reads
    assert all(r.price_mismatches == 3 and r.backlog is not None for r in rows)
    assert took < 5.0, f"the fleet of 600 stores took {took:.2f} s"
    print(f"fleet of 600 stores on {db.dialect}: {took * 1000:.0f} ms")


def test_pages_by_attention_walk_every_store_once_and_search_narrows() -> None:
    rows = [fleet.assess(fleet.StoreFacts(f"S{i:03d}", "online", NOW - 5, NOW - (i % 5) * 40, NOW - 1), NOW)
            for i in range(1, 24)]
    seen, cursor = [], None
    while True:
        page, total = fleet.select(rows, sort="attention", cursor=cursor, limit=5)
        assert total == 23 and len(page) <= 5
        seen += page
        if len(page) < 5:
            break
        cursor = fleet.cursor_of(page[-1], "attention")
    assert sorted(r.store for r in seen) == sorted(r.store for r in rows) and len(seen) == 23
    assert [r.attention for r in seen] == sorted((r.attention for r in seen), reverse=True)
    page, total = fleet.select(rows, sort="id", q="s01")
    assert total == 10 and [r.store for r in page] == [f"S{i:03d}" for i in range(10, 20)]
    with pytest.raises(ValueError):
        fleet.select(rows, sort="attention", cursor="S001")


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback only
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_get_stores_sorts_searches_and_pages_over_http(tmp_path: Path, broker: Mosquitto, hq_backend: HqBackend) -> None:
    rx = start_hq(tmp_path, broker.port, http_port=free_port(), **hq_backend.config())
    try:
        assert rx.http is not None
        base = f"http://127.0.0.1:{rx.http.server_address[1]}"
        order = seed(rx.db, time.time())
        status, body = get(f"{base}/stores")  # as before: id order, cursor = the last id
        assert status == 200 and [r["store"] for r in body["stores"]] == sorted(order) and body["next"] is None
        assert body["total"] == 10 and body["bands"] == {"5": 2, "4": 1, "3": 2, "2": 2, "1": 1, "0": 2}
        walked, url = [], "/stores?sort=attention&limit=4"
        while url:
            status, body = get(base + url)
            assert status == 200 and len(body["stores"]) <= 4
            walked += [r["store"] for r in body["stores"]]
            url = body["next"]
        assert walked == order
        status, body = get(f"{base}/stores?sort=attention&q=s00")
        assert [r["store"] for r in body["stores"]] == [s for s in order if s != "S010"] and body["total"] == 9
        status, body = get(f"{base}/stores?store=S006")
        assert [a["kind"] for a in body["stores"][0]["alerts"]] == ["outbox.disk_full", "store.new_outbox"]
        assert get(f"{base}/stores?store=S404")[1]["stores"] == []
        assert get(f"{base}/stores?sort=worst")[0] == 400
        assert get(f"{base}/stores?sort=attention&cursor=nope")[0] == 400
    finally:
        rx.stop()
