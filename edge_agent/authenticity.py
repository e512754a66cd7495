"""Who signs and who checks what, from config: the policy around ``signing``'s primitives.

- The store signs every sealed message (once, when it is sealed, so a resend carries the same
  signature) and its status birth, when ``signing.key_file`` is set.
- HQ signs its commands and acks when ``hq.signing.key_file`` is set, and checks the stores'
  messages against ``hq.signing.keys``: a message that carries a signature must verify; an unsigned
  one is accepted only while ``require_signatures`` is off.
- The store checks HQ's commands and acks against ``signing.hq_public_key`` by the same rule, with
  ``require_signed_commands`` in place of ``require_signatures``. An ack decides what the store may
  forget, so it is held to the same standard as a command.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import signing
from .clock import rfc3339
from .config import HqSigningConfig, SigningConfig
from .sync.outbox import SealedMessage

UplinkCheck = Callable[[str, bytes], str | None]  # (store, payload) -> None if acceptable, else why not
DownlinkCheck = Callable[[bytes], str | None]


class StoreSigner:
    """Signs what one store sends."""

    def __init__(self, key: Ed25519PrivateKey, store: str) -> None:
        self._key = key
        self.store = store

    def sealed(self, msg: SealedMessage) -> str:
        return self.raw(msg.type, msg.stream, msg.seq, msg.id, msg.prev, rfc3339(msg.ts), msg.body.encode())

    def raw(self, type_: str, stream: str, seq: int, msg_id: str, prev: str, ts: str, body: bytes) -> str:
        return signing.sign(self._key, signing.uplink_preimage(type_, self.store, stream, seq, msg_id, prev, ts, body))


def store_signer(cfg: SigningConfig, store: str) -> StoreSigner | None:
    return StoreSigner(signing.load_private_key(cfg.key_file), store) if cfg.key_file else None


def _lenient(reason: str | None, required: bool) -> str | None:
    return None if reason == signing.UNSIGNED and not required else reason


def downlink_check(cfg: SigningConfig) -> DownlinkCheck | None:
    """The store's check of HQ's commands and acks (None: nothing to check against)."""
    if cfg.hq_public_key is None:
        return None
    key: Ed25519PublicKey = signing.parse_public_key(cfg.hq_public_key)
    return lambda payload: _lenient(signing.verify_json(payload, key), cfg.require_signed_commands)


def uplink_check(cfg: HqSigningConfig) -> UplinkCheck | None:
    """HQ's check of a store's message (None: no keys and nothing required)."""
    if not cfg.keys and not cfg.require_signatures:
        return None
    registry = signing.KeyRegistry.from_text(cfg.keys)

    def check(_store: str, payload: bytes) -> str | None:
        # The registry looks the key up by the store the signed fields name; the applier has already
        # checked that this is the store of the topic.
        return _lenient(registry.verify_uplink(payload), cfg.require_signatures)

    return check


def hq_encoder(cfg: HqSigningConfig) -> Callable[[dict[str, Any]], bytes] | None:
    """HQ's signer of commands and acks (None: they go unsigned)."""
    if cfg.key_file is None:
        return None
    key = signing.load_private_key(cfg.key_file)
    return lambda obj: signing.sign_json(obj, key)
