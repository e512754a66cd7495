"""Wire contract v1: envelope round trips, topics, JSON Schema export, and parsers that never crash on garbage."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edge_agent.clock import VirtualClock, parse_rfc3339
from edge_agent.contract import (
    COMMAND_ARGS,
    DEFAULT_PREFIX,
    MESSAGE_MODELS,
    STATUS_STREAM,
    STATUS_TYPE,
    STREAMS,
    Command,
    TopicParts,
    command_topic,
    parse_message,
    split_topic,
    uplink_topic,
    write_schemas,
)
from edge_agent.sync.outbox import Fact, Outbox, SealedMessage

from .helpers import REPO

TS = "2026-01-01T00:00:00.000Z"
T0 = parse_rfc3339(TS)
GTIN = "04000000000003"
ULID_ = "01ARZ3NDEKTSV4RRFFQ69G5FAV"

# One valid fact per stream: an item of body.items for batched streams, a whole body otherwise.
SAMPLE_FACTS: dict[str, list[dict[str, Any]]] = {
    "inventory/delta": [
        {"ts": TS, "zone": "backroom", "gtin": GTIN, "delta": 2, "added": ["E2801160600002084A6F1A3B"]},
        {"ts": TS, "zone": "salesfloor", "gtin": GTIN, "delta": -1, "removed": ["E2801160600002084A6F1A3B"]},
    ],
    "inventory/snapshot": [
        {"snapshot_id": ULID_, "as_of_seq": 3, "part": 1, "parts": 1, "reason": "test",
         "items": [{"zone": "backroom", "gtin": GTIN, "qty": 5}]},
    ],
    "inventory/count": [
        {"count_id": ULID_, "zone": "salesfloor", "started": TS, "ended": TS, "book_before": 10, "seen": 9,
         "missing": ["3074257BF7194E4000001A85"], "unexpected": [], "accuracy": 0.9, "outcome": "completed"},
    ],
    "epcis/events": [
        {"@context": "https://ref.gs1.org/standards/epcis/epcis-context.jsonld",
         "eventID": "ni:///sha-256;" + "0" * 64 + "?ver=CBV2.0", "type": "ObjectEvent", "eventTime": TS,
         "eventTimeZoneOffset": "+00:00", "epcList": ["urn:epc:id:sgtin:0614141.812345.6789"], "action": "OBSERVE",
         "bizStep": "arriving", "disposition": "sellable_not_accessible",
         "readPoint": {"id": "urn:epc:id:sgln:9521234.56789.backroom"},
         "bizLocation": {"id": "urn:epc:id:sgln:9521234.56789.backroom"}},
    ],
    "cmd-result": [
        {"ts": TS, "cmd_id": "c1", "name": "inventory.resync", "status": "ok", "reason": None, "detail": {"parts": 1}},
        {"ts": TS, "cmd_id": "?", "name": "price.set", "status": "error", "reason": "unknown command", "detail": {}},
        {"ts": TS, "cmd_id": "*", "name": "*", "status": "error", "reason": "invalid args: bogus", "detail": {},
         "count": 412, "sample_ids": ["a-1", "a-8"]},
    ],
    "esl/alert": [{"ts": TS, "label": "L-1", "kind": "price_mismatch", "detail": "shelf 1.99, book 2.49"}],
    "health": [
        {"uptime_s": 1.5, "connected": True, "pending_facts": 3, "sealed_messages": 1, "db_bytes": 4096,
         "cap_bytes": 1 << 20, "compacted_facts": 0, "coarsened_facts": 0, "dropped_facts": {"traffic/heatmap": 2},
         "quarantined": {"downlink": 1}, "refused_commands": {"invalid_args": 1}, "queued_bytes": 2048,
         "book_bytes": 2048, "counters": {"published_messages": 5.0},
         "alerts": [{"ts": TS, "kind": "outbox.corrupt", "message": "moved aside"}]},
    ],
    "esl/state": [
        {"ts": TS, "label": "L-1", "gtin": GTIN, "price": "1.99", "currency": "EUR", "promo": None,
         "battery_mv": 2900, "rssi": -61, "last_seen": TS, "pending_since": None},
    ],
    "traffic/stats": [
        {"camera": "cam1", "zone": "entrance", "bucket_start": TS, "bucket_s": 60, "entries": 3, "exits": 2,
         "occupancy_min": 0.0, "occupancy_avg": 1.5, "occupancy_max": 3.0, "visits": 4,
         "dwell_edges_s": [10.0, 60.0], "dwell_hist": [1, 2, 1], "dwell_median_s": 35.0},
    ],
    "traffic/heatmap": [
        {"camera": "cam1", "bucket_start": TS, "bucket_s": 60, "cell_m": 0.5, "cols": 2, "rows": 2,
         "cells": [0.0, 1.5, 2.0, 0.0]},
    ],
}
STATUS_BODY = {"state": "online", "agent_version": "0.1.0", "boot_id": ULID_, "connection": 1,
               "seq_floor": {"inventory/delta": 1795586360000},
               "hwm": {"inventory/delta": {"seq": 1795586360004, "id": ULID_}}, "instance": ULID_}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def expected_body(stream: str) -> dict[str, Any]:
    facts = SAMPLE_FACTS[stream]
    return {"items": facts} if STREAMS[stream].batched else facts[0]


def test_every_stream_has_a_sample() -> None:
    assert set(SAMPLE_FACTS) == set(STREAMS)
    assert set(MESSAGE_MODELS) == {s.type for s in STREAMS.values()} | {STATUS_TYPE}


def sealed_messages(tmp: Path, store: str = "S001") -> dict[str, SealedMessage]:
    """Every stream's sample facts sealed through a real outbox."""
    ob = Outbox(tmp / "outbox.db", VirtualClock(T0))
    out = {}
    try:
        for stream, facts in SAMPLE_FACTS.items():
            if STREAMS[stream].batched:
                ob.enqueue(stream, [Fact(ts=T0, body=_dumps(f)) for f in facts])
            else:
                ob.enqueue(stream, [Fact(ts=T0, body=_dumps(facts[0]))])
            msg = ob.seal(stream)
            assert msg is not None
            assert ob.seal(stream) is None  # everything went into the one message
            out[stream] = msg
    finally:
        ob.close()
    return out


@pytest.mark.parametrize("historical", [False, True])
def test_envelope_round_trip_every_stream(tmp_path: Path, historical: bool) -> None:
    sent = T0 + 42.25
    for stream, msg in sealed_messages(tmp_path, store="S-01_x").items():
        payload = msg.payload("S-01_x", sent, historical)
        env = parse_message(payload)
        spec = STREAMS[stream]
        assert type(env) is MESSAGE_MODELS[spec.type]
        assert (env.v, env.type, env.store, env.stream, env.seq) == (1, spec.type, "S-01_x", stream, 1)
        assert env.id == msg.id
        assert env.historical is historical
        assert env.ts.timestamp() == pytest.approx(T0)
        assert env.sent.timestamp() == pytest.approx(sent)
        assert env.body == spec.body.model_validate(expected_body(stream))
        # The body travels byte for byte as the facts were written.
        assert json.loads(payload)["body"] == expected_body(stream)
        # and parsing from str works the same as from bytes
        assert parse_message(payload.decode()) == env


def test_status_round_trip() -> None:
    msg = SealedMessage(STATUS_STREAM, 0, ULID_, STATUS_TYPE, T0, T0, 1, _dumps(STATUS_BODY))
    env = parse_message(msg.payload("S001", T0, False))
    assert type(env) is MESSAGE_MODELS[STATUS_TYPE]
    assert env.stream == STATUS_STREAM and env.seq == 0
    assert env.body.model_dump() == STATUS_BODY  # type: ignore[attr-defined]


def test_store_id_is_json_escaped_in_payload() -> None:
    msg = SealedMessage("health", 1, ULID_, "health", T0, T0, 1, _dumps(SAMPLE_FACTS["health"][0]))
    # A store id that is not a valid StoreId must not be able to inject envelope keys.
    payload = msg.payload('S1","seq":99,"x":"', T0, False)
    assert json.loads(payload)["seq"] == 1
    with pytest.raises(ValidationError):
        parse_message(payload)


def test_message_type_must_match_stream_and_body(tmp_path: Path) -> None:
    msgs = sealed_messages(tmp_path)
    good = json.loads(msgs["inventory/delta"].payload("S001", T0, False))
    wrong_stream = dict(good, stream="traffic/stats")
    with pytest.raises(ValidationError):
        parse_message(_dumps(wrong_stream))
    wrong_body = dict(good, body=expected_body("traffic/heatmap"))
    with pytest.raises(ValidationError):
        parse_message(_dumps(wrong_body))
    unknown = dict(good, type="inventory.teleport")
    with pytest.raises(ValueError, match="unknown message type"):
        parse_message(_dumps(unknown))


# ---------------------------------------------------------------- topics


@pytest.mark.parametrize("prefix", [DEFAULT_PREFIX, "acme", "acme/retail/v2"])
def test_topics_compose_and_split(prefix: str) -> None:
    for stream in [*STREAMS, STATUS_STREAM]:
        t = uplink_topic(prefix, "S001", stream)
        assert t == f"{prefix}/S001/{stream}"
        assert split_topic(prefix, t) == TopicParts("S001", stream, None)
    for name in ["inventory.resync", "price.set"]:
        t = command_topic(prefix, "S-9", name)
        assert t == f"{prefix}/S-9/cmd/{name}"
        assert split_topic(prefix, t) == TopicParts("S-9", "cmd", name)


@pytest.mark.parametrize(
    "topic",
    [
        "retail/v10/S001/inventory/delta",  # a prefix that only starts like ours
        "retail/v/S001/inventory/delta",
        "other/S001/inventory/delta",
        "retail/v1",
        "retail/v1/",
        "retail/v1/S001",
        "retail/v1/S001/",
        "retail/v1//inventory/delta",
        "",
    ],
)
def test_split_rejects_foreign_or_short_topics(topic: str) -> None:
    assert split_topic(DEFAULT_PREFIX, topic) is None


def test_split_command_without_name() -> None:
    assert split_topic(DEFAULT_PREFIX, "retail/v1/S001/cmd/") == TopicParts("S001", "cmd", None)
    # a stream that merely starts with "cmd" is not a command
    assert split_topic(DEFAULT_PREFIX, "retail/v1/S001/cmd-result") == TopicParts("S001", "cmd-result", None)


@settings(max_examples=60, deadline=None)
@given(
    store=st.from_regex(r"^[A-Za-z0-9_-]{1,64}\Z"),
    rest=st.lists(st.from_regex(r"^[a-z0-9._-]{1,12}\Z"), min_size=1, max_size=3).map("/".join),
)
def test_topic_round_trip_property(store: str, rest: str) -> None:
    parts = split_topic(DEFAULT_PREFIX, uplink_topic(DEFAULT_PREFIX, store, rest))
    assert parts is not None and parts.store == store
    if rest.startswith("cmd/"):
        assert (parts.stream, parts.command) == ("cmd", rest[4:])
    else:
        assert (parts.stream, parts.command) == (rest, None)
    cparts = split_topic(DEFAULT_PREFIX, command_topic(DEFAULT_PREFIX, store, rest))
    assert cparts == TopicParts(store, "cmd", rest)


# ---------------------------------------------------------------- JSON Schema export


def expected_schema_files() -> set[str]:
    names = {f"{t}.message.schema.json" for t in MESSAGE_MODELS} | {"command.schema.json", "ack.schema.json"}
    return names | {f"cmd.{n}.args.schema.json" for n in COMMAND_ARGS}


def check_schema_dir(out: Path) -> dict[str, dict[str, Any]]:
    files = {p.name for p in out.iterdir()}
    assert files == expected_schema_files()
    schemas = {}
    for name in files:
        schema = json.loads((out / name).read_text())
        assert schema["$id"].endswith(f"/v1/{name}")
        assert schema["type"] == "object"
        assert "properties" in schema
        schemas[name] = schema
    for t in MESSAGE_MODELS:
        s = schemas[f"{t}.message.schema.json"]
        assert set(s["required"]) >= {"v", "type", "store", "stream", "seq", "id", "ts", "sent", "historical", "body"}
        assert s["properties"]["type"]["const"] == t
        assert s["additionalProperties"] is False
    return schemas


def test_write_schemas_in_process(tmp_path: Path) -> None:
    written = write_schemas(tmp_path / "schemas")
    assert {p.name for p in written} == expected_schema_files()
    check_schema_dir(tmp_path / "schemas")


@pytest.mark.slow
def test_schema_cli_writes_one_schema_per_message_type(tmp_path: Path) -> None:
    out = tmp_path / "schemas"
    r = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "schema", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert {Path(line).name for line in r.stdout.split()} == expected_schema_files()
    check_schema_dir(out)


def test_sealed_messages_validate_against_their_json_schema(tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    out = tmp_path / "schemas"
    write_schemas(out)
    for stream, msg in sealed_messages(tmp_path).items():
        schema = json.loads((out / f"{STREAMS[stream].type}.message.schema.json").read_text())
        doc = json.loads(msg.payload("S001", T0, True))
        jsonschema.validate(doc, schema)
        bad = dict(doc, seq=-1)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        extra = dict(doc, extra=1)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(extra, schema)


# ---------------------------------------------------------------- parsers never crash on garbage

PARSE_ERRORS = (ValidationError, ValueError)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=25,
)
ENVELOPE_KEYS = ["v", "type", "store", "stream", "seq", "id", "ts", "sent", "historical", "body"]
envelope_like = st.dictionaries(
    st.sampled_from(ENVELOPE_KEYS) | st.text(max_size=8), json_values, max_size=12
) | st.fixed_dictionaries(
    {"v": st.just(1), "type": st.sampled_from(sorted(MESSAGE_MODELS)), "store": st.just("S001")},
    optional={k: json_values for k in ENVELOPE_KEYS[3:]},
)


def parse_all(payload: bytes | str) -> None:
    """Both wire parsers: they may reject, but only with a validation error."""
    try:
        parse_message(payload)
    except PARSE_ERRORS:
        pass
    try:
        Command.model_validate_json(payload)
    except PARSE_ERRORS:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_parsers_survive_arbitrary_bytes(data: bytes) -> None:
    parse_all(data)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=512))
def test_parsers_survive_arbitrary_text(data: str) -> None:
    parse_all(data)


@settings(max_examples=200, deadline=None)
@given(json_values | envelope_like)
def test_parsers_survive_json_shaped_input(doc: Any) -> None:
    parse_all(json.dumps(doc))
    parse_all(json.dumps(doc).encode("utf-16"))  # wrong encoding entirely


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _set(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    node = obj
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return obj


def _delete(obj: Any, path: tuple) -> Any:
    node = obj
    for p in path[:-1]:
        node = node[p]
    del node[path[-1]]
    return obj


VALID_ENVELOPES: list[dict[str, Any]] = []
VALID_COMMAND = {"v": 1, "id": "cmd-1", "name": "inventory.resync", "store": "S001", "ts": TS,
                 "args": {"reason": "gap"}}


@pytest.fixture(scope="module", autouse=True)
def _valid_envelopes(tmp_path_factory: pytest.TempPathFactory) -> None:
    msgs = sealed_messages(tmp_path_factory.mktemp("contract"))
    VALID_ENVELOPES[:] = [json.loads(m.payload("S001", T0, False)) for m in msgs.values()]
    status = SealedMessage(STATUS_STREAM, 0, ULID_, STATUS_TYPE, T0, T0, 1, _dumps(STATUS_BODY))
    VALID_ENVELOPES.append(json.loads(status.payload("S001", T0, False)))


mutation = st.sampled_from(["retype", "delete", "extra", "huge", "negative_seq", "huge_seq"])
FREE_DICTS = {"detail", "args", "dropped_facts", "quarantined", "refused_commands", "counters",
              "seq_floor"}  # maps keyed by name (a stream, a counter): any new key with a fitting value is valid
COMMAND_REQUIRED = {"id", "name", "store", "ts"}


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def parses(doc: Any, is_command: bool) -> bool:
    payload = json.dumps(doc)
    try:
        (Command.model_validate_json if is_command else parse_message)(payload)
    except PARSE_ERRORS:
        return False
    return True


ENVELOPE_OPTIONAL = {"prev", "sig"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), kind=mutation, is_command=st.booleans())
def test_parsers_survive_mutated_envelopes(data: st.DataObject, kind: str, is_command: bool) -> None:
    base = VALID_COMMAND if is_command else data.draw(st.sampled_from(VALID_ENVELOPES))
    assert parses(base, is_command)  # the unmutated document is valid
    doc = copy.deepcopy(base)
    paths = _paths(doc)
    must_fail = False
    if kind == "retype":
        path = data.draw(st.sampled_from(paths))
        doc = _set(doc, path, data.draw(json_values))
    elif kind == "delete":
        path = data.draw(st.sampled_from(paths[1:]))
        doc = _delete(doc, path)
        # every envelope key is required but the optional chain and signature; a command needs all but v and args
        must_fail = len(path) == 1 and (path[0] in COMMAND_REQUIRED if is_command else path[0] not in ENVELOPE_OPTIONAL)
    elif kind == "extra":
        dicts = [p for p in paths if isinstance(_get(doc, p), dict) and not (p and p[-1] in FREE_DICTS)]
        path = data.draw(st.sampled_from(dicts))
        node = _get(doc, path)
        key = data.draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in node))
        node[key] = data.draw(json_values)
        must_fail = True  # every model forbids unknown keys
    elif kind == "huge":
        strings = [p for p in paths if isinstance(_get(doc, p), str)]
        path = data.draw(st.sampled_from(strings))
        filler = data.draw(st.sampled_from(["x", "\u00e9", "0"]))
        doc = _set(doc, path, filler * 200_000)
        top = COMMAND_REQUIRED if is_command else {"type", "store", "stream", "id", "ts", "sent"}
        if filler == "0":
            top -= {"ts", "sent"}  # pydantic reads a numeric string as a Unix time; it is still a valid time
        must_fail = path[0] in top
    elif kind == "negative_seq":
        if is_command:
            doc["v"] = data.draw(st.integers(max_value=-1))
        else:
            doc["seq"] = data.draw(st.integers(max_value=-1))
        must_fail = True
    elif kind == "huge_seq" and not is_command:
        doc["seq"] = data.draw(st.integers(min_value=2**63))
    payload = json.dumps(doc)
    parse_all(payload)
    parse_all(payload.encode())
    if must_fail:
        assert not parses(doc, is_command), f"{kind} mutation was accepted: {payload[:300]}"


def test_deeply_nested_json_is_rejected_cleanly() -> None:
    for payload in (b"[" * 100_000, b'{"a":' * 50_000, b'{"v":1,"type":"health","body":' + b"[" * 100_000):
        parse_all(payload)
        with pytest.raises(ValidationError):
            parse_message(payload)
        with pytest.raises(ValidationError):
            Command.model_validate_json(payload)
