"""The one shape every reader format is normalised into before the engines see it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TagRead:
    epc: str  # upper-case hex, as read from the EPC memory bank (no CRC/PC words)
    reader: str  # reader hostname or configured id
    antenna: int | str  # antenna port, 1-based; or its name, from readers that identify antennas by name
    rssi_dbm: float | None  # peak RSSI in dBm (Impinj reports centi-dBm: -5350 -> -53.5)
    ts: float  # epoch seconds, from the reader's own timestamp


@dataclass(frozen=True, slots=True)
class BadRead:
    """An input record that could not become a TagRead; quarantined with its reason."""

    reason: str
    raw: bytes
