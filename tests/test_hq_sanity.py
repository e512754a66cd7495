"""HQ's sanity checks, which hold without signatures: one well-formed forged number must not poison a
stream for good (the audit: a health with seq 2^62 set `lost` to 4.6e18; a snapshot as of 10^15
replaced the inventory and made the next real messages "duplicates")."""

from __future__ import annotations

import json
from pathlib import Path

from edge_agent.clock import VirtualClock, rfc3339
from edge_agent.hq.applier import HqApplier
from edge_agent.inventory.book import Delta, InventoryBook
from edge_agent.sync.outbox import Outbox, SealedMessage

from .helpers import HqBackend

T0 = 1_767_225_600.0
PREFIX = "retail/v1/S001"
ID = "01JE0000000000000000000000"


def forged(stream: str, type_: str, seq: int, body: dict, prev: str = "") -> bytes:
    return SealedMessage(stream, seq, ID, type_, T0, T0, 1, json.dumps(body), prev=prev).payload("S001", T0, False)


def test_forged_numbers_are_refused_and_change_nothing(tmp_path: Path, hq_backend: HqBackend) -> None:
    clock = VirtualClock(T0)
    ob = Outbox(tmp_path / "agent.db", clock)
    book = InventoryBook(ob, clock)
    hq = HqApplier(hq_backend.store(), clock, prefix="retail/v1")
    for k in range(3):
        book.apply([Delta(T0 + k, "salesfloor", "04000000000006", 2)])
        m = ob.seal("inventory/delta")
        assert m is not None
        hq.receive(f"{PREFIX}/inventory/delta", m.payload("S001", T0, False))
    inventory = hq.db.inventory("S001")
    last_id = hq.db.read("SELECT last_id FROM streams WHERE stream = 'inventory/delta'")[0][0]
    health = {"uptime_s": 1, "connected": True, "pending_facts": 0, "sealed_messages": 0, "db_bytes": 0,
              "cap_bytes": 1, "compacted_facts": 0, "coarsened_facts": 0, "dropped_facts": {}, "quarantined": {}}
    item = {"ts": rfc3339(T0), "zone": "salesfloor", "gtin": "04000000000006", "delta": 1000}
    cases = {
        "health seq 2^62": ("health", forged("health", "health", 2**62, health)),
        "snapshot as of 10^15": ("inventory/snapshot", forged("inventory/snapshot", "inventory.snapshot", 1, {
            "snapshot_id": "x", "as_of_seq": 10**15, "part": 1, "parts": 1, "reason": "forged", "items": []})),
        "status with a floor of 10^15": ("status", forged("status", "status", 1, {
            "state": "online", "agent_version": "x", "boot_id": "b", "connection": 1,
            "seq_floor": {"inventory/delta": 10**15}})),
        "next delta naming no previous message": ("inventory/delta", forged(
            "inventory/delta", "inventory.delta", 4, {"items": [item]})),
        "a delta a million seqs ahead": ("inventory/delta", forged(
            "inventory/delta", "inventory.delta", 10**6, {"items": [item]}, last_id)),
    }
    for case, (stream, payload) in cases.items():
        before = hq.figures.rejected
        assert hq.receive(f"{PREFIX}/{stream}", payload) == [], case
        assert hq.figures.rejected == before + 1, case
    assert hq.db.inventory("S001") == inventory
    assert hq.db.read("SELECT count(*) FROM stash") == [(0,)]
    assert all(s["lost"] == 0 and s["gaps"] == 0 for s in hq.db.stream_stats())
    assert hq.db.read("SELECT count(*) FROM status") == [(0,)]
    # The real next message still applies.
    book.apply([Delta(T0 + 9, "salesfloor", "04000000000006", 1)])
    m = ob.seal("inventory/delta")
    assert m is not None
    hq.receive(f"{PREFIX}/inventory/delta", m.payload("S001", T0, False))
    assert hq.db.inventory("S001") == {("salesfloor", "04000000000006"): 7}
    hq.db.close()
    ob.close()
