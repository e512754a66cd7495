"""LLRP readers (Impinj Speedway, Zebra FX, ...) through sllurp, the optional ``llrp`` extra.

``pip install 'edge-agent[llrp]'`` brings in sllurp 3.x (GPL-3.0, pure Python, depends only on click). Only
``LlrpReaderSource.start`` imports it, so this module, and ``tags_to_payload``, load without it.

sllurp runs one thread per reader connection. It connects, resets the reader (DELETE_ROSPEC/ACCESSSPEC 0),
sets the reader configuration and adds and enables one ROSpec with an Immediate start trigger. It then calls
back with the ``TagReportData`` list of every RO_ACCESS_REPORT. sllurp 3 decodes each entry into a dict::

    {"EPC": b"e2000017010b016210000004", "EPC-96": b"...", "AntennaID": 1, "PeakRSSI": -59,
     "LastSeenTimestampUTC": 1718452798225324, "TagSeenCount": 1, ...}

``EPC`` is the EPC as lower-case ASCII hex bytes: sllurp hexlifies both EPCData and EPC-96. ``PeakRSSI`` is
LLRP's signed 8-bit dBm. The LLRP timestamps are microseconds since the Unix epoch (UTC). Which fields are
present depends on the ROSpec's TagReportContentSelector: this source turns on AntennaID, PeakRSSI and
LastSeenTimestamp.

Each report becomes one payload in the project's generic shape (see ``edge_agent.rfid.formats``)::

    [{"epc": "E2000017010B016210000004", "antenna": 1, "rssi": -59, "ts": 1718452798.225324, "reader": "r1"}]

The payload goes to ``submit(payload, source, reader)``, which is ``ReaderIntake.submit``'s signature, so it
takes the same parse/quarantine path as the MQTT and HTTP payloads. Values are passed on as the reader sent
them and are not checked here. A tag without an EPC or an antenna is sent with the field empty or null, and
``parse_payload`` quarantines it with the reason, so bad reads get counted and are not silently dropped.

Report cadence: by default sllurp's ROSpec reports only at the end of an AISpec that never ends. Through
sllurp's ``report_every_n_tags`` / ``report_timeout_ms``, this source makes each AISpec end, and so report,
after N tag observations or T ms. The ROSpec (Null stop trigger) then runs the AISpec again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

log = logging.getLogger(__name__)

__all__ = ["LLRP_PORT", "SOURCE", "LlrpReaderSource", "tags_to_payload"]

LLRP_PORT = 5084  # IANA port for LLRP
SOURCE = "rfid.llrp"

Submit = Callable[[bytes, str, str], object]


def _epc(tag: Mapping[str, Any]) -> str:
    value = tag.get("EPC")
    if value is None:
        value = tag.get("EPC-96")
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("ascii").upper()
        except UnicodeDecodeError:  # not sllurp's hexlified form: raw EPC bytes
            return bytes(value).hex().upper()
    return str(value).upper()


def _rssi(tag: Mapping[str, Any]) -> float | None:
    cdbm = tag.get("ImpinjPeakRSSI")  # Impinj extension, centi-dBm, finer than LLRP's whole dBm
    if isinstance(cdbm, (int, float)):
        return cdbm / 100.0
    dbm = tag.get("PeakRSSI")
    return dbm if isinstance(dbm, (int, float)) else None


def _ts(tag: Mapping[str, Any], now: float) -> float:
    for key in ("LastSeenTimestampUTC", "FirstSeenTimestampUTC"):
        us = tag.get(key)
        if isinstance(us, int):
            return us / 1_000_000
    return now  # the reader sent no UTC timestamp (only uptime, or none enabled): time of receipt


def tags_to_payload(tags: Iterable[Mapping[str, Any]], reader: str, *, now: float) -> bytes:
    """sllurp TagReportData dicts -> a generic-shape JSON array (bytes). ``now`` stands in for a missing timestamp."""
    events = [
        {"epc": _epc(t), "antenna": t.get("AntennaID"), "rssi": _rssi(t), "ts": _ts(t, now), "reader": reader}
        for t in tags
    ]
    return json.dumps(events, separators=(",", ":")).encode()


class LlrpReaderSource:
    """One LLRP reader: connects through sllurp and hands each tag report to ``submit`` as a generic payload."""

    def __init__(
        self,
        host: str,
        submit: Submit,
        *,
        port: int = LLRP_PORT,
        name: str | None = None,
        antennas: Iterable[int] = (1,),
        report_every_n_tags: int | None = 100,
        report_timeout_ms: int = 500,
        reset_on_connect: bool = True,
        reconnect: bool = True,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.name = name or host
        self.submit = submit
        self.clock = clock
        self.timeout_s = timeout_s
        self.config: dict[str, Any] = {
            "antennas": list(antennas),
            "report_every_n_tags": report_every_n_tags,
            "report_timeout_ms": report_timeout_ms,
            "reset_on_connect": reset_on_connect,
            "reconnect": reconnect,
            "start_inventory": True,
            "tag_content_selector": {
                "EnableAntennaID": True,
                "EnablePeakRSSI": True,
                "EnableLastSeenTimestamp": True,
            },
        }
        if extra_config:
            self.config.update(extra_config)  # any other LLRPReaderConfig attribute (tx_power, session, ...)
        self.reports = 0
        self.tags = 0
        self.rejected = 0  # payloads submit() refused (intake full)
        self._lock = threading.Lock()
        self._client: Any = None
        self._error: str | None = None  # why the last connection attempt failed
        self._stopped = False
        # The agent's Supervisor retries a reader that is off or unreachable (at boot or later) with backoff,
        # and tells HQ once per episode (source.down / source.recovered): a reader must never stop the agent.
        self.supervised = [self]

    # -- as the Supervisor's child (edge_agent.supervise.Child)
    alerts = ("source.down", "source.recovered")

    def start(self) -> None:
        """Connect and start inventory. Raises ImportError without sllurp; a reader that cannot be reached is
        logged and left to the Supervisor, which calls restart() with backoff."""
        from sllurp.llrp import LLRPReaderClient, LLRPReaderConfig

        self._stopped, self._error = False, None
        client = LLRPReaderClient(self.host, self.port, LLRPReaderConfig(dict(self.config)), timeout=self.timeout_s)
        client.add_tag_report_callback(self._on_report)
        try:
            client.connect()
        except Exception as e:  # sllurp raises OSError or its own ReaderConfigurationError, among others
            self._error = f"cannot connect to {self.host}:{self.port}: {type(e).__name__}: {e}"
            log.error("LLRP reader %s: %s", self.name, self._error)
            return
        self._client = client
        log.info("LLRP reader %s connected at %s:%d", self.name, self.host, self.port)

    restart = start

    def exit(self) -> tuple[Literal["running", "finished", "died"], str]:
        if self._stopped:
            return "finished", ""
        if self._client is None:
            return "died", self._error or "not connected"
        if not self._client.is_alive():
            self._client = None
            return "died", "the connection to the reader ended"
        return "running", ""

    def working(self) -> bool:
        return self.connected

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop inventory politely (delete the ROSpecs) and disconnect, waiting at most ``timeout_s``."""
        self._stopped = True
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.disconnect(timeout=timeout_s)
        finally:
            if client.is_alive():  # the reader did not answer in time
                client.hard_disconnect()
                client.join(timeout_s)

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_alive()

    def _on_report(self, _client: Any, tags: list[Mapping[str, Any]]) -> None:
        # Runs on sllurp's socket thread: convert and hand off, never block for long.
        if not tags:
            return
        payload = tags_to_payload(tags, self.name, now=self.clock())
        ok = self.submit(payload, SOURCE, self.name)
        with self._lock:
            self.reports += 1
            self.tags += len(tags)
            if ok is False:
                self.rejected += 1
        if ok is False:
            log.warning("RFID intake full; dropped an LLRP report of %d tags from %s", len(tags), self.name)
