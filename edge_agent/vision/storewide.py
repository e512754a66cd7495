"""Store-wide traffic: the cameras' finished buckets merged into ``camera="*"`` items.

Pure: it is fed each camera's finished traffic/stats and traffic/heatmap items and told the time; it reads
no clock and does no I/O. One store-wide item per (bucket, zone), where a zone of the same name on several
cameras is one store zone and ``zone=None`` is everything the cameras see.

When a store-wide bucket goes out
    When every configured camera with that bucket length has settled it: delivered it, delivered a later
    bucket (a camera flushes its buckets in order, so it had no frames in this one: it was down or not yet
    started), or finished (its file ended). Otherwise when ``wait_s`` has passed since the first camera
    delivered it, so a camera that is down or stalled never holds the store-wide figure back for long.

A camera that delivers a bucket after its store-wide item went out is late
    Its items still go out as that camera's own items, but are left out of the store-wide figure and
    counted (``late_items``). There is deliberately no second, corrected "*" item for the bucket: the
    outbox's coarsening (edge_agent.sync.compaction.merge_stats) sums every item of one key in a coarse
    bucket, so two "*" items of one minute would count its entries twice, and HQ keeps every message
    rather than replacing one. One "*" item per bucket keeps both exact; HQ can always re-add the camera
    items. ``partial_buckets`` counts the store-wide buckets that went out without every camera.

How each figure merges
    entries, exits, visits, dwell histograms and heatmap cells add. The average occupancy adds too (the
    average of a sum is the sum of the averages), which is exact when the cameras saw the whole bucket.
    The minimum and maximum cannot be merged exactly: the cameras' frames are not aligned and only
    their extremes are sent, so the sum of the minimums and the sum of the maximums are reported, an
    envelope of the true store-wide range (true min >= sum of mins, true max <= sum of maxes; exact for
    one camera, and always min <= avg <= max). The dwell median is exact: each camera also sends the
    dwell seconds of the visits it counted (``DwellCarry``), never beyond this box. If those are missing
    for a camera (results dropped), a camera's own exact median is kept when it alone had visits,
    otherwise the median is read off the merged histogram like the outbox's coarsening does (the middle
    of the median's bin) and counted (``approx_medians``).
    Sums assume the cameras' views do not overlap and each door line is counted by one camera.
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..clock import parse_rfc3339, rfc3339
from ..sync.compaction import median_from_hist
from .analytics import TrafficAnalyticsConfig, Visit

STORE_WIDE = "*"
# Store-wide buckets remembered as sent while a silent camera might still deliver them: a week of minutes.
# A camera silent for longer comes back with new buckets (a live stream's time restarts with the session).
REMEMBER_SENT = 10_080

Item = dict[str, Any]
Items = tuple[list[Item], list[Item]]  # (traffic/stats items, traffic/heatmap items)
Dwells = Mapping[str, Mapping[str, Sequence[float]]]  # bucket_start -> zone -> dwell seconds of its visits
COUNTERS = ("buckets", "partial_buckets", "late_items", "approx_medians")


class DwellCarry:
    """In a camera process: the dwell seconds of each counted visit, held until its bucket is flushed.

    TrafficAnalytics counts a visit in the bucket of its leave time; ``take`` hands over the seconds of
    the buckets just flushed so the store-wide median can be exact.
    """

    def __init__(self, bucket_s: int) -> None:
        self.bucket_s = bucket_s
        self._held: dict[tuple[str, str], list[float]] = {}

    def add(self, visits: Iterable[Visit]) -> None:
        for v in visits:
            start = rfc3339(float(math.floor(v.leave_ts / self.bucket_s) * self.bucket_s))
            self._held.setdefault((start, v.zone), []).append(v.seconds)

    def take(self, stats: Sequence[Item]) -> dict[str, dict[str, list[float]]]:
        """The dwell seconds of these flushed stats items: bucket_start -> zone -> seconds."""
        out: dict[str, dict[str, list[float]]] = {}
        for it in stats:
            if it["zone"] is not None and (values := self._held.pop((it["bucket_start"], it["zone"]), None)):
                out.setdefault(it["bucket_start"], {})[it["zone"]] = values
        if stats:
            # Buckets are flushed in order, so anything held for one already flushed can never be taken.
            newest = max(parse_rfc3339(it["bucket_start"]) for it in stats)
            for key in [k for k in self._held if parse_rfc3339(k[0]) <= newest]:
                del self._held[key]
        return out


@dataclass
class _Bucket:
    start: float
    first_seen: float
    stats: dict[str, list[Item]] = field(default_factory=dict)  # camera -> its items (one per zone)
    heat: dict[str, Item] = field(default_factory=dict)
    dwells: dict[str, Mapping[str, Sequence[float]]] = field(default_factory=dict)  # camera -> zone -> seconds


class StoreWideTraffic:
    """Merges the cameras' finished buckets into store-wide items; see the module docstring for the rules."""

    def __init__(self, cameras: Sequence[TrafficAnalyticsConfig], *, wait_s: float) -> None:
        self.wait_s = wait_s
        self._bucket_s = {c.camera: c.bucket_s for c in cameras}
        grids = {(c.heatmap.origin, c.heatmap.cell_m, c.heatmap.cols, c.heatmap.rows) if c.heatmap else None
                 for c in cameras}
        # Heatmap cells add only when every camera paints the same cells of one floor plan; with separate
        # grids (each camera its own floor coordinates, or cameras without a heatmap) a store-wide sum
        # would put different places in one cell, so there is no store-wide heatmap.
        self.merges_heatmaps = len(grids) == 1 and None not in grids
        self._pending: dict[tuple[str, int], _Bucket] = {}
        self._sent: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._progress: dict[str, float] = {}  # camera -> start of the newest bucket it delivered
        self._finished: set[str] = set()
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    def add(self, camera: str, stats: Sequence[Item], heat: Sequence[Item], dwells: Dwells, now: float) -> Items:
        """Take one camera's flushed items (and the dwell seconds behind them); returns what is now due."""
        if camera not in self._bucket_s:
            raise ValueError(f"camera {camera!r} is not configured")
        for it in stats:
            b = self._bucket_for(it, now)
            if b is not None:
                b.stats.setdefault(camera, []).append(it)
                b.dwells[camera] = dwells.get(it["bucket_start"], {})
        for it in heat:
            b = self._bucket_for(it, now) if self.merges_heatmaps else None
            if b is not None:
                b.heat[camera] = it
        starts = [parse_rfc3339(it["bucket_start"]) for it in (*stats, *heat)]
        if starts:
            self._progress[camera] = max(self._progress.get(camera, -math.inf), *starts)
        return self._emit([k for k in self._pending if self._settled(k)])

    def camera_done(self, camera: str) -> Items:
        """The camera will deliver nothing more (its file ended): stop waiting for it."""
        self._finished.add(camera)
        return self._emit([k for k in self._pending if self._settled(k)])

    def due(self, now: float) -> Items:
        """Buckets that waited ``wait_s`` for a camera that did not deliver them go out without it."""
        return self._emit([k for k, b in self._pending.items() if now - b.first_seen >= self.wait_s])

    def flush(self) -> Items:
        """Everything still waiting (the agent is stopping)."""
        return self._emit(list(self._pending))

    # ------------------------------------------------------------ internals

    def _bucket_for(self, it: Item, now: float) -> _Bucket | None:
        key = (it["bucket_start"], it["bucket_s"])
        if key in self._sent:
            self.counters["late_items"] += 1
            return None
        b = self._pending.get(key)
        if b is None:
            b = self._pending[key] = _Bucket(parse_rfc3339(it["bucket_start"]), now)
        return b

    def _expected(self, bucket_s: int) -> list[str]:
        return [c for c, s in self._bucket_s.items() if s == bucket_s]

    def _settled(self, key: tuple[str, int]) -> bool:
        b = self._pending[key]
        return all(c in b.stats or c in self._finished or self._progress.get(c, -math.inf) > b.start
                   for c in self._expected(key[1]))

    def _emit(self, keys: list[tuple[str, int]]) -> Items:
        stats: list[Item] = []
        heat: list[Item] = []
        for key in sorted(keys, key=lambda k: (k[1], self._pending[k].start)):
            b = self._pending.pop(key)
            self.counters["buckets"] += 1
            if any(c not in b.stats for c in self._expected(key[1])):
                self.counters["partial_buckets"] += 1
            stats.extend(self._merge_stats(b, *key))
            if b.heat:
                heat.append(_merge_heat(b, *key))
            self._sent[key] = None
        while len(self._sent) > REMEMBER_SENT:
            self._sent.popitem(last=False)
        return stats, heat

    def _merge_stats(self, b: _Bucket, start: str, bucket_s: int) -> list[Item]:
        by_zone: dict[str | None, list[tuple[Item, Sequence[float] | None]]] = {}
        for camera in sorted(b.stats):  # a fixed order: float sums do not depend on arrival order
            for it in b.stats[camera]:
                values = b.dwells[camera].get(it["zone"]) if it["zone"] is not None else None
                by_zone.setdefault(it["zone"], []).append((it, values))
        return [self._merge_zone(zone, parts, start, bucket_s)
                for zone, parts in sorted(by_zone.items(), key=lambda kv: (kv[0] is not None, kv[0] or ""))]

    def _merge_zone(self, zone: str | None, parts: list[tuple[Item, Sequence[float] | None]], start: str,
                    bucket_s: int) -> Item:
        items = [it for it, _ in parts]
        edges = items[0]["dwell_edges_s"]
        same_edges = all(it["dwell_edges_s"] == edges for it in items)
        # Histograms with different edges do not add: no store-wide histogram then (the median still can be).
        hist = [sum(col) for col in zip(*(it["dwell_hist"] for it in items), strict=True)] if same_edges else []
        return {
            "camera": STORE_WIDE,
            "zone": zone,
            "bucket_start": start,
            "bucket_s": bucket_s,
            "entries": sum(it["entries"] for it in items),
            "exits": sum(it["exits"] for it in items),
            "occupancy_min": sum(it["occupancy_min"] for it in items),
            "occupancy_avg": round(sum(it["occupancy_avg"] for it in items), 4),
            "occupancy_max": sum(it["occupancy_max"] for it in items),
            "visits": sum(it["visits"] for it in items),
            "dwell_edges_s": edges if same_edges else [],
            "dwell_hist": hist,
            "dwell_median_s": self._median(parts, edges if same_edges else [], hist),
        }

    def _median(self, parts: list[tuple[Item, Sequence[float] | None]], edges: list[float],
                hist: list[int]) -> float | None:
        if all(it["visits"] == 0 or (v is not None and len(v) == it["visits"]) for it, v in parts):
            values = [x for it, v in parts if it["visits"] for x in (v or ())]
            return round(statistics.median(values), 3) if values else None
        with_visits = [it for it, _ in parts if it["visits"]]
        if len(with_visits) == 1:
            return with_visits[0]["dwell_median_s"]
        self.counters["approx_medians"] += 1
        return median_from_hist(edges, hist) if hist else None


def _merge_heat(b: _Bucket, start: str, bucket_s: int) -> Item:
    first = next(iter(b.heat.values()))
    cells = np.sum([b.heat[c]["cells"] for c in sorted(b.heat)], axis=0)
    # One floor, so the cameras' doors are one set: a door two cameras watch is drawn once.
    doors = {(d["name"], tuple(d["a"]), tuple(d["b"])): d for c in sorted(b.heat) for d in b.heat[c].get("doors", [])}
    return {
        "camera": STORE_WIDE,
        "bucket_start": start,
        "bucket_s": bucket_s,
        "cell_m": first["cell_m"],
        "cols": first["cols"],
        "rows": first["rows"],
        "cells": np.round(cells, 3).tolist(),
        "origin": first.get("origin"),
        "doors": list(doors.values()),
    }
