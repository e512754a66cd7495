"""The agent's Prometheus metrics (``GET /metrics``), read from the status snapshot at scrape time.

One collector turns a ``Status`` into metric families, so /metrics, the page and ``edge-agent status``
show the same figures and nothing is counted twice. Every label is bounded by the configuration or the
code: ``reader``/``antenna``/``zone`` (configured antennas only: a read from an unmapped antenna is
quarantined, never a new series), ``camera`` (configured cameras), ``child`` (supervised processes and
threads), ``stream`` (the contract's streams), ``source`` (the agent's inputs), ``reason`` (the first
word of the pipeline's own quarantine reasons) and ``check``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .snapshot import Status


def registry(snapshot: Callable[[], Status]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_StatusCollector(snapshot))
    return reg


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _by(fam: GaugeMetricFamily | CounterMetricFamily, rows: list[tuple[list[str], float | None]]) -> Metric:
    for labels, value in rows:
        if value is not None:
            fam.add_metric(labels, value)
    return fam


class _StatusCollector(Collector):
    def __init__(self, snapshot: Callable[[], Status]) -> None:
        self.snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # describing would take a snapshot at registration

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        ob, up = s.outbox, s.uplink
        yield _gauge("edge_alive", "1 while the main loop ticks (/healthz)", int(s.alive))
        yield _gauge("edge_main_loop_age_seconds", "Since the main loop (housekeeping) last ticked", s.loop_age_s)
        yield _gauge("edge_ready", "1 when every readiness check passes (/readyz)", int(s.ready))
        yield _by(GaugeMetricFamily("edge_check_ok", "Readiness checks: 1 passing, 0 failing", labels=["check"]),
                  [([c.name], int(c.ok)) for c in s.checks])
        yield _gauge("edge_uptime_seconds", "Since the agent started", s.uptime_s)
        # Uplink
        yield _gauge("edge_uplink_connected", "1 while connected to HQ's broker", int(up.connected))
        yield _counter("edge_uplink_messages_published", "Messages published to HQ's broker (resends included)",
                       up.published_messages)
        yield _counter("edge_uplink_messages_acked", "Messages HQ acknowledged (applied), then deleted",
                       up.acked_messages)
        yield _gauge("edge_uplink_unacked_messages", "Sealed messages HQ has not acknowledged yet",
                     up.unacked_messages)
        yield _gauge("edge_uplink_unacked_age_seconds", "Longest wait for HQ's ack progress on a stream",
                     up.unacked_age_s)
        # Outbox
        yield _counter("edge_outbox_facts_enqueued", "Facts committed to the outbox since the agent started",
                       ob.facts_enqueued)
        yield _counter("edge_outbox_facts_sealed", "Facts sealed into messages for HQ since the agent started",
                       ob.facts_sealed)
        yield _by(CounterMetricFamily("edge_outbox_facts_dropped", "Facts dropped by the disk cap, by stream",
                                      labels=["stream"]), [([k], v) for k, v in sorted(ob.dropped.items())])
        yield _counter("edge_outbox_facts_compacted", "Facts merged into others by the disk cap", ob.compacted)
        yield _counter("edge_outbox_facts_coarsened", "Analytics facts merged into coarser buckets", ob.coarsened)
        yield _gauge("edge_outbox_backlog_facts", "Pending facts (not sealed yet)", ob.pending_facts)
        yield _gauge("edge_outbox_sealed_messages", "Sealed messages waiting for HQ's ack", ob.sealed_messages)
        yield _gauge("edge_outbox_queued_bytes", "Bytes of what waits to be sent (refreshed every 15 s at most)",
                     ob.queued_bytes)
        yield _gauge("edge_outbox_db_bytes", "Bytes of the database's pages in use", ob.db_bytes)
        yield _gauge("edge_outbox_cap_bytes", "The disk cap on queued bytes", ob.cap_bytes)
        if ob.oldest_age_s is not None:
            yield _gauge("edge_outbox_oldest_age_seconds", "Age of the oldest fact HQ has not acknowledged",
                         ob.oldest_age_s)
        yield _gauge("edge_outbox_writable", "0 while the disk refuses the outbox's writes", int(ob.writable))
        yield _by(CounterMetricFamily("edge_quarantined", "Inputs quarantined, by source", labels=["source"]),
                  [([k], v) for k, v in sorted(ob.quarantined.items())])
        # RFID
        yield _by(CounterMetricFamily("edge_rfid_reads", "Tag reads taken, per configured antenna",
                                      labels=["reader", "antenna", "zone"]),
                  [([a.reader, a.antenna, a.zone], a.reads) for a in s.antennas])
        yield _by(GaugeMetricFamily("edge_rfid_reads_per_second", "Tag reads a second over the last 10 s",
                                    labels=["reader", "antenna"]),
                  [([a.reader, a.antenna], a.reads_per_s) for a in s.antennas])
        yield _by(GaugeMetricFamily("edge_rfid_antenna_last_read_age_seconds", "Since the antenna's last read",
                                    labels=["reader", "antenna"]),
                  [([a.reader, a.antenna], a.last_read_age_s) for a in s.antennas])
        yield _by(CounterMetricFamily("edge_rfid_bad_reads", "Reads quarantined, by reason", labels=["reason"]),
                  [([k], v) for k, v in sorted(s.rfid_bad.items())])
        # Cameras
        cams = s.cameras
        yield _by(GaugeMetricFamily("edge_camera_up", "1 while the camera's process runs", labels=["camera"]),
                  [([c.camera], int(c.state == "up")) for c in cams])
        yield _by(GaugeMetricFamily("edge_camera_fps", "Frames analysed a second since the camera's process started",
                                    labels=["camera"]), [([c.camera], c.fps) for c in cams])
        yield _by(GaugeMetricFamily("edge_camera_inference_ms", "Detection and tracking per frame since the camera's "
                                    "process started, ms", labels=["camera"]), [([c.camera], c.inference_ms) for c in cams])
        yield _by(CounterMetricFamily("edge_camera_skipped_frames", "Frames dropped by the rate cap since the "
                                      "camera's process started", labels=["camera"]),
                  [([c.camera], c.skipped) for c in cams])
        yield _by(GaugeMetricFamily("edge_camera_last_frame_age_seconds", "Since the camera's last frame figures",
                                    labels=["camera"]), [([c.camera], c.last_frame_age_s) for c in cams])
        # Labels
        if s.labels is not None:
            yield _gauge("edge_esl_price_integrity", "Labels showing HQ's price / labels HQ has a price for",
                         s.labels.price_integrity)
            yield _gauge("edge_esl_labels", "Labels known", s.labels.known)
            yield _gauge("edge_esl_labels_attention", "Labels not showing what they should, or with an alert",
                         s.labels.attention_count)
        # Supervision
        yield _by(GaugeMetricFamily("edge_child_up", "1 while a supervised process or thread runs (or finished)",
                                    labels=["child"]), [([c.name], int(c.state != "down")) for c in s.children])
        yield _by(CounterMetricFamily("edge_child_restarts", "Restarts of a supervised process or thread",
                                      labels=["child"]), [([c.name], c.restarts) for c in s.children])
