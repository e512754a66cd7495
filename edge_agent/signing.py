"""Ed25519 signatures: only a store speaks for itself, only HQ speaks to the stores.

The broker's ACL binds a store's account to its own topics; a signature binds the message itself to
the store's key, so a message is still the store's own after any bridge, replay tool or misconfigured
broker. The rules:

- **Keys.** One Ed25519 key pair per store and one for HQ. A private key is a PKCS8 PEM file, mode
  0600; a public key travels as its 32 raw bytes in base64, one line that fits in a config file.
- **Uplink.** A store signs ``uplink_preimage``: a domain tag naming the contract version, then
  ``type, store, stream, seq, id, prev, ts`` one a line, then the body's bytes exactly as sent.
  ``sent`` and ``historical`` are not signed: they are transport metadata that change when the same
  sealed message is published again, while the signature must not. The signature rides in ``"sig"``,
  just before ``"body"``, which is the last key (see ``split_uplink`` for why that is safe to parse).
- **Downlink.** HQ signs commands and acks (small JSON objects) over their canonical JSON without
  ``"sig"`` (sorted keys, no spaces, UTF-8) behind another domain tag, so an uplink signature can never
  pass for a downlink one or the other way round.
- **Verdicts.** Verification returns None when the message is good, else why not: ``unsigned``,
  ``bad signature``, ``malformed`` or (registry lookups) ``unknown store key``.

A signature proves who wrote a message, not that it is new: replayed commands are the downlink's to
refuse (their ids), replayed uplink messages HQ's (their seq).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

UPLINK_TAG = b"edge-agent/v1 uplink\n"
DOWNLINK_TAG = b"edge-agent/v1 downlink\n"
BODY_MARKER = b',"body":'

UNSIGNED = "unsigned"
BAD_SIGNATURE = "bad signature"
MALFORMED = "malformed"
UNKNOWN_STORE_KEY = "unknown store key"


class MalformedPayload(ValueError):
    """The payload is not a message this module can check."""


# ---------------------------------------------------------------- keys


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    """Strict base64url without padding: one text per byte string, so a signature has one spelling."""
    raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    if _b64url(raw) != text:
        raise ValueError("not canonical unpadded base64url")
    return raw


def public_key_text(key: Ed25519PublicKey) -> str:
    """The public key as config carries it: its 32 raw bytes in standard base64 (44 characters)."""
    return base64.b64encode(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """Inverse of ``public_key_text``; ValueError names what is wrong."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, this is {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a PKCS8 PEM Ed25519 private key (as ``write_keypair`` writes); OSError or ValueError."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (TypeError, UnsupportedAlgorithm) as e:  # encrypted, or a key type this build cannot read
        raise ValueError(str(e)) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"not an Ed25519 key but {type(key).__name__}")
    return key


def write_keypair(directory: Path, name: str) -> tuple[Path, Path, str]:
    """Make a key pair as ``<name>.key`` (PKCS8 PEM, 0600) and ``<name>.pub`` (base64) in ``directory``.

    Returns both paths and the public key text. Refuses to overwrite either file: a store's key is its
    identity at HQ, and replacing it by accident locks the store out until HQ's registry is edited.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    for p in (key_path, pub_path):
        if p.exists():
            raise FileExistsError(f"{p} exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    # Created 0600 (never readable by others, not even for a moment) and exclusively (no race).
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # the umask may only have narrowed it; make it exactly 0600
        f.write(pem)
    text = public_key_text(key.public_key())
    pub_path.write_text(text + "\n")
    return key_path, pub_path, text


def sign(private_key: Ed25519PrivateKey, preimage: bytes) -> str:
    """Ed25519 signature of ``preimage``, base64url without padding (86 characters)."""
    return _b64url(private_key.sign(preimage))


def verify(public_key: Ed25519PublicKey, preimage: bytes, sig: str) -> bool:
    try:
        public_key.verify(_unb64url(sig), preimage)
    except (InvalidSignature, ValueError):  # binascii.Error is a ValueError
        return False
    return True


# ---------------------------------------------------------------- JSON, strictly


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        # Parsers disagree on which duplicate wins; the verifier and the consumer must see one object.
        raise MalformedPayload("duplicate key")
    return out


def _no_constant(name: str) -> Any:
    raise MalformedPayload(f"{name} is not JSON")


def _strict_loads(raw: bytes, *, unique_keys: bool = True) -> Any:
    hook = _unique_keys if unique_keys else None
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=hook, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MalformedPayload(str(e)) from None


# ---------------------------------------------------------------- uplink


def uplink_preimage(type: str, store: str, stream: str, seq: int, id: str, prev: str, ts: str, body: bytes) -> bytes:
    """What a store signs. ``ts`` is the RFC 3339 text as it is in the payload (never re-rendered from a
    datetime), ``prev`` is "" when the message has none, ``body`` the body's bytes as sent.

    No field may hold a newline, so the lines split one way only: the first seven are the fields, the
    rest is the body.
    """
    fields = [type, store, stream, str(seq), id, prev, ts]
    if any("\n" in f for f in fields):
        raise ValueError("a signed field holds a newline")
    return UPLINK_TAG + "\n".join(fields).encode() + b"\n" + body


def split_uplink(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """Split an agent's payload into its header fields and the body's raw bytes.

    The agent writes ``"body"`` as the last key of the envelope, so the body is everything after the
    first ``,"body":`` up to the final ``}``. The signature covers those bytes as they are: HQ never has
    to re-serialise a body (which no two JSON libraries do alike) to check it. Why this split is sound:

    - ``,"body":`` cannot sit inside a JSON string (a quote in a string is escaped), so its first
      occurrence is a key. If that key is nested in some header value, the header text before it
      leaves at least two objects or arrays open and ``<header>}`` does not parse: only the top-level
      key splits.
    - The body bytes must parse as exactly one JSON value. A forger who appends a second
      ``,"body":{...}`` (which many parsers would let win over the signed one) leaves the body text as
      ``{...},"body":{...}``, which does not parse.
    - The header must not hold ``"body"`` under another spelling (``"\\u0062ody"``) nor any key twice,
      so the header read here, the signed body and what HQ's own parser reads are one message.

    Raises MalformedPayload.
    """
    text = payload.rstrip(b" \t\r\n")
    at = text.find(BODY_MARKER)
    if at < 0 or not text.endswith(b"}"):
        raise MalformedPayload('no top-level "body" as the last key')
    header = _strict_loads(text[:at] + b"}")
    if not isinstance(header, dict) or "body" in header:
        raise MalformedPayload('"body" is not the last key of the top-level object')
    body = text[at + len(BODY_MARKER) : -1]
    # Duplicate keys inside the body are not checked: the body is signed as bytes, so only its own
    # store could have put them there; the check would make parsing a 128 KiB body 2.5 times slower.
    _strict_loads(body, unique_keys=False)
    return header, body


def _field(header: Mapping[str, Any], name: str, kind: type) -> Any:
    value = header.get(name)
    if type(value) is not kind:  # bool is an int: a seq of true is not a seq
        raise MalformedPayload(f"{name} is not a {kind.__name__}")
    return value


def _verify_uplink(payload: bytes, key_for: Callable[[str], Ed25519PublicKey | None]) -> str | None:
    try:
        header, body = split_uplink(payload)
    except MalformedPayload:
        # A JSON object that cannot be split but has no "sig" is simply unsigned (json.dumps output, with
        # spaces): HQ may still take it while signatures are not required.
        try:
            whole = _strict_loads(payload)
        except MalformedPayload:
            return MALFORMED
        return UNSIGNED if isinstance(whole, dict) and "sig" not in whole else MALFORMED
    if "sig" not in header:
        return UNSIGNED
    try:
        if _field(header, "v", int) != 1:
            raise MalformedPayload("v is not 1")
        store = _field(header, "store", str)
        prev = header.get("prev", "")
        if type(prev) is not str:
            raise MalformedPayload("prev is not a str")
        preimage = uplink_preimage(
            _field(header, "type", str), store, _field(header, "stream", str), _field(header, "seq", int),
            _field(header, "id", str), prev, _field(header, "ts", str), body,
        )
        sig = _field(header, "sig", str)
    except ValueError:  # MalformedPayload, or a newline in a field
        return MALFORMED
    key = key_for(store)
    if key is None:
        return UNKNOWN_STORE_KEY
    return None if verify(key, preimage, sig) else BAD_SIGNATURE


def verify_uplink(payload: bytes, public_key: Ed25519PublicKey) -> str | None:
    """None if ``payload`` is signed by ``public_key``, else the reason: unsigned, bad signature, malformed."""
    return _verify_uplink(payload, lambda _store: public_key)


# ---------------------------------------------------------------- downlink


def _canonical(obj: Mapping[str, Any]) -> bytes:
    # Python's json.dumps with these settings; an HQ not written in Python must produce the same text
    # (floats as Python's repr, keys sorted by code point).
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_json(obj: Mapping[str, Any], private_key: Ed25519PrivateKey) -> bytes:
    """The payload of a command or ack: ``obj`` with ``"sig"`` over its canonical JSON (any old sig replaced)."""
    unsigned = {k: v for k, v in obj.items() if k != "sig"}
    sig = sign(private_key, DOWNLINK_TAG + _canonical(unsigned))
    return json.dumps({**unsigned, "sig": sig}, separators=(",", ":"), ensure_ascii=False).encode()


def verify_json(payload: bytes, public_key: Ed25519PublicKey) -> str | None:
    """None if the command or ack ``payload`` is signed by ``public_key``, else the reason."""
    try:
        obj = _strict_loads(payload)
        if not isinstance(obj, dict):
            raise MalformedPayload("not a JSON object")
        if "sig" not in obj:
            return UNSIGNED
        sig = _field(obj, "sig", str)
        preimage = DOWNLINK_TAG + _canonical({k: v for k, v in obj.items() if k != "sig"})
    except (MalformedPayload, UnicodeEncodeError):  # a lone surrogate decodes but cannot be re-encoded
        return MALFORMED
    return None if verify(public_key, preimage, sig) else BAD_SIGNATURE


# ---------------------------------------------------------------- HQ's registry


class KeyRegistry:
    """HQ's store id -> public key map. The key is looked up by the store the message claims to be
    from (its signed ``store`` field), so a valid signature means that store's own key signed it."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey]) -> None:
        self._keys = dict(keys)

    @classmethod
    def from_text(cls, keys: Mapping[str, str]) -> KeyRegistry:
        """From config's store -> base64 public key table."""
        return cls({store: parse_public_key(text) for store, text in keys.items()})

    def get(self, store: str) -> Ed25519PublicKey | None:
        return self._keys.get(store)

    def verify_uplink(self, payload: bytes) -> str | None:
        """None if signed by its store's key, else unsigned, bad signature, malformed or unknown store key."""
        return _verify_uplink(payload, self.get)
