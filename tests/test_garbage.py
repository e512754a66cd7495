"""Garbage on every input: the agent's command downlink, HQ's intake, and both over a real broker.

Each bad input gets an error answer with a clear reason, is kept with that reason, changes nothing
else, and never takes the process down.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.clock import Clock, RealClock, VirtualClock, rfc3339
from edge_agent.contract import CmdResultItem, Command, HealthBody, InventoryResyncArgs, parse_message
from edge_agent.health import HealthReporter
from edge_agent.hq.applier import MAX_PAYLOAD, HqApplier
from edge_agent.hq.receiver import subscriptions
from edge_agent.inventory.book import Delta, InventoryBook
from edge_agent.sync.downlink import CommandRejected, Downlink, Outcome
from edge_agent.sync.outbox import Outbox, SealedMessage
from edge_agent.sync.refusals import Refusals
from simulators.inventory_feed import InventoryFeed
from simulators.mosquitto import Mosquitto

from .helpers import AgentProcess, HqBackend, agent_config, start_hq, wait_for

T0 = 1_767_225_600.0
TS = rfc3339(T0)
PREFIX = "retail/v1"
STORE = "S001"
CMD = f"{PREFIX}/{STORE}/cmd/"
GTINS = [f"0400000000{i:04d}" for i in range(10)]


def command(name: str = "inventory.resync", *, id: str = "c-1", store: str = STORE, **args: Any) -> dict[str, Any]:
    return {"v": 1, "id": id, "name": name, "store": store, "ts": TS, "args": args}


def raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


# ---------------------------------------------------------------- (a) the downlink


@dataclass
class Rig:
    outbox: Outbox
    book: InventoryBook
    downlink: Downlink
    calls: list[str]

    def snapshot_state(self) -> tuple[list[tuple], dict]:
        """Everything other than commands' own traces: pending non-result facts, sealed messages, the book."""
        rows = self.outbox.read(
            "SELECT id, stream, key, ts, body FROM pending WHERE stream != 'cmd-result' ORDER BY id"
        ) + self.outbox.read("SELECT * FROM sealed ORDER BY stream, seq")
        return rows, self.book.levels()

    def results(self) -> list[dict[str, Any]]:
        return [json.loads(b) for (b,) in self.outbox.read(
            "SELECT body FROM pending WHERE stream = 'cmd-result' ORDER BY id")]

    def quarantine(self) -> list[tuple[str, str, bytes | None]]:
        return [(s, r, raw) for _, s, r, raw in self.outbox.quarantined(10_000)]


def make_rig(path: Path, *, max_message_bytes: int = 4096, quarantine_keep: int = 10_000,
             clock: Clock | None = None, **queue: int) -> Rig:
    clock = clock or VirtualClock(T0)
    ob = Outbox(path, clock, max_message_bytes=max_message_bytes, quarantine_keep=quarantine_keep)
    book = InventoryBook(ob, clock)
    book.apply([Delta(T0 + i, "backroom", GTINS[i % 10], 1 + i % 3) for i in range(30)])
    assert ob.seal("inventory/delta") is not None  # some of it in flight ...
    book.apply([Delta(T0 + 40 + i, "pos", GTINS[i % 10], -1) for i in range(5)])  # ... some still pending
    dl = Downlink(STORE, PREFIX, ob, clock, **queue)
    calls: list[str] = []

    def resync(cmd: Command, args: InventoryResyncArgs) -> dict[str, Any]:
        calls.append(cmd.id)
        if args.reason == "refuse":
            raise CommandRejected("refused on purpose")
        return {"reason": args.reason}

    dl.register("inventory.resync", resync)  # type: ignore[arg-type]
    return Rig(ob, book, dl, calls)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = make_rig(tmp_path / "outbox.db")
    yield r
    r.outbox.close()


deep = b"[" * 60_000  # nested deeper than Python's json module recurses, and under the size limit
GARBAGE: list[tuple[str, str, bytes, str]] = [
    # (case, topic, payload, what the reason must say)
    ("malformed json", CMD + "inventory.resync", b'{"v":1,"id":"m-1","name":', "invalid command"),
    ("binary", CMD + "inventory.resync", bytes(range(256)), "invalid command"),
    ("empty", CMD + "inventory.resync", b"", "invalid command"),
    ("json array", CMD + "inventory.resync", b"[1,2,3]", "invalid command"),
    ("deeply nested", CMD + "inventory.resync", deep, "invalid command"),
    ("wrong types", CMD + "inventory.resync",
     raw({"v": "one", "id": 5, "name": ["inventory.resync"], "store": None, "ts": "yesterday", "args": []}),
     "invalid command"),
    ("missing keys", CMD + "inventory.resync", raw({"v": 1, "name": "inventory.resync"}), "invalid command"),
    ("extra key", CMD + "inventory.resync", raw({**command(), "sudo": True}), "invalid command"),
    ("huge extra keys", CMD + "inventory.resync",
     raw({**command(), **{k * 12_000: 1 for k in "abcde"}}), "invalid command"),
    ("lone surrogate id", CMD + "inventory.resync", b'{"v":1,"id":"\\ud800","name":"inventory.resync"}',
     "invalid command"),
    ("bad id charset", CMD + "inventory.resync", raw(command(id="rm -rf /")), "invalid command"),
    ("one megabyte", CMD + "inventory.resync", raw(command(reason="x" * (1 << 20))), "exceeds"),
    ("other store's topic", f"{PREFIX}/S002/cmd/inventory.resync", raw(command(store="S002")),
     "command for store 'S002' reached store 'S001'"),
    ("other store in body", CMD + "inventory.resync", raw(command(store="S002")), "command names store 'S002'"),
    ("name/topic mismatch", CMD + "price.set", raw(command("inventory.resync", id="mm-1")),
     "command name 'inventory.resync' does not match topic 'price.set'"),
    ("unknown command", CMD + "price.set", raw(command("price.set", id="u-1", gtin=GTINS[0], price="1.99")),
     "unknown command 'price.set'"),
    ("bad args type", CMD + "inventory.resync", raw(command(reason=5)), "invalid args"),
    ("unknown arg", CMD + "inventory.resync", raw(command(bogus=1)), "invalid args"),
    ("not a command topic", f"{PREFIX}/{STORE}/inventory/delta", raw(command()), "not a command topic"),
    ("command topic without name", CMD, raw(command()), "not a command topic"),
    ("foreign prefix", f"other/{STORE}/cmd/inventory.resync", raw(command()), "not a command topic"),
]


def answered(results: Iterable[dict[str, Any]]) -> int:
    """How many commands these cmd-result items answer: a coalesced one answers ``count``."""
    return sum(r.get("count", 1) for r in results)


def check_result_fact(body: dict[str, Any]) -> None:
    """A cmd-result fact must survive HQ's strict JSON parser, or it would poison its whole message."""
    CmdResultItem.model_validate_json(json.dumps(body))


@pytest.mark.parametrize(("case", "topic", "payload", "reason"), GARBAGE, ids=[g[0] for g in GARBAGE])
def test_downlink_garbage(rig: Rig, case: str, topic: str, payload: bytes, reason: str) -> None:
    before = rig.snapshot_state()
    out = rig.downlink.handle(topic, payload)
    assert isinstance(out, Outcome)
    assert out.status == "error" and out.refused is not None
    assert out.reason is not None and reason in out.reason, out.reason
    assert rig.calls == []  # no handler ran
    assert rig.snapshot_state() == before  # other data intact
    assert rig.results() == []  # answered with whatever else is refused within the second ...
    assert rig.downlink.flush() == 1  # ... which, alone, is an answer of its own
    assert rig.outbox.counters()[f"refused.{out.refused}"] == 1

    (q_source, q_reason, q_raw), *_ = rig.quarantine()
    assert q_source == "downlink"
    assert q_reason.startswith(f"{topic}: ")
    assert reason in q_reason
    assert q_raw == payload[:64 * 1024]
    assert rig.outbox.counters()["quarantined.downlink"] == 1

    (result,) = rig.results()
    check_result_fact(result)
    assert result["status"] == "error"
    assert result["reason"] and reason in result["reason"]
    if case in ("name/topic mismatch", "unknown command"):
        assert result["cmd_id"] == json.loads(payload)["id"]  # so HQ can match the answer to its command
    # the answer goes out as a valid message
    msg = rig.outbox.seal("cmd-result")
    assert msg is not None
    parse_message(msg.payload(STORE, T0, False))


def test_downlink_after_garbage_still_works_and_keeps_everything(rig: Rig) -> None:
    before = rig.snapshot_state()
    for _, topic, payload, _ in GARBAGE:
        assert rig.downlink.handle(topic, payload).status == "error"
        rig.downlink.flush()  # one at a time: each answered as itself
    assert rig.snapshot_state() == before
    assert len(rig.quarantine()) == len(GARBAGE)
    assert rig.outbox.counters()["quarantined.downlink"] == len(GARBAGE)
    kept = rig.quarantine()[::-1]  # oldest first
    for (_, topic, _, _), (_, q_reason, _), result in zip(GARBAGE, kept, rig.results(), strict=True):
        assert q_reason.startswith(f"{topic}: ")
        assert result["reason"][:200] in q_reason  # the answer and the kept record give the same reason
    out = rig.downlink.handle(CMD + "inventory.resync", raw(command(id="ok-1", reason="after garbage")))
    assert (out.status, out.reason, out.detail) == ("ok", None, {"reason": "after garbage"})
    assert rig.calls == ["ok-1"]
    results = rig.results()
    assert len(results) == len(GARBAGE) + 1
    for r in results:
        check_result_fact(r)
    while (m := rig.outbox.seal("cmd-result")) is not None:
        assert len(m.payload(STORE, T0, False)) <= 4096
        parse_message(m.payload(STORE, T0, False))


def test_duplicate_command_runs_nothing_twice(rig: Rig) -> None:
    first = rig.downlink.handle(CMD + "inventory.resync", raw(command(id="dup-1", reason="one")))
    assert first.status == "ok"
    before = rig.snapshot_state()
    n_results = len(rig.results())
    # a QoS 1 redelivery, and a different command re-using the id
    for payload in (raw(command(id="dup-1", reason="one")), raw(command(id="dup-1", reason="two"))):
        again = rig.downlink.handle(CMD + "inventory.resync", payload)
        assert (again.status, again.reason, again.cmd_id) == ("error", "duplicate", "dup-1")
    assert rig.calls == ["dup-1"]
    assert rig.snapshot_state() == before
    assert len(rig.results()) == n_results  # the first answer stands; no second one


def test_duplicate_survives_restart(tmp_path: Path) -> None:
    r = make_rig(tmp_path / "outbox.db")
    assert r.downlink.handle(CMD + "inventory.resync", raw(command(id="dup-2"))).status == "ok"
    r.outbox.close()
    r2 = make_rig(tmp_path / "outbox.db")
    assert r2.downlink.handle(CMD + "inventory.resync", raw(command(id="dup-2"))).reason == "duplicate"
    assert r2.calls == []
    r2.outbox.close()


def test_handler_refusal_and_failure_are_error_results(rig: Rig) -> None:
    out = rig.downlink.handle(CMD + "inventory.resync", raw(command(id="r-1", reason="refuse")))
    assert (out.status, out.reason) == ("error", "refused on purpose")

    def broken(cmd: Command, args: InventoryResyncArgs) -> dict[str, Any]:
        raise RuntimeError("x" * 100_000)

    rig.downlink.register("inventory.resync", broken)  # type: ignore[arg-type]
    out = rig.downlink.handle(CMD + "inventory.resync", raw(command(id="r-2")))
    assert out.status == "error" and out.reason and out.reason.startswith("handler failed: RuntimeError")
    for r in rig.results():
        check_result_fact(r)
    while (m := rig.outbox.seal("cmd-result")) is not None:
        assert len(m.payload(STORE, T0, False)) <= 4096


def test_queue_path_survives_garbage(rig: Rig) -> None:
    """The worker thread the agent really uses: garbage in, results out, thread alive."""
    rig.downlink.start()
    try:
        for _, topic, payload, _ in GARBAGE:
            msg = mqtt.MQTTMessage(topic=topic.encode())
            msg.payload = payload
            rig.downlink.on_message(msg)
        msg = mqtt.MQTTMessage(topic=(CMD + "inventory.resync").encode())
        msg.payload = raw(command(id="q-ok"))
        rig.downlink.on_message(msg)
        wait_for(lambda: any(r["cmd_id"] == "q-ok" for r in rig.results()), 10, "the valid command answered")
        rig.outbox.clock.advance(1.0)  # type: ignore[attr-defined]  # the refusals' second is over
        wait_for(lambda: answered(rig.results()) == len(GARBAGE) + 1, 10, "every command answered")
    finally:
        rig.downlink.stop()
    assert rig.calls == ["q-ok"]
    kinds = [k for k in rig.outbox.counters() if k.startswith("refused.")]
    assert len(rig.results()) == len(kinds) + 1  # one result per kind of refusal, and the valid one's


command_names = st.sampled_from(["inventory.resync", "price.set", "", "cmd", "a/b", "inventory.resync/x"])
payloads = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    st.builds(lambda d: raw(d), st.dictionaries(st.sampled_from(["v", "id", "name", "store", "ts", "args", "x"]),
                                                st.none() | st.integers() | st.text(max_size=30)
                                                | st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
                                                max_size=7)),
    st.builds(lambda n, i, s, a: raw(command(n, id=i, store=s, **a)), command_names,
              st.text(max_size=70), st.sampled_from([STORE, "S002", "", "S 1"]),
              st.dictionaries(st.sampled_from(["reason", "x"]), st.text(max_size=20) | st.integers(), max_size=2)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.one_of(st.text(max_size=80), command_names.map("cmd/".__add__)), payload=payloads)
def test_downlink_never_raises(tmp_path: Path, suffix: str, payload: bytes) -> None:
    if not hasattr(test_downlink_never_raises, "rig"):
        test_downlink_never_raises.rig = make_rig(tmp_path / "prop.db", quarantine_keep=10)  # type: ignore[attr-defined]
    r: Rig = test_downlink_never_raises.rig  # type: ignore[attr-defined]
    before_state = r.snapshot_state()
    n_before = len(r.results())
    out = r.downlink.handle(f"{PREFIX}/{STORE}/{suffix}", payload)
    r.downlink.flush()
    assert out.status in ("ok", "error")
    if out.status == "error" and out.reason != "duplicate":
        assert out.reason
    if out.status == "error":
        assert r.snapshot_state() == before_state
    results = r.results()
    assert len(results) in (n_before, n_before + 1)
    for res in results[n_before:]:
        check_result_fact(res)
    if len(results) > 50:  # keep the shared outbox small: ship what has piled up
        while (m := r.outbox.seal("cmd-result")) is not None:
            assert len(m.payload(STORE, T0, False)) <= 4096
            parse_message(m.payload(STORE, T0, False))


@pytest.fixture(autouse=True)
def _close_property_rig() -> Iterator[None]:
    yield
    r = getattr(test_downlink_never_raises, "rig", None)
    if r is not None:
        r.outbox.close()
        del test_downlink_never_raises.rig  # type: ignore[attr-defined]


# ---------------------------------------------------------------- (a') floods of commands


def test_refusals_count_everything_and_keep_a_few() -> None:
    r = Refusals(interval_s=1.0, samples=3, sample_bytes=10)
    assert not r.due(T0) and r.take() == []
    for i in range(1000):
        r.add(T0 + i / 2000, "invalid_args", CMD + "inventory.resync", "inventory.resync", f"bad {i}", b"x" * 100,
              f"id-{i}")
    r.add(T0 + 0.6, "unknown_command", CMD + "nope", "nope", "unknown command 'nope'", b"{}", "u-1")
    r.add(T0 + 0.7, "invalid_args", CMD + "price.set", "price.set", "bad", b"", "p-1")
    assert not r.due(T0 + 0.99) and r.due(T0 + 1.0)  # the interval opened with the first refusal
    args, unknown = r.take()
    assert (args.kind, args.count, args.name) == ("invalid_args", 1001, "*")  # two names among them
    assert [(s.cmd_id, s.reason, s.raw) for s in args.samples] == [(f"id-{i}", f"bad {i}", b"x" * 10) for i in range(3)]
    assert (unknown.kind, unknown.count, unknown.name, len(unknown.samples)) == ("unknown_command", 1, "nope", 1)
    assert not r.due(T0 + 5) and r.take() == []  # the next interval opens with the next refusal


def garbage_message(i: int) -> tuple[str, bytes, str]:
    """The i-th command of a flood, and the kind of refusal it must get."""
    k = i % 7
    if k == 0:
        return CMD + "inventory.resync", b'{"v":1,"id":"m-%d","name":' % i, "invalid_command"
    if k == 1:
        return CMD + "inventory.resync", raw(command(id=f"a-{i}", bogus=1)), "invalid_args"
    if k == 2:
        return CMD + "nope", raw(command("nope", id=f"u-{i}")), "unknown_command"
    if k == 3:
        return CMD + "inventory.resync", raw(command(id=f"s-{i}", store="S002")), "wrong_store"
    if k == 4:
        return CMD + "esl.flash", raw(command(id=f"n-{i}")), "name_mismatch"
    if k == 5:
        return CMD + "inventory.resync", raw(command(id=f"bad id {i}")), "invalid_command"
    if i % 700 == 6:
        return CMD + "inventory.resync", raw(command(id=f"o-{i}", reason="x" * 70_000)), "oversize"
    return f"{PREFIX}/S002/cmd/inventory.resync", raw(command(id=f"t-{i}", store="S002")), "wrong_store"


def mqtt_message(topic: str, payload: bytes) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(topic=topic.encode())
    msg.payload = payload
    return msg


def test_a_flood_of_garbage_is_counted_in_full_and_answered_in_a_few_results(tmp_path: Path) -> None:
    """20,000 garbage commands at the network thread's callback, a valid one in the middle. Offered
    faster than any broker delivers, so the queue is made big enough for all of them here: what finds
    it full is the next test's."""
    rig = make_rig(tmp_path / "outbox.db", max_message_bytes=128 * 1024, clock=RealClock(), queue_max=30_000)
    flood = [garbage_message(i) for i in range(20_000)]
    rig.downlink.start()
    t0 = time.monotonic()
    try:
        for i, (topic, payload, _) in enumerate(flood):
            rig.downlink.on_message(mqtt_message(topic, payload))
            if i == 10_000:
                rig.downlink.on_message(mqtt_message(CMD + "inventory.resync", raw(command(id="valid-1"))))
        offered_s = time.monotonic() - t0
        wait_for(lambda: answered(r for r in rig.results() if r["status"] == "error") == len(flood), 60,
                 "every refused command answered")
    finally:
        rig.downlink.stop()
    elapsed = time.monotonic() - t0
    results = rig.results()
    (ok,) = [r for r in results if r["cmd_id"] == "valid-1"]
    assert (ok["status"], ok["detail"]) == ("ok", {"reason": "requested"}) and "count" not in ok  # its own answer
    assert rig.calls == ["valid-1"]
    errors = [r for r in results if r["status"] == "error"]
    kinds = Counter(kind for _, _, kind in flood)
    assert len(errors) <= len(kinds) * (elapsed + 2), (len(errors), elapsed)  # a result per kind a second
    for r in errors:
        check_result_fact(r)
        if r.get("count", 1) > 1:
            assert r["cmd_id"] == "*" and len(r["sample_ids"]) <= 3  # malformed JSON has no id to give
    counters = rig.outbox.counters()
    assert {k: v for k, v in counters.items() if k.startswith("refused.")} == {f"refused.{k}": n for k, n in kinds.items()}
    assert counters["quarantined.downlink"] == len(flood)  # counted in full ...
    assert len(rig.quarantine()) <= 3 * len(kinds) * (elapsed + 2)  # ... kept as a sample
    while (m := rig.outbox.seal("cmd-result")) is not None:
        parse_message(m.payload(STORE, T0, False))
    print(f"flood: offered in {offered_s:.2f} s, answered in {elapsed:.2f} s: {len(errors)} error results,"
          f" {len(rig.quarantine())} kept in quarantine")
    rig.outbox.close()


def test_commands_with_no_room_are_counted_and_answered_not_dropped(tmp_path: Path) -> None:
    rig = make_rig(tmp_path / "outbox.db", max_message_bytes=128 * 1024, queue_max=100, queue_max_bytes=300_000)
    # The worker is not running yet: the first 100 fit the queue, the other 900 find it full.
    for i in range(1000):
        rig.downlink.on_message(mqtt_message(CMD + "inventory.resync", raw(command(id=f"c-{i}"))))
    rig.downlink.start()
    rig.downlink.stop()  # handles what was queued, then answers the refusals
    assert rig.calls == [f"c-{i}" for i in range(100)]
    results = rig.results()
    assert [r["cmd_id"] for r in results if r["status"] == "ok"] == rig.calls
    (full,) = [r for r in results if r["status"] == "error"]
    assert (full["cmd_id"], full["count"], full["sample_ids"]) == ("*", 900, ["c-100", "c-101", "c-102"])
    assert full["name"] == "inventory.resync" and "queue full" in full["reason"]
    assert rig.outbox.counters()["refused.queue_full"] == 900
    body = HealthReporter(rig.outbox, rig.outbox.clock, 60, connected=lambda: True).body([], {})
    assert body["refused_commands"] == {"queue_full": 900}
    HealthBody.model_validate(body)

    # The queue is bounded in bytes too, and holds only as much of a command as its size check needs.
    rig2 = make_rig(tmp_path / "bytes.db", queue_max_bytes=300_000)
    for _ in range(10):
        rig2.downlink.on_message(mqtt_message(CMD + "inventory.resync", b"x" * (1 << 20)))
    rig2.downlink.start()
    rig2.downlink.stop()
    counters = rig2.outbox.counters()
    assert (counters["refused.oversize"], counters["refused.queue_full"]) == (4, 6)  # 4 x 64 KiB fit
    assert any("command of 1048576 bytes exceeds" in r["reason"] for r in rig2.results())
    rig.outbox.close()
    rig2.outbox.close()

# ---------------------------------------------------------------- (b) HQ intake


def sealed_deltas(tmp: Path, n: int) -> tuple[list[SealedMessage], dict[tuple[str, str], int]]:
    ob = Outbox(tmp / "agent.db", VirtualClock(T0), max_message_bytes=4096)
    book = InventoryBook(ob, ob.clock)
    msgs = []
    for k in range(n):
        book.apply([Delta(T0 + k, "backroom", GTINS[(k + i) % 10], 1 + i) for i in range(5)])
        m = ob.seal("inventory/delta")
        assert m is not None
        msgs.append(m)
    levels = {k: v for k, v in book.levels().items() if v}
    ob.close()
    return msgs, levels


def envelope(stream: str, type_: str, seq: int, body: dict[str, Any], store: str = STORE) -> bytes:
    return SealedMessage(stream, seq, "01ARZ3NDEKTSV4RRFFQ69G5FAV", type_, T0, T0, 1,
                         json.dumps(body)).payload(store, T0, False)


def hq_garbage(valid: bytes) -> list[tuple[str, str, bytes]]:
    """(case, topic, payload) that HQ must reject, keep and count."""
    d = f"{PREFIX}/{STORE}/inventory/delta"
    good = json.loads(valid)
    return [
        ("not json", d, b"not json"),
        ("empty", d, b""),
        ("binary", d, bytes(range(256))),
        ("json null", d, b"null"),
        ("json list", d, b"[1, 2]"),
        ("unhashable type", d, b'{"type": ["inventory.delta"]}'),
        ("dict type", d, b'{"type": {"a": 1}}'),
        ("unknown type", d, raw({**good, "type": "inventory.teleport"})),
        ("missing keys", d, b'{"type": "inventory.delta"}'),
        ("deeply nested", d, b"[" * 60_000),
        ("nested in body", d, b'{"type":"inventory.delta","body":' + b"[" * 60_000 + b"]" * 60_000 + b"}"),
        ("lone surrogate", d, valid.replace(b'"backroom"', b'"\\udc00"')),
        ("wrong body", d, raw({**good, "body": {"items": "lots"}})),
        ("extra key", d, raw({**good, "extra": 1})),
        ("negative seq", d, raw({**good, "seq": -1})),
        ("seq beyond int64", d, raw({**good, "seq": 2**70})),
        ("delta beyond int64", d, raw({**good, "seq": 2, "body": {"items": [
            {"ts": TS, "zone": "z", "gtin": GTINS[0], "delta": 2**64}]}})),
        ("status connection beyond int64", f"{PREFIX}/{STORE}/status",
         envelope("status", "status", 0, {"state": "online", "agent_version": "1", "boot_id": "b",
                                          "connection": 2**64})),
        ("snapshot as_of beyond int64", f"{PREFIX}/{STORE}/inventory/snapshot",
         envelope("inventory/snapshot", "inventory.snapshot", 1,
                  {"snapshot_id": "s-big", "as_of_seq": 2**64, "part": 1, "parts": 1, "reason": "x", "items": []})),
        ("snapshot qty beyond int64", f"{PREFIX}/{STORE}/inventory/snapshot",
         envelope("inventory/snapshot", "inventory.snapshot", 2,
                  {"snapshot_id": "s-qty", "as_of_seq": 2**62, "part": 1, "parts": 1, "reason": "x",
                   "items": [{"zone": "z", "gtin": GTINS[0], "qty": 2**64}]})),
        ("store mismatch", f"{PREFIX}/S999/inventory/delta", valid),
        ("stream mismatch", f"{PREFIX}/{STORE}/traffic/stats", valid),
        ("unknown stream topic", f"{PREFIX}/{STORE}/no/such/stream", valid),
        ("store-level topic", f"{PREFIX}/{STORE}", valid),
        ("empty store", f"{PREFIX}//inventory/delta", valid),
        ("over the size limit", d, valid + b" " * (MAX_PAYLOAD + 1 - len(valid))),
    ]


def test_hq_rejects_garbage_and_keeps_applying(tmp_path: Path, hq_backend: HqBackend) -> None:
    msgs, levels = sealed_deltas(tmp_path, 4)
    payloads = [m.payload(STORE, T0, False) for m in msgs]
    garbage = hq_garbage(payloads[0])
    hq = HqApplier(hq_backend.store(), VirtualClock(T0), prefix=PREFIX)
    topic = f"{PREFIX}/{STORE}/inventory/delta"
    # valid messages interleaved with garbage; the forged seq-2 delta must come while HQ is at seq 1
    garbage.sort(key=lambda g: g[0] != "delta beyond int64")
    half = len(garbage) // 2
    for i, p in enumerate(payloads):
        assert hq.receive(topic, p) == []
        for case, t, g in garbage[half * i: half * (i + 1)] if i < 2 else []:
            assert hq.receive(t, g) == [], case
    assert hq.db.inventory(STORE) == levels
    (stats,) = [s for s in hq.db.stream_stats() if s["stream"] == "inventory/delta"]
    assert (stats["last_seq"], stats["applied"], stats["gaps"], stats["duplicates"]) == (4, 4, 0, 0)
    assert hq.figures.rejected == len(garbage)
    rows = hq.db.read("SELECT topic, reason, payload FROM rejected ORDER BY id")
    assert len(rows) == len(garbage)
    by_payload = {(t, bytes(p)) for t, _, p in rows}
    for case, t, g in garbage:
        assert (t, g[:65536]) in by_payload, case
    assert all(reason for _, reason, _ in rows)
    # no stray state from the rejected ones
    assert hq.db.read("SELECT count(*) FROM stash") == [(0,)]
    assert hq.db.read("SELECT count(*) FROM snapshot_parts") == [(0,)]
    assert hq.db.read("SELECT count(*) FROM status") == [(0,)]
    assert hq.db.read("SELECT count(*) FROM snapshots") == [(0,)]
    assert hq.tick() == []  # no gap was opened by garbage
    hq.db.close()


def test_hq_ignores_its_own_commands(hq_backend: HqBackend) -> None:
    hq = HqApplier(hq_backend.store(), VirtualClock(T0), prefix=PREFIX)
    assert hq.receive(f"{PREFIX}/{STORE}/cmd/inventory.resync", b"whatever") == []
    assert hq.figures.rejected == 0
    hq.db.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    suffix=st.one_of(st.text(max_size=40),
                     st.sampled_from(["inventory/delta", "inventory/snapshot", "status", "health", "cmd-result"])),
    payload=st.one_of(st.binary(max_size=300), payloads),
)
def test_hq_receive_never_raises(hq_backend: HqBackend, suffix: str, payload: bytes) -> None:
    if not hasattr(test_hq_receive_never_raises, "hq"):
        test_hq_receive_never_raises.hq = HqApplier(  # type: ignore[attr-defined]
            hq_backend.store("hq-prop", synchronous="NORMAL"), VirtualClock(T0), prefix=PREFIX)
    hq: HqApplier = test_hq_receive_never_raises.hq  # type: ignore[attr-defined]
    before = hq.figures.rejected
    assert hq.receive(f"{PREFIX}/{STORE}/{suffix}", payload) == []
    if not suffix.startswith("cmd/"):
        assert hq.figures.rejected == before + 1  # none of these is a valid message


@pytest.fixture(autouse=True)
def _close_property_hq() -> Iterator[None]:
    yield
    hq = getattr(test_hq_receive_never_raises, "hq", None)
    if hq is not None:
        hq.db.close()
        del test_hq_receive_never_raises.hq  # type: ignore[attr-defined]


# ---------------------------------------------------------------- (c) over a real broker

ZONES = ["backroom", "salesfloor", "pos"]


@pytest.mark.slow
def test_garbage_over_mqtt_while_the_agent_runs(tmp_path: Path, broker: Mosquitto) -> None:
    total, gtins, seed = 6000, 20, 11
    cfg = agent_config(tmp_path, broker.port, sim={"seed": seed, "total": total, "rate_per_s": 1500, "batch": 50,
                                                   "zones": ZONES, "gtins": gtins})
    hq = start_hq(tmp_path, broker.port)
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    truth = InventoryFeed(seed, ZONES, gtins).truth(total)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="garbage-thrower")
    try:
        wait_for(lambda: hq.db.read("SELECT state FROM status WHERE store = ?", (STORE,)) == [("online",)], 30,
                 "the agent's birth message at HQ")
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        garbage = [(topic, payload) for _, topic, payload, _ in GARBAGE
                   if topic.startswith(CMD)]  # what reaches the agent's subscription
        garbage += [(CMD + "inventory.resync", b"\x00" * 10), (CMD + "x/y/z", b"{}")]
        # What reaches HQ: a topic of no stream of the contract (a store-level one, an unknown stream)
        # matches none of HQ's subscriptions, so the broker gives it to no receiver.
        to_hq = [(t, p) for _, t, p in hq_garbage(b'{"v":1}') if t.startswith(f"{PREFIX}/") and len(p) < 1 << 20]
        uplink_garbage = [(t, p) for t, p in to_hq if any(mqtt.topic_matches_sub(f, t) for f in subscriptions(PREFIX))]
        assert {t for t, _ in to_hq} - {t for t, _ in uplink_garbage} == {f"{PREFIX}/{STORE}/no/such/stream",
                                                                        f"{PREFIX}/{STORE}"}
        infos = []
        for _round in range(3):  # while the feed is flowing
            for topic, payload in garbage + uplink_garbage:
                infos.append(client.publish(topic, payload, qos=1))
            time.sleep(0.3)
        infos.append(client.publish(CMD + "inventory.resync", raw(command(id="valid-after-garbage")), qos=1))
        for info in infos:
            info.wait_for_publish(timeout=10)
            assert info.is_published()

        wait_for(lambda: hq.db.inventory(STORE) == truth, 60, "HQ inventory to equal the ground truth")
        assert agent.alive

        def results() -> list[dict[str, Any]]:
            out = []
            for (body,) in hq.db.read("SELECT body FROM messages WHERE store = ? AND stream = 'cmd-result'", (STORE,)):
                out += json.loads(body)["items"]
            return out

        wait_for(lambda: answered(r for r in results() if r["status"] == "error") >= 3 * len(garbage)
                 and any(r["cmd_id"] == "valid-after-garbage" for r in results()), 30,
                 "an error cmd-result for every garbage command")
        res = results()
        errors = [r for r in res if r["status"] == "error"]
        assert answered(errors) == 3 * len(garbage)
        assert len(errors) <= 3 * 6  # three rounds, six kinds of refusal among them
        reasons = " | ".join(r["reason"] for r in errors)
        for needle in ("invalid command", "exceeds", "unknown command 'price.set'", "does not match topic",
                       "invalid args", "command names store"):
            assert needle in reasons, needle
        (ok,) = [r for r in res if r["cmd_id"] == "valid-after-garbage"]
        assert ok["status"] == "ok"
        assert hq.applier.figures.rejected >= 3 * len(uplink_garbage)
        # nothing the agent sent was rejected: the garbage results are valid messages too
        agent_rejects = hq.db.read("SELECT count(*) FROM rejected WHERE topic LIKE ? AND payload LIKE ?",
                                   (f"{PREFIX}/{STORE}/cmd-result", '{"v":1,"type":"cmd.result"%'))
        assert agent_rejects == [(0,)]
        stats = {s["stream"]: s for s in hq.db.stream_stats()}
        assert stats["inventory/delta"]["gaps"] == 0
        assert stats["cmd-result"]["gaps"] == 0
        assert agent.alive
    finally:
        client.loop_stop()
        client.disconnect()
        rc = agent.terminate()
        hq.stop()
    assert rc == 0


@pytest.mark.slow
def test_a_flood_of_garbage_over_mqtt(tmp_path: Path, broker: Mosquitto) -> None:
    """20,000 garbage commands through a real mosquitto at a running agent, a valid one in the middle:
    every one is counted, a handful of results go up, the agent's memory stays put."""
    flood = [g for g in (garbage_message(i) for i in range(30_000)) if g[0].startswith(CMD)][:20_000]
    kinds = Counter(kind for _, _, kind in flood)
    hq = start_hq(tmp_path, broker.port)
    agent = AgentProcess(agent_config(tmp_path, broker.port), tmp_path / "agent.log").start()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flooder")
    stop = threading.Event()
    try:
        wait_for(lambda: hq.db.read("SELECT state FROM status WHERE store = ?", (STORE,)) == [("online",)], 30,
                 "the agent's birth message at HQ")
        proc = psutil.Process(agent.proc.pid)  # type: ignore[union-attr]
        rss = [proc.memory_info().rss]

        def sample() -> None:
            while not stop.wait(0.05):
                rss.append(proc.memory_info().rss)

        threading.Thread(target=sample, daemon=True).start()
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        t0 = time.monotonic()
        infos = []
        for i, (topic, payload, _) in enumerate(flood):
            infos.append(client.publish(topic, payload, qos=1))
            if i == len(flood) // 2:
                infos.append(client.publish(CMD + "inventory.resync", raw(command(id="valid-mid")), qos=1))
        for info in infos:
            info.wait_for_publish(timeout=60)
        offered_s = time.monotonic() - t0

        def results() -> list[dict[str, Any]]:
            out = []
            for (body,) in hq.db.read("SELECT body FROM messages WHERE store = ? AND stream = 'cmd-result'", (STORE,)):
                out += json.loads(body)["items"]
            return out

        wait_for(lambda: answered(r for r in results() if r["status"] == "error") == len(flood), 60,
                 "every garbage command answered at HQ")
        answered_s = time.monotonic() - t0
        res = results()
        (ok,) = [r for r in res if r["cmd_id"] == "valid-mid"]
        assert ok["status"] == "ok" and ok.get("count", 1) == 1  # executed, and answered on its own
        errors = [r for r in res if r["status"] == "error"]
        assert len(errors) <= len(kinds) * (answered_s + 2), (len(errors), answered_s)

        def health_figures() -> tuple[dict[str, int], int]:
            rows = hq.db.read("SELECT body FROM telemetry WHERE store = ? AND stream = 'health' ORDER BY seq DESC"
                              " LIMIT 1", (STORE,))
            body = json.loads(rows[0][0]) if rows else {}
            return body.get("refused_commands", {}), body.get("quarantined", {}).get("downlink", 0)

        wait_for(lambda: health_figures() == (dict(kinds), len(flood)), 30, "health to count every refusal")
        growth_mb = (max(rss) - rss[0]) / 1e6
        assert growth_mb < 40, growth_mb
        print(f"mqtt flood: offered in {offered_s:.1f} s, answered at HQ after {answered_s:.1f} s in {len(errors)}"
              f" error results; agent RSS {rss[0] / 1e6:.0f} MB, peak +{growth_mb:.1f} MB")
        assert agent.alive
    finally:
        stop.set()
        client.loop_stop()
        client.disconnect()
        rc = agent.terminate()
        hq.stop()
    assert rc == 0
