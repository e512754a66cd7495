"""The RFID store simulator: determinism, ground truth, noise rates, payload shapes, EPC encoding, CLI."""

from __future__ import annotations

import json
import re
import statistics
import threading
from collections import Counter, defaultdict
from dataclasses import replace
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from simulators.rfid_reader import (
    _CHANNELS,
    GONE,
    ZONES,
    SimConfig,
    StoreSim,
    gs1_check_digit,
    gtin14,
    gtin14_of,
    main,
    sgtin96_decode,
    sgtin96_hex,
)

# A busy little store: every behaviour happens many times within a few simulated minutes.
BUSY = dict(delivery_per_h=30.0, restock_per_h=300.0, tryon_per_h=200.0, purchase_per_h=400.0,
            tryon_minutes=(0.5, 2.0))

RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
IMPINJ_EVENT_KEYS = {"timestamp", "hostname", "eventType", "tagInventoryEvent"}
IMPINJ_TIE_KEYS = {"epcHex", "antennaPort", "antennaName", "peakRssiCdbm", "frequency", "transmitPowerCdbm",
                   "lastSeenTime"}


# ---- GS1 -------------------------------------------------------------------------------------------------


def test_sgtin96_matches_the_tds_example():
    # GS1 EPC Tag Data Standard worked example: urn:epc:tag:sgtin-96:3.0614141.812345.6789
    assert sgtin96_hex("0614141", "812345", 6789, 3) == "3074257BF7194E4000001A85"
    assert gtin14_of("3074257BF7194E4000001A85") == "80614141123458"
    assert gtin14_of("3074257bf7194e4000001a85") == "80614141123458"
    assert sgtin96_decode("3074257BF7194E4000001A85") == (3, "0614141", "812345", 6789)


@pytest.mark.parametrize("prefix_digits", range(6, 13))
def test_sgtin96_round_trips_every_partition(prefix_digits):
    cp = "9" + "0" * (prefix_digits - 2) + "7"
    ref = "5" + "0" * (12 - prefix_digits)  # indicator 5; 13 digits with the prefix
    for serial in (0, 1, 6789, (1 << 38) - 1):
        epc = sgtin96_hex(cp, ref, serial, filter_value=1)
        assert len(epc) == 24 and epc.startswith("30")
        assert sgtin96_decode(epc) == (1, cp, ref, serial)
        assert gtin14_of(epc) == gtin14(cp, ref)


def test_gtin_check_digits_of_published_gtins():
    for gtin in ("80614141123458", "09506000134352", "00012345600012"):
        assert gs1_check_digit(gtin[:-1]) == gtin[-1]


def test_sgtin96_rejects_bad_input():
    with pytest.raises(ValueError):
        sgtin96_hex("0614141", "81234", 1)  # item reference one digit short
    with pytest.raises(ValueError):
        sgtin96_hex("0614141", "812345", 1 << 38)  # serial too big for 38 bits
    with pytest.raises(ValueError):
        sgtin96_hex("06141", "81234567", 1)  # 5-digit company prefix
    with pytest.raises(ValueError):
        gtin14_of("E28011606000020528F904FA")  # not SGTIN-96


# ---- determinism ---------------------------------------------------------------------------------------


def _run(cfg: SimConfig, cycles: int) -> tuple[list[list[bytes]], StoreSim]:
    sim = StoreSim(cfg)
    return [sim.step() for _ in range(cycles)], sim


def test_same_seed_gives_byte_identical_payloads():
    cfg = SimConfig(seed=7, n_items=400, n_gtins=40, ghost_rate=0.3, **BUSY)
    a, sim_a = _run(cfg, 150)
    b, sim_b = _run(cfg, 150)
    assert a == b
    assert sim_a.truth_events == sim_b.truth_events
    assert sim_a.truth() == sim_b.truth()
    c, _ = _run(replace(cfg, seed=8), 150)
    assert c != a


def test_the_physical_world_does_not_depend_on_the_radio_settings():
    cfg = SimConfig(seed=3, n_items=300, n_gtins=30, **BUSY)
    _, quiet = _run(replace(cfg, miss_rate=0.0, cross_read_rate=0.0, ghost_rate=0.0, burst_rate=0.0), 200)
    _, noisy = _run(replace(cfg, miss_rate=0.3, cross_read_rate=0.1, ghost_rate=2.0, burst_rate=0.1), 200)
    assert quiet.truth_events == noisy.truth_events
    assert quiet.truth() == noisy.truth()


def test_run_advances_the_virtual_clock():
    sim = StoreSim(SimConfig(n_items=50, read_cycle_s=0.5, start_ts=1_700_000_000.0))
    times = [t for t, _p in sim.run(3.0)]
    assert times == [1_700_000_000.0 + 0.5 * i for i in range(6)]
    assert sim.now == 1_700_000_003.0


# ---- ground truth --------------------------------------------------------------------------------------


def test_truth_conserves_items_and_matches_the_move_log():
    sim = StoreSim(SimConfig(seed=11, n_items=500, n_gtins=50, **BUSY))
    start_zone = sim.item_zone()
    assert sum(sim.truth().values()) == sim.initial_total == 500
    for _ in range(600):
        sim.step()
        truth = sim.truth()
        assert sum(truth.values()) == sim.initial_total + sim.stats["delivered"] - sim.stats["sold"]
        assert all(n > 0 for n in truth.values())
    st = sim.stats
    assert st["delivered"] > 0 and st["sold"] > 0 and st["restocks"] > 0 and st["tryons"] > 0

    # truth() is the per (zone, GTIN) count of item_zone(), with the GTIN decoded from the EPC
    recount = Counter((zone, gtin14_of(epc)) for epc, zone in sim.item_zone().items())
    assert dict(recount) == sim.truth()

    # replaying the move log from the start gives today's zones; sold items are gone for ever
    zone = dict(start_zone)
    gone: set[str] = set()
    for _ts, epc, frm, to in sim.truth_events:
        assert epc not in gone
        assert zone.get(epc) == frm  # None for a delivery
        if to == GONE:
            assert frm == "exit"
            del zone[epc]
            gone.add(epc)
        else:
            assert to in ZONES
            zone[epc] = to
    assert zone == sim.item_zone()
    assert len(gone) == st["sold"]

    # every sale went salesfloor/fitting-room -> pos -> exit -> gone
    path: dict[str, list[str]] = defaultdict(list)
    for _ts, epc, _frm, to in sim.truth_events:
        path[epc].append(to)
    for epc in gone:
        assert path[epc][-3:] == ["pos", "exit", GONE]


def test_sold_items_leave_through_exit_within_two_cycles():
    sim = StoreSim(SimConfig(seed=5, n_items=300, n_gtins=30, **BUSY))
    for _ in range(400):
        sim.step()
    entered: dict[str, float] = {}
    for ts, epc, _frm, to in sim.truth_events:
        if to == "exit":
            entered[epc] = ts
        elif to == GONE:
            assert 1.0 <= ts - entered[epc] <= 2.0


# ---- noise ---------------------------------------------------------------------------------------------


def test_measured_noise_rates_match_the_configured_ones():
    cfg = SimConfig(seed=2, n_items=400, n_gtins=40, miss_rate=0.10, cross_read_rate=0.02, ghost_rate=0.5,
                    burst_rate=0.02, **BUSY)
    sim = StoreSim(cfg)
    zone_of_reader_port = {(a["reader"], a["port"]): a["zone"] for a in sim.layout()}
    item_cycles = missed = 0
    cross: set[tuple[int, str]] = set()
    cross_drops: list[float] = []
    ghost_cycles: dict[str, set[int]] = defaultdict(set)
    groups: Counter = Counter()
    cycles = 600
    all_epcs: set[str] = set()
    for k in range(cycles):
        payloads = sim.step()
        zone = sim.item_zone()
        home = sim.item_antenna()
        all_epcs.update(zone)
        seen_home: dict[str, int] = {}
        cross_now: list[tuple[str, int]] = []
        for p in payloads:
            for ev in json.loads(p):
                tie = ev["tagInventoryEvent"]
                epc, port, host = tie["epcHex"], tie["antennaPort"], ev["hostname"]
                groups[(k, host, port, epc)] += 1
                if epc not in zone:
                    if epc not in all_epcs:
                        ghost_cycles[epc].add(k)
                    continue
                if zone_of_reader_port[(host, port)] == zone[epc]:
                    assert home[epc] == (host, port)  # never read by another antenna of its own zone
                    seen_home[epc] = tie["peakRssiCdbm"]
                else:
                    cross.add((k, epc))
                    cross_now.append((epc, tie["peakRssiCdbm"]))
        cross_drops += [(seen_home[epc] - rssi) / 100 for epc, rssi in cross_now if epc in seen_home]
        item_cycles += len(zone)
        missed += len(zone) - len(seen_home)

    assert item_cycles > 200_000
    assert abs(missed / item_cycles - cfg.miss_rate) < 0.005
    assert abs(len(cross) / item_cycles - cfg.cross_read_rate) < 0.002
    assert abs(len(ghost_cycles) / cycles - cfg.ghost_rate) < 0.25 * cfg.ghost_rate  # Poisson: 300 +- 17
    assert all(len(ks) == 1 for ks in ghost_cycles.values())  # a ghost is never seen again
    assert not (ghost_cycles.keys() & all_epcs)
    dup = [n for n in groups.values() if n > 1]
    assert abs(len(dup) / len(groups) - cfg.burst_rate) < 0.003
    assert min(dup) >= 2 and max(dup) <= 5
    # a cross-read is 10-20 dB weaker than the tag's base RSSI at home; a home read is the base plus noise
    # (Gaussian, 2 dB, clipped at 6 dB), so against the same cycle's home read the drop is 4-26 dB, mean 15
    assert len(cross_drops) > 3000
    assert 4.0 <= min(cross_drops) and max(cross_drops) <= 26.0
    assert 14.0 <= statistics.mean(cross_drops) <= 16.0


def test_no_noise_means_every_tag_every_cycle_exactly_once():
    sim = StoreSim(SimConfig(n_items=300, miss_rate=0.0, cross_read_rate=0.0, ghost_rate=0.0, burst_rate=0.0,
                             **BUSY))
    for _ in range(100):
        payloads = sim.step()
        epcs = [ev["tagInventoryEvent"]["epcHex"] for p in payloads for ev in json.loads(p)]
        assert sorted(epcs) == sorted(sim.item_zone())


# ---- payload shapes ------------------------------------------------------------------------------------


def test_every_payload_is_an_impinj_tag_inventory_array():
    sim = StoreSim(SimConfig(seed=4, n_items=300, n_gtins=30, ghost_rate=1.0, burst_rate=0.05, **BUSY))
    antennas = {(a["reader"], a["port"]): a["name"] for a in sim.layout()}
    fcc = set(_CHANNELS["FCC"])
    n = 0
    for _ in range(120):
        t = sim.now
        for reader, payload in sim.step_by_reader():
            assert isinstance(payload, bytes)
            events = json.loads(payload)
            assert isinstance(events, list) and events
            for ev in events:
                n += 1
                assert set(ev) == IMPINJ_EVENT_KEYS
                assert ev["eventType"] == "tagInventory"
                assert ev["hostname"] == reader
                tie = ev["tagInventoryEvent"]
                assert set(tie) == IMPINJ_TIE_KEYS
                assert re.fullmatch(r"[0-9A-F]{24}", tie["epcHex"])
                assert antennas[(reader, tie["antennaPort"])] == tie["antennaName"]
                assert isinstance(tie["peakRssiCdbm"], int) and -9500 <= tie["peakRssiCdbm"] <= -2000
                assert tie["frequency"] in fcc
                assert tie["transmitPowerCdbm"] in (2000, 3000)
                assert RFC3339_MS.match(ev["timestamp"]) and tie["lastSeenTime"] == ev["timestamp"]
                ts = datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp()
                assert t <= ts < t + sim.cfg.read_cycle_s
    assert n > 10_000


@pytest.mark.parametrize("fmt", ["zebra", "generic"])
def test_other_formats_are_json_arrays_of_their_shape(fmt):
    sim = StoreSim(SimConfig(n_items=200, format=fmt, max_events_per_payload=50, ghost_rate=1.0))
    n_events = 0
    for _ in range(5):
        for reader, payload in sim.step_by_reader():
            events = json.loads(payload)
            assert 1 <= len(events) <= 50
            n_events += len(events)
            for ev in events:
                if fmt == "zebra":
                    assert ev["type"] == "SIMPLE" and ev["timestamp"].endswith("+0000")
                    d = ev["data"]
                    assert d["format"] == "epc" and re.fullmatch(r"[0-9A-F]{24}", d["idHex"])
                    assert isinstance(d["antenna"], int) and isinstance(d["peakRssi"], int)
                    assert d["reads"] == 1 and isinstance(d["eventNum"], int)
                else:
                    assert set(ev) == {"epc", "antenna", "rssi", "ts", "reader"}
                    assert ev["reader"] == reader and isinstance(ev["rssi"], float)
    assert n_events == sim.stats["events"]


def test_payloads_can_be_split_to_a_maximum_number_of_events():
    whole = StoreSim(SimConfig(seed=9, n_items=300))
    split = StoreSim(SimConfig(seed=9, n_items=300, max_events_per_payload=64))
    for _ in range(5):
        a = [ev for p in whole.step() for ev in json.loads(p)]
        parts = split.step()
        assert all(len(json.loads(p)) <= 64 for p in parts)
        assert [ev for p in parts for ev in json.loads(p)] == a


# ---- CLI -----------------------------------------------------------------------------------------------


def test_cli_writes_ndjson_per_reader_and_the_truth(tmp_path: Path):
    out = tmp_path / "day"
    assert main(["--seed", "3", "--items", "200", "--gtins", "20", "--hours", "0.02", "--out", str(out),
                 "--quiet"]) == 0
    sim = StoreSim(SimConfig(seed=3, n_items=200, n_gtins=20))
    expected: dict[str, list[bytes]] = defaultdict(list)
    for _ in range(72):
        for reader, payload in sim.step_by_reader():
            expected[reader].append(payload)
    for reader, payloads in expected.items():
        assert (out / f"{reader}.ndjson").read_bytes().splitlines() == payloads
    doc = json.loads((out / "truth.json").read_text())
    assert {(r["zone"], r["gtin"]): r["count"] for r in doc["truth"]} == sim.truth()
    assert doc["layout"] == sim.layout() and doc["cycles"] == 72
    assert doc["total"] == doc["initial_total"] + doc["stats"]["delivered"] - doc["stats"]["sold"]
    lines = (out / "truth_events.ndjson").read_text().splitlines()
    assert len(lines) == len(sim.truth_events)


def test_cli_publishes_to_mqtt(broker):
    import paho.mqtt.client as mqtt

    got: list[tuple[str, bytes]] = []
    ready = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    sub.on_connect = lambda c, *_a: (c.subscribe("readers/+/events", qos=1), ready.set())
    sub.on_message = lambda _c, _u, m: got.append((m.topic, m.payload))
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    try:
        assert ready.wait(5)
        assert main(["--items", "100", "--gtins", "10", "--hours", str(10 / 3600), "--mqtt-port",
                     str(broker.port), "--quiet"]) == 0
        sim = StoreSim(SimConfig(n_items=100, n_gtins=10))
        expected = [(f"readers/{r}/events", p) for _ in range(10) for r, p in sim.step_by_reader()]
        for _ in range(50):
            if len(got) >= len(expected):
                break
            threading.Event().wait(0.1)
        assert sorted(got) == sorted(expected)
    finally:
        sub.loop_stop()
        sub.disconnect()


def test_cli_posts_to_http_on_loopback_only():
    bodies: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/rfid/events"
        assert main(["--items", "100", "--gtins", "10", "--hours", str(5 / 3600), "--http", url, "--quiet"]) == 0
        sim = StoreSim(SimConfig(n_items=100, n_gtins=10))
        assert bodies == [p for _ in range(5) for p in sim.step()]
        with pytest.raises(SystemExit):
            main(["--items", "10", "--hours", "0.001", "--http", "http://example.com/x", "--quiet"])
    finally:
        srv.shutdown()
        srv.server_close()
