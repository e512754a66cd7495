"""EPCIS 2.0 output (edge_agent/rfid/epcis.py) against GS1's own JSON Schema and the CBV 2.0 event hash.

GS1's schema and context are read from ``../shared/data/epcis/`` (beside the repository, never copied in).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator

from edge_agent.cli import main
from edge_agent.clock import VirtualClock
from edge_agent.config import ConfigError, RfidConfig, load_config
from edge_agent.contract import EpcisEventsBody
from edge_agent.hq.applier import HqApplier
from edge_agent.inventory.book import InventoryBook
from edge_agent.rfid import epcis
from edge_agent.rfid.pipeline import RfidPipeline
from edge_agent.sync.outbox import Outbox
from simulators.rfid_reader import sgtin96_hex

from .helpers import HqBackend

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "epcis"
needs_schema = pytest.mark.skipif(not (SHARED / "EPCIS-JSON-Schema.json").exists(),
                                  reason="GS1's EPCIS schema lives in ../shared/data/epcis")
T0 = 1_767_225_600.0
STORE = "urn:epc:id:sgln:9521234.56789"  # not one of GS1's example prefixes
EPCS = [sgtin96_hex("0614141", "812345", n) for n in range(1, 4)]
LAYOUT = [("r1", 1, "sales floor"), ("r1", 2, "exit"), ("r1", 3, "backroom")]


@pytest.fixture(scope="module")
def gs1() -> Draft7Validator:
    schema = json.loads((SHARED / "EPCIS-JSON-Schema.json").read_text())
    v = Draft7Validator(schema, format_checker=Draft7Validator.FORMAT_CHECKER)
    # Without rfc3986-validator (jsonschema[format-nongpl]) "format": "uri" is not checked at all, and a
    # readPoint of "urn:epc:id:sgln:....sales floor" would pass.
    assert {"uri", "date-time"} <= set(Draft7Validator.FORMAT_CHECKER.checkers)
    return v


def errors(v: Draft7Validator, doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


def make(tmp: Path, **rfid: Any) -> tuple[VirtualClock, Outbox, RfidPipeline]:
    clock = VirtualClock(T0)
    ob = Outbox(tmp / "o.db", clock, synchronous="NORMAL")
    cfg = RfidConfig(enabled=True, antennas=[{"reader": r, "port": p, "zone": z} for r, p, z in LAYOUT],
                     snapshot_interval_s=0, epcis=True, epcis_location=STORE,
                     epcis_zones={"sales floor": "1"}, epcis_stockroom_zones=["backroom"], **rfid)
    return clock, ob, RfidPipeline(cfg, InventoryBook(ob, clock), ob, clock)


def read(clock: VirtualClock, pipe: RfidPipeline, epc: str, port: int, seconds: int = 1, rssi: float = -50) -> None:
    for _ in range(seconds):
        pipe.ingest(json.dumps([{"epc": epc, "antenna": port, "rssi": rssi, "ts": clock.now(), "reader": "r1"}]).encode())
        clock.advance(1)
        pipe.tick()


def every_kind(tmp: Path) -> list[dict[str, Any]]:
    """Each thing presence reports: arrivals in a sales and a stockroom zone, moves both ways, a sale at
    the exit, a tag gone unseen and one missed by a cycle count."""
    clock, ob, pipe = make(tmp)
    read(clock, pipe, EPCS[2], 1, 2)  # arrives on the sales floor
    pipe.start_count("sales floor", 3)
    clock.advance(4)
    pipe.tick()  # the count read nothing: EPCS[2] is missing
    read(clock, pipe, EPCS[0], 1, 2)  # arrives on the sales floor
    read(clock, pipe, EPCS[0], 3, 10, rssi=-40)  # moves to the backroom
    read(clock, pipe, EPCS[0], 1, 10, rssi=-40)  # and back to the sales floor
    read(clock, pipe, EPCS[0], 2)  # read at the exit: sold
    read(clock, pipe, EPCS[1], 3, 2)  # arrives in the backroom
    clock.advance(200)
    pipe.tick()  # and is not seen again
    items = [json.loads(b) for (b,) in ob.read("SELECT body FROM pending WHERE stream='epcis/events' ORDER BY id")]
    ob.close()
    return items


def test_arrivals_and_departures_are_observations_in_cbv_terms(tmp_path: Path) -> None:
    """Item 9: nothing the agent sees comes into or goes out of existence, so every event is OBSERVE;
    bizStep and disposition say what happened (CBV 2.0)."""
    items = every_kind(tmp_path)
    seen = [(it["epcList"][0].rsplit(".", 1)[1], it["action"], it["bizStep"], it["disposition"],
             it["readPoint"]["id"].rsplit(".", 1)[1], it.get("bizLocation", {}).get("id", "-").rsplit(".", 1)[-1])
            for it in items]
    assert seen == [
        ("3", "OBSERVE", "arriving", "sellable_accessible", "1", "1"),
        ("3", "OBSERVE", "cycle_counting", "unknown", "1", "-"),
        ("1", "OBSERVE", "arriving", "sellable_accessible", "1", "1"),
        ("1", "OBSERVE", "storing", "sellable_not_accessible", "backroom", "backroom"),
        ("1", "OBSERVE", "stocking", "sellable_accessible", "1", "1"),
        ("1", "OBSERVE", "entering_exiting", "retail_sold", "1", "-"),
        ("2", "OBSERVE", "arriving", "sellable_not_accessible", "backroom", "backroom"),
        ("2", "OBSERVE", "departing", "unknown", "backroom", "-"),
    ]
    assert {(v.biz_step, v.disposition) for v in epcis.VOCAB.values()} == {(s[2], s[3]) for s in seen}


@needs_schema
def test_every_kind_of_event_and_the_document_validate_against_gs1s_schema(tmp_path: Path,
                                                                           gs1: Draft7Validator) -> None:
    """Item 11: each event alone (as a capture of one event) and all in an EPCISDocument."""
    items = every_kind(tmp_path)
    for it in items:
        assert errors(gs1, it) == [], it
        assert it["@context"] == epcis.EPCIS_CONTEXT and it["eventID"].startswith("ni:///sha-256;")
    doc = epcis.document(items, T0)
    assert errors(gs1, doc) == []
    assert len({it["eventID"] for it in items}) == len(items)
    # The checker has teeth: today's event shape (no @context, a zone name with a space) fails.
    old = {k: v for k, v in items[0].items() if k not in ("@context", "eventID")}
    assert errors(gs1, old)
    assert errors(gs1, items[0] | {"readPoint": {"id": f"{STORE}.sales floor"}})
    # The context the events name is the one GS1 publishes (the copy in shared/ says what it is).
    assert "epcis-context.jsonld" in epcis.EPCIS_CONTEXT and (SHARED / "epcis-context.jsonld").exists()


@needs_schema
def test_event_id_is_the_cbv2_event_hash_and_stable_across_replays(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """eventID: the CBV 2.0 event hash, as GS1's community reference implementation computes it; a replay
    of the same reads makes the same ids."""
    from epcis_event_hash_generator.hash_generator import calculate_hashes_from_pre_hashes, derive_prehashes_from_events
    from epcis_event_hash_generator.json_to_py import event_list_from_epcis_document_json
    from pyld import jsonld

    # The reference expands JSON-LD: it gets GS1's context from the copy in shared/, never the network.
    context = json.loads((SHARED / "epcis-context.jsonld").read_text())
    fallback = jsonld._default_document_loader

    def offline(url: str, options: dict | None = None) -> dict:
        if url == epcis.EPCIS_CONTEXT:
            return {"contentType": "application/ld+json", "contextUrl": None, "documentUrl": url, "document": context}
        return fallback(url, options or {})

    monkeypatch.setattr(jsonld, "_default_document_loader", offline)

    a = every_kind(tmp_path / "a")
    b = every_kind(tmp_path / "b")
    assert [it["eventID"] for it in a] == [it["eventID"] for it in b]
    # An extension the Tag Data Standard escapes ("/") and one Digital Link encodes (":"), and a time with
    # its milliseconds and offset to normalise.
    odd = a[0] | {"readPoint": {"id": f"{STORE}.A%2F1:b"}, "eventTime": "2026-01-01T01:00:00.5+01:00"}
    odd["eventID"] = epcis.event_hash(odd)
    events = [{k: v for k, v in it.items() if k not in ("@context", "eventID")} for it in [*a, odd]]
    doc = {"@context": epcis.EPCIS_CONTEXT, "type": "EPCISDocument", "schemaVersion": "2.0",
           "creationDate": "2026-01-01T00:00:00Z", "epcisBody": {"eventList": events}}
    pre = derive_prehashes_from_events(event_list_from_epcis_document_json(doc), join_by="")
    assert [epcis.prehash(it) for it in [*a, odd]] == pre
    assert [it["eventID"] for it in [*a, odd]] == calculate_hashes_from_pre_hashes(pre)


def write(tmp: Path, rfid: str) -> Path:
    p = tmp / "agent.toml"
    p.write_text('[store]\nid = "S001"\n\n[rfid]\nenabled = true\n' + rfid)
    return p


ANTENNAS = """
[[rfid.antennas]]
reader = "r1"
port = 1
zone = "sales floor"

[[rfid.antennas]]
reader = "r1"
port = 2
zone = "exit"
"""


def test_zone_names_must_map_to_valid_sgln_extensions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Item 10: "sales floor" is no SGLN extension (a space is not in GS1 set 82): check-config names the
    antenna's zone and its line; mapped, it reports the mapping, and extensions are TDS-escaped."""
    p = write(tmp_path, f'epcis = true\nepcis_location = "{STORE}"\n' + ANTENNAS)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    [issue] = e.value.issues
    assert (issue.key, issue.line) == ("rfid.antennas.0.zone", 12) and "' '" in issue.message
    assert "rfid.epcis_zones" in issue.message
    assert main(["check-config", str(p)]) == 2
    p = write(tmp_path, f'epcis = true\nepcis_location = "{STORE}"\n' + ANTENNAS
              + '\n[rfid.epcis_zones]\n"sales floor" = "SF/1"\n')
    assert main(["check-config", str(p)]) == 0
    out = capsys.readouterr().out
    assert f"rfid.epcis: zone 'sales floor' -> {STORE}.SF%2F1" in out
    assert f"rfid.epcis: zone 'exit' -> {STORE}.exit" in out
    p = write(tmp_path, f'epcis = true\nepcis_location = "{STORE}"\n' + ANTENNAS
              + '\n[rfid.epcis_zones]\n"sales floor" = "an extension far too long"\nexit = "1"\nbackroom = "2"\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert [(i.key, i.line) for i in e.value.issues] == [("rfid.epcis_zones.sales floor", 20)]
    p = write(tmp_path, f'epcis = true\nepcis_location = "{STORE}"\n' + ANTENNAS
              + '\n[rfid.epcis_zones]\n"sales floor" = "1"\nexit = "1"\nbackroom = "2"\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert [(i.key, i.line, i.message[:26]) for i in e.value.issues] == [
        ("rfid.epcis_zones.exit", 21, "zones 'sales floor' and 'e"), ("rfid.epcis_zones.backroom", 22, "zone 'backroom' is no ante")]
    with pytest.raises(ValueError, match="both have SGLN extension"):
        epcis.zone_locations(STORE, ["a", "b"], {"a": "1", "b": "1"})


def test_the_store_location_is_required_and_not_gs1s_example(tmp_path: Path) -> None:
    """Item 11: no default location (it was GS1's example company prefix 0614141)."""
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "epcis = true\n"))
    assert [(i.key, i.line) for i in e.value.issues] == [("rfid.epcis_location", 4)]  # the [rfid] table it belongs in
    assert "required" in e.value.issues[0].message
    for bad, why in (("urn:epc:id:sgln:0614141.00001", "example company prefix"),
                     ("urn:epc:id:sgln:9521234.5678", "12 digits"), (f"{STORE}.0", "without extension")):
        with pytest.raises(ConfigError) as e:
            load_config(write(tmp_path, f'epcis = true\nepcis_location = "{bad}"\n'))
        assert e.value.issues[0].key == "rfid.epcis_location" and why in e.value.issues[0].message
    assert load_config(write(tmp_path, "epcis = false\n")).rfid.epcis_location is None


@needs_schema
def test_epcis_export_writes_a_valid_document_for_a_time_range(tmp_path: Path, gs1: Draft7Validator,
                                                                hq_backend: HqBackend) -> None:
    """Item 11: ``edge-agent epcis export`` reads what HQ applied (HQ keeps every message; the store's
    outbox forgets them once acked) and writes an EPCISDocument of the events in [--from, --to)."""
    clock, ob, pipe = make(tmp_path)
    read(clock, pipe, EPCS[0], 1, 2)  # arrives at T0 + 1
    read(clock, pipe, EPCS[0], 2)  # sold at T0 + 2
    read(clock, pipe, EPCS[1], 1, 2)  # arrives at T0 + 4
    hq = HqApplier(hq_backend.store(), clock, prefix="retail/v1")
    m = ob.seal("epcis/events")
    assert m is not None and len(EpcisEventsBody.model_validate_json(m.body).items) == 3
    hq.receive("retail/v1/S001/epcis/events", m.payload("S001", clock.now(), False))
    sent = [json.loads(b)["items"] for (b,) in hq.db.read("SELECT body FROM messages")][0]
    assert len(sent) == 3
    hq.db.close()
    ob.close()
    cfg = tmp_path / "hq.toml"
    cfg.write_text("[hq]\n" + "".join(f'{k} = "{v}"\n' for k, v in hq_backend.config().items()))
    out = tmp_path / "doc.json"
    assert main(["epcis", "export", "-c", str(cfg), "--store", "S001", "--from", "2026-01-01T00:00:01Z",
                 "--to", "2026-01-01T00:00:04Z", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert errors(gs1, doc) == []
    events = doc["epcisBody"]["eventList"]
    assert [(e["bizStep"], e["eventTime"][:19]) for e in events] == [
        ("arriving", "2026-01-01T00:00:01"), ("entering_exiting", "2026-01-01T00:00:02")]
    # HQ's copy went through the contract model and back; the ids still are the hashes of what it holds.
    assert all(e["eventID"] == epcis.event_hash(e) for e in events)
    assert main(["epcis", "export", "-c", str(cfg), "--store", "S002", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["epcisBody"]["eventList"] == []
