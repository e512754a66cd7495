"""HQ's Prometheus metrics (``GET /metrics``), in a registry of each receiver's own.

Counters and histograms that only the apply path sees are updated there (``applied``, ``rejected``,
``apply_seconds``); what HQ's tables already count, durably and across restarts (gaps, lost,
rewinds, replays, resyncs, stores online, per-store lag), is read from them at scrape time by a
collector, so no number is kept twice. Every label is bounded: ``stream`` (the contract's streams),
``reason`` (the fixed kinds below) and ``store`` (the chain's stores: hundreds, not unbounded).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .applier import Applied
from .store import HqStore

# A rejected message's reason is free text (it names fields and numbers); its kind, the metric's label,
# is one of these, by how the applier's reasons begin (HqApplier.receive).
REJECT_KINDS = (
    ("not a ", "topic"),
    ("payload of", "too_large"),
    ("unknown message type", "unknown_type"),
    ("envelope says", "topic_mismatch"),
    ("signature:", "signature"),
    ("implausible:", "implausible"),
    ("number out of range", "out_of_range"),
)


def reject_kind(reason: str) -> str:
    for prefix, kind in REJECT_KINDS:
        if reason.startswith(prefix):
            return kind
    return "invalid"  # not JSON, or not the schema of its type


class HqMetrics:
    def __init__(self, db: HqStore, connected: Callable[[], bool], now: Callable[[], float]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.messages = Counter("hq_messages_applied", "Messages applied, per stream", ["stream"],
                                registry=self.registry)
        self.facts = Counter("hq_facts_applied", "Facts (items) applied, per stream", ["stream"],
                             registry=self.registry)
        self.rejected = Counter("hq_messages_rejected", "Messages refused before anything was applied, by reason",
                                ["reason"], registry=self.registry)
        self.apply_seconds = Histogram(
            "hq_apply_seconds", "Time from HQ receiving an MQTT message to its batch committing (queue, validate, apply, commit)", registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self.delivery_seconds = Histogram(
            "hq_delivery_latency_seconds", "From the store's send to HQ's commit, per stream", ["stream"],
            registry=self.registry, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600))
        self.registry.register(_TableCollector(db, connected, now))

    def applied(self, a: Applied) -> None:
        self.messages.labels(a.stream).inc()
        self.facts.labels(a.stream).inc(a.facts)
        self.delivery_seconds.labels(a.stream).observe(max(0.0, a.at - a.sent))

    def on_rejected(self, reason: str) -> None:
        self.rejected.labels(reject_kind(reason)).inc()


class _TableCollector(Collector):
    """What HQ's tables count, read at scrape time."""

    def __init__(self, db: HqStore, connected: Callable[[], bool], now: Callable[[], float]) -> None:
        self.db = db
        self.connected = connected
        self.now = now  # HQ's wall clock, as /state's lag_s

    def describe(self) -> list[Metric]:
        return []  # names vary with nothing; describing would run a scrape at registration

    def collect(self) -> Iterator[Metric]:
        per_stream = self.db.read(
            "SELECT stream, sum(gaps), sum(lost), sum(rewinds), sum(replays), sum(duplicates) FROM streams GROUP BY stream")
        for i, (name, doc) in enumerate((
            ("hq_gaps", "Gaps HQ gave up waiting for (skipped or resynced), per stream"),
            ("hq_lost_messages", "Messages counted lost in those gaps, per stream"),
            ("hq_rewinds", "Times a store went back in time (lost WAL, restored backup, copied box), per stream"),
            ("hq_replays_requested", "replay commands HQ sent for gaps, per stream"),
            ("hq_duplicates", "Messages received again and ignored, per stream"),
        ), start=1):
            fam = CounterMetricFamily(name, doc, labels=["stream"])
            for row in per_stream:
                fam.add_metric([row[0]], row[i] or 0)
            yield fam
        (resyncs,), = self.db.read("SELECT count(*) FROM resyncs")
        yield CounterMetricFamily("hq_resyncs", "inventory.resync commands HQ sent for gaps it could not replay",
                                  value=resyncs)
        (online, total), = self.db.read("SELECT count(*) FILTER (WHERE state = 'online'), count(*) FROM status")
        yield GaugeMetricFamily("hq_stores_online", "Stores whose last birth says online", value=online)
        yield GaugeMetricFamily("hq_stores_known", "Stores that have sent a birth", value=total)
        yield GaugeMetricFamily("hq_mqtt_connected", "1 if HQ is connected to its broker",
                                value=int(self.connected()))
        now = self.now()
        lag = GaugeMetricFamily("hq_store_lag_seconds", "Age of the newest fact HQ applied from each store",
                                labels=["store"])
        behind = GaugeMetricFamily("hq_store_behind_messages",
                                   "Messages each store has sealed that HQ has not applied yet", labels=["store"])
        for store, last_ts, missing in self.db.read(
                "SELECT store, max(last_ts), sum(greatest(0, hwm - last_seq)) FROM streams GROUP BY store"):
            if last_ts is not None:
                lag.add_metric([store], max(0.0, now - last_ts))
            behind.add_metric([store], missing or 0)
        yield lag
        yield behind
