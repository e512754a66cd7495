"""RFID input edge: reader payload parsing and EPC decoding, one core, no I/O.

* rfid_parse_events_per_s: a 100-event Impinj R700 tagInventory JSON array (every eventConfig field on, as a
  webhook POST or MQTT message carries it) through parse_payload, repeated; the median of the rounds.
* rfid_parse_us_per_event: the same figure as microseconds per event.
* rfid_parse_ndjson_events_per_s: the same 100 events as newline-delimited JSON (the HTTP stream's shape).
* rfid_parse_bad_batch_events_per_s: the array with one bad event in it (per-event fallback path).
* rfid_epc_decode_cached_per_s: decode_epc on EPCs already seen (the steady state: tags are read again and again).

    python bench/rfid_parse.py                 # ~10 s
    python bench/rfid_parse.py --seconds 1     # CI size
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

from _common import emit, header, note

from edge_agent.rfid.epc import decode_epc, encode_sgtin96
from edge_agent.rfid.formats import parse_payload

NOW = 1_750_000_000.0  # 2025-06-15T15:06:40Z


def impinj_event(i: int, epc: str) -> dict:
    return {
        "timestamp": "2025-06-15T15:06:39.277766184Z",
        "hostname": "impinj-14-2f-f4",
        "eventType": "tagInventory",
        "tagInventoryEvent": {
            "epc": "MHQle/cZTkAAABqF",
            "epcHex": epc,
            "tid": "4oARcCAAFM2bWgjs",
            "tidHex": "E2801170200014CD9B5A08EC",
            "pc": "MAA=",
            "antennaPort": 1 + i % 4,
            "antennaName": f"Antenna {1 + i % 4}",
            "peakRssiCdbm": -4500 - 13 * i,
            "frequency": 902750 + 500 * (i % 50),
            "transmitPowerCdbm": 3000,
            "lastSeenTime": f"2025-06-15T15:06:39.{i * 1000:06d}Z",
            "phaseAngle": 69.5,
        },
    }


def rate(fn: Callable[[], int], seconds: float, rounds: int = 7) -> float:
    """Median items/s over `rounds` rounds sharing `seconds` of wall time."""
    per_round = seconds / rounds
    rates = []
    for _ in range(rounds):
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + per_round
        while True:
            n += fn()
            t = time.perf_counter()
            if t >= deadline:
                break
        rates.append(n / (t - t0))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="total wall time, split over the figures")
    args = ap.parse_args()
    share = args.seconds / 5

    epcs = [encode_sgtin96("80614141123458", 1000 + i, 1, 7) for i in range(100)]
    events = [impinj_event(i, epc) for i, epc in enumerate(epcs)]
    array = json.dumps(events).encode()
    ndjson = b"\r\n".join(json.dumps(e).encode() for e in events) + b"\r\n"
    spoiled = [dict(e) for e in events]
    spoiled[50] = impinj_event(50, "NOT-HEX")
    bad_batch = json.dumps(spoiled).encode()
    header("rfid_parse", events_per_payload=len(events), payload_bytes=len(array))

    reads, bad = parse_payload(array, now=NOW)
    assert len(reads) == 100 and not bad, bad[:1]
    reads, bad = parse_payload(ndjson, now=NOW)
    assert len(reads) == 100 and not bad, bad[:1]
    reads, bad = parse_payload(bad_batch, now=NOW)
    assert len(reads) == 99 and len(bad) == 1

    def parse_array() -> int:
        return len(parse_payload(array, now=NOW)[0])

    def parse_ndjson() -> int:
        return len(parse_payload(ndjson, now=NOW)[0])

    def parse_bad() -> int:
        r, b = parse_payload(bad_batch, now=NOW)
        return len(r) + len(b)

    def decode() -> int:
        for e in epcs:
            decode_epc(e)
        return len(epcs)

    per_s = rate(parse_array, 2 * share)
    emit("rfid_parse_events_per_s", per_s)
    emit("rfid_parse_us_per_event", 1e6 / per_s)
    emit("rfid_parse_ndjson_events_per_s", rate(parse_ndjson, share))
    emit("rfid_parse_bad_batch_events_per_s", rate(parse_bad, share))
    emit("rfid_epc_decode_cached_per_s", rate(decode, share))
    note("median of 7 rounds per figure; a busy machine (see loadavg) lowers every figure")


if __name__ == "__main__":
    main()
