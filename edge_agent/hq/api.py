"""HQ's HTTP API rules, apart from the HTTP plumbing: who may write, what a write may say, how lists page.

- **Writes have an owner.** ``POST /cmd`` and ``POST /prices`` need ``Authorization: Bearer <token>``.
  HQ keeps only ``sha256:<hex>`` of each token, under a name (the "who" of the audit log); a token is
  32 random bytes, so a fast hash is enough (nothing to guess), and every stored hash is compared with
  ``hmac.compare_digest``, so the time taken says nothing about which one came close.
- **No simple requests.** A write must be ``Content-Type: application/json``: a browser sends that
  (and an ``Authorization`` header) from another origin only after a CORS preflight, which HQ never
  answers, so a web page in an operator's browser cannot send a command.
- **Names are checked before anything goes out.** A store HQ has never heard of is 404; a command name
  the stores do not know, or arguments its model refuses, is 422.
- **Every list is a page.** ``limit`` (capped) and an opaque ``cursor``; a page that may have more says
  where the next one is (``next``), and no request returns more than the cap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ..contract import PriceSetArgs, StoreId
from ..tokens import new_token, token_hash, token_owner  # noqa: F401 -- HQ's API rules, re-exported here

PAGE_DEFAULT = 100
PAGE_MAX = 500
MAX_PRICE_STORES = 10_000  # a chain's stores, with room: one call for a chain-wide price change


def is_json(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == "application/json"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CommandRequest(_Request):
    """POST /cmd: one command to one store."""

    store: StoreId
    name: Annotated[str, StringConstraints(max_length=64)]
    args: dict[str, Any] = Field(default_factory=dict)


class PricesRequest(_Request):
    """POST /prices: one price (a price.set) for many stores; ``"all"`` is every store HQ knows."""

    stores: Annotated[list[StoreId], Field(min_length=1, max_length=MAX_PRICE_STORES)] | Literal["all"]
    price: PriceSetArgs


class PageQuery(_Request):
    limit: int = Field(PAGE_DEFAULT, ge=1, le=PAGE_MAX)
    cursor: Annotated[str, StringConstraints(max_length=128)] | None = None


def page_query(q: Mapping[str, list[str]]) -> PageQuery:
    """``limit`` and ``cursor`` of a query string (ValidationError if bad; other keys are the caller's)."""
    return PageQuery.model_validate({k: q[k][0] for k in ("limit", "cursor") if k in q})


def next_link(path: str, q: Mapping[str, list[str]], page: PageQuery, got: int, cursor: str | None) -> str | None:
    """Where the next page is: only when this one came full (a short page is the last)."""
    if got < page.limit or cursor is None:
        return None
    keep = {k: v[0] for k, v in q.items() if k not in ("cursor", "limit")}
    return f"{path}?{urlencode(keep | {'limit': page.limit, 'cursor': cursor})}"
