"""The small interface between the ESL engine and a store's label controller (an access point or a
vendor gateway). An adapter turns its controller's protocol into these models; the engine never sees
HTTP, so adding a VUSION or Pricer gateway means one new adapter and no engine change."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from ..contract import Currency, Gtin, LabelId, Price


class LabelReport(BaseModel):
    """What the controller says about one label right now."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: LabelId  # the label's MAC, upper-case hex
    last_seen: datetime | None = None
    battery_mv: int | None = Field(default=None, ge=0, le=10_000)
    rssi: int | None = Field(default=None, ge=-150, le=20)
    lqi: int | None = Field(default=None, ge=0, le=255)
    pending: bool = False  # content is waiting on the controller for the label to fetch it
    # The controller's hash of the content the label last confirmed; None when what the controller reports
    # is not a hash of content (the firmware zeroes it, or puts a command's payload there).
    content_hash: str | None = None
    # How many transfers the label has confirmed, as the controller counts them (None: not reported).
    # A count that moved is the only clock-free proof that a transfer completed after a send.
    update_count: int | None = Field(default=None, ge=0)
    # The label restarted since it last confirmed a transfer: its own boot screen replaced what it showed.
    rebooted: bool = False
    # The controller's clock was not set when it stamped this report, so ``last_seen`` is unknown.
    clock_unset: bool = False


class LabelContent(BaseModel):
    """What the agent wants one label to show."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gtin: Gtin
    price: Price  # decimal string, e.g. "3.49": prices are never floats
    currency: Currency
    promo: str | None = None
    pick: bool = False  # a BOPIS pick request: the label flashes / shows "PICK"
    stock_note: str | None = None  # e.g. "LOW STOCK", when configured

    def digest(self) -> str:
        """A stable id of this content, independent of any controller."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Rejected:
    """A controller record the adapter could not accept, kept for the quarantine."""

    raw: str
    reason: str


@dataclass
class PollResult:
    reports: list[LabelReport] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


@dataclass(frozen=True)
class SendReceipt:
    """The controller accepted content for a label. ``content_hash`` is the hash the controller will
    report once the label holds this content, if the controller can tell in advance; otherwise it is
    None and ``hash_before`` and ``count_before`` are what the controller reported for the label just
    after accepting: the engine (``reconcile``) says what later report counts as evidence."""

    label: str
    content_hash: str | None
    hash_before: str | None = None
    count_before: int | None = None


class ControllerError(Exception):
    """The controller could not be reached or refused a request; the engine retries with backoff."""


class EslController(Protocol):
    def poll(self) -> PollResult:
        """Every label the controller knows, with bad records set aside (never raised)."""
        ...

    def send(self, label: str, content: LabelContent, flash: bool = False) -> SendReceipt:
        """Hand content to the controller for one label, and with ``flash`` also have its LED flash
        (best effort). Raises ControllerError."""
        ...
