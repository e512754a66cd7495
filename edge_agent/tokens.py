"""API tokens, shared by HQ's write API and the store's RFID intake: who presented which token.

A token is 32 random bytes (URL-safe base64); the server keeps only ``sha256:<hex>`` of it, under a name
(HQ: the "who" of its audit log; the intake: the reader's id). A fast hash is enough: there is nothing to
guess in 32 random bytes. Every stored hash is compared with ``hmac.compare_digest``, each one, so the
time taken says nothing about which one came close.

Two ways to present one: ``Authorization: Bearer <token>``, or HTTP basic auth (RFC 7617) with the name as
user and the token as password, for reader firmware whose HTTP client knows only that.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Mapping

TOKEN_BYTES = 32
_NO_HASH = "sha256:" + "0" * 64  # compared against for an unknown basic-auth user, so it takes as long


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def token_owner(authorization: str | None, tokens: Mapping[str, str]) -> str | None:
    """The name of the token in an ``Authorization: Bearer`` header, or None."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    presented = token_hash(token.strip())
    owner = None
    for name, stored in tokens.items():  # every one compared: no early exit to time
        if hmac.compare_digest(presented, stored):
            owner = name
    return owner


def credential_owner(authorization: str | None, tokens: Mapping[str, str]) -> str | None:
    """Bearer as ``token_owner``, or ``Basic base64(name:token)`` whose token is that name's; else None."""
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return token_owner(authorization, tokens)
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    stored = tokens.get(user)
    matches = hmac.compare_digest(token_hash(password), stored or _NO_HASH)
    return user if sep and stored is not None and matches else None
