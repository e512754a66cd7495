"""Signatures: a change to anything signed fails, transport metadata may change freely, another store's
key fails, the duplicate-body trick fails, garbage never crashes, and keygen's output loads as config."""

from __future__ import annotations

import base64
import json
import os
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edge_agent import cli
from edge_agent.config import HqFileConfig, load_config
from edge_agent.signing import (
    BAD_SIGNATURE,
    MALFORMED,
    UNKNOWN_STORE_KEY,
    UNSIGNED,
    KeyRegistry,
    MalformedPayload,
    load_private_key,
    parse_public_key,
    public_key_text,
    sign,
    sign_json,
    split_uplink,
    uplink_preimage,
    verify,
    verify_json,
    verify_uplink,
    write_keypair,
)

KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
BODY = b'{"items":[{"ts":"2026-11-25T01:48:26.123Z","zone":"salesfloor","gtin":"04000000000006","delta":-1}]}'
SIGNED = ("type", "store", "stream", "seq", "id", "prev", "ts")
FIELDS: dict[str, Any] = {"type": "inventory.delta", "store": "S001", "stream": "inventory/delta", "seq": 5,
                          "id": "01JD0000000000000000000000", "prev": "01JC0000000000000000000000",
                          "ts": "2026-11-25T01:48:26.123Z"}


def compose(key: Ed25519PrivateKey = KEY, body: bytes = BODY, *, sent: str = "2026-11-25T01:48:26.130Z",
            historical: bool = False, order: list[str] | None = None, **fields: Any) -> bytes:
    """A payload as the agent writes it: compact JSON text, "sig" then "body" last, body bytes as given."""
    f = FIELDS | fields
    header: dict[str, Any] = {"v": 1, **{k: v for k, v in f.items() if v is not None}, "sent": sent,
                              "historical": historical}
    if order is not None:
        header = {k: header[k] for k in order}
    sig = sign(key, uplink_preimage(f["type"], f["store"], f["stream"], f["seq"], f["id"], f["prev"] or "",
                                    f["ts"], body))
    text = json.dumps({**header, "sig": sig}, separators=(",", ":"), ensure_ascii=False)
    return text[:-1].encode() + b',"body":' + body + b"}"


def with_header(payload: bytes, **changes: Any) -> bytes:
    """The same payload, body and signature kept, with header fields replaced."""
    header, body = split_uplink(payload)
    text = json.dumps(header | changes, separators=(",", ":"), ensure_ascii=False)
    return text[:-1].encode() + b',"body":' + body + b"}"


line_text = st.text(st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=30)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | line_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(line_text, inner, max_size=4),
    max_leaves=15,
)
bodies = st.dictionaries(line_text, json_values, max_size=5).map(
    lambda d: json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode())


# ---------------------------------------------------------------- uplink


def test_a_signed_payload_verifies() -> None:
    payload = compose()
    assert verify_uplink(payload, KEY.public_key()) is None
    assert verify_uplink(compose(prev=None), KEY.public_key()) is None  # no prev: signed as ""
    assert verify_uplink(payload + b"\n", KEY.public_key()) is None  # trailing whitespace is not content
    header, body = split_uplink(payload)
    assert body == BODY
    assert header["seq"] == 5 and header["sent"] == "2026-11-25T01:48:26.130Z" and "body" not in header


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(SIGNED), text=line_text, seq=st.integers(min_value=0, max_value=2**70))
def test_any_change_to_a_signed_field_fails(field: str, text: str, seq: int) -> None:
    new: Any = seq if field == "seq" else text
    assume(new != FIELDS[field])
    assert verify_uplink(with_header(compose(), **{field: new}), KEY.public_key()) == BAD_SIGNATURE


def test_dropping_prev_or_the_version_fails() -> None:
    header, body = split_uplink(compose())
    del header["prev"]
    text = json.dumps(header, separators=(",", ":"))
    assert verify_uplink(text[:-1].encode() + b',"body":' + body + b"}", KEY.public_key()) == BAD_SIGNATURE
    assert verify_uplink(with_header(compose(), v=2), KEY.public_key()) == MALFORMED
    assert verify_uplink(with_header(compose(), v=True), KEY.public_key()) == MALFORMED


@settings(max_examples=300)
@given(body=bodies, data=st.data())
def test_any_change_to_a_byte_of_the_body_fails(body: bytes, data: st.DataObject) -> None:
    payload = compose(body=body)
    assert verify_uplink(payload, KEY.public_key()) is None
    start = payload.index(b',"body":') + len(b',"body":')
    at = data.draw(st.integers(min_value=start, max_value=len(payload) - 2), label="byte")
    byte = data.draw(st.integers(min_value=0, max_value=255).filter(lambda b: b != payload[at]), label="value")
    tampered = payload[:at] + bytes([byte]) + payload[at + 1 :]
    assert verify_uplink(tampered, KEY.public_key()) in (BAD_SIGNATURE, MALFORMED)


@settings(max_examples=200)
@given(sent=line_text, historical=st.booleans(), order=st.permutations(["v", *SIGNED, "sent", "historical"]))
def test_sent_historical_and_key_order_are_not_signed(sent: str, historical: bool, order: list[str]) -> None:
    payload = compose()
    moved = compose(order=order, sent=sent, historical=historical)
    assert moved != payload or (sent, historical) == ("2026-11-25T01:48:26.130Z", False)
    assert verify_uplink(moved, KEY.public_key()) is None
    # and changing them on the wire, after signing, still verifies: a resend is the same message
    assert verify_uplink(with_header(payload, sent=sent, historical=historical), KEY.public_key()) is None


def test_another_stores_key_fails() -> None:
    payload = compose()
    assert verify_uplink(payload, OTHER.public_key()) == BAD_SIGNATURE
    registry = KeyRegistry({"S001": KEY.public_key(), "S002": OTHER.public_key()})
    assert registry.verify_uplink(payload) is None
    # S001 signing a message that claims to be S002's: looked up by the claimed store, it fails.
    assert registry.verify_uplink(compose(KEY, store="S002")) == BAD_SIGNATURE
    assert registry.verify_uplink(compose(OTHER, store="S002")) is None
    assert registry.verify_uplink(compose(KEY, store="S003")) == UNKNOWN_STORE_KEY
    assert KeyRegistry.from_text({"S001": public_key_text(KEY.public_key())}).verify_uplink(payload) is None


def test_a_second_body_key_fails() -> None:
    payload = compose()
    forged_body = b'{"items":[{"ts":"2026-11-25T01:48:26.123Z","zone":"salesfloor","gtin":"04000000000006","delta":1000}]}'
    # Appended after the signed body: most parsers would let the last "body" win.
    appended = payload[:-1] + b',"body":' + forged_body + b"}"
    assert json.loads(appended)["body"] == json.loads(forged_body)
    assert verify_uplink(appended, KEY.public_key()) == MALFORMED
    # Put before the signed one under another spelling of the key.
    header, body = split_uplink(payload)
    text = json.dumps(header, separators=(",", ":"))[:-1] + ',"\\u0062ody":' + forged_body.decode()
    assert verify_uplink(text.encode() + b',"body":' + body + b"}", KEY.public_key()) == MALFORMED
    # Any header key twice (here seq, escaped): parsers disagree on which one wins.
    text = json.dumps(header, separators=(",", ":"))[:-1] + ',"\\u0073eq":6'
    assert verify_uplink(text.encode() + b',"body":' + body + b"}", KEY.public_key()) == MALFORMED
    # A "body" key nested in a header value does not split the message.
    nested = payload.replace(b'{"v":1,', b'{"v":1,"x":{"a":1,"body":{}},', 1)
    assert verify_uplink(nested, KEY.public_key()) == MALFORMED


def test_unsigned_and_malformed_are_told_apart() -> None:
    header, body = split_uplink(compose())
    del header["sig"]
    unsigned = json.dumps(header, separators=(",", ":"))[:-1].encode() + b',"body":' + body + b"}"
    assert verify_uplink(unsigned, KEY.public_key()) == UNSIGNED
    # An older agent's json.dumps, with spaces, is unsigned too, not malformed.
    assert verify_uplink(json.dumps(header | {"body": json.loads(body)}).encode(), KEY.public_key()) == UNSIGNED
    for bad in (b"", b"not json", b'{"sig":"x"}', b'[1,"body":2]', compose()[:-1],
                with_header(compose(), seq="5"), with_header(compose(), seq=True), with_header(compose(), seq=5.0),
                with_header(compose(), sig=7), with_header(compose(), ts=None), with_header(compose(), type="a\nb"),
                compose(body=b'{"a":NaN}'), compose(body=b"{\xff}"), compose(body=b"[" * 100_000 + b"]" * 100_000)):
        assert verify_uplink(bad, KEY.public_key()) == MALFORMED, bad[:80]


@settings(max_examples=500)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_garbage_never_crashes(payload: bytes) -> None:
    assert verify_uplink(payload, KEY.public_key()) in (UNSIGNED, MALFORMED, BAD_SIGNATURE)
    assert verify_json(payload, KEY.public_key()) in (UNSIGNED, MALFORMED, BAD_SIGNATURE)
    try:
        split_uplink(payload)
    except MalformedPayload:
        pass


def test_preimage_is_the_documented_bytes() -> None:
    assert uplink_preimage("t", "S001", "inventory/delta", 42, "01J", "", "2026-01-01T00:00:00Z", b'{"x":1}') == (
        b"edge-agent/v1 uplink\nt\nS001\ninventory/delta\n42\n01J\n\n2026-01-01T00:00:00Z\n" + b'{"x":1}')
    with pytest.raises(ValueError):
        uplink_preimage("t", "S001\n", "s", 1, "i", "", "ts", b"{}")


def test_a_signature_has_one_spelling() -> None:
    sig = sign(KEY, b"m")
    assert len(sig) == 86 and "=" not in sig
    assert verify(KEY.public_key(), b"m", sig)
    raw = base64.urlsafe_b64decode(sig + "==")
    for other in (sig + "==", base64.urlsafe_b64encode(raw).decode(), base64.b64encode(raw).decode().rstrip("="),
                  sig[:-1] + chr(ord(sig[-1]) + 1), sig + " ", "", "!" * 86):
        if other != sig:
            assert not verify(KEY.public_key(), b"m", other), other


# ---------------------------------------------------------------- downlink


COMMAND = {"v": 1, "id": "hq-7731", "name": "price.set", "store": "S001", "ts": "2026-11-25T06:00:00Z",
           "args": {"gtin": "09506000134352", "price": "2.99", "currency": "EUR", "duration_s": 1.5, "note": "é"}}


def test_commands_round_trip_in_any_key_order() -> None:
    payload = sign_json(COMMAND, KEY)
    assert verify_json(payload, KEY.public_key()) is None
    obj = json.loads(payload)
    reordered = json.dumps(dict(reversed(list(obj.items()))), indent=2).encode()  # spaces, \u escapes
    assert verify_json(reordered, KEY.public_key()) is None
    assert verify_json(payload, OTHER.public_key()) == BAD_SIGNATURE
    assert verify_json(json.dumps(COMMAND).encode(), KEY.public_key()) == UNSIGNED
    assert verify_json(sign_json(obj, OTHER), OTHER.public_key()) is None  # an old sig is replaced


@settings(max_examples=200)
@given(obj=st.dictionaries(line_text.filter(lambda k: k != "sig"), json_values, max_size=6), data=st.data())
def test_any_change_to_a_command_fails(obj: dict[str, Any], data: st.DataObject) -> None:
    payload = sign_json(obj, KEY)
    assert verify_json(payload, KEY.public_key()) is None
    signed = json.loads(payload)
    key = data.draw(st.sampled_from(sorted(signed)), label="key")
    new = data.draw(json_values, label="value")
    assume(key != "sig" and json.dumps(new) != json.dumps(signed[key]))
    assert verify_json(json.dumps(signed | {key: new}).encode(), KEY.public_key()) == BAD_SIGNATURE


def test_commands_with_duplicate_keys_or_an_uplink_signature_fail() -> None:
    payload = sign_json(COMMAND, KEY)
    assert verify_json(payload[:-1] + b',"store":"S002"}', KEY.public_key()) == MALFORMED
    assert verify_json(b"[1]", KEY.public_key()) == MALFORMED
    assert verify_json(b'{"sig":1}', KEY.public_key()) == MALFORMED
    assert verify_json(b'{"a":"\\ud800","sig":"x"}', KEY.public_key()) == MALFORMED
    # Domain separation: a store's uplink signature over the same bytes is no command signature.
    canonical = json.dumps(COMMAND, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    forged = json.dumps(COMMAND | {"sig": sign(KEY, b"edge-agent/v1 uplink\n" + canonical)}).encode()
    assert verify_json(forged, KEY.public_key()) == BAD_SIGNATURE


# ---------------------------------------------------------------- keys and keygen


def test_keypair_files(tmp_path: Path) -> None:
    key_path, pub_path, text = write_keypair(tmp_path / "keys", "S001")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert pub_path.read_text() == text + "\n"
    assert key_path.read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS8
    key = load_private_key(key_path)
    assert public_key_text(key.public_key()) == text
    assert len(base64.b64decode(text)) == 32
    with pytest.raises(FileExistsError):
        write_keypair(tmp_path / "keys", "S001")
    assert load_private_key(key_path) is not None  # untouched


def test_bad_keys_are_refused(tmp_path: Path) -> None:
    for text, why in (("not base64!", "not base64"), (base64.b64encode(b"x" * 31).decode(), "32 bytes")):
        with pytest.raises(ValueError, match=why):
            parse_public_key(text)
    rsa = tmp_path / "rsa.key"
    rsa.write_bytes(generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    locked = tmp_path / "locked.key"
    locked.write_bytes(KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"pw")))
    (tmp_path / "junk.key").write_text("junk")
    for p in (rsa, locked, tmp_path / "junk.key"):
        with pytest.raises(ValueError):
            load_private_key(p)


def test_keygen_output_is_the_config_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keys"
    assert cli.main(["keygen", "--out", str(out), "--name", "S001"]) == 0
    line, err = capsys.readouterr()
    assert "S001.key" in err and "0600" in err
    assert stat.S_IMODE((out / "S001.key").stat().st_mode) == 0o600
    assert tomllib.loads(line) == {"S001": (out / "S001.pub").read_text().strip()}
    # HQ's pair: the line is for the stores' [signing] table.
    assert cli.main(["keygen", "--out", str(out)]) == 0
    hq_line, _ = capsys.readouterr()
    assert tomllib.loads(hq_line) == {"hq_public_key": (out / "hq.pub").read_text().strip()}
    # Pasted into HQ's registry (here appended to a keys_file), the store's key checks its messages.
    (tmp_path / "stores.toml").write_text(line)
    conf = tmp_path / "hq.toml"
    conf.write_text('[hq.signing]\nrequire_signatures = true\nkeys_file = "stores.toml"\nkey_file = "keys/hq.key"\n')
    cfg = load_config(conf, env={}, model=HqFileConfig)
    registry = KeyRegistry.from_text(cfg.hq.signing.keys)
    assert registry.verify_uplink(compose(load_private_key(out / "S001.key"))) is None
    assert registry.verify_uplink(compose(KEY)) == BAD_SIGNATURE
    assert cfg.hq.signing.key_file == tmp_path / "keys" / "hq.key"
    # Never overwrites a key; refuses a name that is no store id.
    before = (out / "S001.key").read_bytes()
    assert cli.main(["keygen", "--out", str(out), "--name", "S001"]) == 1
    assert (out / "S001.key").read_bytes() == before
    assert cli.main(["keygen", "--out", str(out), "--name", "../S001"]) == 2
    assert "exists" in capsys.readouterr().err
    assert not (tmp_path / "S001.key").exists()
    assert sorted(os.listdir(out)) == ["S001.key", "S001.pub", "hq.key", "hq.pub"]
