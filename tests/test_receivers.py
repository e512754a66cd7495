"""Several HQ receivers on one database, sharing the stores' traffic through an MQTT v5 shared
subscription: one of them is SIGKILLed mid-run and started again, and every store's inventory at HQ
still equals its truth, each delta applied once, nothing lost.

Real parts only: a private mosquitto, `edge-agent hq` and `edge-agent run` subprocesses, the HQ
database on SQLite and on a private PostgreSQL cluster (``hq_backend``).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from edge_agent.clock import VirtualClock
from edge_agent.hq.applier import HqApplier
from edge_agent.hq.receiver import HqReceiver
from edge_agent.inventory.book import Delta, InventoryBook
from edge_agent.sync.outbox import Outbox
from simulators.inventory_feed import InventoryFeed
from simulators.mosquitto import Mosquitto
from simulators.postgres import Postgres

from .helpers import AgentProcess, HqBackend, HqProcess, agent_config, start_hq, wait_for

ZONES = ["backroom", "salesfloor", "fitting-room", "pos"]
STORES = {"S001": 41, "S002": 42, "S003": 43}  # store: its feed's seed
TOTAL = 9_000
T0 = 1_767_225_600.0
GTIN = "04000000000006"
APPLIED_LINE = re.compile(r"hq applied (\S+) inventory/delta\s+msgs=(\d+)")


def applied_by(p: HqProcess) -> int:
    """Delta messages this receiver applied, from the lines it prints each second."""
    return sum(int(m.group(2)) for m in APPLIED_LINE.finditer(p.log.read_text(errors="replace")))


@pytest.mark.slow
def test_three_receivers_share_the_load_and_one_killed_loses_nothing(
    tmp_path: Path, broker: Mosquitto, hq_backend: HqBackend
) -> None:
    keys = hq_backend.config()
    receivers = [HqProcess(tmp_path, broker.port, name=f"hq-{i}", client_id=f"hq-{i}", share_group="hq",
                           print_applied=True, **keys) for i in (1, 2, 3)]
    agents = []
    try:
        for r in receivers:
            r.start()
        db = hq_backend.store()  # a reader of the receivers' database (migrated by whichever came first)

        def facts(store: str) -> int:
            rows = db.read("SELECT facts FROM streams WHERE store = ? AND stream = 'inventory/delta'", (store,))
            return rows[0][0] if rows else 0

        time.sleep(2.0)  # the receivers subscribe (a message with no subscriber yet is sent again by its store)
        for store, seed in STORES.items():
            cfg = agent_config(tmp_path, broker.port, store=store, sim={
                "seed": seed, "total": TOTAL, "rate_per_s": 1_200, "batch": 30, "zones": ZONES, "gtins": 40})
            agents.append(AgentProcess(cfg, tmp_path / f"agent-{store}.log").start())
        wait_for(lambda: all(facts(s) >= 1_500 for s in STORES), 30, "deltas flowing to every store's row")
        receivers[1].kill9()  # with messages of every store in its hands, applied or not
        killed_at = sum(facts(s) for s in STORES)
        assert killed_at < 3 * TOTAL, "the receiver was killed after the feeds were complete"
        time.sleep(1.5)
        receivers[1].start()  # its session still holds what it had not acked: a duplicate now, or new

        truth = {s: InventoryFeed(seed, ZONES, 40).truth(TOTAL) for s, seed in STORES.items()}
        wait_for(lambda: all(db.inventory(s) == truth[s] for s in STORES), 90, "HQ inventory to equal every truth")
        for s in STORES:
            (st,) = [x for x in db.stream_stats() if x["store"] == s and x["stream"] == "inventory/delta"]
            assert st["facts"] == TOTAL, st  # more would be a delta applied twice
            assert st["gaps"] == 0 and st["lost"] == 0, st
        assert db.read("SELECT count(*) FROM stash")[0][0] == 0
        assert db.read("SELECT count(*) FROM rejected")[0][0] == 0
        time.sleep(1.2)  # the receivers' last once-a-second lines
        shares = [applied_by(r) for r in receivers]
        assert all(n > 0 for n in shares), shares  # all three took a share of the traffic
        for a in agents:
            assert a.alive
    finally:
        for a in agents:
            a.terminate()
        for r in receivers:
            r.terminate()


@pytest.mark.slow
@pytest.mark.postgres
def test_a_receiver_rides_out_lost_database_connections(tmp_path: Path, broker: Mosquitto, postgres: Postgres) -> None:
    """PostgreSQL drops HQ's connection (a restart, a failover, a network cut) five times while a store
    streams: each batch in hand rolls back unacknowledged and is applied again on a new connection."""
    url = postgres.create_database()
    hq = start_hq(tmp_path, broker.port, database=url)
    total, seed = 9_000, 44
    cfg = agent_config(tmp_path, broker.port, sim={
        "seed": seed, "total": total, "rate_per_s": 1_500, "batch": 30, "zones": ZONES, "gtins": 40})
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    admin = psycopg.connect(url, autocommit=True)
    try:
        cuts = 0
        while cuts < 5:
            wait_for(lambda c=cuts: delta_facts(hq) >= 1_000 * (c + 1), 60, "deltas applied between cuts")
            cuts += admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                  " WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()[0] > 0
        assert delta_facts(hq) < total, "the cuts came after the feed was complete"
        truth = InventoryFeed(seed, ZONES, 40).truth(total)
        wait_for(lambda: hq.db.inventory("S001") == truth, 90, "HQ inventory to equal the truth")
        (st,) = [x for x in hq.db.stream_stats() if x["stream"] == "inventory/delta"]
        assert st["facts"] == total and st["gaps"] == 0 and st["lost"] == 0, st
        assert hq.db.read("SELECT count(*) FROM rejected")[0][0] == 0
        assert agent.alive
    finally:
        admin.close()
        agent.terminate()
        hq.stop()


def delta_facts(hq: HqReceiver) -> int:
    try:
        rows = hq.db.read("SELECT facts FROM streams WHERE store = 'S001' AND stream = 'inventory/delta'")
    except psycopg.OperationalError:  # the connection this read used was just cut; the next one reconnects
        return 0
    return rows[0][0] if rows else 0


def test_a_batch_that_fails_teaches_the_duplicate_filter_nothing(tmp_path: Path, hq_backend: HqBackend) -> None:
    """A receiver counts a message below what it saw committed as a duplicate without applying it; what
    it saw in a batch that rolled back (the database failed at its end) must not count as committed, or
    the batch's retry would drop its own messages as duplicates."""
    clock = VirtualClock(T0)
    ob = Outbox(tmp_path / "agent.db", clock)
    book = InventoryBook(ob, clock)
    hq = HqApplier(hq_backend.store(), clock, prefix="retail/v1")
    topic = "retail/v1/S001/inventory/delta"
    msgs = []
    for k in range(4):
        book.apply([Delta(T0 + k, "salesfloor", GTIN, 1)])
        m = ob.seal("inventory/delta")
        assert m is not None
        msgs.append((topic, m.payload("S001", T0, False), False))
    hq.receive_batch(msgs[:2])
    real_one = hq._one

    calls = []

    def fail_after(*args: Any) -> None:
        real_one(*args)
        calls.append(args)
        if len(calls) == 2:  # seqs 3 and 4 applied, then the database goes, before the commit
            raise hq.db.outage[0]("the database went away")

    hq._one = fail_after  # type: ignore[method-assign]
    with pytest.raises(hq.db.outage[0]):
        hq.receive_batch(msgs[2:4])
    hq._one = real_one  # type: ignore[method-assign]
    hq.receive_batch(msgs)  # the retry, with 1 and 2 again
    (st,) = hq.db.stream_stats()
    assert (st["last_seq"], st["applied"], st["facts"], st["duplicates"]) == (4, 4, 4, 2), st
    assert hq.db.inventory("S001") == {("salesfloor", GTIN): 4}
    hq.db.close()
    ob.close()
