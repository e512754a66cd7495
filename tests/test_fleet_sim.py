"""The fleet simulator end to end: 20 stores in 2 processes, each the agent's own outbox and uplink, two
of them cut off for a few seconds, against a real mosquitto and one HQ receiver (SQLite and PostgreSQL):
every store's HQ inventory equals its truth, every stream is applied exactly up to the store's last
sealed seq, and no fact is missing or counted twice."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from simulators.fleet import STREAMS_GENERATED, Fleet, plan_outages, store_ids
from simulators.mosquitto import Mosquitto

from .helpers import HqBackend, start_hq

pytestmark = pytest.mark.slow

STORES = 20
SECONDS = 15.0


def test_fleet_hq_equals_truth(tmp_path: Path, broker: Mosquitto, hq_backend: HqBackend) -> None:
    rx = start_hq(tmp_path, broker.port, **hq_backend.config())
    outages = plan_outages(store_ids(STORES), seed=3, share=0.1, min_s=2.0, max_s=5.0, run_s=SECONDS)
    assert len(outages) == 2
    fleet = Fleet(STORES, 2, broker.port, tmp_path / "fleet", seed=3, outages=outages)
    try:
        fleet.start(connect_timeout=60)
        time.sleep(SECONDS)
        fleet.stop_workload()
        assert fleet.wait_drained(40), "every outbox empties once HQ has acked everything"
        res = fleet.results()
    finally:
        fleet.stop()
        rx.stop()
    assert not res["errors"]
    db = hq_backend.store()
    assert len(res["stores"]) == STORES
    cut = [st for st in res["stores"] if st["outage"][0] is not None]
    assert len(cut) == 2 and all(st["outage"][2] is not None for st in cut), "both outages happened and ended"
    for st in res["stores"]:
        s = st["store"]
        truth = {(z, g): q for z, g, q in st["inventory"]}
        hq = {(z, g): q for z, g, q in db.read("SELECT zone, gtin, qty FROM inventory WHERE store = ? AND qty != 0", (s,))}
        assert truth and hq == truth, s
        streams = {r[0]: r[1:] for r in db.read(
            "SELECT stream, last_seq, applied, facts, gaps, lost FROM streams WHERE store = ?", (s,))}
        for stream, hwm in st["hwm"].items():
            last, applied, facts, gaps, lost = streams[stream]
            assert (last, applied, gaps, lost) == (hwm, hwm, 0, 0), (s, stream)
            if stream in STREAMS_GENERATED:
                assert facts == st["facts"][stream], (s, stream)
    # The records cover every message the stores sealed, each acked after it was committed.
    sealed = sum(hwm for st in res["stores"] for hwm in st["hwm"].values())
    records = [r for recs in res["records"].values() for r in recs]
    assert len(records) == sealed
    assert all(acked >= created for *_, created, acked in records)
