"""RFID pipeline: simulated store -> reader payloads -> book, against the simulator's exact truth.

Unit-level runs use a real SQLite outbox in-process; the end-to-end test goes simulator -> MQTT ->
agent subprocess -> mosquitto -> HQ.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edge_agent.clock import VirtualClock
from edge_agent.config import RfidConfig
from edge_agent.inventory.book import InventoryBook
from edge_agent.rfid.pipeline import RfidPipeline
from edge_agent.sync.outbox import Outbox
from simulators.mosquitto import Mosquitto
from simulators.rfid_reader import SimConfig, StoreSim, sgtin96_hex

from .helpers import AgentProcess, agent_config, start_hq, wait_for

T0 = 1_767_225_600.0


def make(tmp: Path, sim: StoreSim | None = None, name: str = "o.db", **rfid: object):
    clock = VirtualClock(sim.now if sim else T0)
    ob = Outbox(tmp / name, clock, synchronous="NORMAL")
    book = InventoryBook(ob, clock)
    layout = sim.layout() if sim else [{"reader": "r1", "port": 1, "zone": "salesfloor"},
                                       {"reader": "r1", "port": 2, "zone": "exit"}]
    cfg = RfidConfig(enabled=True, antennas=[{k: a[k] for k in ("reader", "port", "zone")} for a in layout],
                     snapshot_interval_s=0, **rfid)  # type: ignore[arg-type]
    return clock, ob, book, RfidPipeline(cfg, book, ob, clock)


def replay(sim: StoreSim, clock: VirtualClock, pipe: RfidPipeline, seconds: float, close: bool = True) -> int:
    """Trade for ``seconds``, then close the store and let what is under way settle for 15 minutes."""
    return sim.replay(lambda t: clock.set(max(t, clock.now())), lambda p: pipe.ingest(p).reads, pipe.tick,
                      seconds, 900 if close else 0)


def levels(book: InventoryBook) -> dict[tuple[str, str], int]:
    return {k: v for k, v in book.levels().items() if v}


def test_book_equals_truth_with_noise(tmp_path: Path) -> None:
    sim = StoreSim(SimConfig(seed=5, n_items=400, n_gtins=40, miss_rate=0.10, cross_read_rate=0.02,
                             ghost_rate=0.2, burst_rate=0.02, purchase_per_h=200, tryon_per_h=100))
    clock, ob, book, pipe = make(tmp_path, sim)
    replay(sim, clock, pipe, 1800)
    assert levels(book) == sim.stock_truth()
    assert all(v >= 0 for v in book.levels().values())
    h = pipe.health()
    assert h["rfid.ghosts_dropped"] > 0
    ob.close()


def test_replay_gives_identical_deltas(tmp_path: Path) -> None:
    bodies = []
    for run in ("a", "b"):
        sim = StoreSim(SimConfig(seed=9, n_items=150, n_gtins=15, purchase_per_h=300))
        clock, ob, _book, pipe = make(tmp_path, sim, name=f"{run}.db")
        replay(sim, clock, pipe, 600)
        bodies.append([b for (b,) in ob.read("SELECT body FROM pending WHERE stream='inventory/delta' ORDER BY id")])
        ob.close()
    assert bodies[0] == bodies[1] and len(bodies[0]) > 150


def test_restart_resumes_from_the_persisted_tags(tmp_path: Path) -> None:
    sim = StoreSim(SimConfig(seed=2, n_items=300, n_gtins=30, purchase_per_h=200))
    clock, ob, book, pipe = make(tmp_path, sim)
    replay(sim, clock, pipe, 600, close=False)
    ob.close()  # the process dies here; only the database remains
    ob2 = Outbox(tmp_path / "o.db", clock, synchronous="NORMAL")
    book2 = InventoryBook(ob2, clock)
    pipe2 = RfidPipeline(pipe.cfg, book2, ob2, clock)
    assert len(pipe2.engine.present()) == len(pipe.engine.present())
    replay(sim, clock, pipe2, 600)
    assert levels(book2) == sim.stock_truth()
    ob2.close()


def generic(epc: str, antenna: int, ts: float, rssi: float = -50.0, reader: str = "r1") -> dict:
    return {"epc": epc, "antenna": antenna, "rssi": rssi, "ts": ts, "reader": reader}


EPCS = [sgtin96_hex("0614141", "812345", n) for n in range(1, 4)]


def test_garbage_reads_are_counted_and_quarantined(tmp_path: Path) -> None:
    clock, ob, book, pipe = make(tmp_path)
    good = [generic(EPCS[0], 1, T0), generic(EPCS[0], 1, T0 + 0.5)]
    junk = [
        generic("XYZ", 1, T0),  # bad hex
        generic("30", 1, T0),  # too short
        generic(EPCS[1], 9, T0),  # unknown antenna
        generic(EPCS[1], 1, 4_000_000_000.0),  # absurd timestamp
        generic(EPCS[2], 1, T0, rssi=float("nan")) | {"rssi": "loud"},
    ]
    pipe.ingest(json.dumps(good[:1]).encode())
    clock.advance(1)
    res = pipe.ingest(json.dumps(good[1:] + junk + [good[0]] * 20).encode())  # and a duplicated burst
    assert res.reads == 22 and res.bad == 5
    res = pipe.ingest(b"\x00\xffnot json at all")
    assert res.bad == 1
    assert levels(book) == {("salesfloor", _gtin(EPCS[0])): 1}
    reasons = [r for _, _, r, _ in ob.quarantined(100)]
    assert len(reasons) == 6 and any("unknown antenna" in r for r in reasons)
    ob.close()


def _gtin(epc: str) -> str:
    from edge_agent.rfid.epc import decode_epc

    g = decode_epc(epc).gtin
    assert g is not None
    return g


def test_cycle_count_reports_missing_tags(tmp_path: Path) -> None:
    clock, ob, book, pipe = make(tmp_path)
    for _ in range(2):
        pipe.ingest(json.dumps([generic(epc, 1, clock.now()) for epc in EPCS]).encode())
        clock.advance(1)
    assert len(pipe.engine.present()) == 3
    count = pipe.start_count("salesfloor", 10)
    for _ in range(10):
        clock.advance(1)
        pipe.ingest(json.dumps([generic(EPCS[0], 1, clock.now()), generic(EPCS[1], 1, clock.now())]).encode())
        pipe.tick()
    (body,) = [json.loads(b) for (b,) in ob.read("SELECT body FROM pending WHERE stream='inventory/count'")]
    assert body["count_id"] == count.count_id and body["missing"] == [EPCS[2]] and body["unexpected"] == []
    assert body["book_before"] == 3 and body["accuracy"] == pytest.approx(2 / 3, abs=1e-6)
    assert levels(book) == {("salesfloor", _gtin(EPCS[0])): 2}
    with pytest.raises(ValueError, match="no antenna covers"):
        pipe.start_count("moon", 5)
    ob.close()


@pytest.mark.slow
def test_simulated_readers_over_mqtt_to_hq(tmp_path: Path, broker: Mosquitto) -> None:
    sim = StoreSim(SimConfig(seed=11, n_items=300, n_gtins=30, purchase_per_h=300, tryon_per_h=100))
    antennas = [{k: a[k] for k in ("reader", "port", "zone")} for a in sim.layout()]
    cfg = agent_config(tmp_path, broker.port, rfid={"enabled": True, "clock": "reads", "snapshot_interval_s": 0})
    with cfg.open("a") as f:
        f.write(f'\n[rfid.mqtt]\nenabled = true\nport = {broker.port}\ntopic = "readers/+/events"\n')
        for a in antennas:
            f.write(f'\n[[rfid.antennas]]\nreader = "{a["reader"]}"\nport = {a["port"]}\nzone = "{a["zone"]}"\n')
    hq = start_hq(tmp_path, broker.port)
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sim-readers")
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    try:
        wait_for(lambda: "connected" in (tmp_path / "agent.log").read_text(), 20, "the agent to connect")
        time.sleep(1.0)  # its reader subscription is made right after connecting
        info = None
        for cycle in range(600 + 720):
            if cycle == 600:
                sim.close()  # closing time: what is under way settles before the count is compared
            for reader, p in sim.step_by_reader():
                info = pub.publish(f"readers/{reader}/events", p, qos=1)
        assert info is not None
        info.wait_for_publish(30)
        truth = sim.stock_truth()
        try:
            wait_for(lambda: hq.db.inventory("S001") == truth, 60, "HQ inventory to equal the simulated store")
        except AssertionError:
            got = hq.db.inventory("S001")
            diff = {k: (truth.get(k), got.get(k)) for k in set(truth) | set(got) if truth.get(k) != got.get(k)}
            raise AssertionError(f"HQ differs from the truth (truth, HQ): {diff}") from None
    finally:
        pub.loop_stop()
        pub.disconnect()
        assert agent.terminate() == 0
        hq.stop()


def test_health_reports_while_reads_flow_do_not_deadlock(tmp_path: Path) -> None:
    """The engine holds its lock while writing to the outbox; health must not take them the other way round."""
    import threading

    from edge_agent.health import HealthReporter

    sim = StoreSim(SimConfig(seed=4, n_items=200, n_gtins=20, purchase_per_h=2000))
    clock, ob, _book, pipe = make(tmp_path, sim)
    health = HealthReporter(ob, clock, 0.0, connected=lambda: True, extra=pipe.health)
    stop = time.monotonic() + 2.0
    done: list[str] = []

    def reads() -> None:
        replay(sim, clock, pipe, 120, close=False)
        done.append("reads")

    def reports() -> None:
        while time.monotonic() < stop:
            health.tick(force=True)
        done.append("health")

    threads = [threading.Thread(target=f, daemon=True) for f in (reads, reports)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(done) == ["health", "reads"], "deadlock between the RFID engine and health reports"
    ob.close()


def test_http_intake_over_real_http(tmp_path: Path) -> None:
    """An Impinj-style webhook POST, with the reader's token in basic auth, reaches the book; bad requests
    get clear HTTP errors."""
    import base64
    import http.client

    from edge_agent.config import ReaderHttpConfig
    from edge_agent.rfid.sources import HttpReaderSource, ReaderIntake
    from edge_agent.tokens import token_hash

    clock, ob, book, pipe = make(tmp_path)
    intake = ReaderIntake(pipe, maxsize=100, tick_s=0.05)
    token = "rdr-canary-77d0b3-pipeline"  # a canary: tests/conftest.py fails the run if a log shows it
    basic = "Basic " + base64.b64encode(f"r1:{token}".encode()).decode()
    src = HttpReaderSource(ReaderHttpConfig(enabled=True, port=0, tokens={"r1": token_hash(token)}), intake)
    intake.start()
    src.start()
    try:
        def post(body: bytes, path: str = "/rfid/events") -> int:
            conn = http.client.HTTPConnection("127.0.0.1", src.port, timeout=5)
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json", "Authorization": basic})
            status = conn.getresponse().status
            conn.close()
            return status

        events = [{"timestamp": "2026-01-01T00:00:00.000Z", "hostname": "r1", "eventType": "tagInventory",
                   "tagInventoryEvent": {"epcHex": EPCS[0], "antennaPort": 1, "peakRssiCdbm": -5500}}]
        assert post(json.dumps(events).encode()) == 202
        # The intake thread reads the clock when it takes a batch: the first must be in before the
        # clock moves, or both reads land at one instant (what a loaded CI box once made of it).
        wait_for(lambda: pipe.engine.reads_seen >= 1, 10, "the first POST taken in")
        clock.advance(1)
        assert post(json.dumps(events).encode()) == 202
        assert post(b"{not json") == 202  # accepted, then quarantined with its reason
        assert post(b"[]", path="/elsewhere") == 404
        wait_for(lambda: levels(book) == {("salesfloor", _gtin(EPCS[0])): 1}, 10, "the POSTed reads in the book")
        wait_for(lambda: any(src_ == "rfid.http" for _, src_, _, _ in ob.quarantined()), 10, "the bad POST quarantined")
    finally:
        src.stop()
        intake.stop()
        ob.close()


def test_silent_antenna_raises_an_alert(tmp_path: Path) -> None:
    clock, ob, _book, pipe = make(tmp_path, silent_antenna_s=60)
    pipe.ingest(json.dumps([generic(EPCS[0], 1, clock.now())]).encode())
    clock.advance(61)
    pipe.ingest(json.dumps([generic(EPCS[0], 1, clock.now())]).encode())  # port 1 keeps reading
    pipe.tick()
    alerts = ob.read("SELECT kind, message FROM alerts")
    assert [k for k, _ in alerts] == ["rfid.antenna_silent"] and "antenna 2 (exit)" in alerts[0][1]
    assert pipe.health()["rfid.silent_antennas"] == 1
    ob.close()


def test_epcis_object_events_follow_presence(tmp_path: Path) -> None:
    from edge_agent.contract import EpcisObjectEvent

    clock, ob, _book, pipe = make(tmp_path, epcis=True, epcis_location="urn:epc:id:sgln:9521234.56789")
    for _ in range(2):
        pipe.ingest(json.dumps([generic(EPCS[0], 1, clock.now())]).encode())
        clock.advance(1)
    pipe.ingest(json.dumps([generic(EPCS[0], 2, clock.now())]).encode())  # read at the exit: sold
    events = [EpcisObjectEvent.model_validate_json(b)
              for (b,) in ob.read("SELECT body FROM pending WHERE stream='epcis/events' ORDER BY id")]
    assert [(e.action, e.bizStep, e.disposition) for e in events] == [
        ("OBSERVE", "arriving", "sellable_accessible"), ("OBSERVE", "entering_exiting", "retail_sold")]
    assert events[0].epcList == ["urn:epc:id:sgtin:0614141.812345.1"]
    assert events[0].bizLocation is not None and events[0].bizLocation.id.endswith(".salesfloor")
    ob.close()


# ------------------------------------------------------------------------------- reader set-ups (issue 13)


def _alerts(ob: Outbox, kind: str) -> list[str]:
    return [m for k, m in ob.read("SELECT kind, message FROM alerts") if k == kind]


def test_reader_overflow_and_other_events_are_counted_in_health_and_alerted(tmp_path: Path) -> None:
    """An Impinj ``overflowEvent`` (the reader purged ``eventsPurged`` events: Impinj Reader Configuration API
    v1.7.0 OverflowEvent, saji-ttarius/impinj-reader-config-api-v1.7.0 docs/OverflowEvent.md), antenna and GPI
    events (ReaderEvent.antenna_connected_event, docs/GpiTransitionEvent.md). Before: the pipeline passed no
    stats object, so all of them vanished without trace, lost reads included."""
    clock, ob, book, pipe = make(tmp_path)
    events = [
        {"timestamp": "2026-01-01T00:00:00Z", "hostname": "r1", "eventType": "overflow",
         "overflowEvent": {"eventsPurged": 1200, "eventsRemaining": 4000}},
        {"timestamp": "2026-01-01T00:00:00Z", "hostname": "r1", "eventType": "antennaConnected",
         "antennaConnectedEvent": {"antennaPort": 2}},
        {"timestamp": "2026-01-01T00:00:00Z", "hostname": "r1", "eventType": "gpiTransition",
         "gpiTransitionEvent": {"gpi": 1, "transition": "high-to-low"}},
    ]
    pipe.ingest(json.dumps(events).encode())  # before any read: the replay clock has not started
    pipe.ingest(json.dumps([generic(EPCS[0], 1, T0), events[0] | {"overflowEvent": {"eventsPurged": 30}}]).encode())
    h = pipe.health()
    assert h["rfid.reader_purged.r1"] == 1230 and h["rfid.ignored.overflow"] == 2
    assert h["rfid.ignored.antennaConnected"] == 1 and h["rfid.ignored.gpiTransition"] == 1
    told = _alerts(ob, "rfid.reader_overflow")
    assert len(told) == 2 and "r1" in told[0] and "1200" in told[0] and "30" in told[1]
    ob.close()


ZEBRA_DOC_EPC = "3005FB63AC1F3681EC880468"  # decodes as SGTIN-96 to GTIN 96810064511308


class _PriceBookLike:
    def __init__(self, *gtins: str) -> None:
        self.gtins = set(gtins)

    def knows(self, gtin: str) -> bool:
        return gtin in self.gtins

    def __len__(self) -> int:
        return len(self.gtins)


def test_foreign_products_stay_out_of_the_book_and_are_accounted_for(tmp_path: Path) -> None:
    """Zebra's IoT Connector documentation's example tag event (type SIMPLE, idHex 3005fb63ac1f3681ec880468; the
    same event is quoted from Zebra's AsyncAPI ``tag`` example, and in ZebraDevs' DockDoor sample) carries a valid
    SGTIN-96 header: it decodes to GTIN 96810064511308 of company prefix 68100645113, a product no store of ours
    sells. Before: it became stock like any other tag."""
    clock, ob, book, pipe = make(tmp_path, company_prefixes=["0614141"])
    ours = EPCS[0]
    for k in range(3):
        pipe.ingest(json.dumps([generic(ours, 1, T0 + k), generic(ZEBRA_DOC_EPC, 1, T0 + k)]).encode())
        clock.advance(1)
    assert levels(book) == {("salesfloor", _gtin(ours)): 1}
    h = pipe.health()
    assert h["rfid.foreign_reads.company_prefix"] == 3 and h["rfid.foreign_tags"] == 1
    assert h["rfid.unverified_reads"] == 0
    reasons = [r for _, _, r, _ in ob.quarantined(100)]
    assert len(reasons) == 1 and "96810064511308" in reasons[0] and "68100645113" in reasons[0]
    # HQ's catalogue lets a GTIN in whatever its prefix.
    pipe.catalogue = _PriceBookLike("96810064511308")
    for k in range(2):
        pipe.ingest(json.dumps([generic(ZEBRA_DOC_EPC, 1, T0 + 5 + k)]).encode())
        clock.advance(1)
    assert levels(book)[("salesfloor", "96810064511308")] == 1
    ob.close()


def test_catalogue_alone_or_nothing_to_check_against(tmp_path: Path) -> None:
    """Without ``company_prefixes``, a known catalogue (the price book) decides; with neither, today's behaviour
    stays (every GTIN taken) but the reads are counted as unverified, so health shows nothing was checked."""
    clock, ob, book, pipe = make(tmp_path)
    for k in range(2):
        pipe.ingest(json.dumps([generic(ZEBRA_DOC_EPC, 1, T0 + k)]).encode())
        clock.advance(1)
    assert levels(book) == {("salesfloor", "96810064511308"): 1}
    assert pipe.health()["rfid.unverified_reads"] == 2
    pipe.catalogue = _PriceBookLike(_gtin(EPCS[0]))  # same prefix as the next one: the catalogue decides
    other = sgtin96_hex("0614141", "812346", 1)
    for k in range(2):
        pipe.ingest(json.dumps([generic(EPCS[0], 1, T0 + 2 + k), generic(other, 1, T0 + 2 + k)]).encode())
        clock.advance(1)
    h = pipe.health()
    assert h["rfid.foreign_reads.not_in_catalogue"] == 2 and h["rfid.unverified_reads"] == 2
    assert levels(book) == {("salesfloor", "96810064511308"): 1, ("salesfloor", _gtin(EPCS[0])): 1}
    ob.close()


def test_name_identified_antennas_and_reader_defaults_from_config(tmp_path: Path) -> None:
    """``[[rfid.antennas]] name = ...`` maps an Impinj antenna reported by name (antennaIdentifier =
    antennaName: saji-ttarius/impinj-reader-config-api-v1.7.0 docs/TagReportingConfiguration.md), and
    ``[[rfid.readers]]`` gives a Zebra reader in SIMPLE mode (no antenna metadata: reelyActive/barnowl-zebra
    lib/zebradecoder.js) its antenna and the time zone of timestamps written without an offset. Before: all of
    these reads were quarantined."""
    clock = VirtualClock(T0)
    ob = Outbox(tmp_path / "o.db", clock, synchronous="NORMAL")
    book = InventoryBook(ob, clock)
    cfg = RfidConfig(enabled=True, snapshot_interval_s=0, antennas=[
        {"reader": "impinj-1", "name": "dock door", "zone": "backroom"},
        {"reader": "fx", "port": 1, "zone": "salesfloor"},
    ], readers=[{"name": "fx", "default_antenna": 1, "timezone": "Europe/Berlin"}])  # type: ignore[list-item]
    pipe = RfidPipeline(cfg, book, ob, clock)
    impinj = {"timestamp": "2026-01-01T00:00:00Z", "hostname": "impinj-1", "eventType": "tagInventory",
              "tagInventoryEvent": {"epcHex": EPCS[0], "antennaName": "dock door", "peakRssiCdbm": -5000}}
    zebra = {"data": {"eventNum": 1, "format": "epc", "idHex": EPCS[1].lower()},
             "timestamp": "2026-01-01T01:00:00.500", "type": "SIMPLE"}  # 00:00:00.5 UTC
    for _ in range(2):
        res = pipe.ingest(json.dumps([impinj]).encode())
        res2 = pipe.ingest(json.dumps(zebra).encode(), reader_hint="fx")
        assert res.bad == res2.bad == 0
        clock.advance(1)
    assert levels(book) == {("backroom", _gtin(EPCS[0])): 1, ("salesfloor", _gtin(EPCS[1])): 1}
    assert pipe.health()["rfid.reads_per_s.impinj-1.dock door"] >= 0
    ob.close()


def test_mixed_reader_setups_keep_the_book_exact_and_account_for_every_lost_or_foreign_read(tmp_path: Path) -> None:
    """The simulated store with the issue-13 set-ups at once (as bench/rfid_accuracy.py runs them): r1 by antenna
    name, r3 a Zebra reader sending objects back to back and named by its MAC, Impinj overflow events, 1% foreign
    products. The book equals the truth, and health counts exactly the foreign reads and purged events sent."""
    sim = StoreSim(SimConfig(seed=11, n_items=300, n_gtins=30, read_cycle_s=5.0, name_readers=("r1",),
                             reader_formats=(("r3", "zebra"),), zebra_concatenated=True, overflow_rate=0.02,
                             foreign_share=0.01, purchase_per_h=120, tryon_per_h=60))
    clock = VirtualClock(sim.now)
    ob = Outbox(tmp_path / "o.db", clock, synchronous="NORMAL")
    book = InventoryBook(ob, clock)
    antennas = [{"reader": "r1", "name": a["name"], "zone": a["zone"]} if a["reader"] == "r1"
                else {"reader": a["mac"] if a["reader"] == "r3" else a["reader"], "port": a["port"], "zone": a["zone"]}
                for a in sim.layout()]
    cfg = RfidConfig(enabled=True, antennas=antennas, snapshot_interval_s=0,  # type: ignore[arg-type]
                     company_prefixes=list(sim.cfg.company_prefixes), recent_s=12.5)
    pipe = RfidPipeline(cfg, book, ob, clock)
    replay(sim, clock, pipe, 1800)
    assert levels(book) == sim.stock_truth()
    h = pipe.health()
    assert sim.stats["foreign_items"] == 3 and sim.stats["overflows"] > 0
    assert sum(v for k, v in h.items() if k.startswith("rfid.foreign_reads.")) == sim.stats["foreign_reads"] > 0
    assert sum(v for k, v in h.items() if k.startswith("rfid.reader_purged.")) == sim.stats["purged"]
    assert h["rfid.ignored.overflow"] == sim.stats["overflows"]
    assert len(_alerts(ob, "rfid.reader_overflow")) == sim.stats["overflows"]
    ob.close()
