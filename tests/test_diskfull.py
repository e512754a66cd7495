"""A full disk is a state, not a crash (issue 12): on a real tmpfs of a few MB, filled to the last byte.

Unit level: a refused commit leaves every engine exactly where it was (presence, the book, cycle
counts, the price book, ESL alerts and label state, a command's handler), and the retry gives what an
undisturbed run gives, byte for byte. Sources hold their input and resume by themselves. End to end:
an agent subprocess whose outbox fills up during trading stays up, tells HQ, resumes when space comes
back, and HQ's inventory equals the simulators' ground truth.
"""

from __future__ import annotations

import errno
import http.client
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edge_agent.clock import RealClock, VirtualClock, rfc3339
from edge_agent.config import ReaderHttpConfig, SimulatedInventoryConfig, VisionConfig
from edge_agent.contract import DEFAULT_PREFIX, command_topic
from edge_agent.health import HealthReporter
from edge_agent.inventory.book import InventoryBook
from edge_agent.rfid.pipeline import RfidPipeline
from edge_agent.rfid.sources import HttpReaderSource, ReaderIntake
from edge_agent.sources.simulated_inventory import SimulatedInventorySource
from edge_agent.sync.diskstate import DISK_FULL, IO_ERROR, DiskState, WriteFailed, refusal_kind
from edge_agent.sync.downlink import Downlink
from edge_agent.sync.outbox import Fact, Outbox
from edge_agent.tokens import token_hash
from edge_agent.vision.service import VisionService
from simulators.esl_store import EslStore
from simulators.inventory_feed import InventoryFeed
from simulators.mosquitto import Mosquitto
from simulators.rfid_reader import SimConfig, StoreSim

from .helpers import AgentProcess, agent_config, start_hq, wait_for
from .test_rfid_pipeline import EPCS, T0, generic, levels, make

ZONES = ["backroom", "salesfloor", "fitting-room", "pos"]


class TinyDisk:
    """A tmpfs of a few MB mounted for one test: a real filesystem that really fills up."""

    def __init__(self, path: Path, size_mb: int) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], check=True)
        self.filler = path / "filler"

    def fill(self) -> int:
        """Write a filler file until the filesystem refuses another byte; its size."""
        with open(self.filler, "ab", buffering=0) as f:
            for block in (1 << 20, 1 << 16, 1 << 12, 1):
                try:
                    while True:
                        f.write(b"\0" * block)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
        return self.filler.stat().st_size

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        if subprocess.run(["umount", str(self.path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(self.path)], check=True)  # still busy: detach it anyway


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[TinyDisk]:
    if os.geteuid() != 0:
        pytest.skip("filling a real tiny filesystem needs root to mount a tmpfs (CI runs as root)")
    d = TinyDisk(tmp_path / "disk", 8)
    yield d
    d.unmount()


def refuse_writes(ob: Outbox, disk: TinyDisk) -> None:
    """Fill the disk so that the very next commit is refused: an empty WAL has to grow to take it."""
    ob.read("PRAGMA wal_checkpoint(TRUNCATE)")
    disk.fill()


# ---------------------------------------------------------------------------- the episode, pure


def test_refusals_are_told_apart_from_other_errors() -> None:
    import sqlite3

    def err(code: int | None, text: str) -> sqlite3.Error:
        e = sqlite3.OperationalError(text)
        if code is not None:
            e.sqlite_errorcode = code  # type: ignore[attr-defined]
        return e

    assert refusal_kind(err(sqlite3.SQLITE_FULL, "database or disk is full")) == DISK_FULL
    assert refusal_kind(err(sqlite3.SQLITE_IOERR | (3 << 8), "disk I/O error")) == IO_ERROR  # SQLITE_IOERR_WRITE
    assert refusal_kind(err(None, "database or disk is full")) == DISK_FULL  # no code: SQLite's words
    assert refusal_kind(err(sqlite3.SQLITE_BUSY, "database is locked")) is None
    assert refusal_kind(err(sqlite3.SQLITE_CONSTRAINT, "UNIQUE constraint failed")) is None


def test_an_episode_is_counted_once_and_closed_by_a_commit() -> None:
    d = DiskState()
    assert not d.failing and d.closing_alert(T0) is None
    assert d.refused(DISK_FULL, T0, "database or disk is full") is True
    assert [d.refused(DISK_FULL, T0 + i, "database or disk is full") for i in (1, 2)] == [False, False]
    kind, message = d.closing_alert(T0 + 30)  # type: ignore[misc]
    assert kind == DISK_FULL and d.failing
    assert rfc3339(T0) in message and rfc3339(T0 + 30) in message and "3 times" in message
    d.committed()
    assert not d.failing and d.refused_total == 3
    assert d.refused(IO_ERROR, T0 + 40, "disk I/O error") is True  # a new episode


# ---------------------------------------------------------------------------- the outbox on a full disk


def test_a_full_disk_is_one_episode_one_alert_carried_by_the_health_report(
    disk: TinyDisk, caplog: pytest.LogCaptureFixture
) -> None:
    clock = VirtualClock(T0)
    ob = Outbox(disk.path / "o.db", clock, cap_bytes=2 << 20)
    health = HealthReporter(ob, clock, 3600.0, connected=lambda: True)
    try:
        health.tick(force=True)
        ob.enqueue("inventory/delta", [Fact(clock.now(), '{"n":0}', key="k")])
        refuse_writes(ob, disk)
        with caplog.at_level(logging.INFO, logger="edge_agent.sync.outbox"):
            for n in range(1, 21):
                clock.advance(1)
                with pytest.raises(WriteFailed):
                    ob.enqueue("inventory/delta", [Fact(clock.now(), f'{{"n":{n}}}', key="k")])
                assert ob.write_failing
            with pytest.raises(WriteFailed):
                health.tick()  # not due, but while writes fail every tick tries: it is the probe
            disk.free()
            clock.advance(1)
            assert health.tick()  # the first commit after the episode: it carries the alert
        refused = [r for r in caplog.records if "write refused" in r.getMessage()]
        ended = [r for r in caplog.records if DISK_FULL in r.getMessage()]
        assert len(refused) == 1 and refused[0].levelno == logging.ERROR, caplog.text
        assert len(ended) == 1 and "21 times" in ended[0].getMessage(), caplog.text
        assert not ob.write_failing and ob.disk.refused_total == 21
        bodies = [json.loads(b) for (b,) in ob.read("SELECT body FROM pending WHERE stream = 'health' ORDER BY id")]
        alerts = [a for a in bodies[-1]["alerts"] if a["kind"] == DISK_FULL]
        assert len(alerts) == 1 and rfc3339(T0 + 1) in alerts[0]["message"] and rfc3339(T0 + 21) in alerts[0]["message"]
        assert [json.loads(b)["n"] for (b,) in ob.read(
            "SELECT body FROM pending WHERE stream = 'inventory/delta'")] == [0]  # nothing refused was kept
    finally:
        ob.close()


# ---------------------------------------------------------------------------- RFID: presence and the book

SIM = SimConfig(seed=5, n_items=200, n_gtins=20, miss_rate=0.1, cross_read_rate=0.02, ghost_rate=0.2,
                burst_rate=0.02, purchase_per_h=400, tryon_per_h=200)


def store_ops(open_s: float, closed_s: float) -> tuple[list[tuple[float, bytes | None]], StoreSim]:
    """Every payload of a simulated store, then a tick, per read cycle: (cycle time, payload or None)."""
    sim = StoreSim(SIM)
    ops: list[tuple[float, bytes | None]] = []
    for phase, span in (("open", open_s), ("closed", closed_s)):
        if phase == "closed":
            sim.close()
        for t, payloads in sim.run(span):
            ops += [(t, p) for p in payloads]
            ops.append((t, None))
    return ops, sim


def run_op(clock: VirtualClock, pipe: RfidPipeline, op: tuple[float, bytes | None]) -> None:
    t, payload = op
    clock.set(max(t, clock.now()))
    if payload is None:
        pipe.tick()
    else:
        pipe.ingest(payload)


def engine_state(pipe: RfidPipeline) -> tuple:
    """Everything presence decides by, and the pipeline's figures."""
    e = pipe.engine
    tags = {epc: (t.gtin, t.zone, t.first_seen, t.last_seen, t.reads, t.counted_at, t.candidate, t.candidate_since,
                  [(z, s.ema, s.last) for z, s in t.signals.items()]) for epc, t in e.tags.items()}
    return (tags, e.reads_seen, e.ghosts_dropped, pipe.clock.now(), dict(pipe.reads_by_antenna),
            dict(pipe.last_read_at), pipe.raw_epcs)


def db_state(ob: Outbox) -> tuple:
    return (sorted(ob.read("SELECT epc, gtin, zone, since FROM rfid_tags")),
            sorted(ob.read("SELECT zone, gtin, qty FROM stock")), ob.pending_count())


def deltas(ob: Outbox) -> list[str]:
    return [b for (b,) in ob.read("SELECT body FROM pending WHERE stream = 'inventory/delta' ORDER BY id")]


def test_presence_and_the_book_never_run_ahead_of_a_refused_commit(tmp_path: Path, disk: TinyDisk) -> None:
    """The disk fills just before a tick that departs tags, and again before a payload that moves some:
    each refused attempt leaves presence, the reads clock, the figures and the database as they were;
    given again once there is room, the day ends byte for byte as an undisturbed one does."""
    ops, sim = store_ops(900, 300)
    clock, ob, book, pipe = make(tmp_path, StoreSim(SIM), name="ref.db", clock="reads")
    changed = []
    for op in ops:
        before = ob.pending_count()
        run_op(clock, pipe, op)
        changed.append(ob.pending_count() > before)
    want, want_tags = deltas(ob), sorted(ob.read("SELECT epc, gtin, zone, since FROM rfid_tags"))
    assert levels(book) == sim.stock_truth()
    ob.close()
    n = len(ops)
    tick_at = next(i for i in range(n // 3, n) if changed[i] and ops[i][1] is None)
    ingest_at = next(i for i in range(2 * n // 3, n) if changed[i] and ops[i][1] is not None)

    clock, ob, book, pipe = make(disk.path, StoreSim(SIM), name="full.db", clock="reads")
    try:
        for i, op in enumerate(ops):
            if i in (tick_at, ingest_at):
                refuse_writes(ob, disk)
                engine, db = engine_state(pipe), db_state(ob)
                for _ in range(3):
                    with pytest.raises(WriteFailed):
                        run_op(clock, pipe, op)
                    assert engine_state(pipe) == engine
                    assert db_state(ob) == db
                    assert {e: (z, g) for e, g, z, _ in db[0]} == pipe.engine.present()
                disk.free()
            run_op(clock, pipe, op)
        assert ob.disk.refused_total == 6
        assert deltas(ob) == want
        assert sorted(ob.read("SELECT epc, gtin, zone, since FROM rfid_tags")) == want_tags
        assert levels(book) == sim.stock_truth()
    finally:
        ob.close()


def test_a_cycle_count_refused_at_its_end_finishes_once_there_is_room(disk: TinyDisk) -> None:
    clock, ob, book, pipe = make(disk.path)
    try:
        for _ in range(2):
            pipe.ingest(json.dumps([generic(epc, 1, clock.now()) for epc in EPCS]).encode())
            clock.advance(1)
        count = pipe.start_count("salesfloor", 5)
        for _ in range(5):
            clock.advance(1)
            pipe.ingest(json.dumps([generic(EPCS[0], 1, clock.now())]).encode())
        refuse_writes(ob, disk)
        with pytest.raises(WriteFailed):
            pipe.tick()  # the count ends: two tags missing, refused
        assert count.count_id in pipe.counts and len(pipe.engine.present()) == 3
        assert len(levels(book)) == 1 and sum(levels(book).values()) == 3
        disk.free()
        pipe.tick()
        (body,) = [json.loads(b) for (b,) in ob.read("SELECT body FROM pending WHERE stream='inventory/count'")]
        assert body["count_id"] == count.count_id and body["missing"] == EPCS[1:]
        assert sum(levels(book).values()) == 1 and not pipe.counts
    finally:
        ob.close()


# ---------------------------------------------------------------------------- sources hold and resume


def test_reader_intake_holds_its_payload_then_drops_and_counts_then_resumes(
    disk: TinyDisk, caplog: pytest.LogCaptureFixture
) -> None:
    clock, ob, book, pipe = make(disk.path)
    intake = ReaderIntake(pipe, maxsize=5, tick_s=3600)
    intake.start()
    try:
        for k in (1, 2):
            assert intake.submit(json.dumps([generic(EPCS[0], 1, clock.now())]).encode(), "rfid.mqtt")
            wait_for(lambda k=k: pipe.engine.reads_seen == k, 10, "the read taken in")
            clock.advance(1)
        wait_for(lambda: len(levels(book)) == 1, 10, "the tag on the book")
        refuse_writes(ob, disk)
        assert intake.submit(json.dumps([generic(EPCS[0], 2, clock.now())]).encode(), "rfid.mqtt")  # sold
        wait_for(lambda: ob.write_failing, 10, "the departure refused")
        with caplog.at_level(logging.INFO, logger="edge_agent.rfid.sources"):
            took = [intake.submit(json.dumps([generic(EPCS[1], 1, clock.now())]).encode(), "rfid.mqtt", timeout=0.05)
                    for _ in range(12)]
            assert took == [True] * 5 + [False] * 7  # the queue holds 5 behind the payload being retried
            assert intake.dropped == 7
            assert len(levels(book)) == 1  # the sale waits
            disk.free()
            wait_for(lambda: not levels(book) and not ob.write_failing, 10, "the sale once there is room")
            wait_for(lambda: pipe.engine.reads_seen == 3 + 5, 10, "the queued payloads taken in")
            assert intake.submit(json.dumps([generic(EPCS[1], 1, clock.now())]).encode(), "rfid.mqtt")
        mine = [r.levelno for r in caplog.records if r.name == "edge_agent.rfid.sources"]
        assert mine == [logging.WARNING, logging.INFO], caplog.text  # once when dropping begins, once when it ends
        assert intake._worker.is_alive()
    finally:
        intake.stop()
        ob.close()


def test_http_intake_answers_503_with_retry_after_while_writes_fail(disk: TinyDisk) -> None:
    clock, ob, book, pipe = make(disk.path)
    intake = ReaderIntake(pipe, maxsize=100, tick_s=3600)
    token = "rdr-canary-2b8e51-diskfull"  # a canary: tests/conftest.py fails the run if a log shows it
    src = HttpReaderSource(ReaderHttpConfig(enabled=True, port=0, tokens={"r1": token_hash(token)}), intake)
    intake.start()
    src.start()

    def post(events: list[dict]) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", src.port, timeout=5)
        conn.request("POST", "/rfid/events", body=json.dumps(events).encode(),
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp

    try:
        for k in (1, 2):
            assert post([generic(EPCS[0], 1, clock.now())]).status == 202
            wait_for(lambda k=k: pipe.engine.reads_seen == k, 10, "the read taken in")
            clock.advance(1)
        wait_for(lambda: len(levels(book)) == 1, 10, "the tag on the book")
        refuse_writes(ob, disk)
        assert post([generic(EPCS[0], 2, clock.now())]).status == 202  # taken before anything failed
        wait_for(lambda: ob.write_failing, 10, "the departure refused")
        refused = post([generic(EPCS[1], 1, clock.now())])
        assert refused.status == 503 and refused.getheader("Retry-After") == "2"
        disk.free()
        wait_for(lambda: not ob.write_failing, 10, "the held payload committed")
        assert post([generic(EPCS[1], 1, clock.now())]).status == 202
        wait_for(lambda: pipe.engine.reads_seen == 4, 10, "the last read taken in")
        assert levels(book) == {}  # the sale is in
    finally:
        src.stop()
        intake.stop()
        ob.close()


def test_simulated_inventory_gives_its_batch_again_until_the_disk_takes_it(disk: TinyDisk) -> None:
    clock = RealClock()
    ob = Outbox(disk.path / "o.db", clock)
    book = InventoryBook(ob, clock)
    cfg = SimulatedInventoryConfig(enabled=True, seed=3, total=3000, rate_per_s=3000, batch=30, zones=ZONES,
                                   gtins=20)
    source = SimulatedInventorySource(cfg, book, clock)
    source.start()
    try:
        wait_for(lambda: book.cursor("sim-inventory") >= 300, 10, "the feed under way")
        refuse_writes(ob, disk)
        wait_for(lambda: ob.write_failing, 10, "a batch refused")
        at = book.cursor("sim-inventory")
        time.sleep(0.5)
        assert source._thread.is_alive() and book.cursor("sim-inventory") == at < cfg.total
        disk.free()
        assert source.done.wait(15), "the feed did not resume"
        assert book.cursor("sim-inventory") == cfg.total
        assert {k: v for k, v in book.levels().items() if v} == InventoryFeed(3, ZONES, 20).truth(cfg.total)
        assert ob.read("SELECT count(*) FROM pending WHERE stream = 'inventory/delta'")[0][0] == cfg.total
        assert [k for (k,) in ob.read("SELECT kind FROM alerts")] == [DISK_FULL]
    finally:
        source.stop()
        ob.close()


def test_a_command_whose_result_is_refused_runs_its_handler_once(disk: TinyDisk) -> None:
    clock = VirtualClock(T0)
    ob = Outbox(disk.path / "o.db", clock)
    downlink = Downlink("S001", DEFAULT_PREFIX, ob, clock)
    ran: list[str] = []
    downlink.register("rfid.cycle_count", lambda cmd, _args: ran.append(cmd.id) or {"started": True})
    topic = command_topic(DEFAULT_PREFIX, "S001", "rfid.cycle_count")
    payload = json.dumps({"v": 1, "id": "c1", "name": "rfid.cycle_count", "store": "S001", "ts": rfc3339(T0),
                          "args": {"zone": "salesfloor", "duration_s": 60}}).encode()
    try:
        refuse_writes(ob, disk)
        for _ in range(3):
            with pytest.raises(WriteFailed):
                downlink.handle(topic, payload)
        disk.free()
        assert downlink.handle(topic, payload).status == "ok"
        assert ran == ["c1"]  # the handler ran before the first refusal, and never again
        assert downlink.handle(topic, payload).reason == "duplicate"
        results = [json.loads(b) for (b,) in ob.read("SELECT body FROM pending WHERE stream = 'cmd-result'")]
        assert [(r["cmd_id"], r["status"]) for r in results] == [("c1", "ok")]
    finally:
        ob.close()


def test_vision_items_wait_for_the_disk_instead_of_being_lost(disk: TinyDisk) -> None:
    clock = VirtualClock(T0)
    ob = Outbox(disk.path / "o.db", clock)
    svc = VisionService(VisionConfig(), ob)  # no cameras: only the drain's writing is under test
    item = {"camera": "*", "zone": None, "bucket_start": rfc3339(T0), "bucket_s": 60, "entries": 3, "exits": 2,
            "occupancy_min": 0.0, "occupancy_avg": 1.5, "occupancy_max": 4.0, "visits": 3}
    try:
        refuse_writes(ob, disk)
        writer = threading.Thread(target=svc._enqueue, args=([item], []), daemon=True)
        writer.start()
        wait_for(lambda: ob.write_failing, 10, "the items refused")
        time.sleep(0.3)
        assert writer.is_alive()  # held and retried, not dropped
        disk.free()
        writer.join(5)
        assert not writer.is_alive()
        (body,) = [json.loads(b) for (b,) in ob.read("SELECT body FROM pending WHERE stream = 'traffic/stats'")]
        assert body == item
    finally:
        svc._halt.set()
        ob.close()


# ---------------------------------------------------------------------------- ESL


@pytest.fixture
def esl_on_disk(disk: TinyDisk) -> Iterator[EslStore]:
    s = EslStore(disk.path, labels=20, gtins=10, silent=0.2, silent_after_s=1e7, mismatch_deadline_s=600.0,
                 poll_interval_s=10.0)
    yield s
    s.close()


def test_esl_alerts_and_prices_refused_by_the_disk_come_again(esl_on_disk: EslStore, disk: TinyDisk) -> None:
    store = esl_on_disk
    gtins = sorted(set(store.gtin_of.values()))
    store.bind_all()
    store.set_prices(gtins, 1, {g: "1.00" for g in gtins})
    store.run(120)
    assert store.silent and not store.uplinked("esl/alert")
    g = gtins[0]
    args = {"gtin": g, "price": "2.00", "currency": "EUR", "version": 2}

    refuse_writes(store.outbox, disk)
    with pytest.raises(WriteFailed):
        store.command("price.set", args, cmd_id="p2")
    assert store.service.book.effective(g, store.clock.now()).price == "1.00"  # no version the database lacks
    store.clock.advance(700)  # the silent labels have shown a wrong price past the deadline
    for _ in range(3):
        with pytest.raises(WriteFailed):
            store.service.step()
    assert all(not store.service.engine.labels[m].alerted for m in store.silent)

    disk.free()
    assert store.command("price.set", args, cmd_id="p2").detail["outcome"] == "stored"
    store.service.step()
    alerts = {(a["label"], a["kind"]) for a in store.uplinked("esl/alert")}
    assert {(m, "price_mismatch") for m in store.silent} <= alerts
    store.run(300)
    assert not store.wrong()
    assert len(store.uplinked("esl/alert")) == len({(a["label"], a["kind"]) for a in store.uplinked("esl/alert")})


# ---------------------------------------------------------------------------- end to end


def _publish_store(port: int, sim: StoreSim, open_cycles: int, closed_cycles: int, per_s: float,
                   stop: threading.Event) -> None:
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sim-readers")
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    try:
        t0 = time.monotonic()
        info = None
        for cycle in range(open_cycles + closed_cycles):
            if stop.is_set():
                return
            if cycle == open_cycles:
                sim.close()
            if cycle < open_cycles:
                time.sleep(max(0.0, t0 + cycle / per_s - time.monotonic()))
            for reader, p in sim.step_by_reader():
                info = pub.publish(f"readers/{reader}/events", p, qos=1)
        if info is not None:
            info.wait_for_publish(30)
    finally:
        pub.loop_stop()
        pub.disconnect()


def _health_alerts(hq: Any, kind: str) -> list[dict]:
    out = []
    for (body,) in hq.db.read("SELECT body FROM telemetry WHERE store = 'S001' AND stream = 'health'"):
        out += [a for a in json.loads(body)["alerts"] if a["kind"] == kind]
    return out


@pytest.mark.slow
def test_a_disk_that_fills_during_trading_loses_nothing(tmp_path: Path, disk: TinyDisk, broker: Mosquitto) -> None:
    """An agent process with its outbox on an 8 MB tmpfs takes RFID reads (a simulated store publishing to
    its reader broker at 40 cycles a second) and the simulated inventory feed; the disk is filled to the
    last byte for 4 s while both go on, then the filler is deleted. The agent stays up, HQ gets the
    outbox.disk_full alert in a health report, and HQ's inventory equals both simulators' truth."""
    total = 8_000
    rfid = StoreSim(SimConfig(seed=11, n_items=300, n_gtins=30, purchase_per_h=300, tryon_per_h=100))
    antennas = [{k: a[k] for k in ("reader", "port", "zone")} for a in rfid.layout()]
    cfg = agent_config(
        tmp_path, broker.port,
        sim={"seed": 7, "total": total, "rate_per_s": 400, "batch": 20, "zones": ZONES, "gtins": 40},
        outbox={"path": str(disk.path / "outbox.db"), "cap_bytes": 4 << 20},
        health={"interval_s": 2.0},
        rfid={"enabled": True, "clock": "reads", "snapshot_interval_s": 0},
        rfid__mqtt={"enabled": True, "port": broker.port, "topic": "readers/+/events"},
        # Every episode's lines as they happen: this test counts them against HQ's alerts, and coalescing
        # holds a second episode's alert line back for a minute (test_logs.py tests coalescing).
        log={"level": "INFO", "coalesce_s": 0},
    )
    with cfg.open("a") as f:
        for a in antennas:
            f.write(f'\n[[rfid.antennas]]\nreader = "{a["reader"]}"\nport = {a["port"]}\nzone = "{a["zone"]}"\n')
    hq = start_hq(tmp_path, broker.port)
    log = tmp_path / "agent.log"
    agent = AgentProcess(cfg, log).start()
    stop = threading.Event()
    publisher = threading.Thread(target=_publish_store, args=(broker.port, rfid, 600, 720, 40.0, stop), daemon=True)
    try:
        wait_for(lambda: "connected" in log.read_text(), 20, "the agent to connect")
        time.sleep(1.0)  # its reader subscription is made right after connecting
        publisher.start()
        wait_for(lambda: sum(hq.db.inventory("S001").values()) > 0, 20, "facts reaching HQ")
        time.sleep(2.0)
        disk.fill()
        wait_for(lambda: "outbox write refused" in log.read_text(), 10, "the agent to hit the full disk")
        time.sleep(4.0)  # trading goes on: readers publish, the feed has batches to write
        assert agent.alive, f"agent died on a full disk; log: {log}"
        disk.free()
        publisher.join(60)
        truth, feed_truth = rfid.stock_truth(), InventoryFeed(7, ZONES, 40).truth(total)
        assert not feed_truth.keys() & truth.keys()
        truth.update(feed_truth)
        try:
            wait_for(lambda: hq.db.inventory("S001") == truth, 40, "HQ inventory to equal the ground truth")
        except AssertionError:
            got = hq.db.inventory("S001")
            diff = {k: (truth.get(k), got.get(k)) for k in set(truth) | set(got) if truth.get(k) != got.get(k)}
            raise AssertionError(f"HQ differs from the truth (truth, HQ): {diff}") from None
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        began = [x for x in lines if "outbox write refused" in x["msg"]]
        ended = [x for x in lines if f"alert {DISK_FULL}" in x["msg"]]
        # Once per episode. The disk can take a commit or two mid-outage (a checkpoint truncating the WAL frees
        # some), which ends an episode: each then has its own alert.
        assert 1 <= len(began) == len(ended) <= 5, [x["msg"] for x in began + ended]
        wait_for(lambda: len(_health_alerts(hq, DISK_FULL)) == len(ended), 10, "the outbox.disk_full alerts at HQ")
        # The readers' payloads waited in the intake queue: none was dropped.
        (last,) = hq.db.read("SELECT body FROM telemetry WHERE store = 'S001' AND stream = 'health' ORDER BY seq DESC"
                             " LIMIT 1")
        figures = json.loads(last[0])["counters"]
        assert figures["rfid.intake_dropped"] == 0 and figures["outbox.writes_refused"] > 0, figures
        # Tracebacks: only the uplink's (its seal does not go through transaction() yet), none from a source.
        assert {x["logger"] for x in lines if "exc" in x} <= {"edge_agent.sync.uplink"}
        assert agent.alive
    finally:
        stop.set()
        assert agent.terminate() == 0
        hq.stop()


@pytest.mark.slow
def test_an_agent_started_on_a_full_disk_comes_up_and_catches_up(
    tmp_path: Path, disk: TinyDisk, broker: Mosquitto
) -> None:
    """A box that reboots with its disk full must not crash-loop: the agent waits for room like a running one."""
    total = 3_000
    cfg = agent_config(
        tmp_path, broker.port,
        sim={"seed": 9, "total": total, "rate_per_s": 1_000, "batch": 20, "zones": ZONES, "gtins": 40},
        outbox={"path": str(disk.path / "outbox.db"), "cap_bytes": 4 << 20},
    )
    hq = start_hq(tmp_path, broker.port)
    log = tmp_path / "agent.log"
    agent = AgentProcess(cfg, log)
    try:
        agent.start()
        wait_for(lambda: sum(hq.db.inventory("S001").values()) > 0, 20, "facts reaching HQ")
        assert agent.terminate() == 0  # its last act empties the WAL: the disk now has no room at all
        disk.fill()
        agent.start()
        wait_for(lambda: "cannot be opened" in log.read_text(), 10, "the restarted agent to find the disk full")
        time.sleep(2.0)
        assert agent.alive, f"agent died starting on a full disk; log: {log}"
        assert log.read_text().count("cannot be opened") == 1
        disk.free()
        wait_for(lambda: hq.db.inventory("S001") == InventoryFeed(9, ZONES, 40).truth(total), 30,
                 "HQ inventory to equal the feed's truth")
        wait_for(lambda: _health_alerts(hq, DISK_FULL) + _health_alerts(hq, IO_ERROR), 10, "the alert at HQ")
        assert not list(disk.path.glob("*.corrupt-*"))  # a full disk is not a corrupt database
    finally:
        if agent.alive:
            assert agent.terminate() == 0
        hq.stop()
