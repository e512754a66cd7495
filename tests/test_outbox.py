"""The SQLite outbox on real database files: sequencing, sealing, acks, the disk cap, quarantine,
corruption, and the inventory book's snapshot."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.clock import VirtualClock, parse_rfc3339, rfc3339
from edge_agent.contract import (
    STREAMS,
    HealthBody,
    InventoryDeltaItem,
    TrafficHeatmapItem,
    TrafficStatsItem,
    parse_message,
)
from edge_agent.health import HealthReporter
from edge_agent.hq.applier import HqApplier
from edge_agent.inventory.book import Delta, InventoryBook
from edge_agent.sync import compaction
from edge_agent.sync.outbox import AckResult, DiskUse, Fact, FactTooLarge, Outbox, SealedMessage, wal_limit

from .helpers import REPO, HqBackend

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
GTINS = [f"0400000000{i:04d}" for i in range(40)]
ZONES = ["backroom", "salesfloor", "fitting-room", "pos"]
EPCS = [f"E28011606000020{i:09X}" for i in range(12)]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def new_outbox(path: Path, clock: VirtualClock | None = None, **kw: Any) -> Outbox:
    return Outbox(path, clock or VirtualClock(T0), **kw)


@contextmanager
def scratch_outbox(**kw: Any) -> Iterator[Outbox]:
    """A fresh outbox file per hypothesis example (function-scoped tmp_path is shared by all examples)."""
    with tempfile.TemporaryDirectory(prefix="outbox-") as d:
        ob = new_outbox(Path(d) / "outbox.db", synchronous="NORMAL", **kw)
        try:
            yield ob
        finally:
            ob.close()


def delta_fact(i: int, zone: str = "backroom", gtin: str = GTINS[0], delta: int = 1, **extra: Any) -> Fact:
    item = {"ts": rfc3339(T0 + i), "zone": zone, "gtin": gtin, "delta": delta, **extra}
    return Fact(ts=T0 + i, body=_dumps(item), key=f"{zone}|{gtin}")


def items_of(msg: SealedMessage) -> list[dict[str, Any]]:
    return json.loads(msg.body)["items"]


def pending(ob: Outbox, stream: str) -> list[tuple[int, str]]:
    return [tuple(r) for r in ob.read("SELECT id, body FROM pending WHERE stream = ? ORDER BY id", (stream,))]


def seal_all(ob: Outbox, stream: str) -> list[SealedMessage]:
    out = []
    while (m := ob.seal(stream)) is not None:
        out.append(m)
    return out


# ---------------------------------------------------------------- sequencing


def test_seq_starts_at_one_has_no_gaps_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    ob = new_outbox(path)
    assert ob.last_seq("inventory/delta") == 0
    seqs, msgs = [], []
    for i in range(5):
        ob.enqueue("inventory/delta", [delta_fact(i)])
        msgs.append(ob.seal("inventory/delta"))
        seqs.append(msgs[-1].seq)  # type: ignore[union-attr]
    assert seqs == [1, 2, 3, 4, 5]
    assert ob.ack_through("inventory/delta", 5, msgs[-1].id).deleted == 5  # even with no sealed message left ...
    ob.enqueue("cmd-result", [Fact(T0, _dumps({"ts": rfc3339(T0), "cmd_id": "c", "name": "n", "status": "ok"}))])
    assert ob.seal("cmd-result").seq == 1  # type: ignore[union-attr]  # each stream counts on its own
    ob.close()

    ob = new_outbox(path)  # ... the numbering carries on after a restart
    assert ob.last_seq("inventory/delta") == 5
    for i in range(3):
        ob.enqueue("inventory/delta", [delta_fact(10 + i)])
        seqs.append(ob.seal("inventory/delta").seq)  # type: ignore[union-attr]
    assert seqs == list(range(1, 9))
    assert ob.last_seq("cmd-result") == 1
    ob.close()


@pytest.mark.slow
def test_seq_survives_kill_9(tmp_path: Path) -> None:
    """A process killed right after sealing: no close(), no checkpoint; the committed seqs must survive."""
    path = tmp_path / "outbox.db"
    body = _dumps({"ts": rfc3339(T0), "zone": "z", "gtin": GTINS[0], "delta": 1})
    code = (
        "import os, signal\n"
        "from pathlib import Path\n"
        "from edge_agent.clock import VirtualClock\n"
        "from edge_agent.sync.outbox import Fact, Outbox\n"
        f"ob = Outbox(Path({str(path)!r}), VirtualClock({T0!r}))\n"
        "for i in range(3):\n"
        f"    ob.enqueue('inventory/delta', [Fact(ts={T0!r}, body={body!r})] * 2)\n"
        "    ob.seal('inventory/delta')\n"
        f"ob.enqueue('inventory/delta', [Fact(ts={T0!r}, body={body!r})])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    ob = new_outbox(path)
    assert ob.last_seq("inventory/delta") == 3
    assert [(m.seq, m.facts) for m in ob.sealed_after("inventory/delta", 0, 10)] == [(1, 2), (2, 2), (3, 2)]
    assert ob.pending_count() == 1
    assert [m.seq for m in seal_all(ob, "inventory/delta")] == [4]
    ob.close()


# ---------------------------------------------------------------- sealing


def test_seal_moves_exactly_the_sealed_facts(tmp_path: Path) -> None:
    ob = new_outbox(tmp_path / "outbox.db")
    ob.enqueue("inventory/delta", [delta_fact(i, delta=i + 1) for i in range(10)])
    heat = {"camera": "c", "bucket_start": rfc3339(T0), "bucket_s": 60, "cell_m": 1.0, "cols": 1, "rows": 1,
            "cells": [1.0]}
    ob.enqueue("traffic/heatmap", [Fact(T0, _dumps(heat))])
    before = pending(ob, "inventory/delta")
    ids = [i for i, _ in before]

    m = ob.seal("inventory/delta", after_id=ids[1], up_to_id=ids[5])
    assert m is not None and m.seq == 1 and m.facts == 4
    assert items_of(m) == [json.loads(b) for _, b in before[2:6]]
    assert pending(ob, "inventory/delta") == before[:2] + before[6:]
    assert len(pending(ob, "traffic/heatmap")) == 1  # another stream is untouched
    assert ob.sealed_count() == 1

    rest = seal_all(ob, "inventory/delta")
    assert [r.seq for r in rest] == [2]
    assert items_of(rest[0]) == [json.loads(b) for _, b in before[:2] + before[6:]]
    assert pending(ob, "inventory/delta") == []
    assert m.ts == T0 + 2 and rest[0].ts == T0
    ob.close()


def test_seal_is_one_transaction(tmp_path: Path) -> None:
    """If storing the sealed message fails, the facts stay pending and the seq is not used up."""
    ob = new_outbox(tmp_path / "outbox.db")
    ob.enqueue("inventory/delta", [delta_fact(i) for i in range(5)])
    before = pending(ob, "inventory/delta")
    # A stray row occupying (stream, seq=1) makes the INSERT of the sealed message fail half way.
    ob.conn.execute(
        "INSERT INTO sealed(stream, seq, id, type, ts, oldest_created, facts, body) VALUES (?,?,?,?,?,?,?,?)",
        ("inventory/delta", 1, "x", "inventory.delta", T0, T0, 0, "{}"),
    )
    with pytest.raises(sqlite3.IntegrityError):
        ob.seal("inventory/delta")
    assert pending(ob, "inventory/delta") == before
    assert ob.last_seq("inventory/delta") == 0
    assert not ob.conn.in_transaction
    ob.conn.execute("DELETE FROM sealed")
    m = ob.seal("inventory/delta")
    assert m is not None and m.seq == 1 and m.facts == 5
    ob.close()


def test_nothing_to_seal(tmp_path: Path) -> None:
    ob = new_outbox(tmp_path / "outbox.db")
    assert ob.seal("inventory/delta") is None
    assert ob.last_seq("inventory/delta") == 0
    with pytest.raises(ValueError):
        ob.enqueue("no/such/stream", [Fact(T0, "{}")])
    ob.close()


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=3500), min_size=1, max_size=60),
    char=st.sampled_from(["a", "\u00e9", "\u20ac", "\U0001f600"]),
    max_message_bytes=st.sampled_from([4096, 8192]),
)
def test_messages_respect_max_message_bytes(sizes: list[int], char: str, max_message_bytes: int) -> None:
    with scratch_outbox(max_message_bytes=max_message_bytes) as ob:
        store = "S" * 64  # the longest store id
        facts = []
        for i, n in enumerate(sizes):
            body = _dumps({"ts": rfc3339(T0), "cmd_id": f"c{i}", "name": "n", "status": "error",
                           "reason": "", "detail": {}}).replace('"reason":""', '"reason":"' + char * n + '"')
            if len(body.encode()) > ob.max_body_bytes:
                with pytest.raises(FactTooLarge):
                    ob.enqueue("cmd-result", [Fact(T0, body)])
                continue
            facts.append(body)
            ob.enqueue("cmd-result", [Fact(T0, body)])
        got = []
        for m in seal_all(ob, "cmd-result"):
            payload = m.payload(store, T0 + 1e6, True)
            assert len(payload) <= max_message_bytes, (len(payload), m.facts)
            env = parse_message(payload)
            got += [it.cmd_id for it in env.body.items]  # type: ignore[attr-defined]
        assert got == [json.loads(b)["cmd_id"] for b in facts]


def test_fact_larger_than_a_message_is_refused(tmp_path: Path) -> None:
    ob = new_outbox(tmp_path / "outbox.db", max_message_bytes=4096)
    big = delta_fact(0, zone="z" * 5000)
    with pytest.raises(FactTooLarge):
        ob.enqueue("inventory/delta", [delta_fact(1), big])
    assert ob.pending_count() == 0  # the whole batch was refused, not half of it
    ob.close()


def alert_fact(i: int) -> Fact:
    return Fact(T0, _dumps({"ts": rfc3339(T0), "label": f"L{i}", "kind": "low_battery"}))


def test_hq_ack_forgets_what_it_covers_and_nothing_else(tmp_path: Path) -> None:
    ob = new_outbox(tmp_path / "outbox.db")
    sealed: dict[str, list[SealedMessage]] = {"inventory/delta": [], "esl/alert": []}
    for i in range(3):
        ob.enqueue("inventory/delta", [delta_fact(i)])
        ob.enqueue("esl/alert", [alert_fact(i)])
        for stream in sealed:
            sealed[stream].append(ob.seal(stream))  # type: ignore[arg-type]
    # Each message names the one before it: the chain HQ checks.
    assert [m.prev for m in sealed["inventory/delta"]] == ["", sealed["inventory/delta"][0].id, sealed["inventory/delta"][1].id]
    ob.enqueue("inventory/delta", [delta_fact(9)])  # a pending fact is not touched by acks either
    assert ob.unacked() == 6
    r = ob.ack_through("inventory/delta", 2, sealed["inventory/delta"][1].id)
    assert (r.deleted, r.rewind) == (2, False)
    assert ob.read("SELECT stream, seq FROM sealed ORDER BY stream, seq") == [
        ("esl/alert", 1), ("esl/alert", 2), ("esl/alert", 3), ("inventory/delta", 3)]
    # A late or repeated ack, and an ack of nothing, are harmless.
    assert ob.ack_through("inventory/delta", 2, sealed["inventory/delta"][1].id) == AckResult()
    assert ob.ack_through("inventory/delta", 1, sealed["inventory/delta"][0].id) == AckResult()
    assert ob.ack_through("esl/alert", 0, "") == AckResult()
    assert ob.unacked("inventory/delta") == 1 and ob.unacked() == 4
    assert ob.pending_count() == 1
    assert ob.high_water() == {"inventory/delta": {"seq": 3, "id": sealed["inventory/delta"][2].id},
                               "esl/alert": {"seq": 3, "id": sealed["esl/alert"][2].id}}
    ob.close()


def test_an_ack_from_hq_that_is_ahead_puts_unacknowledged_messages_back_to_pending(tmp_path: Path) -> None:
    """HQ applied seq 5 (id X) while this outbox (restored from an older copy) holds only up to 3: the
    unacknowledged messages go back to pending, numbering continues after HQ's, chained on to X."""
    ob = new_outbox(tmp_path / "outbox.db")
    for i in range(3):
        ob.enqueue("inventory/delta", [delta_fact(i, delta=i + 1)])
        ob.seal("inventory/delta")
    ob.enqueue("inventory/delta", [delta_fact(7, delta=7)])
    facts_before = sorted(json.loads(b)["delta"] for (b,) in ob.read("SELECT body FROM pending")) + [1, 2, 3]
    hq_id = "01JDZZZZZZZZZZZZZZZZZZZZZZ"
    r = ob.ack_through("inventory/delta", 5, hq_id)
    assert r.rewind and r.repended == 3 and r.deleted == 0
    assert ob.sealed_count() == 0 and ob.unacked() == 0
    # Nothing lost: every fact is pending again, the put-back ones first, in their order.
    bodies = [json.loads(b) for _, b in pending(ob, "inventory/delta")]
    assert [b["delta"] for b in bodies] == [1, 2, 3, 7]
    assert sorted(b["delta"] for b in bodies) == sorted(facts_before)
    m = ob.seal("inventory/delta")
    assert m is not None and (m.seq, m.prev, m.facts) == (6, hq_id, 4)
    assert [k for _, k, _ in ob.read("SELECT ts, kind, message FROM alerts")] == ["outbox.rewind"]
    assert ob.counters()["rewinds"] == 1
    ob.close()


def test_an_ack_naming_another_id_at_a_held_seq_is_a_rewind(tmp_path: Path) -> None:
    ob = new_outbox(tmp_path / "outbox.db")
    for i in range(4):
        ob.enqueue("esl/alert", [alert_fact(i)])
        ob.seal("esl/alert")
    r = ob.ack_through("esl/alert", 2, "01JDZZZZZZZZZZZZZZZZZZZZZZ")
    assert r.rewind and r.repended == 4
    m = ob.seal("esl/alert")
    assert m is not None and m.seq == 3 and m.prev == "01JDZZZZZZZZZZZZZZZZZZZZZZ"
    # An ack that does not know the id (HQ installed a snapshot there) is taken at its word.
    ob.enqueue("esl/alert", [alert_fact(9)])
    ob.seal("esl/alert")
    assert ob.ack_through("esl/alert", 3, "") == AckResult(deleted=1)
    ob.close()


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["enq", "seal", "ack", "stale", "rewind"]), st.integers(0, 6)),
                    max_size=40))
def test_acks_and_rewinds_never_lose_a_fact_or_reuse_a_seq(ops: list[tuple[str, int]]) -> None:
    """Whatever HQ acks (in order, late, or from a timeline this outbox lost), every fact enqueued is
    either covered by an ack of the message holding it or still held, and seqs only ever grow."""
    with scratch_outbox() as ob:
        stream = "inventory/delta"
        made = acked_facts = top = 0
        sent: dict[int, SealedMessage] = {}
        ids: dict[int, str] = {}  # what HQ would name each seq
        for op, n in ops:
            if op == "enq":
                ob.enqueue(stream, [delta_fact(made + i) for i in range(n + 1)])
                made += n + 1
            elif op == "seal" and (m := ob.seal(stream)) is not None:
                assert m.seq > top, "a seq sealed twice"
                top = m.seq
                sent[m.seq], ids[m.seq] = m, m.id
            elif op in ("ack", "stale"):
                held = sorted(r[0] for r in ob.read("SELECT seq FROM sealed"))
                if held:
                    seq = held[min(n, len(held) - 1)] if op == "ack" else held[0] - 1
                    if op == "ack":
                        acked_facts += sum(sent[s].facts for s in held if s <= seq)
                    assert not ob.ack_through(stream, seq, ids.get(seq, "")).rewind
            elif op == "rewind":
                hq_seq = ob.last_seq(stream) + n + 1
                ids[hq_seq] = "01JDZZZZZZZZZZZZZZZZZZZZ" + "ABCDEFG"[n]
                assert ob.ack_through(stream, hq_seq, ids[hq_seq]).rewind
                top = hq_seq
        held = ob.read("SELECT coalesce(sum(facts), 0) FROM sealed")[0][0] + ob.pending_count()
        assert acked_facts + held == made


# ---------------------------------------------------------------- disk cap


def stats_item(camera: str, minute: int, zone: str | None = "z1", entries: int = 1, exits: int = 0,
               occ: float = 1.0, bucket_s: int = 60, start: float = T0) -> dict[str, Any]:
    return {"camera": camera, "zone": zone, "bucket_start": rfc3339(start + minute * bucket_s), "bucket_s": bucket_s,
            "entries": entries, "exits": exits, "occupancy_min": 0.0, "occupancy_avg": occ,
            "occupancy_max": occ * 2, "visits": entries, "dwell_edges_s": [30.0, 120.0], "dwell_hist": [1, entries, 0],
            "dwell_median_s": None}


def heat_item(camera: str, minute: int, cells: list[float], bucket_s: int = 60) -> dict[str, Any]:
    return {"camera": camera, "bucket_start": rfc3339(T0 + minute * bucket_s), "bucket_s": bucket_s, "cell_m": 0.5,
            "cols": len(cells), "rows": 1, "cells": cells}


def analytics_fact(stream: str, item: dict[str, Any]) -> Fact:
    key_of = compaction.ANALYTICS_MERGE[stream][0]
    return Fact(ts=parse_rfc3339(item["bucket_start"]), body=_dumps(item), key=key_of(item))


def esl_state_fact(i: int) -> Fact:
    item = {"ts": rfc3339(T0 + i), "label": f"label-{i:06d}", "gtin": GTINS[i % len(GTINS)], "price": "12.99",
            "currency": "EUR", "battery_mv": 2900, "rssi": -60, "last_seen": rfc3339(T0 + i)}
    return Fact(ts=T0 + i, body=_dumps(item))


def counts(ob: Outbox) -> dict[str, int]:
    return dict(ob.read("SELECT stream, count(*) FROM pending GROUP BY stream"))


def fill_for_drops(ob: Outbox) -> dict[str, int]:
    """Undroppable and droppable facts in blocks; analytics on day buckets with distinct cameras, so
    coarsening cannot shrink them and only dropping helps. Returns the bytes queued after each block."""
    queued = {}
    ob.enqueue("inventory/delta", [delta_fact(i, zone=ZONES[i % 4], gtin=f"{i:014d}") for i in range(1500)])
    ob.enqueue("cmd-result", [Fact(T0, _dumps({"ts": rfc3339(T0), "cmd_id": f"c{i}", "name": "n", "status": "ok"}))
                              for i in range(50)])
    ob.enqueue("esl/alert", [Fact(T0, _dumps({"ts": rfc3339(T0), "label": f"L{i}", "kind": "low_battery"}))
                             for i in range(50)])
    queued["undroppable"] = ob.disk_use().queued
    ob.enqueue("esl/state", [esl_state_fact(i) for i in range(1500)])
    queued["esl/state"] = ob.disk_use().queued
    ob.enqueue("traffic/stats", [analytics_fact("traffic/stats", stats_item(f"cam{i}", 0, bucket_s=86400))
                                 for i in range(1200)])
    queued["traffic/stats"] = ob.disk_use().queued
    ob.enqueue("traffic/heatmap", [analytics_fact("traffic/heatmap", heat_item(f"cam{i}", 0, [1.25] * 300, 86400))
                                   for i in range(600)])
    queued["traffic/heatmap"] = ob.disk_use().queued
    return queued


def sealed_rows(ob: Outbox) -> list[tuple]:
    return ob.read("SELECT * FROM sealed ORDER BY stream, seq")


def seal_one_of_each(ob: Outbox) -> None:
    ob.enqueue("inventory/delta", [delta_fact(i) for i in range(3)])
    ob.enqueue("esl/state", [esl_state_fact(i) for i in range(3)])
    ob.enqueue("traffic/stats", [analytics_fact("traffic/stats", stats_item("c", m)) for m in range(3)])
    ob.enqueue("traffic/heatmap", [analytics_fact("traffic/heatmap", heat_item("c", m, [1.0, 2.0])) for m in range(3)])
    for stream in ("inventory/delta", "esl/state", "traffic/stats", "traffic/heatmap"):
        assert ob.seal(stream) is not None


def test_drop_order_heatmap_first_and_never_inventory(tmp_path: Path) -> None:
    ob = new_outbox(tmp_path / "outbox.db")
    queued = fill_for_drops(ob)
    full = counts(ob)
    heat_bytes = queued["traffic/heatmap"] - queued["traffic/stats"]
    assert heat_bytes > 0.35 * queued["traffic/heatmap"]  # so that dropping half of them brings it under 85 %
    # Room for everything but about half the heatmaps: only heatmaps go.
    ob.cap_bytes = int((queued["traffic/heatmap"] - heat_bytes // 2) / 0.85)
    report = ob.enforce_cap()
    assert report is not None
    assert set(report.dropped) == {"traffic/heatmap"}
    after = counts(ob)
    assert {k: v for k, v in after.items() if k != "traffic/heatmap"} == {
        k: v for k, v in full.items() if k != "traffic/heatmap"
    }
    assert after.get("traffic/heatmap", 0) == full["traffic/heatmap"] - report.dropped["traffic/heatmap"]
    assert ob.counters()["dropped.traffic/heatmap"] == report.dropped["traffic/heatmap"]
    assert report.queued_after <= ob.cap_bytes
    ob.close()


def test_drop_order_stats_before_esl_state(tmp_path: Path) -> None:
    ob = new_outbox(tmp_path / "outbox.db")
    queued = fill_for_drops(ob)
    full = counts(ob)
    stats_bytes = queued["traffic/stats"] - queued["esl/state"]
    # Room for everything up to about half the traffic stats: all heatmaps go, then stats, not ESL state.
    ob.cap_bytes = int((queued["esl/state"] + stats_bytes // 2) / 0.85)
    report = ob.enforce_cap()
    assert report is not None
    assert report.dropped["traffic/heatmap"] == full["traffic/heatmap"]
    assert 0 < report.dropped["traffic/stats"] <= full["traffic/stats"]
    assert "esl/state" not in report.dropped
    after = counts(ob)
    assert "traffic/heatmap" not in after
    assert after["esl/state"] == full["esl/state"]
    assert after["inventory/delta"] == full["inventory/delta"]
    c = ob.counters()
    assert c["dropped.traffic/heatmap"] == full["traffic/heatmap"]
    assert c["dropped.traffic/stats"] == report.dropped["traffic/stats"]
    assert "dropped.esl/state" not in c
    ob.close()


def test_cap_never_drops_inventory_nor_alters_sealed(tmp_path: Path) -> None:
    ob = new_outbox(tmp_path / "outbox.db")
    seal_one_of_each(ob)
    sealed = sealed_rows(ob)
    fill_for_drops(ob)
    full = counts(ob)
    inventory_before = pending(ob, "inventory/delta")
    ob.cap_bytes = 64 * 1024  # far below what inventory alone needs
    report = ob.enforce_cap()
    assert report is not None
    assert report.dropped == {s: full[s] for s in ("traffic/heatmap", "traffic/stats", "esl/state")}
    assert counts(ob) == {s: full[s] for s in ("inventory/delta", "cmd-result", "esl/alert")}
    assert pending(ob, "inventory/delta") == inventory_before  # distinct keys: nothing to compact
    assert sealed_rows(ob) == sealed  # sealed messages, droppable streams included, are never altered
    c = ob.counters()
    for s in ("traffic/heatmap", "traffic/stats", "esl/state"):
        assert c[f"dropped.{s}"] == full[s]
    kinds = [k for (k,) in ob.read("SELECT kind FROM alerts")]
    assert kinds == ["outbox.cap_exceeded"]
    assert ob.enforce_cap() is not None
    assert [k for (k,) in ob.read("SELECT kind FROM alerts")] == kinds  # alerted once, not every round
    # health reports the dropped figures per stream
    body = HealthReporter(ob, ob.clock, 60, connected=lambda: False).body([], {})
    assert body["dropped_facts"] == {s: full[s] for s in ("traffic/heatmap", "traffic/stats", "esl/state")}
    # the sealed messages and the remaining facts still go out, in order
    assert [m.seq for m in seal_all(ob, "inventory/delta")][:1] == [2]
    ob.close()


def test_compaction_merges_and_cancels_epcs(tmp_path: Path) -> None:
    ob = new_outbox(tmp_path / "outbox.db")
    seal_one_of_each(ob)
    sealed = sealed_rows(ob)
    e1, e2, e3 = EPCS[:3]
    ob.enqueue("inventory/delta", [
        delta_fact(10, delta=1, added=[e1]),
        delta_fact(11, zone="pos", delta=5),
        delta_fact(12, delta=1, added=[e2]),
        delta_fact(13, delta=-1, removed=[e1]),  # e1 added then removed: cancels out
        delta_fact(14, delta=-1, removed=[e3]),
        delta_fact(15, zone="pos", delta=-2),
    ])
    ob.cap_bytes = 1
    report = ob.enforce_cap()
    assert report is not None and report.compacted == 4
    rows = {json.loads(b)["zone"]: json.loads(b) for _, b in pending(ob, "inventory/delta")}
    assert rows["backroom"] == {"ts": rfc3339(T0 + 14), "zone": "backroom", "gtin": GTINS[0], "delta": 0,
                                "added": [e2], "removed": [e3]}
    assert rows["pos"] == {"ts": rfc3339(T0 + 15), "zone": "pos", "gtin": GTINS[0], "delta": 3}
    assert ob.counters()["compacted"] == 4
    assert sealed_rows(ob) == sealed
    ob.close()


delta_items = st.lists(
    st.tuples(
        st.integers(0, 2),  # zone
        st.integers(0, 3),  # gtin
        st.integers(-5, 5),  # delta
        st.lists(st.sampled_from(EPCS), max_size=3, unique=True),
        st.lists(st.sampled_from(EPCS), max_size=3, unique=True),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=30, deadline=None)
@given(items=delta_items, seal_first=st.integers(0, 10))
def test_inventory_compaction_is_lossless(items: list[tuple], seal_first: int) -> None:
    with scratch_outbox() as ob:
        book = InventoryBook(ob, ob.clock)
        deltas = [Delta(T0 + i, ZONES[z], GTINS[g], d, tuple(a), tuple(r)) for i, (z, g, d, a, r) in enumerate(items)]
        book.apply(deltas)
        # Part of the stream may already be sealed (in flight); it must stay exactly as it is.
        ids = [i for i, _ in pending(ob, "inventory/delta")]
        sealed = []
        if seal_first and ids:
            m = ob.seal("inventory/delta", up_to_id=ids[min(seal_first, len(ids)) - 1])
            assert m is not None
            sealed = items_of(m)
        sealed_before = sealed_rows(ob)
        before = [json.loads(b) for _, b in pending(ob, "inventory/delta")]

        ob.cap_bytes = 1  # force the cap path
        ob.enforce_cap()

        after = [json.loads(b) for _, b in pending(ob, "inventory/delta")]
        assert sealed_rows(ob) == sealed_before

        def sums(rows: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
            out: dict[tuple[str, str], int] = defaultdict(int)
            for it in rows:
                out[(it["zone"], it["gtin"])] += it["delta"]
            return dict(out)

        def net_epcs(rows: list[dict[str, Any]]) -> dict[tuple[str, str], Counter[str]]:
            out: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
            for it in rows:
                out[(it["zone"], it["gtin"])].update(it.get("added", ()))
                out[(it["zone"], it["gtin"])].subtract(it.get("removed", ()))
            return out

        assert sums(after) == sums(before)
        assert len(after) == len({(it["zone"], it["gtin"]) for it in before})  # one fact per key
        net = net_epcs(before)
        for it in after:
            InventoryDeltaItem.model_validate(it)
            k = (it["zone"], it["gtin"])
            group = [b for b in before if (b["zone"], b["gtin"]) == k]
            if len(group) == 1:
                assert it == group[0]  # nothing to merge: the fact is left exactly as it was
                continue
            assert it["ts"] == max(b["ts"] for b in group)
            assert set(it.get("added", [])) == {e for e, n in net[k].items() if n > 0}
            assert set(it.get("removed", [])) == {e for e, n in net[k].items() if n < 0}
        # sealed + pending still add up to the book, and so does a snapshot
        total = sums(sealed)
        for k, v in sums(after).items():
            total[k] = total.get(k, 0) + v
        assert {k: v for k, v in total.items() if v} == {k: v for k, v in book.levels().items() if v}
        info = book.snapshot("test")
        snap = json.loads(pending(ob, "inventory/snapshot")[0][1])
        assert info.as_of_seq == (1 if sealed else 0)
        assert {(i["zone"], i["gtin"]): i["qty"] for i in snap["items"]} == {k: v for k, v in sums(sealed).items() if v}
        for m in seal_all(ob, "inventory/delta"):
            parse_message(m.payload("S001", T0, False))


def test_coarsening_keeps_sums(tmp_path: Path) -> None:
    ob = new_outbox(tmp_path / "outbox.db")
    minutes = 120
    stats, heats = [], []
    for cam in ("cam1", "cam2"):
        for zone in ("entrance", None):
            for m in range(minutes):
                stats.append(stats_item(cam, m, zone=zone, entries=m % 7, exits=m % 5, occ=float(m % 4)))
        for m in range(minutes):
            heats.append(heat_item(cam, m, [float((m + c) % 3) for c in range(40)]))
    ob.enqueue("traffic/stats", [analytics_fact("traffic/stats", s) for s in stats])
    ob.enqueue("traffic/heatmap", [analytics_fact("traffic/heatmap", h) for h in heats])
    ob.enqueue("inventory/delta", [delta_fact(i, gtin=GTINS[i % 5]) for i in range(20)])
    ob.cap_bytes = ob.disk_use().queued - 1
    report = ob.enforce_cap()
    assert report is not None
    assert report.dropped == {}, "coarsening alone should have been enough"
    assert report.coarsened > 0
    new_stats = [json.loads(b) for _, b in pending(ob, "traffic/stats")]
    new_heats = [json.loads(b) for _, b in pending(ob, "traffic/heatmap")]
    assert len(new_stats) < len(stats) and len(new_heats) < len(heats)
    assert report.coarsened == len(stats) - len(new_stats) + len(heats) - len(new_heats)
    assert ob.counters()["coarsened"] == report.coarsened

    def stat_sums(rows: list[dict[str, Any]]) -> dict[tuple, tuple]:
        out: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0])
        for r in rows:
            s = out[(r["camera"], r["zone"])]
            s[0] += r["entries"]
            s[1] += r["exits"]
            s[2] += r["visits"]
        return {k: tuple(v) for k, v in out.items()}

    assert stat_sums(new_stats) == stat_sums(stats)
    for r in new_stats:
        TrafficStatsItem.model_validate(r)
        assert parse_rfc3339(r["bucket_start"]) % r["bucket_s"] == 0
        assert r["occupancy_max"] == max(s["occupancy_max"] for s in stats
                                         if (s["camera"], s["zone"]) == (r["camera"], r["zone"])
                                         and r["bucket_start"] <= s["bucket_start"]
                                         and parse_rfc3339(s["bucket_start"]) < parse_rfc3339(r["bucket_start"]) + r["bucket_s"])
    # weighted average occupancy over the whole span is unchanged
    for key in {(s["camera"], s["zone"]) for s in stats}:
        old = [s for s in stats if (s["camera"], s["zone"]) == key]
        new = [s for s in new_stats if (s["camera"], s["zone"]) == key]
        assert sum(s["occupancy_avg"] * s["bucket_s"] for s in new) == pytest.approx(
            sum(s["occupancy_avg"] * s["bucket_s"] for s in old))
    for cam in ("cam1", "cam2"):
        old_cells = [sum(col) for col in zip(*(h["cells"] for h in heats if h["camera"] == cam), strict=True)]
        new_cells = [sum(col) for col in zip(*(h["cells"] for h in new_heats if h["camera"] == cam), strict=True)]
        assert new_cells == pytest.approx(old_cells)
    for h in new_heats:
        TrafficHeatmapItem.model_validate(h)
    assert len(pending(ob, "inventory/delta")) == 5  # compaction ran too: one fact per key
    # coarsened facts seal and parse like any others
    for stream in ("traffic/stats", "traffic/heatmap"):
        for m in seal_all(ob, stream):
            parse_message(m.payload("S001", T0, True))
    ob.close()


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 200), st.integers(0, 9), st.integers(0, 9),
                  st.lists(st.integers(0, 5), min_size=3, max_size=3)),
        min_size=1, max_size=60),
    level=st.sampled_from(compaction.COARSEN_LEVELS_S),
)
def test_coarsen_property(rows: list[tuple], level: int) -> None:
    stats = [stats_item(f"c{c}", m, entries=e, exits=x) for c, m, e, x, _ in rows]
    heats = [heat_item(f"c{c}", m, [float(v) for v in cells]) for c, m, _, _, cells in rows]
    new_stats = compaction.coarsen("traffic/stats", map(_dumps, stats), level)
    new_heats = compaction.coarsen("traffic/heatmap", map(_dumps, heats), level)
    for cam in {f"c{c}" for c, *_ in rows}:
        assert sum(s["entries"] for s in new_stats if s["camera"] == cam) == sum(
            s["entries"] for s in stats if s["camera"] == cam)
        assert sum(s["exits"] for s in new_stats if s["camera"] == cam) == sum(
            s["exits"] for s in stats if s["camera"] == cam)
        old = [sum(col) for col in zip(*(h["cells"] for h in heats if h["camera"] == cam), strict=True)]
        new = [sum(col) for col in zip(*(h["cells"] for h in new_heats if h["camera"] == cam), strict=True)]
        assert new == old
    for s in new_stats:
        TrafficStatsItem.model_validate(s)
        assert s["bucket_s"] == level and parse_rfc3339(s["bucket_start"]) % level == 0
    for h in new_heats:
        TrafficHeatmapItem.model_validate(h)
    # coarsening what is already coarse changes nothing but the representation
    again = compaction.coarsen("traffic/stats", map(_dumps, new_stats), level)
    assert len(again) == len(new_stats)


def test_coarsening_never_shortens_a_bucket_an_earlier_round_made() -> None:
    hour = stats_item("a", 0, entries=7, occ=2.0, bucket_s=3600) | {"dwell_median_s": 42.0}  # an earlier round's
    minutes = [stats_item("a", m, entries=1) for m in range(5, 10)] + [stats_item("b", m) for m in range(3)]
    out = compaction.coarsen("traffic/stats", map(_dumps, [hour, *minutes]), 900)
    assert hour in out  # as it was, exact dwell median included: not re-labelled as 15 minutes
    assert sorted((o["camera"], o["bucket_s"], o["entries"]) for o in out) == [
        ("a", 900, 5), ("a", 3600, 7), ("b", 900, 3)]
    heat = heat_item("a", 0, [4.0, 2.0], bucket_s=86400)
    out = compaction.coarsen("traffic/heatmap", map(_dumps, [heat, heat_item("a", 3, [1.0, 1.0])]), 3600)
    assert sorted((o["bucket_s"], o["cells"]) for o in out) == [(3600, [1.0, 1.0]), (86400, [4.0, 2.0])]


# ---------------------------------------------------------------- what the cap budgets; giving pages back


def deliver(ob: Outbox) -> None:
    """Seal and acknowledge everything pending, as a drain to HQ does."""
    for stream in ob.streams_with_pending():
        for m in seal_all(ob, stream):
            ob.ack_through(m.stream, m.seq, m.id)


def big_book(ob: Outbox, keys: int) -> InventoryBook:
    """An inventory book of ``keys`` (zone, GTIN) rows whose deltas have all been delivered."""
    book = InventoryBook(ob, ob.clock)
    for start in range(0, keys, 1000):
        book.apply([Delta(T0, ZONES[i % 4], f"{i:014d}", 1) for i in range(start, min(keys, start + 1000))])
    deliver(ob)
    return book


def btree_bytes(ob: Outbox) -> dict[str, int]:
    return dict(ob.read("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"))


def test_disk_use_splits_the_pages_in_use_into_queue_and_book(tmp_path: Path) -> None:
    ob = new_outbox(tmp_path / "outbox.db")
    big_book(ob, 2000)
    ob.enqueue("inventory/delta", [delta_fact(i, gtin=GTINS[i % 40]) for i in range(8000)])
    ob.seal("inventory/delta")
    pages = btree_bytes(ob)
    queue = sum(n for name, n in pages.items() if name in ("pending", "pending_by_stream", "sealed"))
    assert sum(pages.values()) - queue > 0
    first = ob.disk_use()  # walks the queue (nothing measured before)
    assert (first.used, first.queued, first.book) == (ob.used_bytes(), queue, ob.used_bytes() - queue)
    second = ob.disk_use()  # walks the book, now known to be the smaller side
    # Pages of no b-tree (auto-vacuum's pointer maps, one in 819) fall on the side not walked.
    assert second.used == first.used and 0 <= second.queued - first.queued <= 4096 * (1 + first.used // 4096 // 819)
    # Without dbstat in the SQLite build, everything in use counts as queued: never less than the truth.
    ob._dbstat = False
    assert ob.disk_use() == DiskUse(first.used, first.used, 0)
    ob.close()


def test_a_book_larger_than_the_cap_is_not_over_cap(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ob = new_outbox(tmp_path / "outbox.db", cap_bytes=256 * 1024)
    book = big_book(ob, 20_000)
    ob.enqueue("inventory/delta", [delta_fact(i, gtin=GTINS[i % 2]) for i in range(10)])  # compactable, yet kept
    use = ob.disk_use()
    assert use.book > 2 * ob.cap_bytes and use.queued < ob.cap_bytes // 4
    with caplog.at_level(logging.DEBUG, logger="edge_agent.sync.outbox"):
        for _ in range(20):
            assert ob.enforce_cap() is None
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []
    assert ob.read("SELECT count(*) FROM alerts") == [(0,)]
    assert ob.pending_count() == 10 and "compacted" not in ob.counters()
    body = HealthReporter(ob, ob.clock, 60, connected=lambda: True).body([], {})
    HealthBody.model_validate(body)
    assert body["queued_bytes"] + body["book_bytes"] == body["db_bytes"] > ob.cap_bytes
    assert body["book_bytes"] > ob.cap_bytes > body["queued_bytes"]
    assert sum(book.levels().values()) == 20_000
    ob.close()


def test_past_the_cap_beside_a_big_book_only_the_queue_gives_way_in_order(tmp_path: Path) -> None:
    ob = new_outbox(tmp_path / "outbox.db")
    book = big_book(ob, 60_000)
    levels = book.levels()
    queued = fill_for_drops(ob)
    full = counts(ob)
    heat_bytes = queued["traffic/heatmap"] - queued["traffic/stats"]
    # Room for everything but about half the heatmaps, once the facts below are compacted and coarsened.
    ob.cap_bytes = int((queued["traffic/heatmap"] - heat_bytes // 2) / 0.85)
    ob.enqueue("inventory/delta", [delta_fact(i, zone=ZONES[i % 4], gtin=GTINS[0]) for i in range(400)])
    ob.enqueue("traffic/stats", [analytics_fact("traffic/stats", stats_item(f"minutes{c}", m)) for c in range(3)
                                 for m in range(120)])
    assert ob.disk_use().book > ob.cap_bytes
    report = ob.enforce_cap()
    assert report is not None
    assert report.compacted == 396  # first: inventory summed per key, losslessly
    assert report.coarsened >= 3 * 120 - 3 * 8  # then: minutes into quarter hours (or coarser)
    assert set(report.dropped) == {"traffic/heatmap"}  # last: the lowest class, and only as much as needed
    assert 0 < report.dropped["traffic/heatmap"] < full["traffic/heatmap"]
    assert report.queued_after <= ob.cap_bytes < ob.used_bytes()
    after = counts(ob)
    assert after["inventory/delta"] == full["inventory/delta"] + 4
    assert (after["esl/state"], after["cmd-result"], after["esl/alert"]) == (
        full["esl/state"], full["cmd-result"], full["esl/alert"])
    assert book.levels() == levels  # the book is the store's state: the cap never touches it
    ob.close()


def test_over_cap_is_one_episode_warned_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ob = new_outbox(tmp_path / "outbox.db", cap_bytes=256 * 1024)
    ob.enqueue("inventory/delta", [delta_fact(i, gtin=f"{i:014d}") for i in range(6000)])  # undroppable
    with caplog.at_level(logging.DEBUG, logger="edge_agent.sync.outbox"):
        reports = [ob.enforce_cap() for _ in range(10)]
        warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert all(r is not None and r.queued_after > ob.cap_bytes for r in reports)
        assert len(warned) == 2, warned  # the episode starts, and the alert that inventory alone is over
        assert "outbox over its cap" in warned[0] and "alert outbox.cap_exceeded" in warned[1]
        assert [k for (k,) in ob.read("SELECT kind FROM alerts")] == ["outbox.cap_exceeded"]
        caplog.clear()
        deliver(ob)
        assert ob.enforce_cap() is None
        (ended,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
        assert ended.startswith("outbox back under its cap after") and "10 rounds" in ended, ended
        caplog.clear()
        ob.enqueue("inventory/delta", [delta_fact(i, gtin=f"{i:014d}") for i in range(6000)])
        ob.enforce_cap()  # a new episode: warned, and alerted, again
    assert sum(r.levelno >= logging.WARNING for r in caplog.records) == 2
    ob.close()


def test_the_file_shrinks_after_a_drain(tmp_path: Path) -> None:
    ob = new_outbox(tmp_path / "outbox.db", cap_bytes=2 * 1024 * 1024)
    book = big_book(ob, 2000)
    for k in range(40):  # an outage: 8 MB of facts wait
        ob.enqueue("inventory/delta", [delta_fact(k * 2000 + i, gtin=GTINS[i % 40], delta=1) for i in range(2000)])
    peak = ob.file_bytes()
    assert peak > 8 * 1024 * 1024
    deliver(ob)
    assert ob.file_bytes() > 0.9 * peak  # the drained pages are free, but still the file's
    rounds = 0
    while ob.file_bytes() > ob.used_bytes() + wal_limit(ob.cap_bytes) and rounds < 100:
        assert ob.enforce_cap() is None  # housekeeping
        rounds += 1
    assert ob.file_bytes() <= ob.used_bytes() + wal_limit(ob.cap_bytes) < peak / 10
    assert rounds <= peak // wal_limit(ob.cap_bytes) + 1  # a WAL's worth a round
    assert ob.read("PRAGMA quick_check") == [("ok",)]
    assert sum(book.levels().values()) == 2000
    ob.close()


def test_a_file_made_before_incremental_vacuum_is_converted_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.db"
    ob = new_outbox(path, cap_bytes=2 * 1024 * 1024)
    ob.enqueue("inventory/delta", [delta_fact(i) for i in range(20_000)])
    sealed = ob.seal("inventory/delta")
    ob.close()
    old = sqlite3.connect(path, isolation_level=None)  # as the outbox used to make them
    old.executescript("PRAGMA auto_vacuum=NONE; VACUUM;")
    assert old.execute("PRAGMA auto_vacuum").fetchone() == (0,)
    old.close()
    with caplog.at_level(logging.INFO, logger="edge_agent.sync.outbox"):
        ob = new_outbox(path, cap_bytes=2 * 1024 * 1024)
        assert ob.read("PRAGMA auto_vacuum") == [(2,)]
        assert "converted to incremental vacuum" in caplog.text
        caplog.clear()
        ob.close()
        ob = new_outbox(path, cap_bytes=2 * 1024 * 1024)  # once: the next start has nothing to do
        assert "converted" not in caplog.text
    assert ob.sealed_after("inventory/delta", 0, 10) == [sealed]
    assert ob.pending_count() == 20_000 - sealed.facts
    deliver(ob)
    peak = ob.file_bytes()
    for _ in range(50):
        ob.enforce_cap()
    assert ob.file_bytes() < peak / 3
    ob.close()


# ---------------------------------------------------------------- quarantine


def test_quarantine_keeps_the_newest_rows_but_counts_all(tmp_path: Path) -> None:
    ob = new_outbox(tmp_path / "outbox.db", quarantine_keep=10)
    for i in range(25):
        ob.quarantine("rfid", f"bad record {i}", f"raw-{i}")
    ob.quarantine("downlink", "x" * 10_000, b"\x00" * 200_000)
    rows = ob.quarantined(100)
    assert len(rows) == 10
    assert [r[2] for r in rows[1:]] == [f"bad record {i}" for i in range(24, 15, -1)]
    assert [r[3] for r in rows[1:]] == [f"raw-{i}".encode() for i in range(24, 15, -1)]
    _, source, reason, raw = rows[0]
    assert source == "downlink" and len(reason) == 2000 and raw is not None and len(raw) == 64 * 1024
    assert ob.counters()["quarantined.rfid"] == 25
    assert ob.counters()["quarantined.downlink"] == 1
    ob.close()
    ob = new_outbox(tmp_path / "outbox.db", quarantine_keep=10)  # and after a restart it goes on the same way
    ob.quarantine("rfid", "one more", None)
    assert len(ob.quarantined(100)) == 10
    assert ob.counters()["quarantined.rfid"] == 26
    ob.close()


# ---------------------------------------------------------------- corruption


def corrupt_files(path: Path) -> list[Path]:
    """The moved-aside database files (their -wal and -shm companions move with them)."""
    return sorted(
        p for p in path.parent.iterdir()
        if p.name.startswith(path.name + ".corrupt-") and not p.name.endswith(("-wal", "-shm"))
    )


def test_garbage_file_is_moved_aside_and_a_fresh_outbox_works(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    garbage = os.urandom(64 * 1024)
    path.write_bytes(garbage)
    ob = new_outbox(path)
    moved = corrupt_files(path)
    assert len(moved) == 1
    assert moved[0].read_bytes() == garbage  # never silently deleted
    alerts = ob.read("SELECT kind, message FROM alerts")
    assert [k for k, _ in alerts] == ["outbox.corrupt"]
    assert moved[0].name in alerts[0][1]
    ob.enqueue("inventory/delta", [delta_fact(0)])
    m = ob.seal("inventory/delta")
    # the old sequence numbers are lost: the new ones jump far ahead so HQ sees a gap, not duplicates
    assert m is not None and m.seq > 1_000_000
    parse_message(m.payload("S001", T0, False))
    ob.close()
    ob = new_outbox(path)  # the fresh file is healthy: no second move
    assert len(corrupt_files(path)) == 1
    assert ob.last_seq("inventory/delta") == m.seq
    ob.close()


def test_damaged_pages_are_salvaged_and_seq_never_goes_back(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    ob = new_outbox(path)
    for i in range(30):
        ob.enqueue("inventory/delta", [delta_fact(i * 100 + j, gtin=GTINS[j % 40], delta=1) for j in range(100)])
        ob.seal("inventory/delta")
    last = ob.last_seq("inventory/delta")
    ob.enqueue("inventory/delta", [delta_fact(10_000 + j) for j in range(2000)])
    ob.close()
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 40 * page
    for p in range(len(data) // page - 12, len(data) // page - 2):  # scribble over some b-tree pages
        data[p * page:(p + 1) * page] = os.urandom(page)
    path.write_bytes(bytes(data))

    ob = new_outbox(path)
    moved = corrupt_files(path)
    assert len(moved) == 1 and moved[0].read_bytes() == bytes(data)
    assert [k for (k,) in ob.read("SELECT kind FROM alerts")] == ["outbox.corrupt"]
    assert ob.read("PRAGMA quick_check") == [("ok",)]
    ob.enqueue("inventory/delta", [delta_fact(99_999)])
    seqs = [m.seq for m in seal_all(ob, "inventory/delta")]
    assert seqs and min(seqs) > last  # never reuse a seq HQ may already have applied
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    ob.close()


def test_two_corruptions_at_the_same_clock_reading_keep_both_files(tmp_path: Path) -> None:
    """An edge box without an RTC can boot at the same wall time twice: neither corrupt file may be lost."""
    path = tmp_path / "outbox.db"
    first, second = b"first corrupt file " * 1000, b"second corrupt file " * 1000
    path.write_bytes(first)
    new_outbox(path, VirtualClock(T0)).close()
    path.write_bytes(second)
    new_outbox(path, VirtualClock(T0)).close()
    kept = {p.read_bytes() for p in corrupt_files(path)}
    assert kept == {first, second}


# ---------------------------------------------------------------- inventory snapshot


def test_snapshot_is_book_minus_pending_as_of_last_sealed_seq(tmp_path: Path, hq_backend: HqBackend) -> None:
    clock = VirtualClock(T0)
    ob = new_outbox(tmp_path / "outbox.db", clock, max_message_bytes=4096)
    book = InventoryBook(ob, clock)
    first = [Delta(T0 + i, ZONES[i % 4], GTINS[(i // 4) % 40], 1 + i % 3) for i in range(400)]
    book.apply(first)
    sealed = seal_all(ob, "inventory/delta")
    assert len(sealed) > 1
    as_of = sealed[-1].seq
    levels_then = book.levels()
    # later deltas stay pending: they change one key to zero, another up, and add a new key
    (z0, g0), q0 = next(iter(levels_then.items()))
    later = [Delta(T0 + 500, z0, g0, -q0), Delta(T0 + 501, ZONES[1], GTINS[1], 7), Delta(T0 + 502, "new", GTINS[0], 4)]
    book.apply(later)
    assert book.levels() != levels_then

    info = book.snapshot("resync test")
    assert info.as_of_seq == as_of == ob.last_seq("inventory/delta")
    parts = seal_all(ob, "inventory/snapshot")
    assert len(parts) == info.parts > 1  # a 4 KiB message bound needs several parts
    got: dict[tuple[str, str], int] = {}
    for n, m in enumerate(parts, start=1):
        payload = m.payload("S001", clock.now(), False)
        assert len(payload) <= 4096
        body = parse_message(payload).body
        assert (body.snapshot_id, body.as_of_seq, body.part, body.parts) == (info.snapshot_id, as_of, n, info.parts)  # type: ignore[attr-defined]
        for it in body.items:  # type: ignore[attr-defined]
            assert (it.zone, it.gtin) not in got
            got[(it.zone, it.gtin)] = it.qty
    assert got == {k: v for k, v in levels_then.items() if v}
    assert info.keys == len(got)

    # An HQ that applied exactly the sealed deltas finds the snapshot verified, then catches up.
    hq = HqApplier(hq_backend.store(), clock, prefix="retail/v1")
    topic = "retail/v1/S001/"
    for m in sealed:
        hq.receive(topic + m.stream, m.payload("S001", clock.now(), False))
    for m in parts:
        hq.receive(topic + m.stream, m.payload("S001", clock.now(), False))
    assert hq.db.read("SELECT outcome, mismatches FROM snapshots") == [("verified", 0)]
    for m in seal_all(ob, "inventory/delta"):
        hq.receive(topic + m.stream, m.payload("S001", clock.now(), False))
    assert hq.db.inventory("S001") == {k: v for k, v in book.levels().items() if v}
    assert hq.figures.rejected == 0
    hq.db.close()
    ob.close()


def test_snapshot_of_an_empty_book(tmp_path: Path) -> None:
    ob = new_outbox(tmp_path / "outbox.db")
    book = InventoryBook(ob, ob.clock)
    info = book.snapshot("empty")
    assert (info.as_of_seq, info.parts, info.keys) == (0, 1, 0)
    (m,) = seal_all(ob, "inventory/snapshot")
    body = parse_message(m.payload("S001", T0, False)).body
    assert body.items == [] and body.parts == 1  # type: ignore[attr-defined]
    ob.close()


def test_streams_are_known() -> None:
    assert {s for s in STREAMS if STREAMS[s].droppable} == {"traffic/heatmap", "traffic/stats", "esl/state"}


def test_salvage_copies_every_readable_table_including_the_book(tmp_path: Path) -> None:
    from edge_agent.inventory.book import Delta, InventoryBook
    from edge_agent.sync.outbox import _salvage

    clock = VirtualClock(T0)
    ob = Outbox(tmp_path / "old.db", clock)
    book = InventoryBook(ob, clock)
    book.apply([Delta(T0, "salesfloor", "04000000000006", 3)], cursor=("src", 7))
    ob.close()
    fresh = sqlite3.connect(tmp_path / "new.db", isolation_level=None)
    copied, failed = _salvage(tmp_path / "old.db", fresh)
    assert failed == []
    assert copied["stock"] == 1 and copied["source_cursors"] == 1 and copied["pending"] == 1
    assert fresh.execute("SELECT zone, gtin, qty FROM stock").fetchall() == [("salesfloor", "04000000000006", 3)]
    assert fresh.execute("SELECT position FROM source_cursors WHERE source = 'src'").fetchone() == (7,)


def test_oldest_waiting_is_the_oldest_fact_hq_has_not_acknowledged(tmp_path: Path) -> None:
    """Health's ``oldest_unsent_s``: sealed messages count until HQ's ack, pending facts from their creation."""
    clock = VirtualClock(T0)
    ob = new_outbox(tmp_path / "outbox.db", clock)
    assert ob.oldest_waiting() is None
    ob.enqueue("inventory/delta", [Fact(T0, _dumps({"zone": "z", "gtin": GTINS[0], "delta": 1}))])
    clock.advance(10)
    ob.enqueue("esl/state", [Fact(T0 + 10, _dumps({"ts": "2026-01-01T00:00:10Z", "label": "L1"}))])
    assert ob.oldest_waiting() == T0
    [msg] = seal_all(ob, "inventory/delta")
    clock.advance(5)
    assert ob.oldest_waiting() == T0  # sealed and sent is not acknowledged
    body = HealthReporter(ob, clock, 60, connected=lambda: True, timezone="Europe/Berlin").body([], {})
    assert (body["oldest_unsent_s"], body["timezone"]) == (15.0, "Europe/Berlin")
    HealthBody.model_validate(body)
    assert ob.ack_through("inventory/delta", msg.seq, msg.id).deleted == 1
    assert ob.oldest_waiting() == T0 + 10  # now the label's state is the oldest
    seal_all(ob, "esl/state")
    assert ob.oldest_waiting() == T0 + 10
    ob.close()
