"""Configuration: TOML loaded with tomllib into pydantic v2 models.

Every error names its dotted key and the line of the file it is on (or the variable, file or credential
that gave its value). Any key can come from the environment, a ``*_FILE`` or systemd's credentials
(config_sources.py), so secrets need not be written into the file; secrets are ``SecretStr``, so neither a
repr nor a log line of the config shows them.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    SecretStr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import config_sources, signing
from .contract import DEFAULT_PREFIX, StoreId
from .rfid.epcis import check_extension as epcis_check_extension
from .rfid.epcis import check_store_location as epcis_check_store_location
from .rfid.epcis import zone_problems as epcis_zone_problems
from .vision.analytics import TrafficAnalyticsConfig
from .vision.storewide import STORE_WIDE

log = logging.getLogger(__name__)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TlsConfig(Section):
    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False  # skip hostname verification; only for lab brokers

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class MqttConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)
    session_expiry_s: int = Field(7 * 24 * 3600, ge=0)
    topic_prefix: str = Field(DEFAULT_PREFIX, pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
    reconnect_min_s: float = Field(0.2, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    tls: TlsConfig = TlsConfig()

    @model_validator(mode="after")
    def _backoff(self) -> MqttConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be at least reconnect_min_s")
        return self


class OutboxConfig(Section):
    path: Path = Path("var/outbox.db")
    cap_bytes: int = Field(256 * 1024 * 1024, ge=256 * 1024)
    max_message_bytes: int = Field(128 * 1024, ge=4096, le=256 * 1024 * 1024)
    inflight_window: int = Field(32, ge=1, le=65535)
    # Sealed messages per stream that may wait for HQ's ack; past it, new facts stay pending (compactable).
    ack_window: int = Field(128, ge=1, le=65535)
    # No ack progress for this long: publish a stream's unacknowledged messages again, once while HQ says nothing.
    resend_after_s: float = Field(3.0, gt=0)
    resend_max_s: float = Field(60.0, gt=0)
    # HQ silent this long: seal nothing more for it; facts stay pending and go out packed when HQ speaks.
    hold_when_silent_s: float = Field(10.0, gt=0)
    # Unacknowledged messages older than this raise an uplink.hq_silent alert (once per episode).
    hq_silent_alert_s: float = Field(600.0, gt=0)
    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    cap_check_interval_s: float = Field(0.5, gt=0)
    quarantine_keep: int = Field(10_000, ge=10)


class HealthConfig(Section):
    interval_s: float = Field(60.0, gt=0)


class SimulatedInventoryConfig(Section):
    enabled: bool = False
    seed: int = 1
    zones: list[str] = ["backroom", "salesfloor", "fitting-room", "pos"]
    gtins: int = Field(50, ge=1)
    rate_per_s: float = Field(200.0, gt=0)
    batch: int = Field(20, ge=1)
    total: int = Field(10_000, ge=0)  # 0 runs forever


class SourcesConfig(Section):
    simulated_inventory: SimulatedInventoryConfig = SimulatedInventoryConfig()


class AntennaConfig(Section):
    reader: str = Field(min_length=1, max_length=128)
    # One of the two: the port, or the name for an Impinj preset with antennaIdentifier = "antennaName".
    port: int | None = Field(None, ge=1, le=64)
    name: str | None = Field(None, min_length=1, max_length=128)
    zone: str = Field(min_length=1, max_length=128)

    @model_validator(mode="after")
    def _port_or_name(self) -> AntennaConfig:
        if (self.port is None) == (self.name is None):
            raise ValueError("give the antenna's port or its name (antennaIdentifier = antennaName), one of them")
        return self

    @property
    def key(self) -> tuple[str, int | str]:
        """How reads name this antenna: (reader, port) or (reader, name)."""
        return (self.reader, self.port if self.port is not None else self.name)  # type: ignore[return-value]


def _time_zone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name, e.g. Europe/Berlin)") from None
    return name


class RfidReaderConfig(Section):
    """What one reader's events leave out, supplied here (the reader id as reads name it: Impinj hostname,
    the topic's reader, the HTTP ?reader=, or a Zebra reader's MAC)."""

    name: str = Field(min_length=1, max_length=128)
    default_antenna: int | None = Field(None, ge=1, le=64)  # for events without one (Zebra SIMPLE mode)
    timezone: Annotated[str, AfterValidator(_time_zone)] | None = None  # for timestamps without a UTC offset


class ReaderMqttConfig(Section):
    """The in-store broker the readers publish to (may be the same as [mqtt])."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    topic: str = "readers/+/events"
    client_id: str | None = None
    tls: TlsConfig = TlsConfig()  # as the uplink's [mqtt.tls]


# An API token's name (the "who" of HQ's audit log) and the hash HQ keeps of it (`edge-agent hq-token`).
TokenName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")]
TokenHash = Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]


def is_loopback(host: str) -> bool:
    """Whether a listener bound to ``host`` is reachable from this box only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or "" (every address)


class ReaderHttpConfig(Section):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8781, ge=0, le=65535)
    path: str = "/rfid/events"
    # The readers that may POST: reader id = "sha256:<hex>" of its token (`edge-agent hq-token --name <reader>`
    # prints the line and, once, the token). A reader sends "Authorization: Bearer <token>" or, where its
    # firmware has only basic auth, user <reader id> and password <token> (README: which readers do what).
    # A token speaks for its reader only: ?reader= naming another is 403, reads naming another quarantined.
    # Needed when host is beyond loopback: without tokens the intake then refuses every request (401);
    # on loopback without tokens it is open, for tools on the box itself.
    tokens: dict[TokenName, TokenHash] = {}


class LlrpReaderConfig(Section):
    """An LLRP reader the agent connects to itself (needs the 'llrp' extra: sllurp)."""

    host: str = Field(min_length=1)
    port: int = Field(5084, ge=1, le=65535)
    name: str | None = None  # the reader id antennas are mapped by; defaults to host
    antennas: list[int] = [1]


class RfidConfig(Section):
    enabled: bool = False
    antennas: list[AntennaConfig] = []
    departure_zones: list[str] = ["exit"]
    departure_timeout_s: float = Field(120.0, gt=0)
    min_reads: int = Field(2, ge=1)
    dedupe_s: float = Field(0.5, ge=0)
    arrive_window_s: float = Field(30.0, gt=0)
    holdoff_s: float = Field(3.0, ge=0)
    hysteresis_db: float = Field(3.0, ge=0)
    rssi_alpha: float = Field(0.3, gt=0, le=1)
    recent_s: float = Field(5.0, gt=0)
    tick_s: float = Field(1.0, gt=0)
    snapshot_interval_s: float = Field(3600.0, ge=0)  # 0 = only on request
    silent_antenna_s: float = Field(300.0, gt=0)
    # "wall": the agent's clock drives presence (live stores; reader clocks are often wrong).
    # "reads": the newest read timestamp does, so a recorded or simulated feed replays at any speed.
    clock: Literal["wall", "reads"] = "wall"
    queue_max: int = Field(10_000, ge=10)
    # EPCIS 2.0 ObjectEvents on their own stream, for HQ systems that speak EPCIS (rfid/epcis.py).
    epcis: bool = False
    # The store's own SGLN without extension, urn:epc:id:sgln:<company prefix>.<location reference>:
    # required when epcis is on (no default: an example GLN would put every store at GS1's address).
    epcis_location: str | None = Field(None, validate_default=True)
    # Zone -> SGLN extension (GS1 AI 254: 1-20 characters of GS1 set 82); a zone not listed uses its name,
    # which must then be a valid extension itself ("sales floor" is not: no spaces).
    epcis_zones: dict[str, Annotated[str, AfterValidator(epcis_check_extension)]] = {}
    # Zones shoppers cannot reach (a backroom): what is there is sellable_not_accessible, not _accessible.
    epcis_stockroom_zones: list[str] = []
    mqtt: ReaderMqttConfig = ReaderMqttConfig()
    http: ReaderHttpConfig = ReaderHttpConfig()
    llrp: list[LlrpReaderConfig] = []
    readers: list[RfidReaderConfig] = []
    # GS1 company prefixes of the products this store sells; with HQ's catalogue (the price book), what keeps
    # other companies' tagged goods out of the book. Empty and no catalogue: every GTIN is taken, "unverified".
    company_prefixes: list[Annotated[str, StringConstraints(pattern=r"^[0-9]{6,12}$")]] = []
    # "price_book": a GTIN HQ has priced (esl.enabled) is one the store sells, whatever its prefix. Only where HQ
    # prices every product the store stocks: a price book of the labelled shelves alone would turn every
    # other product's tags into foreign ones, and real stock would leave the book.
    catalogue: Literal["none", "price_book"] = "none"

    @field_validator("epcis_location")
    @classmethod
    def _epcis_location(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            if info.data.get("epcis"):
                raise ValueError("required when rfid.epcis is on: the store's SGLN, urn:epc:id:sgln:<company "
                                 "prefix>.<location reference>")
            return v
        return epcis_check_store_location(v)

    @model_validator(mode="after")
    def _unique_antennas(self) -> RfidConfig:
        seen: set[tuple[str, int | str]] = set()
        for a in self.antennas:
            if a.key in seen:
                raise ValueError(f"antenna {a.reader} {'port' if a.port else 'name'} {a.key[1]} is mapped twice")
            seen.add(a.key)
        names = [r.name for r in self.readers]
        for r in self.readers:
            if names.count(r.name) > 1:
                raise ValueError(f"reader {r.name} is listed twice in [[rfid.readers]]")
            if r.default_antenna is not None and (r.name, r.default_antenna) not in seen:
                raise ValueError(f"reader {r.name}: default_antenna {r.default_antenna} is not mapped to a zone in"
                                 " [[rfid.antennas]]; every read without an antenna would be quarantined")
        return self


def _public_key(text: str) -> str:
    signing.parse_public_key(text)
    return text.strip()


# An Ed25519 public key: its 32 raw bytes in base64, as `edge-agent keygen` prints it.
PublicKeyText = Annotated[str, AfterValidator(_public_key)]


class SigningConfig(Section):
    """The store's keys: its own, to sign what it sends, and HQ's, to check commands and acks."""

    key_file: Path | None = None  # None: the store's messages go unsigned
    hq_public_key: PublicKeyText | None = None
    require_signed_commands: bool = False

    @field_validator("require_signed_commands")
    @classmethod
    def _needs_hq_key(cls, v: bool, info: ValidationInfo) -> bool:
        # Only when hq_public_key was valid and absent: a bad key has its own error already.
        if v and "hq_public_key" in info.data and info.data["hq_public_key"] is None:
            raise ValueError("needs signing.hq_public_key to check commands against")
        return v


class HqSigningConfig(Section):
    """HQ's side: the stores' public keys and HQ's own private key.

    A table of its own under [hq] rather than keys of [signing]: one file may serve a store and HQ
    (the demo, the tests), and the store's key must never be taken for HQ's or the other way round.
    """

    key_file: Path | None = None  # HQ's private key, to sign commands and acks; None: unsigned
    keys: dict[StoreId, PublicKeyText] = {}
    # A TOML file of `S001 = "<base64>"` lines (what keygen prints), for chains with many stores.
    keys_file: Path | None = None
    require_signatures: bool = False

    @field_validator("require_signatures")
    @classmethod
    def _needs_keys(cls, v: bool, info: ValidationInfo) -> bool:
        given = info.data  # keys that failed validation are absent here, and have their own error
        if v and {"keys", "keys_file"} <= given.keys() and not given["keys"] and given["keys_file"] is None:
            raise ValueError("needs the stores' keys: hq.signing.keys or hq.signing.keys_file")
        return v


class LogConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    coalesce_s: float = Field(60.0, ge=0)


class HqConfig(Section):
    db_path: Path = Path("var/hq.db")  # SQLite, unless database is given
    # PostgreSQL instead: a libpq URI (postgresql://user@host:5432/hq); a password may come from
    # PGPASSWORD or ~/.pgpass rather than this file.
    database: str | None = None
    client_id: str = "edge-hq"  # one per receiver: two receivers with one id take the session from each other
    # Several receivers share the stores' traffic: each subscribes through $share/<share_group>/...
    # (MQTT v5 shared subscriptions); unset, one receiver takes all of it.
    share_group: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]+$")
    # Messages applied in one transaction at most (group commit); each is acked to the broker after it commits.
    batch_max: int = Field(500, ge=1, le=100_000)
    reorder_window_s: float = Field(2.0, ge=0)
    resync_retry_s: float = Field(15.0, gt=0)
    # A seq further than this past the last applied (or a store's announced seq floor) is refused as
    # implausible: a store seals at most ``outbox.ack_window`` messages ahead of HQ's ack.
    max_seq_jump: int = Field(100_000, ge=1)
    # Acks to a store are coalesced: at most one per store per this many seconds.
    ack_interval_s: float = Field(0.05, ge=0)
    # Telemetry (traffic/stats, traffic/heatmap, health, esl/state) is kept raw for this many UTC days,
    # today included, in day partitions dropped whole after that (hq/store.py); its hourly roll-ups for
    # rollup_retention_days. Inventory, labels, EPCIS events, commands and their results are kept for good.
    retention_days: int = Field(14, ge=1)
    rollup_retention_days: int = Field(400, ge=1)
    http_host: str = "127.0.0.1"
    http_port: int = Field(8780, ge=0, le=65535)
    print_applied: bool = True
    signing: HqSigningConfig = HqSigningConfig()
    # Who may send commands over HTTP (POST /cmd, /prices): name = "sha256:<hex>", hashes only. With
    # none, the write API answers 401 to everyone; the read-only GETs need no token.
    api_tokens: dict[TokenName, TokenHash] = {}
    # A TOML file of such lines (what `edge-agent hq-token` prints), merged into api_tokens.
    api_tokens_file: Path | None = None

    @field_validator("database")
    @classmethod
    def _postgres_uri(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a PostgreSQL URI, postgresql://[user@]host[:port]/dbname (for SQLite use db_path)")
        return v

    @model_validator(mode="after")
    def _one_database(self) -> HqConfig:
        if self.database is not None and "db_path" in self.model_fields_set:
            raise ValueError("give hq.database (PostgreSQL) or hq.db_path (SQLite), not both")
        return self

    @field_validator("rollup_retention_days")
    @classmethod
    def _rollups_outlive_rows(cls, v: int, info: ValidationInfo) -> int:
        if v < info.data.get("retention_days", 1):
            raise ValueError("must be at least hq.retention_days: the roll-ups outlive the rows they sum")
        return v


class CameraConfig(TrafficAnalyticsConfig):
    """One camera: where its frames come from, plus its floor calibration, zones, lines and masks."""

    # rtsp://user:password@host/..., /dev/video0, or a video file; a secret (its password), logged only
    # through redact_url.
    url: SecretStr = Field(min_length=1)
    # Network streams only: a camera that accepts the connection and then says nothing costs this much
    # before the reconnect backoff, instead of hanging its process.
    open_timeout_s: float = Field(10.0, gt=0, le=600)
    read_timeout_s: float = Field(10.0, gt=0, le=600)
    # RTSP over TCP (interleaved) or UDP; unset: FFmpeg's default (UDP, then TCP if nothing comes).
    rtsp_transport: Literal["tcp", "udp"] | None = None
    fps_cap: float = Field(0.0, ge=0)  # 0 = every frame
    # Stream time of a file's first frame (epoch seconds); default: when it is opened.
    start_ts: float | None = None


_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


class VisionConfig(Section):
    enabled: bool = False
    # Where the model runs: "openvino" or "onnx" (the lean runtime, no torch: pip install edge-agent[vision]
    # or [vision-onnx]) or "ultralytics" (YOLO with its own trackers; needs torch, requirements-vision.txt).
    runtime: Literal["openvino", "onnx", "ultralytics"] = "openvino"
    # The runtime's export (an OpenVINO export folder, an .onnx file; ultralytics also loads .pt). Default: the
    # provisioned package model (models/provision.py).
    model: Path | None = None
    imgsz: int = Field(480, ge=32, le=1920)
    conf: float = Field(0.25, gt=0, lt=1)  # see PersonDetector: measured on real CCTV and the simulator
    tracker: Literal["bytetrack.yaml", "botsort.yaml"] = "bytetrack.yaml"
    # How often finished minute buckets are sent to the outbox.
    flush_s: float = Field(5.0, gt=0)
    # Results waiting for the outbox at most; a slow outbox never stalls a camera (excess is counted).
    queue_max: int = Field(1000, ge=10)
    # A store-wide ("*") bucket waits at most this long for a camera that has not delivered it (down or stalled).
    storewide_wait_s: float = Field(120.0, gt=0)
    # Off unless set: a local folder where each camera overwrites <camera>.jpg with a blurred frame at most
    # once per interval, for an operator checking aim and calibration. Never published nor put in the outbox.
    debug_snapshot_dir: Path | None = None
    debug_snapshot_interval_s: float = Field(10.0, gt=0)
    cameras: list[CameraConfig] = []

    @model_validator(mode="after")
    def _camera_ids(self) -> VisionConfig:
        ids = [c.camera for c in self.cameras]
        if len(ids) != len(set(ids)):
            raise ValueError("camera ids must be unique")
        if STORE_WIDE in ids:
            raise ValueError(f"camera id {STORE_WIDE!r} is reserved for store-wide figures")
        if self.runtime != "ultralytics" and self.tracker != "bytetrack.yaml":
            raise ValueError(f"tracker {self.tracker} needs runtime = \"ultralytics\" (the {self.runtime} runtime runs "
                             "ByteTrack)")
        if self.debug_snapshot_dir is not None:
            # The id becomes a file name in the snapshot folder: no path separators, no hidden or parent names.
            bad = [i for i in ids if not _FILE_NAME.fullmatch(i)]
            if bad:
                raise ValueError(f"with debug_snapshot_dir, camera ids must be file names ({_FILE_NAME.pattern}): "
                                 f"{bad}")
        return self


class EslConfig(Section):
    enabled: bool = False
    controller: Literal["openepaperlink"] = "openepaperlink"
    # The access points' web interfaces; several when the store has more labels than one serves.
    urls: list[Annotated[str, StringConstraints(pattern=r"^https?://")]] = Field(["http://127.0.0.1:80"], min_length=1)
    timeout_s: float = Field(5.0, gt=0)
    poll_interval_s: float = Field(30.0, gt=0)
    max_sends_per_poll: int = Field(200, ge=1)  # the AP queues uploads; flooding it only slows everyone
    resend_after_s: float = Field(300.0, gt=0)
    mismatch_deadline_s: float = Field(600.0, gt=0)
    pending_deadline_s: float = Field(900.0, gt=0)
    silent_after_s: float = Field(3600.0, gt=0)
    low_battery_mv: int = Field(2400, ge=0)
    retry_min_s: float = Field(5.0, gt=0)
    retry_max_s: float = Field(300.0, gt=0)
    # Show "LOW STOCK" on a label when the RFID book holds fewer than this many of its GTIN (0 = off).
    low_stock_below: int = Field(0, ge=0)
    low_stock_zones: list[str] = []  # zones counted for low stock; empty = all


class StatusConfig(Section):
    """The local status server for the engineer on site: /healthz, /readyz, /metrics, the page (edge_agent/status/)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8782, ge=0, le=65535)  # 0: any free port (logged)
    # Required when host is beyond loopback: the figures tell anyone on the store LAN what the store does.
    # A secret: from EDGE_AGENT_STATUS_TOKEN, EDGE_AGENT_STATUS_TOKEN_FILE or systemd credentials too.
    token: SecretStr | None = Field(None, min_length=16, validate_default=True)
    # /healthz says unhealthy once the agent's main loop (housekeeping) has not ticked for this long.
    stale_after_s: float = Field(30.0, gt=0)

    @field_validator("token")
    @classmethod
    def _token_beyond_loopback(cls, v: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        host = info.data.get("host")
        if v is None and info.data.get("enabled") and host is not None and not is_loopback(host):
            raise ValueError(f"required: status.host {host!r} is beyond loopback, and the status figures would be "
                             "open to anyone on the store's network")
        return v


class SupervisionConfig(Section):
    """Camera processes and source threads that die are restarted (edge_agent/supervise.py)."""

    restart_min_s: float = Field(1.0, gt=0)
    restart_max_s: float = Field(60.0, gt=0)
    # Up this long after a restart: the episode is over (a recovered note to HQ; backoff from the minimum again).
    stable_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> SupervisionConfig:
        if self.restart_max_s < self.restart_min_s:
            raise ValueError("restart_max_s must be at least restart_min_s")
        return self


class StoreConfig(Section):
    id: StoreId
    # The store's IANA time zone: sent in health so HQ shows the store's local times (timestamps stay UTC).
    timezone: Annotated[str, AfterValidator(_time_zone)] | None = None


class AgentConfig(Section):
    store: StoreConfig
    mqtt: MqttConfig = MqttConfig()
    outbox: OutboxConfig = OutboxConfig()
    health: HealthConfig = HealthConfig()
    sources: SourcesConfig = SourcesConfig()
    rfid: RfidConfig = RfidConfig()
    vision: VisionConfig = VisionConfig()
    esl: EslConfig = EslConfig()
    log: LogConfig = LogConfig()
    signing: SigningConfig = SigningConfig()
    hq: HqConfig = HqConfig()
    status: StatusConfig = StatusConfig()
    supervision: SupervisionConfig = SupervisionConfig()


class HqFileConfig(BaseModel):
    """What ``edge-agent hq`` reads; an agent's file works too (its agent-only tables are ignored)."""

    model_config = ConfigDict(extra="ignore")

    mqtt: MqttConfig = MqttConfig()
    hq: HqConfig = HqConfig()
    log: LogConfig = LogConfig()


M = TypeVar("M", AgentConfig, HqFileConfig)

@dataclass(frozen=True)
class ConfigIssue:
    key: str
    line: int | None
    message: str

    def render(self, path: Path) -> str:
        where = f"{path}:{self.line}" if self.line else str(path)
        return f"{where}: {self.key}: {self.message}"


class ConfigError(Exception):
    def __init__(self, path: Path, issues: list[ConfigIssue]) -> None:
        self.path = path
        self.issues = issues
        super().__init__("\n".join(i.render(path) for i in issues))


_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_ASSIGN = re.compile(r'^\s*("[^"]+"|[A-Za-z0-9_.-]+)\s*=')


def key_lines(text: str) -> dict[str, int]:
    """Map each dotted key (and table) of a TOML text to its 1-based line number.

    tomllib keeps no positions, so this reads the line structure itself; it only has to be right for
    the tables and assignments that tomllib has already accepted.
    """
    lines: dict[str, int] = {}
    table = ""
    arrays: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        if m := _HEADER.match(raw):
            table = m.group(1).strip("[] ").replace('"', "")
            lines.setdefault(table, n)
            if raw.lstrip().startswith("[["):
                # An array of tables: pydantic names its entries table.0, table.1, ...
                arrays[table] = arrays.get(table, -1) + 1
                table = f"{table}.{arrays[table]}"
                lines.setdefault(table, n)
        elif m := _ASSIGN.match(raw):
            key = m.group(1).strip('"')
            lines.setdefault(f"{table}.{key}" if table else key, n)
    return lines


def _nearest_line(lines: dict[str, int], key: str) -> int | None:
    parts = key.split(".")
    while parts:
        if (n := lines.get(".".join(parts))) is not None:
            return n
        parts.pop()
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(path, [ConfigIssue("(file)", None, f"cannot read: {e.strerror or e}")]) from e


def _parse(path: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise ConfigError(path, [ConfigIssue("(syntax)", int(m.group(1)) if m else None, str(e))]) from e


B = TypeVar("B", bound=BaseModel)


def _validate(path: Path, text: str, data: dict[str, Any], model: type[B], from_env: dict[str, str]) -> B:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = key_lines(text)
        issues = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(root)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "missing":
                msg = "required key is missing"
            if key in from_env:
                issues.append(ConfigIssue(key, None, f"{msg} (value from {from_env[key]})"))
            else:
                issues.append(ConfigIssue(key, _nearest_line(lines, key), msg))
        raise ConfigError(path, issues) from e


def state_dir(config_path: str | Path, given: str | Path | None = None, env: dict[str, str] | None = None) -> Path:
    """The folder every relative path of a config file resolves against: ``given`` (``--state-dir``), else
    ``$STATE_DIRECTORY`` (what systemd sets from the unit's StateDirectory=; the first, if it lists several),
    else the config file's own folder (a checkout, the demo, the tests)."""
    if given is not None:
        return Path(given)
    if first := (os.environ if env is None else env).get("STATE_DIRECTORY", "").split(":")[0]:
        return Path(first)
    return Path(config_path).parent


def load_config(path: str | Path, env: dict[str, str] | None = None, model: type[M] = AgentConfig,
                warn: Callable[[str], None] | None = None, state: str | Path | None = None) -> M:
    """``warn`` hears what is suspicious but not wrong (default: a warning log line; before logging is set
    up, as in ``run``, Python prints it on stderr). ``state``: the state directory (see state_dir); ``env``
    (default: the process's) supplies the settings from the environment and $STATE_DIRECTORY."""
    path = Path(path)
    text = _read(path)
    data = _parse(path, text)
    env = dict(os.environ) if env is None else env
    try:
        from_env = config_sources.apply(model, data, env)
    except config_sources.SourceProblem as e:
        raise ConfigError(path, [ConfigIssue(e.key, None, str(e))]) from e
    for source in config_sources.unknown_sources(AgentConfig, data, env):  # the agent's keys include HQ's
        (warn or log.warning)(f"{source} names no setting (see edge_agent/config_sources.py)")
    cfg = _resolve_paths(_validate(path, text, data, model, from_env), state_dir(path, state, env))
    if isinstance(cfg, AgentConfig):
        for problem in _open_endpoints(cfg):
            (warn or log.warning)(problem)
    if isinstance(cfg, AgentConfig):
        _check_epcis_zones(cfg.rfid, path, text)
    return _load_key_files(cfg, path, text)


def _open_endpoints(cfg: AgentConfig) -> Iterator[str]:
    """The HTTP endpoints bound beyond loopback without a token (check-config and the agent warn)."""
    http = cfg.rfid.http
    if http.enabled and not http.tokens and not is_loopback(http.host):
        yield (f"rfid.http is bound to {http.host!r}, beyond loopback, without rfid.http.tokens: it refuses every "
               "reader (401) until each has a token")


def _check_epcis_zones(rfid: RfidConfig, path: Path, text: str) -> None:
    """With EPCIS on, every antenna's zone needs a valid SGLN extension of its own: the error names the
    antenna's zone (or its [rfid.epcis_zones] entry) and its line."""
    if not rfid.epcis:
        return
    zones = [a.zone for a in rfid.antennas]
    lines = key_lines(text)
    issues = []
    for zone, why in epcis_zone_problems(zones, rfid.epcis_zones):
        key = f"rfid.epcis_zones.{zone}" if zone in rfid.epcis_zones else f"rfid.antennas.{zones.index(zone)}.zone"
        issues.append(ConfigIssue(key, _nearest_line(lines, key), why))
    for name, listed in (("epcis_zones", list(rfid.epcis_zones)), ("epcis_stockroom_zones", rfid.epcis_stockroom_zones)):
        for zone in listed:
            if zone not in zones:
                key = f"rfid.{name}.{zone}" if name == "epcis_zones" else f"rfid.{name}"
                issues.append(ConfigIssue(key, _nearest_line(lines, key), f"zone {zone!r} is no antenna's zone"))
    if issues:
        raise ConfigError(path, issues)


class _StoreKeys(RootModel[dict[StoreId, PublicKeyText]]):
    """hq.signing.keys_file: ``S001 = "<base64 public key>"``, one store a line."""


class _ApiTokens(RootModel[dict[TokenName, TokenHash]]):
    """hq.api_tokens_file: ``alice = "sha256:<hex>"``, one token a line."""


def _merged_map_file(issue: Callable[[str, str], None], key: str, file: Path, model: type[RootModel[Any]],
                     inline: dict[str, Any], what: str) -> dict[str, Any]:
    """``inline`` (the ``key`` table) with the entries of ``file`` (the ``key + "_file"`` setting, same shape);
    an entry in both is an issue: which one counts must not depend on a merge rule."""
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        issue(f"{key}_file", f"cannot read {file}: {e.strerror or e}")
        return inline
    listed = _validate(file, text, _parse(file, text), model, {}).root
    for name in sorted(listed.keys() & inline.keys()):
        issue(f"{key}.{name}", f"also in {file}; give each {what} once")
    return inline | listed


def _load_key_files(cfg: M, path: Path, text: str) -> M:
    """Read the key files now, so check-config reports a missing or wrong one with its key and line.

    Each process reads only its own: the agent its private key; HQ its private key and the stores'
    public keys (merged into hq.signing.keys). A store's key given in both places is an error: which
    one HQ trusts must not depend on a merge rule.
    """
    issues: list[ConfigIssue] = []

    def issue(key: str, message: str) -> None:
        issues.append(ConfigIssue(key, _nearest_line(key_lines(text), key), message))

    if isinstance(cfg, AgentConfig):
        own_key, own_path = "signing.key_file", cfg.signing.key_file
    else:
        own_key, own_path = "hq.signing.key_file", cfg.hq.signing.key_file
    if own_path is not None:
        try:
            signing.load_private_key(own_path)
        except OSError as e:
            issue(own_key, f"cannot read {own_path}: {e.strerror or e}")
        except ValueError as e:
            issue(own_key, f"{own_path} is not an Ed25519 private key in PKCS8 PEM: {e}")
    if isinstance(cfg, HqFileConfig) and cfg.hq.signing.keys_file is not None:
        keys = _merged_map_file(issue, "hq.signing.keys", cfg.hq.signing.keys_file, _StoreKeys,
                                cfg.hq.signing.keys, "store's key")
        sig = cfg.hq.signing.model_copy(update={"keys": keys})
        cfg = cfg.model_copy(update={"hq": cfg.hq.model_copy(update={"signing": sig})})
    if isinstance(cfg, HqFileConfig) and cfg.hq.api_tokens_file is not None:
        tokens = _merged_map_file(issue, "hq.api_tokens", cfg.hq.api_tokens_file, _ApiTokens, cfg.hq.api_tokens,
                                  "token")
        cfg = cfg.model_copy(update={"hq": cfg.hq.model_copy(update={"api_tokens": tokens})})
    if issues:
        raise ConfigError(path, issues)
    return cfg


def _resolve_paths(cfg: M, base: Path) -> M:
    """Every relative path in a config file resolves against ``base`` (state_dir), never against the current
    directory: files the agent writes (outbox, snapshots) and files it reads (keys, certificates, the model)
    alike, so one rule answers where any of them is."""

    def rel(p: Path) -> Path:
        return p if p.is_absolute() else (base / p)

    def rel_fields(section: BaseModel, *names: str) -> dict[str, Path]:
        return {n: rel(v) for n in names if (v := getattr(section, n)) is not None}

    tls = cfg.mqtt.tls
    hq = cfg.hq
    update: dict[str, Any] = {}
    if isinstance(cfg, AgentConfig):
        update["outbox"] = cfg.outbox.model_copy(update={"path": rel(cfg.outbox.path)})
        rtls = cfg.rfid.mqtt.tls
        rmqtt = cfg.rfid.mqtt.model_copy(
            update={"tls": rtls.model_copy(update=rel_fields(rtls, "ca_file", "cert_file", "key_file"))})
        update["rfid"] = cfg.rfid.model_copy(update={"mqtt": rmqtt})
        update["signing"] = cfg.signing.model_copy(update=rel_fields(cfg.signing, "key_file"))
        vision = cfg.vision
        cameras = []
        for c in vision.cameras:
            url = c.url.get_secret_value()
            cameras.append(c.model_copy(update={"url": SecretStr(str(rel(Path(url))))}) if _is_relative_file(url) else c)
        update["vision"] = vision.model_copy(
            update=rel_fields(vision, "model", "debug_snapshot_dir") | {"cameras": cameras})
    return cfg.model_copy(
        update=update
        | {
            "hq": hq.model_copy(
                update={
                    "db_path": rel(hq.db_path),
                    "signing": hq.signing.model_copy(update=rel_fields(hq.signing, "key_file", "keys_file")),
                    **rel_fields(hq, "api_tokens_file"),
                }
            ),
            "mqtt": cfg.mqtt.model_copy(
                update={"tls": tls.model_copy(update=rel_fields(tls, "ca_file", "cert_file", "key_file"))}
            ),
        }
    )


def _is_relative_file(url: str) -> bool:
    """A camera url that names a video file by a relative path (not a stream URL, not /dev/video0)."""
    return "://" not in url and not Path(url).is_absolute()
