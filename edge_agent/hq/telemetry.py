"""Telemetry at HQ: which streams are kept only for a while, in which day, and what their hourly roll-ups sum.

Rules
- Telemetry is ``traffic/stats``, ``traffic/heatmap``, ``health`` and ``esl/state``: figures read for the
  recent past. Every other stream is a record HQ keeps for good in ``messages``: ``epcis/events`` (the
  EPCIS export reads it; an event log is business record), ``cmd-result`` (what became of each command),
  ``esl/alert`` and ``inventory/count``. Inventory and label state are current tables of their own.
- A telemetry message is kept in the day of its own ``ts`` (UTC), not the day HQ received it: a store
  replaying three days of buffered traffic puts it in the days it happened, where a day's reads and that
  day's expiry find it.
- Raw rows are kept for ``Retention.days`` UTC days, today included; older days go whole (a dropped
  partition on PostgreSQL, a DELETE on SQLite).
- A message whose own day is outside what HQ keeps is kept in HQ's today instead, and counted
  (``rehomed``): one older than the retention when it arrives (a store offline for longer, or a store
  clock far behind), or more than ``PARTITIONS_AHEAD`` days ahead (a store clock far ahead). Nothing
  applied is dropped on arrival, a late backlog stays readable for a retention period after it came,
  and a wrong clock can neither bring back a dropped day nor make a day far ahead that nothing expires.
- Roll-ups are per UTC hour and added in the transaction that applies the message, so each applied
  message counts exactly once, and no job has to parse bodies again
  (which SQLite and PostgreSQL spell differently). Per stream by the hour of the message's ``ts``:
  messages, items, body bytes, rehomed, and the largest backlog (pending facts) ``health`` reported.
  Per camera (``*`` store-wide) by the hour its bucket starts in: entries, exits and visits of the
  ``traffic/stats`` items with no zone, and the person-seconds of the ``traffic/heatmap`` items. They are
  kept for ``Retention.rollup_days``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

TELEMETRY = frozenset({"traffic/stats", "traffic/heatmap", "health", "esl/state"})
DAY_S = 86_400
HOUR_S = 3_600
PARTITIONS_AHEAD = 2  # days past today whose partitions exist before their first message


@dataclass(frozen=True)
class Retention:
    days: int = 14  # raw telemetry: UTC days, today included (hq.retention_days)
    rollup_days: int = 400  # hourly roll-ups (hq.rollup_retention_days)

    def horizon(self, now: float) -> int:
        """The oldest day whose raw telemetry is kept at ``now``."""
        return day_of(now) - self.days + 1

    def rollup_horizon(self, now: float) -> int:
        """The oldest hour (epoch seconds) whose roll-ups are kept at ``now``."""
        return (day_of(now) - self.rollup_days + 1) * DAY_S


def day_of(ts: float) -> int:
    """Days since 1970-01-01 of the UTC day ``ts`` falls in."""
    return math.floor(ts / DAY_S)


def hour_of(ts: float) -> int:
    return math.floor(ts / HOUR_S) * HOUR_S


def partition_name(day: int) -> str:
    return "telemetry_d" + datetime.fromtimestamp(day * DAY_S, UTC).strftime("%Y%m%d")


def keep_day(ts: float, now: float, retention: Retention) -> int:
    """The day a message stamped ``ts`` is kept in at ``now``: its own, or HQ's today if its own is not kept."""
    day = day_of(ts)
    return day if retention.horizon(now) <= day <= day_of(now) + PARTITIONS_AHEAD else day_of(now)


@dataclass
class Rollup:
    """Roll-up figures of a batch of messages, summed per key, so each key is one upsert (PostgreSQL
    refuses a statement that updates one row twice)."""

    # (store, stream, hour) -> [messages, items, bytes, rehomed, max_backlog]
    streams: dict[tuple[str, str, int], list[int]] = field(default_factory=dict)
    # (store, camera, hour) -> [entries, exits, visits, person_s]
    traffic: dict[tuple[str, str, int], list[float]] = field(default_factory=dict)

    def add(self, store: str, stream: str, ts: float, body: Any, size: int, rehomed: bool) -> None:
        """One message: ``body`` is its typed body (contract.py), ``size`` its JSON bytes."""
        items = getattr(body, "items", None)
        backlog = body.pending_facts if stream == "health" else 0
        s = self.streams.setdefault((store, stream, hour_of(ts)), [0, 0, 0, 0, 0])
        s[0] += 1
        s[1] += len(items) if items is not None else 1
        s[2] += size
        s[3] += int(rehomed)
        s[4] = max(s[4], backlog)
        if stream == "traffic/stats":
            for it in items:
                if it.zone is None:
                    t = self._traffic(store, it.camera, it.bucket_start.timestamp())
                    t[0] += it.entries
                    t[1] += it.exits
                    t[2] += it.visits
        elif stream == "traffic/heatmap":
            for it in items:
                self._traffic(store, it.camera, it.bucket_start.timestamp())[3] += math.fsum(it.cells)

    def _traffic(self, store: str, camera: str, ts: float) -> list[float]:
        return self.traffic.setdefault((store, camera, hour_of(ts)), [0, 0, 0, 0.0])
