"""Pure merge rules the outbox uses under disk pressure.

Inventory deltas commute, so summing the pending deltas of one (zone, GTIN) is lossless.
Analytics are re-bucketed into coarser time buckets: counts add, occupancy min/max fold, averages
are weighted by bucket length, histograms and heatmap cells add.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

from ..clock import parse_rfc3339, rfc3339

COARSEN_LEVELS_S = (900, 3600, 86400)


def inventory_key(item: dict[str, Any]) -> str:
    return f"{item['zone']}|{item['gtin']}"


def merge_inventory(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum deltas; an EPC added in one fact and removed in another cancels out."""
    net: Counter[str] = Counter()
    for it in items:
        net.update({e: 1 for e in it.get("added", ())})
        net.subtract({e: 1 for e in it.get("removed", ())})
    first = items[0]
    out: dict[str, Any] = {
        "ts": max(it["ts"] for it in items),
        "zone": first["zone"],
        "gtin": first["gtin"],
        "delta": sum(it["delta"] for it in items),
    }
    added = sorted(e for e, n in net.items() if n > 0)
    removed = sorted(e for e, n in net.items() if n < 0)
    if added:
        out["added"] = added
    if removed:
        out["removed"] = removed
    return out


def stats_key(item: dict[str, Any]) -> str:
    return f"{item['camera']}|{item.get('zone') or ''}"


def heatmap_key(item: dict[str, Any]) -> str:
    return f"{item['camera']}|{item['cell_m']}|{item['cols']}x{item['rows']}"


def _bucket(item: dict[str, Any], level_s: int) -> str:
    start = parse_rfc3339(item["bucket_start"])
    return rfc3339(start - start % level_s)


def median_from_hist(edges: list[float], hist: list[int]) -> float | None:
    total = sum(hist)
    if not total:
        return None
    half, seen = total / 2, 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= half:
            lo = edges[i - 1] if i > 0 and i - 1 < len(edges) else 0.0
            hi = edges[i] if i < len(edges) else lo
            return (lo + hi) / 2
    return None


def merge_stats(items: list[dict[str, Any]], level_s: int) -> dict[str, Any]:
    first = items[0]
    span = sum(it["bucket_s"] for it in items)
    hist = [sum(col) for col in zip(*(it.get("dwell_hist", []) for it in items), strict=False)]
    edges = first.get("dwell_edges_s", [])
    return {
        "camera": first["camera"],
        "zone": first.get("zone"),
        "bucket_start": _bucket(first, level_s),
        "bucket_s": level_s,
        "entries": sum(it["entries"] for it in items),
        "exits": sum(it["exits"] for it in items),
        "occupancy_min": min(it["occupancy_min"] for it in items),
        "occupancy_avg": sum(it["occupancy_avg"] * it["bucket_s"] for it in items) / span,
        "occupancy_max": max(it["occupancy_max"] for it in items),
        "visits": sum(it["visits"] for it in items),
        "dwell_edges_s": edges,
        "dwell_hist": hist,
        "dwell_median_s": median_from_hist(edges, hist),
    }


def merge_heatmap(items: list[dict[str, Any]], level_s: int) -> dict[str, Any]:
    first = items[0]
    cells = [sum(col) for col in zip(*(it["cells"] for it in items), strict=True)]
    return {
        "camera": first["camera"],
        "bucket_start": _bucket(first, level_s),
        "bucket_s": level_s,
        "cell_m": first["cell_m"],
        "cols": first["cols"],
        "rows": first["rows"],
        "cells": cells,
        # One camera's grid: the same origin and doors in every bucket (the newest, should its config change).
        **{k: items[-1][k] for k in ("origin", "doors") if k in items[-1]},
    }


ANALYTICS_MERGE = {"traffic/stats": (stats_key, merge_stats), "traffic/heatmap": (heatmap_key, merge_heatmap)}


def fact_key(stream: str, item: dict[str, Any]) -> str | None:
    """The compaction key a pending fact of ``stream`` carries (None where facts are never merged)."""
    if stream == "inventory/delta":
        return inventory_key(item)
    merge = ANALYTICS_MERGE.get(stream)
    return merge[0](item) if merge else None


def coarsen(stream: str, bodies: Iterable[str], level_s: int) -> list[dict[str, Any]]:
    """Group analytics items by key and coarse bucket and merge each group.

    An item already coarser than ``level_s`` (made by an earlier round of a long outage, which starts
    again at the finest level) is grouped at its own length: re-bucketed finer, it would claim its
    counts for a shorter time than they took. A group of one item already at its length is kept as it
    is, exact dwell median included.
    """
    key_of, merge = ANALYTICS_MERGE[stream]
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for body in bodies:
        item = json.loads(body)
        level = max(level_s, item["bucket_s"])
        groups.setdefault((key_of(item), level, _bucket(item, level)), []).append(item)
    return [
        g[0] if len(g) == 1 and g[0]["bucket_s"] == level else merge(g, level)
        for (_, level, _), g in groups.items()
    ]
