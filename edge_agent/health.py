"""Periodic health reports: outbox depth, disk use, compaction/drop counters, quarantine counts, alerts."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from .clock import Clock, rfc3339
from .sync.outbox import Fact, Outbox

log = logging.getLogger(__name__)


class HealthReporter:
    def __init__(
        self,
        outbox: Outbox,
        clock: Clock,
        interval_s: float,
        *,
        connected: Callable[[], bool],
        extra: Callable[[], dict[str, float]] | None = None,
        timezone: str | None = None,
    ) -> None:
        self.outbox = outbox
        self.clock = clock
        self.interval_s = interval_s
        self._connected = connected
        self._extra = extra or (lambda: {})
        self._timezone = timezone
        self._started = clock.now()
        self._last = float("-inf")

    def body(self, alerts: list[tuple[float, str, str]], extra: dict[str, float]) -> dict:
        counters = self.outbox.counters()
        use = self.outbox.disk_use()
        now = self.clock.now()
        oldest = self.outbox.oldest_waiting()
        return {
            "uptime_s": round(now - self._started, 3),
            "connected": self._connected(),
            "pending_facts": self.outbox.pending_count(),
            "sealed_messages": self.outbox.sealed_count(),
            "db_bytes": self.outbox.used_bytes(),
            "cap_bytes": self.outbox.cap_bytes,
            "queued_bytes": use.queued,
            "book_bytes": use.book,
            "compacted_facts": counters.get("compacted", 0),
            "coarsened_facts": counters.get("coarsened", 0),
            "dropped_facts": {k[len("dropped."):]: v for k, v in counters.items() if k.startswith("dropped.")},
            "quarantined": {k[len("quarantined."):]: v for k, v in counters.items() if k.startswith("quarantined.")},
            "refused_commands": {k[len("refused."):]: v for k, v in counters.items() if k.startswith("refused.")},
            "counters": extra,
            "alerts": [{"ts": rfc3339(ts), "kind": k, "message": m} for ts, k, m in alerts],
            "hwm": self.outbox.high_water(),
            "oldest_unsent_s": 0.0 if oldest is None else round(max(0.0, now - oldest), 3),
            "timezone": self._timezone,
        }

    def tick(self, force: bool = False) -> bool:
        """Report if the interval has passed, or at once when there are unreported alerts. While the disk
        refuses writes, try at every tick: the report that commits ends the episode and carries its alert
        (raises WriteFailed until then)."""
        now = self.clock.now()
        has_alerts = bool(self.outbox.read("SELECT 1 FROM alerts WHERE reported = 0 LIMIT 1"))
        if not (force or has_alerts or self.outbox.write_failing or now - self._last >= self.interval_s):
            return False
        # Engines' figures are read before the outbox's write lock is taken: an engine holds its own
        # lock while it writes to the outbox, so taking them the other way round would deadlock.
        extra = self._extra()
        with self.outbox.transaction() as tx:
            body = self.body(self.outbox.take_alerts(tx), extra)
            tx.enqueue("health", [Fact(ts=now, body=json.dumps(body, separators=(",", ":")))])
        self._last = now
        return True
