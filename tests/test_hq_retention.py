"""Telemetry retention at HQ (issue 14): day partitions dropped whole, hourly roll-ups, late messages,
and a version-2 database's telemetry moved in. Every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import math
import sqlite3
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
import pytest
from ulid import ULID

from edge_agent.clock import VirtualClock, rfc3339
from edge_agent.config import ConfigError, HqFileConfig, load_config
from edge_agent.contract import STREAMS
from edge_agent.hq.applier import HqApplier
from edge_agent.hq.store import HqStore, open_store
from edge_agent.hq.telemetry import DAY_S, HOUR_S, Retention, day_of, partition_name
from edge_agent.sync.outbox import SealedMessage

from .helpers import HqBackend

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
HEALTH = {"uptime_s": 1, "connected": True, "sealed_messages": 0, "db_bytes": 0, "cap_bytes": 1,
          "compacted_facts": 0, "coarsened_facts": 0, "dropped_facts": {}, "quarantined": {}}
TYPES = {"health": "health", "traffic/stats": "traffic.stats", "traffic/heatmap": "traffic.heatmap",
         "esl/state": "esl.state", "epcis/events": "epcis.events"}


class Feed:
    """One store's messages, numbered and chained per stream as its outbox would."""

    def __init__(self, hq: HqApplier, store: str = "S001") -> None:
        self.hq, self.store = hq, store
        self.last: dict[str, tuple[int, str]] = defaultdict(lambda: (0, ""))

    def send(self, stream: str, ts: float, body: dict[str, Any]) -> None:
        seq, prev = self.last[stream]
        m = SealedMessage(stream, seq + 1, str(ULID()), TYPES[stream], ts, ts, 1, json.dumps(body), prev=prev)
        self.last[stream] = (seq + 1, m.id)
        self.hq.receive(f"retail/v1/{self.store}/{stream}", m.payload(self.store, self.hq.clock.now(), False))
        assert self.hq.figures.rejected == 0


def stats(camera: str, start: float, entries: int, exits: int, visits: int, zone: str | None = None) -> dict:
    return {"camera": camera, "zone": zone, "bucket_start": rfc3339(start), "bucket_s": 60, "entries": entries,
            "exits": exits, "occupancy_min": 0, "occupancy_avg": 1, "occupancy_max": 2, "visits": visits}


def heat(camera: str, start: float, cells: list[float]) -> dict:
    return {"camera": camera, "bucket_start": rfc3339(start), "bucket_s": 60, "cell_m": 0.5, "cols": 2, "rows": 1,
            "cells": cells}


def partitions(store: HqStore) -> set[str]:
    return {r[0] for r in store.read("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                                     " WHERE i.inhparent = 'telemetry'::regclass")}


def kept_days(store: HqStore) -> list[int]:
    return [d for (d,) in store.read("SELECT DISTINCT day FROM telemetry ORDER BY day")]


def test_days_past_the_retention_go_whole_and_the_rest_stays(hq_backend: HqBackend) -> None:
    clock = VirtualClock(T0)
    store = hq_backend.store()
    store.retention = Retention(days=3, rollup_days=6)
    feed = Feed(HqApplier(store, clock, prefix="retail/v1"))
    day0 = day_of(T0)
    for k in range(6):  # a health a day, applied as it comes
        clock.set(T0 + k * DAY_S + 3600)
        feed.send("health", clock.now(), HEALTH | {"pending_facts": k})
        feed.send("epcis/events", clock.now(), {"items": []})
    assert kept_days(store) == [day0 + k for k in range(6)]
    expired = store.expire(clock.now())
    # Three days kept, today included; the others dropped, as whole partitions on PostgreSQL.
    assert expired.days == [day0, day0 + 1, day0 + 2] and expired.rollups == 0
    assert expired.rows == (3 if store.dialect == "sqlite" else None)
    assert kept_days(store) == [day0 + 3, day0 + 4, day0 + 5]
    assert [json.loads(b)["pending_facts"] for b in store.bodies("health", "S001")] == [3, 4, 5]
    if store.dialect == "postgres":
        names = partitions(store)
        assert {partition_name(day0 + k) for k in range(3)}.isdisjoint(names)
        assert {partition_name(day0 + k) for k in range(3, 6)} <= names
        assert not store.read("SELECT 1 FROM pg_class WHERE relname = ?", (partition_name(day0),))
    assert store.expire(clock.now()).days == []  # nothing more to drop
    # EPCIS events are a record, not telemetry: all six messages stay.
    assert len(store.bodies("epcis/events", "S001")) == 6
    # The roll-ups outlive the raw rows: every hour is still there, until their own retention.
    assert store.read("SELECT count(*), sum(messages), max(max_backlog) FROM telemetry_hourly"
                      " WHERE stream = 'health'") == [(6, 6, 5)]
    clock.set(T0 + 7 * DAY_S)
    store.ensure_partitions(clock.now())
    expired = store.expire(clock.now())
    assert expired.days == [day0 + 3, day0 + 4] and expired.rollups == 2
    assert [h for (h,) in store.read("SELECT hour FROM telemetry_hourly ORDER BY hour")] == [
        T0 + k * DAY_S + 3600 for k in range(2, 6)]
    if store.dialect == "postgres":  # today and two days ahead are made before their first message
        assert {partition_name(day_of(clock.now()) + k) for k in range(3)} <= partitions(store)
        store.ensure_partitions(clock.now())  # idempotent


def test_a_late_message_is_kept_in_its_own_day_or_if_that_is_gone_in_today(hq_backend: HqBackend) -> None:
    clock = VirtualClock(T0 + 10 * DAY_S + 60)
    store = hq_backend.store()
    store.retention = Retention(days=3, rollup_days=30)
    feed = Feed(HqApplier(store, clock, prefix="retail/v1"))
    today = day_of(clock.now())
    for days_ago in (2, 5, -1, -9):  # within the retention; past it; tomorrow; a store clock far ahead
        feed.send("health", clock.now() - days_ago * DAY_S, HEALTH | {"pending_facts": days_ago})
    rows = store.read("SELECT day, body FROM telemetry ORDER BY seq")
    assert [(d - today, json.loads(b)["pending_facts"]) for d, b in rows] == [(-2, 2), (0, 5), (1, -1), (0, -9)]
    # Rolled up in the hour of their own ts, the two kept in today counted.
    assert store.read("SELECT hour, rehomed FROM telemetry_hourly ORDER BY hour") == [
        (hour - d * DAY_S, int(d in (5, -9))) for d in (5, 2, -1, -9) for hour in [T0 + 10 * DAY_S]]
    # Today's partition keeps the late one for a whole retention period, whatever its own day.
    assert store.expire(clock.now()).days == []
    assert len(store.bodies("health")) == 4


def test_hourly_rollups_are_the_sums_of_the_raw_items(hq_backend: HqBackend) -> None:
    clock = VirtualClock(T0 + 3 * HOUR_S)
    store = hq_backend.store()
    feed = Feed(HqApplier(store, clock, prefix="retail/v1"))
    t = T0 + HOUR_S - 120  # buckets on both sides of an hour
    for k in range(4):
        start = t + 60 * k
        feed.send("traffic/stats", start + 65, {"items": [
            stats("cam1", start, k, 1, k + 2), stats("cam2", start, 2 * k, k, 1),
            stats("cam1", start, 7, 7, 7, zone="entrance"), stats("*", start, 3 * k, k + 1, k + 3)]})
        feed.send("traffic/heatmap", start + 65, {"items": [heat("cam1", start, [0.5 * k, 1.25]),
                                                           heat("*", start, [0.5 * k, 2.0])]})
    for k, backlog in enumerate((4, 40, 9)):
        feed.send("health", t + 30 * k, HEALTH | {"pending_facts": backlog})
    # The raw items, summed here per camera and hour, zoned items left out (they count twice).
    want: dict[tuple[str, float], list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])
    for b in store.bodies("traffic/stats", "S001"):
        for it in json.loads(b)["items"]:
            if it["zone"] is None:
                w = want[(it["camera"], T0 + HOUR_S * (it["bucket_start"] >= rfc3339(T0 + HOUR_S)))]
                w[0], w[1], w[2] = w[0] + it["entries"], w[1] + it["exits"], w[2] + it["visits"]
    for b in store.bodies("traffic/heatmap", "S001"):
        for it in json.loads(b)["items"]:
            want[(it["camera"], T0 + HOUR_S * (it["bucket_start"] >= rfc3339(T0 + HOUR_S)))][3] += math.fsum(it["cells"])
    got = {(cam, hour): [e, x, v, p] for cam, hour, e, x, v, p in store.read(
        "SELECT camera, hour, entries, exits, visits, person_s FROM traffic_hourly WHERE store = 'S001'")}
    assert got == want and len(got) == 6  # cam1, cam2, * in the hour before and the hour after
    assert got[("*", T0)] == [0 + 3, 1 + 2, 3 + 4, 0 + 0.5 + 2 * 2.0]
    bodies = {s: store.bodies(s, "S001") for s in ("traffic/stats", "traffic/heatmap", "health")}
    per_stream = {s: (n, i, by) for s, n, i, by in store.read(
        "SELECT stream, sum(messages), sum(items), sum(bytes) FROM telemetry_hourly GROUP BY stream")}
    assert per_stream == {s: (len(b), sum(len(json.loads(x).get("items", [1])) for x in b), sum(map(len, b)))
                          for s, b in bodies.items()}
    assert store.read("SELECT max(max_backlog) FROM telemetry_hourly WHERE stream = 'health'") == [(40,)]


def _version_2(hq_backend: HqBackend, rows: list[tuple[str, str, int, float, int, str]]) -> None:
    """A database as release 0002 left it, with these ``messages`` rows."""
    keys = hq_backend.config("old")
    dialect = "postgres" if "database" in keys else "sqlite"
    folder = resources.files("edge_agent.hq").joinpath("migrations", dialect)
    scripts = [folder.joinpath(n).read_text() for n in ("0001_initial.sql", "0002_audit.sql")]
    versions = "CREATE TABLE schema_version(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL);" \
               " INSERT INTO schema_version VALUES (1, '0001_initial.sql', 0), (2, '0002_audit.sql', 0);"
    if dialect == "sqlite":
        with sqlite3.connect(keys["db_path"]) as db:
            db.executescript("\n".join(scripts) + versions)
            db.executemany("INSERT INTO messages VALUES (?,?,?,?,?,?)", rows)
        db.close()
    else:
        with psycopg.connect(keys["database"], autocommit=True) as pg:
            pg.execute("\n".join(scripts).encode() + versions.encode())
            with pg.cursor() as cur:
                cur.executemany("INSERT INTO messages VALUES (%s,%s,%s,%s,%s,%s)", rows)


def test_a_version_2_database_keeps_its_messages_rows(hq_backend: HqBackend) -> None:
    t = T0 + 600
    health = json.dumps(HEALTH | {"pending_facts": 7})
    traffic, later = (json.dumps({"items": [stats("*", b, 4, 3, 2)]}) for b in (t, t + DAY_S))
    epcis = json.dumps({"items": []})
    _version_2(hq_backend, [("S001", "health", 1, t, 0, health), ("S001", "traffic/stats", 1, t, 1, traffic),
                            ("S001", "traffic/stats", 2, t + DAY_S, 0, later), ("S001", "epcis/events", 1, t, 0, epcis)])
    store = hq_backend.store("old")
    assert store.read("SELECT max(version) FROM schema_version") == [(4,)]
    assert store.read("SELECT store, stream, seq, day, ts, historical, body FROM telemetry ORDER BY stream, seq") == [
        ("S001", "health", 1, day_of(t), t, 0, health), ("S001", "traffic/stats", 1, day_of(t), t, 1, traffic),
        ("S001", "traffic/stats", 2, day_of(t) + 1, t + DAY_S, 0, later)]
    assert store.read("SELECT stream, seq, body FROM messages") == [("epcis/events", 1, epcis)]
    assert store.read("SELECT camera, hour, entries, exits, visits FROM traffic_hourly ORDER BY hour") == [
        ("*", T0, 4, 3, 2), ("*", T0 + DAY_S, 4, 3, 2)]
    assert [s["entries"] for s in store.traffic("S001")["stats"]] == [4, 4]
    if store.dialect == "postgres":
        assert {partition_name(day_of(t)), partition_name(day_of(t) + 1)} <= partitions(store)


def test_retention_is_configured_and_errors_name_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "hq.toml"
    cfg.write_text('[hq]\nretention_days = 0\n')
    with pytest.raises(ConfigError, match=r"hq.toml:2: hq.retention_days"):
        load_config(cfg, env={}, model=HqFileConfig)
    cfg.write_text('[hq]\nretention_days = 30\nrollup_retention_days = 7\n')
    with pytest.raises(ConfigError, match=r"hq.rollup_retention_days: .*at least hq.retention_days"):
        load_config(cfg, env={}, model=HqFileConfig)
    cfg.write_text(f'[hq]\ndb_path = "{tmp_path / "hq.db"}"\nretention_days = 30\nrollup_retention_days = 90\n')
    store = open_store(load_config(cfg, env={}, model=HqFileConfig).hq)
    assert store.retention == Retention(30, 90)
    store.close()
    assert HqFileConfig.model_validate({}).hq.retention_days == 14


def test_a_batch_of_bodies_is_kept_byte_for_byte(hq_backend: HqBackend) -> None:
    """Many rows at once (PostgreSQL sends them as one JSON parameter): text and times come back exact."""
    store = hq_backend.store()
    t = T0 + 0.123456789
    alert = {"ts": rfc3339(t), "kind": "x", "message": 'quote " backslash \\ tab \t newline \n é 漢 \U0001F600'}
    rows = [("S001", "health", k + 1, t + k / 7, bool(k % 2),
             STREAMS["health"].body.model_validate(HEALTH | {"pending_facts": k, "alerts": [alert]})) for k in range(40)]
    with store.tx() as c:
        assert store.record_messages(c, rows, t) == 0
    got = store.read("SELECT seq, ts, historical, body FROM telemetry ORDER BY seq")
    assert got == [(k + 1, t + k / 7, k % 2, b.model_dump_json()) for k, (*_, b) in enumerate(rows)]
    assert json.loads(got[0][3])["alerts"][0]["message"] == alert["message"]
