"""Wire contract v1: topics, the envelope, one pydantic model per message type, JSON Schema export.

Topic: ``{prefix}/{store}/{stream}`` uplink, ``{prefix}/{store}/cmd/{name}`` downlink.
Envelope: ``{"v":1,"type","store","stream","seq","id","ts","sent","historical","body"}``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

CONTRACT_VERSION = 1
DEFAULT_PREFIX = "retail/v1"

StoreId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Gtin = Annotated[str, StringConstraints(pattern=r"^[0-9]{8,14}$")]
Epc = Annotated[str, StringConstraints(pattern=r"^[0-9A-Fa-f]{8,124}$")]
Ulid = Annotated[str, StringConstraints(pattern=r"^[0-9A-HJKMNP-TV-Z]{26}$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Priority(IntEnum):
    """Outbox priority classes: lower drains first and is dropped last."""

    INVENTORY = 0
    ESL = 1
    TRAFFIC_STATS = 2
    HEATMAP = 3


# ---------------------------------------------------------------- bodies


class InventoryDeltaItem(Strict):
    ts: datetime
    zone: Name
    gtin: Gtin
    delta: int
    added: list[Epc] = Field(default_factory=list)
    removed: list[Epc] = Field(default_factory=list)


class InventoryDeltaBody(Strict):
    items: list[InventoryDeltaItem]


class StockLevel(Strict):
    zone: Name
    gtin: Gtin
    qty: int


class InventorySnapshotBody(Strict):
    """The whole book as of ``as_of_seq`` of the store's inventory/delta stream, in ``parts`` messages."""

    snapshot_id: str
    as_of_seq: int = Field(ge=0)
    # The id of the delta message at as_of_seq: HQ installs the snapshot only onto that same message, so
    # a snapshot from another timeline (a cloned box, a rewound outbox) cannot be mixed into this one.
    as_of_id: Ulid | Literal[""] = ""
    part: int = Field(ge=1)
    parts: int = Field(ge=1)
    reason: str
    items: list[StockLevel]


class InventoryCountBody(Strict):
    """The result of a cycle count of one zone: tags on the book that were not seen are missing."""

    count_id: str
    zone: Name
    started: datetime
    ended: datetime
    book_before: int = Field(ge=0)
    seen: int = Field(ge=0)
    missing: list[Epc]
    unexpected: list[Epc]
    accuracy: float = Field(ge=0, le=1)
    outcome: Literal["completed", "aborted"] = "completed"


class EpcisLocation(Strict):
    id: str


EPCIS_CONTEXT = "https://ref.gs1.org/standards/epcis/epcis-context.jsonld"


class EpcisObjectEvent(Strict):
    """An EPCIS 2.0 ObjectEvent in its JSON-LD form, for HQ systems that speak EPCIS (built by
    edge_agent/rfid/epcis.py). ``eventID`` is the CBV 2.0 event hash; ``@context`` and ``eventID`` are
    optional here only so that events of agents from before they were added still parse."""

    # "@context" is no Python name: the field is "context", written and read as "@context".
    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_alias=True, validate_by_name=False,
                              serialize_by_alias=True)

    context: str | list[str] | None = Field(None, alias="@context")
    eventID: Annotated[str, StringConstraints(pattern=r"^(ni:///sha-256;[0-9a-f]{64}\?ver=CBV2\.0|urn:uuid:.+)$")] | None = None
    type: Literal["ObjectEvent"] = "ObjectEvent"
    eventTime: datetime
    eventTimeZoneOffset: str = "+00:00"
    epcList: list[str]
    # OBSERVE is all this agent sends (an arrival or a sale observes an object, it neither makes nor ends
    # one); ADD and DELETE are still accepted from agents from before that.
    action: Literal["ADD", "OBSERVE", "DELETE"]
    bizStep: str
    disposition: str | None = None
    readPoint: EpcisLocation
    bizLocation: EpcisLocation | None = None


class EpcisEventsBody(Strict):
    items: list[EpcisObjectEvent]


class TrafficStatsItem(Strict):
    camera: Name  # "*" for store-wide
    zone: Name | None = None
    bucket_start: datetime
    bucket_s: int = Field(gt=0)
    entries: int = Field(ge=0)
    exits: int = Field(ge=0)
    occupancy_min: float = Field(ge=0)
    occupancy_avg: float = Field(ge=0)
    occupancy_max: float = Field(ge=0)
    visits: int = Field(ge=0)
    dwell_edges_s: list[float] = Field(default_factory=list)
    dwell_hist: list[int] = Field(default_factory=list)
    dwell_median_s: float | None = None


class TrafficStatsBody(Strict):
    items: list[TrafficStatsItem]


class Door(Strict):
    """A counting line of the floor plan, end to end in metres: where people enter and leave."""

    name: Name
    a: tuple[float, float]
    b: tuple[float, float]


class TrafficHeatmapItem(Strict):
    """Person-seconds per floor cell, row-major; numbers only, never pixels. ``origin`` is the floor
    point (metres) of cell (row 0, col 0)'s corner, and ``doors`` the counting lines in the same floor
    metres, so a reader can draw the grid to scale with the doors on it (both optional: older agents
    send neither)."""

    camera: Name
    bucket_start: datetime
    bucket_s: int = Field(gt=0)
    cell_m: float = Field(gt=0)
    cols: int = Field(gt=0)
    rows: int = Field(gt=0)
    cells: list[float]
    origin: tuple[float, float] | None = None
    doors: list[Door] = Field(default_factory=list, max_length=64)


class TrafficHeatmapBody(Strict):
    items: list[TrafficHeatmapItem]


class EslStateItem(Strict):
    ts: datetime
    label: Name
    gtin: Gtin | None = None
    price: str | None = None
    currency: str | None = None
    promo: str | None = None
    battery_mv: int | None = None
    rssi: int | None = None
    lqi: int | None = None
    last_seen: datetime | None = None
    pending_since: datetime | None = None
    pick: bool = False  # flashing "PICK" for an online order
    matches_hq: bool | None = None  # shows HQ's price in effect; None if HQ has no price for its GTIN


class EslStateBody(Strict):
    items: list[EslStateItem]


class EslAlertItem(Strict):
    ts: datetime
    label: Name
    kind: Literal["price_mismatch", "stuck_pending", "low_battery", "label_silent"]
    detail: str = ""


class EslAlertBody(Strict):
    items: list[EslAlertItem]


class CmdResultItem(Strict):
    ts: datetime
    cmd_id: str
    name: str
    status: Literal["ok", "error"]
    reason: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict)
    # Commands refused for one reason within a second (a flood) share one result: cmd_id "*", how many
    # they were, and the ids of the first few (the reason is the first one's). Without these fields a
    # result answers the one command cmd_id names.
    count: int = Field(1, ge=1)
    sample_ids: list[str] = Field(default_factory=list)


class CmdResultBody(Strict):
    items: list[CmdResultItem]


class Alert(Strict):
    ts: datetime
    kind: str
    message: str


class Mark(Strict):
    """A position in one stream: a seq and the id of the message that holds it."""

    seq: int = Field(ge=0)
    id: Ulid | Literal[""] = ""


class HealthBody(Strict):
    uptime_s: float
    connected: bool
    pending_facts: int
    sealed_messages: int
    db_bytes: int  # the file's pages in use: queued_bytes + book_bytes
    cap_bytes: int  # budgets queued_bytes
    queued_bytes: int | None = None  # what waits to be sent: pending facts, messages not yet acknowledged
    book_bytes: int | None = None  # the rest: inventory book, tag presence, price book, commands, quarantine
    compacted_facts: int
    coarsened_facts: int
    dropped_facts: dict[str, int]
    quarantined: dict[str, int]
    refused_commands: dict[str, int] = Field(default_factory=dict)  # per kind of refusal (sync/downlink.py)
    counters: dict[str, float] = Field(default_factory=dict)
    alerts: list[Alert] = Field(default_factory=list)
    # Per stream, the last sealed message (the high-water mark): HQ asks for a replay when it holds less.
    hwm: dict[str, Mark] = Field(default_factory=dict)
    # How long the oldest fact HQ has not acknowledged has waited (seconds; 0 when nothing waits), and the
    # store's IANA time zone ([store] timezone), so HQ shows its local times. Optional: older agents omit them.
    oldest_unsent_s: float | None = Field(None, ge=0)
    timezone: str | None = Field(None, max_length=64)


class StatusBody(Strict):
    state: Literal["online", "offline"]
    agent_version: str
    boot_id: str
    connection: int
    # Per stream, the first seq of an outbox rebuilt after corruption: numbers below it were never sent
    # by this outbox, so a gap up to it is a restart (resync inventory), not messages lost in transit.
    seq_floor: dict[str, int] = Field(default_factory=dict)
    hwm: dict[str, Mark] = Field(default_factory=dict)  # as in health, at the moment of connecting
    instance: str = ""  # the outbox's own id, made once when its file is created: a copy carries it along


# ---------------------------------------------------------------- streams


@dataclass(frozen=True)
class StreamSpec:
    name: str
    type: str
    body: type[BaseModel]
    priority: Priority
    batched: bool  # facts are items of body.items; otherwise a fact is a whole body
    droppable: bool  # may be dropped under the disk cap (counted in health)
    drop_order: int = 0  # lower is dropped first


STREAMS: dict[str, StreamSpec] = {
    s.name: s
    for s in (
        StreamSpec("inventory/delta", "inventory.delta", InventoryDeltaBody, Priority.INVENTORY, True, False),
        StreamSpec("inventory/snapshot", "inventory.snapshot", InventorySnapshotBody, Priority.INVENTORY, False, False),
        StreamSpec("inventory/count", "inventory.count", InventoryCountBody, Priority.INVENTORY, False, False),
        StreamSpec("epcis/events", "epcis.events", EpcisEventsBody, Priority.INVENTORY, True, False),
        StreamSpec("cmd-result", "cmd.result", CmdResultBody, Priority.INVENTORY, True, False),
        StreamSpec("esl/alert", "esl.alert", EslAlertBody, Priority.ESL, True, False),
        StreamSpec("health", "health", HealthBody, Priority.ESL, False, False),
        StreamSpec("esl/state", "esl.state", EslStateBody, Priority.ESL, True, True, drop_order=3),
        StreamSpec("traffic/stats", "traffic.stats", TrafficStatsBody, Priority.TRAFFIC_STATS, True, True, drop_order=2),
        StreamSpec("traffic/heatmap", "traffic.heatmap", TrafficHeatmapBody, Priority.HEATMAP, True, True, drop_order=1),
    )
}
STATUS_STREAM = "status"
STATUS_TYPE = "status"
ITEM_MODELS: dict[str, type[BaseModel]] = {
    "epcis/events": EpcisObjectEvent,
    "inventory/delta": InventoryDeltaItem,
    "cmd-result": CmdResultItem,
    "esl/alert": EslAlertItem,
    "esl/state": EslStateItem,
    "traffic/stats": TrafficStatsItem,
    "traffic/heatmap": TrafficHeatmapItem,
}


# ---------------------------------------------------------------- envelope


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid")

    v: Literal[1]
    type: str
    store: StoreId
    stream: str
    seq: int = Field(ge=0)
    id: Annotated[str, StringConstraints(pattern=r"^[0-9A-HJKMNP-TV-Z]{26}$")]
    ts: datetime
    sent: datetime
    historical: bool
    # The id of the message before this one in the stream ("" for the first, or when it is unknown):
    # a chain that makes a store that went back in time visible at the first message past HQ's position.
    prev: Ulid | Literal[""] = ""
    sig: str | None = None  # Ed25519 over the fields that matter (edge_agent.signing), when the store signs
    body: dict[str, Any]


def _typed_envelope(spec_type: str, stream: str, body: type[BaseModel]) -> type[Envelope]:
    cls_name = "".join(p.capitalize() for p in re.split(r"[./-]", spec_type)) + "Message"
    return type(
        cls_name,
        (Envelope,),
        {
            "__annotations__": {"type": Literal[spec_type], "stream": Literal[stream], "body": body},
            "__doc__": f"Envelope of a {spec_type} message on the {stream} stream.",
        },
    )


MESSAGE_MODELS: dict[str, type[Envelope]] = {
    spec.type: _typed_envelope(spec.type, spec.name, spec.body) for spec in STREAMS.values()
}
MESSAGE_MODELS[STATUS_TYPE] = _typed_envelope(STATUS_TYPE, STATUS_STREAM, StatusBody)


def parse_message(payload: bytes | str) -> Envelope:
    """Validate a raw uplink payload against the envelope and its type's body model."""
    env = Envelope.model_validate_json(payload)
    model = MESSAGE_MODELS.get(env.type)
    if model is None:
        raise ValueError(f"unknown message type {env.type!r}")
    return model.model_validate_json(payload)


# ---------------------------------------------------------------- topics


def uplink_topic(prefix: str, store: str, stream: str) -> str:
    return f"{prefix}/{store}/{stream}"


def command_topic(prefix: str, store: str, name: str) -> str:
    return f"{prefix}/{store}/cmd/{name}"


@dataclass(frozen=True)
class TopicParts:
    store: str
    stream: str  # for commands: "cmd"
    command: str | None = None


def split_topic(prefix: str, topic: str) -> TopicParts | None:
    """Split ``{prefix}/{store}/{rest}``; None if the topic is not under the prefix."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    rest = topic[len(head) :]
    store, _, stream = rest.partition("/")
    if not store or not stream:
        return None
    if stream.startswith("cmd/"):
        return TopicParts(store, "cmd", stream[4:] or None)
    return TopicParts(store, stream)


# ---------------------------------------------------------------- commands


class Command(BaseModel):
    """Downlink command envelope on ``{prefix}/{store}/cmd/{name}``."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = 1
    id: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    name: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")]
    store: StoreId
    ts: datetime
    args: dict[str, Any] = Field(default_factory=dict)
    sig: str | None = None  # HQ's Ed25519 signature over the rest (edge_agent.signing.sign_json)


class ReplayArgs(Strict):
    """Publish again, from ``from_seq`` on, the sealed messages of ``stream`` HQ has not applied."""

    stream: str
    from_seq: int = Field(ge=1)


ACK_TOPIC = "ack"


class Ack(BaseModel):
    """HQ's word to a store on ``{prefix}/{store}/ack``: per stream, the last message it has applied
    (seq and id). Sent after HQ's commit, so the store may then forget everything up to it."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = 1
    type: Literal["ack"] = "ack"
    store: StoreId
    ts: datetime
    streams: dict[str, Mark]
    sig: str | None = None


def ack_topic(prefix: str, store: str) -> str:
    return f"{prefix}/{store}/{ACK_TOPIC}"


class InventoryResyncArgs(Strict):
    reason: str = "requested"


class CycleCountArgs(Strict):
    zone: Name
    duration_s: float = Field(60.0, gt=0, le=24 * 3600)


Price = Annotated[str, StringConstraints(pattern=r"^(0|[1-9][0-9]{0,8})(\.[0-9]{1,4})?$")]
Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
# 12 or 16 hex digits, as the OEPL firmware's hex2mac takes them: it leaves any other length unanswered.
LabelId = Annotated[str, StringConstraints(pattern=r"^(?:[0-9A-F]{12}|[0-9A-F]{16})$")]


class PriceSetArgs(Strict):
    """One price of HQ's price book. Of the versions in effect at a moment, the highest wins, so
    versions may arrive in any order and repeat without harm."""

    gtin: Gtin
    price: Price  # a decimal string: prices are never floats
    currency: Currency
    promo: Annotated[str, StringConstraints(max_length=64)] | None = None
    effective_from: datetime | None = None  # None: at once
    effective_until: datetime | None = None  # None: until superseded
    version: int = Field(ge=1)

    @model_validator(mode="after")
    def _window(self) -> PriceSetArgs:
        if self.effective_from and self.effective_until and self.effective_until <= self.effective_from:
            raise ValueError("effective_until must be after effective_from")
        for name in ("effective_from", "effective_until"):
            v = getattr(self, name)
            if v is not None and v.tzinfo is None:
                raise ValueError(f"{name} must carry a time zone")
        return self


class LabelBinding(Strict):
    label: LabelId
    gtin: Gtin | None  # None unbinds the label


class EslBindArgs(Strict):
    """Which product each label is on the shelf for (the store's planogram)."""

    items: list[LabelBinding] = Field(min_length=1, max_length=10_000)


class EslFlashArgs(Strict):
    """Make the labels of a product flash "PICK" for a store associate picking an online order."""

    gtin: Gtin
    order_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    duration_s: float = Field(600.0, gt=0, le=24 * 3600)


COMMAND_ARGS: dict[str, type[BaseModel]] = {
    "inventory.resync": InventoryResyncArgs,
    "replay": ReplayArgs,
    "rfid.cycle_count": CycleCountArgs,
    "price.set": PriceSetArgs,
    "esl.bind": EslBindArgs,
    "esl.flash": EslFlashArgs,
}


# ---------------------------------------------------------------- schema export


def write_schemas(out: Path) -> list[Path]:
    """One JSON Schema file per message type, plus the command envelope and each command's args."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    targets: dict[str, type[BaseModel]] = {f"{t}.message": m for t, m in MESSAGE_MODELS.items()}
    targets["command"] = Command
    targets["ack"] = Ack
    targets.update({f"cmd.{n}.args": m for n, m in COMMAND_ARGS.items()})
    for name, model in sorted(targets.items()):
        path = out / f"{name}.schema.json"
        schema = model.model_json_schema()
        schema["$id"] = f"https://edge-agent.example/schemas/v{CONTRACT_VERSION}/{path.name}"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
