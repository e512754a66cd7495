"""HQ telemetry retention: 40 simulated days of 600 stores into PostgreSQL, expired daily (issue 14).

A private PostgreSQL cluster (simulators/postgres.py, fsync off: sizes, not durability, are measured).
Time is a fake clock: hour by hour, every store's telemetry goes through ``HqStore.record_messages`` (the
applier's own write path: day partitions and hourly roll-ups), one transaction per simulated hour; at
each simulated midnight ``ensure_partitions`` and ``expire`` run, as the receiver's hourly job would.

Per store, full rate (the issue's figures): traffic/stats 1 message a minute per camera (3 cameras),
traffic/heatmap the same, health every 30 s, esl/state every 5 minutes. Bodies are realistic: stats
items with two zones and a dwell histogram, the first camera's message also carrying the store-wide "*"
item; heatmaps of 8 x 16 cells (the example config's grid); health with counters and the high-water
marks of every stream; label states of 5 labels.

600 stores x 40 days at full rate is 280 million messages, hours of inserts and about 100 GB on this
box; so the 40 days run at a 60th of the rate of each minute stream (one message an hour per camera,
health twice an hour) and esl/state at a 12th (once an hour). Each store still has every stream in every
hour, so the roll-ups are their full-rate size, measured. The raw figures at full rate are extrapolated
per stream from the rows and bytes measured, and checked against a calibration: one simulated hour of all
600 stores at the full rate, into a database of its own, measured.

    python bench/hq_retention.py                                   # 600 stores, 40 days, retention 14
    python bench/hq_retention.py --stores 20 --days 5 --calibrate-hours 0    # a quick look
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from typing import Any

from _common import emit, header, note
from ulid import ULID

from edge_agent.clock import rfc3339
from edge_agent.contract import STREAMS
from edge_agent.hq.pg_store import PgStore
from edge_agent.hq.telemetry import DAY_S, HOUR_S, Retention, day_of, partition_name
from edge_agent.vision.analytics import DEFAULT_DWELL_EDGES_S
from simulators.postgres import Postgres

T_START = 1_767_225_600.0  # 2026-01-01T00:00:00Z
CAMERAS = ("cam1", "cam2", "cam3")
FULL_PER_HOUR = {"traffic/stats": 180, "traffic/heatmap": 180, "health": 120, "esl/state": 12}
SIM_PER_HOUR = {"traffic/stats": 3, "traffic/heatmap": 3, "health": 2, "esl/state": 1}
MARKS = {s: {"seq": 10_000 + i, "id": str(ULID())} for i, s in enumerate(STREAMS)}


def stats_body(rng: random.Random, cam: str, start: float) -> Any:
    def item(camera: str, zone: str | None, scale: int) -> dict[str, Any]:
        hist = [rng.randrange(scale + 1) for _ in range(len(DEFAULT_DWELL_EDGES_S) + 1)]
        occ = rng.uniform(0, scale)
        return {"camera": camera, "zone": zone, "bucket_start": rfc3339(start), "bucket_s": 60,
                "entries": rng.randrange(scale), "exits": rng.randrange(scale), "occupancy_min": round(occ / 2, 2),
                "occupancy_avg": round(occ, 2), "occupancy_max": round(occ * 1.5, 2), "visits": sum(hist),
                "dwell_edges_s": DEFAULT_DWELL_EDGES_S, "dwell_hist": hist,
                "dwell_median_s": round(rng.uniform(5, 200), 1)}

    items = [item(cam, z, 6) for z in (None, f"{cam}-entrance", f"{cam}-aisle")]
    if cam == CAMERAS[0]:
        items += [item("*", None, 15)]
    return STREAMS["traffic/stats"].body.model_validate({"items": items})


def heatmap_body(rng: random.Random, cam: str, start: float) -> Any:
    def item(camera: str) -> dict[str, Any]:
        cells = [round(rng.expovariate(0.3), 1) if rng.random() < 0.3 else 0.0 for _ in range(8 * 16)]
        return {"camera": camera, "bucket_start": rfc3339(start), "bucket_s": 60, "cell_m": 0.5, "cols": 8,
                "rows": 16, "cells": cells}

    return STREAMS["traffic/heatmap"].body.model_validate(
        {"items": [item(cam)] + ([item("*")] if cam == CAMERAS[0] else [])})


def health_body(rng: random.Random, t: float) -> Any:
    return STREAMS["health"].body.model_validate({
        "uptime_s": round(t - T_START, 1), "connected": True, "pending_facts": rng.randrange(50),
        "sealed_messages": rng.randrange(8), "db_bytes": rng.randrange(10**6, 10**8), "cap_bytes": 268435456,
        "queued_bytes": rng.randrange(10**5), "book_bytes": rng.randrange(10**6, 10**7), "compacted_facts": 0,
        "coarsened_facts": 0, "dropped_facts": {}, "quarantined": {"rfid": rng.randrange(3)},
        "counters": {"rfid.reads": rng.randrange(10**7), "vision.frames": rng.randrange(10**7),
                     "esl.uploads": rng.randrange(10**4), "uplink.published": rng.randrange(10**6)},
        "hwm": MARKS})


def esl_body(rng: random.Random, t: float) -> Any:
    return STREAMS["esl/state"].body.model_validate({"items": [
        {"ts": rfc3339(t), "label": f"0000021A{rng.randrange(16**4):04X}", "gtin": f"0400000{rng.randrange(10**6):06d}6"[:14],
         "price": f"{rng.randrange(1, 99)}.99", "currency": "EUR", "battery_mv": 2900 + rng.randrange(200),
         "rssi": -60 - rng.randrange(30), "lqi": 100 + rng.randrange(100), "last_seen": rfc3339(t - 30),
         "matches_hq": True} for _ in range(5)]})


def hour_bodies(rng: random.Random, h: float, per_hour: dict[str, int]) -> list[tuple[str, float, Any]]:
    """One store's messages in the hour starting at ``h``, at ``per_hour`` messages a stream (stream, ts,
    body); every store sends these bodies (their sizes are what is measured, not their values)."""
    out = []
    for stream, n in per_hour.items():
        per_cam = stream.startswith("traffic/")
        for k in range(n // len(CAMERAS) if per_cam else n):
            t = h + (k + 0.5) * HOUR_S / (n // len(CAMERAS) if per_cam else n)
            if per_cam:
                start = t - t % 60 - 60  # the minute that just finished
                make: Callable[[random.Random, str, float], Any] = stats_body if stream == "traffic/stats" else heatmap_body
                out += [(stream, t, make(rng, cam, start)) for cam in CAMERAS]
            else:
                out.append((stream, t, (health_body if stream == "health" else esl_body)(rng, t)))
    return out


def run(store: PgStore, stores: int, hours: int, per_hour: dict[str, int], daily: Callable[[float], None]) -> int:
    rng = random.Random(1)
    seqs = {s: 0 for s in per_hour}
    rows = 0
    for i in range(hours):
        h = T_START + i * HOUR_S
        if i % 24 == 0:
            daily(h)
        msgs = hour_bodies(rng, h, per_hour)
        base = dict(seqs)
        batch = []
        for s in range(stores):
            count = dict.fromkeys(per_hour, 0)
            for stream, t, body in msgs:
                count[stream] += 1
                batch.append((f"S{s:04d}", stream, base[stream] + count[stream], t, False, body))
        for stream in per_hour:
            seqs[stream] += sum(1 for m in msgs if m[0] == stream)
        with store.tx() as c:
            store.record_messages(c, batch, h + HOUR_S - 1)
        rows += len(batch)
    return rows


def one(store: PgStore, sql: str) -> Any:
    return store.read(sql)[0][0]


def partitions_bytes(store: PgStore) -> tuple[int, int]:
    return tuple(store.read(  # type: ignore[return-value]
        "SELECT count(*), coalesce(sum(pg_total_relation_size(i.inhrelid)), 0)::bigint FROM pg_inherits i"
        " WHERE i.inhparent = 'telemetry'::regclass")[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stores", type=int, default=150, help="stores simulated for the whole run")
    p.add_argument("--fleet", type=int, default=600, help="stores the estimates are for (and the calibration runs)")
    p.add_argument("--days", type=int, default=40)
    p.add_argument("--retention-days", type=int, default=14)
    p.add_argument("--rollup-retention-days", type=int, default=400)
    p.add_argument("--calibrate-hours", type=int, default=1, help="hours of the fleet at the full rate, measured")
    a = p.parse_args()
    header("hq_retention", stores=a.stores, fleet=a.fleet, days=a.days, retention_days=a.retention_days,
           rollup_retention_days=a.rollup_retention_days)
    note(f"simulated messages per store-hour {SIM_PER_HOUR}; full rate {FULL_PER_HOUR}")
    pg = Postgres().start()
    try:
        store = PgStore(pg.create_database())
        store.retention = Retention(a.retention_days, a.rollup_retention_days)
        dropped: list[int] = []
        sizes: dict[int, int] = {}
        day_bytes: list[int] = []

        def daily(now: float) -> None:
            day = int((now - T_START) // DAY_S)
            if day:  # yesterday's partition is complete: its size, before anything is dropped
                day_bytes.append(one(store, f"SELECT pg_total_relation_size('{partition_name(day_of(now) - 1)}')"))
            store.ensure_partitions(now)
            dropped.extend(store.expire(now).days)
            sizes[day] = one(store, "SELECT pg_database_size(current_database())")

        t0 = time.perf_counter()
        rows = run(store, a.stores, a.days * 24, SIM_PER_HOUR, daily)
        elapsed = time.perf_counter() - t0
        daily(T_START + a.days * DAY_S - 1)  # the last day's end: its own expiry, sizes as they stand
        emit("rows_recorded", rows)
        emit("record_rows_per_s", rows / elapsed)
        emit("partitions_dropped", len(dropped))
        parts, part_bytes = partitions_bytes(store)
        emit("partitions_retained", parts)
        retained_rows = one(store, "SELECT count(*) FROM telemetry")
        emit("rows_retained", retained_rows)
        emit("retained_partitions_mb", part_bytes / 2**20)
        rollup_rows = one(store, "SELECT (SELECT count(*) FROM telemetry_hourly) + (SELECT count(*) FROM traffic_hourly)")
        rollup_bytes = one(store, "SELECT pg_total_relation_size('telemetry_hourly') + pg_total_relation_size('traffic_hourly')")
        emit("rollup_rows", rollup_rows)
        emit("rollup_mb", rollup_bytes / 2**20)
        for day in sorted({d for d in (1, a.retention_days, a.retention_days + 5, a.days // 2) if d in sizes}):
            emit(f"db_mb_at_day_{day}", sizes[day] / 2**20)
        db_bytes = one(store, "SELECT pg_database_size(current_database())")
        emit(f"db_mb_at_day_{a.days}", db_bytes / 2**20)
        per_day = sum(day_bytes) / len(day_bytes)
        emit("partition_mb_per_day", per_day / 2**20)
        keep_all = db_bytes - part_bytes + per_day * a.days
        emit("keep_everything_mb", keep_all / 2**20)
        emit("keep_everything_over_db", keep_all / db_bytes)

        # The fleet at the full rate, extrapolated: each stream's rows and stored body bytes times its rate
        # factor, with the per-row overhead (tuple header, primary key, page slack) measured over them all,
        # times fleet / stores. The roll-ups are already at their full-rate size (every stream every hour).
        by_stream = {st: (n, b) for st, n, b in store.read(
            "SELECT stream, count(*), sum(pg_column_size(body))::bigint FROM telemetry GROUP BY stream")}
        overhead = (part_bytes - sum(b for _, b in by_stream.values())) / max(1, retained_rows)
        scale = a.fleet / a.stores
        full = scale * sum(FULL_PER_HOUR[st] / SIM_PER_HOUR[st] * (n * overhead + b) for st, (n, b) in by_stream.items())
        rollups_full = rollup_bytes / min(a.days, a.rollup_retention_days) * a.rollup_retention_days * scale
        emit("row_overhead_bytes", overhead)
        emit("fleet_full_rate_rows_per_day", a.fleet * 24 * sum(FULL_PER_HOUR.values()))
        emit("fleet_retained_gb", full / 2**30)
        emit("fleet_rollup_gb_per_year", rollup_bytes / min(a.days, a.rollup_retention_days) * 365 * scale / 2**30)
        emit(f"fleet_rollup_gb_at_{a.rollup_retention_days}_days", rollups_full / 2**30)
        emit("fleet_db_gb_bound", (full + rollups_full) / 2**30)
        emit(f"fleet_keep_everything_gb_at_{a.days}_days", full / a.retention_days * a.days / 2**30)
        store.close()

        if a.calibrate_hours:
            cal = PgStore(pg.create_database())
            t0 = time.perf_counter()
            rows = run(cal, a.fleet, a.calibrate_hours, FULL_PER_HOUR, cal.ensure_partitions)
            emit("calibration_rows", rows)
            emit("calibration_rows_per_s", rows / (time.perf_counter() - t0))
            _, hour_bytes = partitions_bytes(cal)
            emit("calibration_mb_per_hour", hour_bytes / a.calibrate_hours / 2**20)
            emit("fleet_retained_gb_calibrated", hour_bytes / a.calibrate_hours * 24 * a.retention_days / 2**30)
            cal.close()
        note("PostgreSQL with fsync off, no VACUUM run; a dropped partition gives its files back at once")
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
