"""HQ's write API has an owner, its lists come in pages, and /metrics is Prometheus text: real HTTP on
127.0.0.1 against a real receiver (and, for the cmd-result, a real agent)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.clock import rfc3339
from edge_agent.hq.api import PAGE_MAX, token_hash
from edge_agent.hq.receiver import HqReceiver
from simulators.mosquitto import Mosquitto, free_port

from .helpers import AgentProcess, HqBackend, agent_config, start_hq, wait_for

TOKEN = "s3cret-token-of-alice"
PRICE = {"gtin": "09506000134352", "price": "2.99", "currency": "EUR", "version": 1}


def call(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback only
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def post(base: str, path: str, body: object, token: str | None = TOKEN, ctype: str = "application/json") -> tuple[int, dict, bytes]:
    headers = {"Content-Type": ctype} | ({"Authorization": f"Bearer {token}"} if token else {})
    return call(f"{base}{path}", json.dumps(body).encode(), headers)


def get(base: str, path: str) -> dict:
    status, _, data = call(f"{base}{path}")
    assert status == 200, (path, status, data[:300])
    return json.loads(data)


def known(rx: HqReceiver, *stores: str) -> None:
    with rx.db.tx() as c:
        c.executemany("INSERT INTO status(store, state, at) VALUES (?, 'online', 0)", [(s,) for s in stores])


@pytest.fixture
def hq(tmp_path: Path, broker: Mosquitto, hq_backend: HqBackend) -> Iterator[tuple[HqReceiver, str]]:
    """Every API test on both stores of record: the API's queries are the same SQL on SQLite and PostgreSQL."""
    rx = start_hq(tmp_path, broker.port, http_port=free_port(), api_tokens={"alice": token_hash(TOKEN)},
                  **hq_backend.config())
    assert rx.http is not None
    yield rx, f"http://127.0.0.1:{rx.http.server_address[1]}"
    rx.stop()


def commands(rx: HqReceiver) -> int:
    return rx.db.read("SELECT count(*) FROM commands_out")[0][0]


def test_a_cross_origin_simple_request_is_refused_and_changes_nothing(hq: tuple[HqReceiver, str]) -> None:
    rx, base = hq
    known(rx, "S001")
    cmd = {"store": "S001", "name": "price.set", "args": PRICE}
    # What a form or fetch() on another site can send without a preflight: text/plain, no Authorization.
    status, headers, _ = call(f"{base}/cmd", json.dumps(cmd).encode(),
                              {"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert post(base, "/cmd", cmd, ctype="text/plain")[0] == 415  # even with the token: never a simple request
    assert commands(rx) == 0 and get(base, "/audit")["items"] == []


def test_no_or_a_wrong_token_is_401(hq: tuple[HqReceiver, str]) -> None:
    rx, base = hq
    known(rx, "S001")
    cmd = {"store": "S001", "name": "inventory.resync", "args": {}}
    for token in (None, "wrong", TOKEN + "x", token_hash(TOKEN)):
        status, headers, _ = post(base, "/cmd", cmd, token=token)
        assert status == 401 and "Bearer" in headers["WWW-Authenticate"], token
        assert post(base, "/prices", {"stores": ["S001"], "price": PRICE}, token=token)[0] == 401
    assert commands(rx) == 0


def test_unknown_stores_names_and_args_are_4xx(hq: tuple[HqReceiver, str]) -> None:
    rx, base = hq
    known(rx, "S001")
    assert post(base, "/cmd", {"store": "S999", "name": "inventory.resync"})[0] == 404
    assert post(base, "/cmd", {"store": "S001", "name": "rm.rf"})[0] == 422
    assert post(base, "/cmd", {"store": "S001", "name": "price.set", "args": {"gtin": "1"}})[0] == 422
    assert post(base, "/prices", {"stores": ["S001", "S999"], "price": PRICE})[0] == 404
    assert call(f"{base}/cmd", b"{not json", {"Content-Type": "application/json",
                                               "Authorization": f"Bearer {TOKEN}"})[0] == 400
    assert commands(rx) == 0


def test_a_good_token_is_202_and_audited_with_the_stores_cmd_result(
    tmp_path: Path, broker: Mosquitto, hq: tuple[HqReceiver, str]
) -> None:
    rx, base = hq
    agent = AgentProcess(agent_config(tmp_path, broker.port), tmp_path / "agent.log").start()
    try:
        wait_for(lambda: rx.known_store("S001"), 30, "the store's birth")
        status, _, data = post(base, "/cmd", {"store": "S001", "name": "inventory.resync", "args": {"reason": "audit"}})
        assert status == 202, data
        cmd_id = json.loads(data)["id"]
        row = get(base, "/audit")["items"][0]
        assert (row["who"], row["store"], row["cmd_id"], row["name"], row["args"]) == (
            "alice", "S001", cmd_id, "inventory.resync", {"reason": "audit"})
        wait_for(lambda: get(base, "/audit")["items"][0]["result"] is not None, 30, "the store's cmd-result")
        assert get(base, "/audit")["items"][0]["result"]["status"] == "ok"
    finally:
        agent.terminate()


def test_post_prices_for_three_stores_makes_three_commands_with_progress_per_store(hq: tuple[HqReceiver, str]) -> None:
    rx, base = hq
    known(rx, "S001", "S002", "S003", "S004")
    status, _, data = post(base, "/prices", {"stores": ["S001", "S002", "S003"], "price": PRICE})
    assert status == 202, data
    reply = json.loads(data)
    assert [c["store"] for c in reply["commands"]] == ["S001", "S002", "S003"]
    rows = rx.db.read("SELECT store, payload FROM commands_out ORDER BY store")
    assert [s for s, _ in rows] == ["S001", "S002", "S003"]
    assert all(json.loads(p)["name"] == "price.set" and json.loads(p)["args"] == PRICE for _, p in rows)
    label = {"ts": "2026-11-25T10:00:00Z", "label": "0000021234567890", "gtin": PRICE["gtin"], "price": "2.99",
             "currency": "EUR", "matches_hq": True}
    with rx.db.tx() as c:  # S002's label already shows the new price
        c.execute("INSERT INTO labels(store, label, ts, state) VALUES ('S002', ?, 0, ?)", (label["label"], json.dumps(label)))
    progress = {p["store"]: p for p in get(base, reply["progress"])["items"]}
    assert sorted(progress) == ["S001", "S002", "S003"]
    assert (progress["S002"]["labels"], progress["S002"]["showing"]) == (1, 1)
    assert (progress["S001"]["labels"], progress["S001"]["result"]) == (0, None)
    assert {a["who"] for a in get(base, "/audit")["items"]} == {"alice"}
    status, _, data = post(base, "/prices", {"stores": "all", "price": PRICE | {"version": 2}})
    assert status == 202 and len(json.loads(data)["commands"]) == 4


def test_metrics_parse_and_have_the_named_series(hq: tuple[HqReceiver, str]) -> None:
    rx, base = hq
    topic = "retail/v1/S001/inventory/delta"
    rx.applier.receive(topic, b"not json")  # one rejected message
    status, headers, data = call(f"{base}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(data.decode())}
    for name in ("hq_messages_applied", "hq_facts_applied", "hq_apply_seconds", "hq_delivery_latency_seconds",
                 "hq_gaps", "hq_lost_messages", "hq_rewinds", "hq_replays_requested", "hq_resyncs",
                 "hq_messages_rejected", "hq_stores_online", "hq_store_lag_seconds", "hq_store_behind_messages",
                 "hq_mqtt_connected"):
        assert name in families, name
    rejected = {s.labels["reason"]: s.value for s in families["hq_messages_rejected"].samples
                if s.name == "hq_messages_rejected_total"}
    assert rejected == {"invalid": 1.0}


def test_state_pages_are_bounded_and_the_cursor_walks_them_all(hq: tuple[HqReceiver, str]) -> None:
    rx, base = hq
    stores = [f"S{i:03d}" for i in range(1, 28)]
    known(rx, *stores)
    with rx.db.tx() as c:  # many snapshots per store: /state shows only the newest few
        c.executemany("INSERT INTO snapshots(store, snapshot_id, as_of_seq, applied_at, outcome, mismatches)"
                      " VALUES (?,?,0,?,'verified',0)", [(s, f"snap{k}", k) for s in stores[:3] for k in range(50)])
    seen: list[str] = []
    url: str | None = "/state?limit=10"
    while url:
        page = get(base, url)
        assert len(page["stores"]) <= 10 and set(page["status"]) == set(page["stores"])
        assert all(sum(s["store"] == st for s in page["snapshots"]) <= 10 for st in page["stores"])
        seen += page["stores"]
        url = page["next"]
    assert seen == stores
    assert get(base, f"/state?limit={PAGE_MAX}")["next"] is None
    assert call(f"{base}/state?limit={PAGE_MAX + 1}")[0] == 400
    one = get(base, "/state?store=S002")
    assert one["stores"] == ["S002"] and [s["snapshot_id"] for s in one["snapshots"]][-1] == "snap49"


def test_epcis_and_the_hourly_rollups_come_in_pages(hq: tuple[HqReceiver, str]) -> None:
    """/epcis pages through a store's record (an EPCISDocument a page), and the roll-ups that outlive the raw
    telemetry have an API: /traffic/hourly and /telemetry/hourly, by time, in pages."""
    rx, base = hq
    t0 = 1_767_225_600.0

    def event(k: int) -> dict:
        return {"type": "ObjectEvent", "eventTime": rfc3339(t0 + k), "eventTimeZoneOffset": "+00:00", "action": "OBSERVE",
                "epcList": [f"urn:epc:id:sgtin:0614141.107346.{k}"]}

    def k(e: dict) -> int:
        return int(e["epcList"][0].rsplit(".", 1)[1])

    # 7 messages of 3 events (message 4 is another store's), HQ's record of what it applied.
    with rx.db.tx() as c:
        c.executemany("INSERT INTO messages(store, stream, seq, ts, historical, body) VALUES (?, 'epcis/events', ?, ?, 0, ?)",
                      [("S002" if m == 4 else "S001", m, t0, json.dumps({"items": [event(3 * m + i) for i in range(3)]}))
                       for m in range(1, 8)])
        c.executemany("INSERT INTO traffic_hourly(store, camera, hour, entries, exits, visits, person_s)"
                      " VALUES ('S001', ?, ?, ?, 0, 0, 0)",
                      [(cam, int(t0) + 3600 * h, h) for h in range(5) for cam in ("*", "cam1")])
    want = [3 * m + i for m in (1, 2, 3, 5, 6, 7) for i in range(3)]
    got: list[int] = []
    url: str | None = "/epcis?store=S001&limit=4"
    while url:
        status, headers, data = call(f"{base}{url}")
        assert status == 200, data[:300]
        events = json.loads(data)["epcisBody"]["eventList"]
        assert len(events) <= 4
        got += [k(e) for e in events]
        link = headers.get("Link")
        url = link[1:link.index(">")].removeprefix(base) if link else None
    assert got == want
    # A time range: [t0 + 7, t0 + 16) holds events 7, 8 and 9..11, 15 (12..14 are S002's).
    body = get(base, f"/epcis?store=S001&from={rfc3339(t0 + 7)}&to={rfc3339(t0 + 16)}")
    assert [k(e) for e in body["epcisBody"]["eventList"]] == [7, 8, 9, 10, 11, 15]
    assert call(f"{base}/epcis?store=S001&cursor=nonsense")[0] == 400

    rows: list[tuple[str, str, int]] = []
    url = f"/traffic/hourly?store=S001&from={rfc3339(t0 + 3600)}&limit=3"
    while url:
        page = get(base, url)
        rows += [(r["hour"], r["camera"], r["entries"]) for r in page["items"]]
        url = page["next"]
    assert rows == [(rfc3339(t0 + 3600 * h), cam, h) for h in range(1, 5) for cam in ("*", "cam1")]
    assert get(base, "/telemetry/hourly?store=S001")["items"] == []
