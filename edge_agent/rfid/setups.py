"""What each reader set-up in ``[rfid]`` can and cannot tell: printed by ``check-config``, summed up in the README.

- A port-identified antenna (the default) places a tag in its zone, with RSSI to prefer the nearest zone.
- A name-identified antenna (Impinj ``antennaIdentifier = antennaName``) tells the same, but the name is the
  key: renamed on the reader and not here, its reads are quarantined as from an unknown antenna.
- A reader with ``default_antenna`` (Zebra SIMPLE mode without antenna metadata) cannot tell its antennas
  apart: every read lands in that one antenna's zone. Without ``peakRssi`` either, presence takes a fixed
  -60 dBm for its reads, so between two zones that both read a tag it cannot tell which is nearer.
- A reader with ``timezone`` sends local times: taken in that zone, an hour at the autumn clock change is
  ambiguous (the earlier of the two instants is taken), and a reader clock set to the wrong zone is not
  noticed.
- ``company_prefixes`` and HQ's catalogue (the price book) decide which GTINs are the store's products; with
  neither, every SGTIN is taken and counted as unverified.
"""

from __future__ import annotations

from ..config import RfidConfig

__all__ = ["describe"]


def describe(cfg: RfidConfig) -> list[str]:
    """One line per set-up that tells less than ports, offsets and known products do."""
    zone = {a.key: a.zone for a in cfg.antennas}
    notes = []
    for a in cfg.antennas:
        if a.name is not None:
            notes.append(f"rfid.antennas: reader {a.reader} antenna {a.name!r} ({a.zone}) is identified by name "
                         "(Impinj antennaIdentifier = antennaName): rename it on the reader and here together, or "
                         "its reads are quarantined as from an unknown antenna")
    for r in cfg.readers:
        if r.default_antenna is not None:
            notes.append(f"rfid.readers: {r.name}: reads without an antenna count as antenna {r.default_antenna} "
                         f"({zone[(r.name, r.default_antenna)]}): this reader cannot tell its antennas apart, and "
                         "without peakRssi presence cannot tell which of two zones reading a tag is nearer")
        if r.timezone is not None:
            notes.append(f"rfid.readers: {r.name}: timestamps without a UTC offset are {r.timezone} local time: "
                         "the repeated hour at the autumn clock change is ambiguous (the earlier instant is "
                         "taken) and a reader clock set to the wrong zone goes unnoticed")
    if not cfg.company_prefixes:
        notes.append("rfid.company_prefixes is empty: unless HQ's price book lists products, every SGTIN is taken "
                     "as stock, other companies' goods included (counted in health as rfid.unverified_reads)")
    return notes
