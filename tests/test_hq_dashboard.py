"""HQ's dashboard page and the JSON it reads, over real HTTP."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

from edge_agent.clock import parse_rfc3339
from edge_agent.contract import STREAMS
from simulators.mosquitto import Mosquitto, free_port

from .helpers import start_hq

T = parse_rfc3339("2026-11-25T10:02:00Z")


def fetch(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback only
        return r.status, r.headers.get("Content-Type", ""), r.read()


def stats(camera: str, minute: int, entries: int) -> dict:
    return {"camera": camera, "zone": None, "bucket_start": f"2026-11-25T10:{minute:02d}:00.000Z", "bucket_s": 60,
            "entries": entries, "exits": 0, "occupancy_min": 0, "occupancy_avg": 1, "occupancy_max": 2, "visits": 0}


def heat(camera: str, cells: list[float]) -> dict:
    return {"camera": camera, "bucket_start": "2026-11-25T10:00:00.000Z", "bucket_s": 60, "cell_m": 0.5, "cols": 2,
            "rows": 1, "cells": cells}


def test_dashboard_page_and_every_endpoint_it_reads(tmp_path: Path, broker: Mosquitto) -> None:
    rx = start_hq(tmp_path, broker.port, http_port=free_port())
    try:
        assert rx.http is not None
        base = f"http://127.0.0.1:{rx.http.server_address[1]}"
        with rx.db.tx() as c:
            rows = [("S001", "traffic/stats", 1, {"items": [stats("cam1", 1, 3), stats("*", 1, 3)]}),
                    ("S001", "traffic/stats", 2, {"items": [stats("*", 0, 2)]}),
                    ("S001", "traffic/heatmap", 1, {"items": [heat("cam1", [1, 2]), heat("*", [1, 2])]}),
                    ("S001", "traffic/heatmap", 2, {"items": [heat("*", [0.5, 0])]})]
            rx.db.record_messages(c, [(s, st, q, T, False, STREAMS[st].body.model_validate(b)) for s, st, q, b in rows], T)
        status, ctype, page = fetch(f"{base}/dashboard")
        assert status == 200 and ctype.startswith("text/html") and b"HQ receiver" in page
        for path in sorted(set(re.findall(r'(?:get|pages)\(`?"?(/[a-z]+)', page.decode()))):
            status, ctype, _ = fetch(f"{base}{path}?store=S001")
            assert status == 200 and ctype == "application/json", path
        traffic = json.loads(fetch(f"{base}/traffic?store=S001")[2])
        assert [(s["camera"], s["bucket_start"][14:16]) for s in traffic["stats"]] == [("*", "00"), ("cam1", "01"),
                                                                                     ("*", "01")]
        assert traffic["heatmap"]["camera"] == "*" and traffic["heatmap"]["cells"] == [1.5, 2.0]
    finally:
        rx.stop()
