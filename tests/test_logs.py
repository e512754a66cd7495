"""Quiet, useful logs: JSON lines with journald priorities, repeats coalesced on an injected clock, camera
processes' lines written by the main process, and a flood of bad reads costing one quarantine transaction
per ingest."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.clock import VirtualClock
from edge_agent.config import RfidConfig
from edge_agent.inventory.book import InventoryBook
from edge_agent.logs import Coalescer, JsonFormatter, camera_log_listener, child_logging, setup_logging
from edge_agent.rfid.pipeline import RfidPipeline
from edge_agent.sync.outbox import Outbox
from simulators.rfid_reader import sgtin96_hex


@pytest.fixture
def logged() -> Iterator[tuple[io.StringIO, VirtualClock]]:
    """The root logger writing JSON lines to a buffer, coalescing on a virtual clock; restored afterwards."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    out, clock = io.StringIO(), VirtualClock()
    setup_logging("INFO", coalesce_s=60.0, stream=out, clock=clock, timer=False)  # the test ticks
    yield out, clock
    for h in root.handlers:
        h.close()
    root.handlers[:], root.level = saved, level


def lines(out: io.StringIO) -> list[dict]:
    return [json.loads(x) for x in out.getvalue().splitlines() if x]


def record(msg: str, *args: object, level: int = logging.WARNING, name: str = "t") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_coalescer_writes_the_first_and_sums_up_the_rest_when_the_window_closes() -> None:
    c = Coalescer(60.0)
    assert c.admit(record("antenna %s unknown", 3), 0.0)
    assert [c.admit(record("antenna %s unknown", 3), t) for t in (1.0, 30.0, 59.0)] == [False] * 3
    assert c.admit(record("another %s", 1), 2.0)  # another template: its own window
    assert c.admit(record("antenna %s unknown", 3, level=logging.ERROR), 3.0)  # another level too
    assert c.admit(record("antenna %s unknown", 3, level=logging.INFO), 4.0)  # INFO is never held back
    assert c.due(59.5) == []
    due = c.due(60.0)
    assert [(s.count, s.span_s) for s in due] == [(3, 60.0)]
    assert c.due(120.0) == []  # the other windows held nothing back: no summary
    assert c.admit(record("antenna %s unknown", 3), 121.0)  # a new window


def test_formatter_carries_the_priority_and_the_journal_prefix() -> None:
    r = record("disk %s", "full", level=logging.ERROR)
    line = JsonFormatter().format(r)
    assert json.loads(line)["priority"] == 3 and json.loads(line)["msg"] == "disk full"
    assert JsonFormatter(journal=True).format(r).startswith("<3>{")
    assert [json.loads(JsonFormatter().format(record("x", level=lv)))["priority"]
            for lv in (logging.DEBUG, logging.INFO, logging.WARNING, logging.CRITICAL)] == [7, 6, 4, 2]


def test_journal_prefix_only_when_stderr_is_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent.logs import stderr_is_journal

    with open(tmp_path / "journal", "w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert stderr_is_journal(f)
        with open(tmp_path / "elsewhere", "w") as g:  # inherited the variable, writes elsewhere: no prefix
            assert not stderr_is_journal(g)
    monkeypatch.delenv("JOURNAL_STREAM")
    with open(tmp_path / "journal") as f:
        assert not stderr_is_journal(f)


def test_a_flood_is_one_line_then_one_summary(logged: tuple[io.StringIO, VirtualClock]) -> None:
    out, clock = logged
    log = logging.getLogger("edge_agent.test")
    for _ in range(150):
        log.warning("reader %s antenna %d is not in [[rfid.antennas]]", "r1", 9)
        clock.advance(0.4)
    logging.getLogger().handlers[0].tick()  # type: ignore[attr-defined]  # the timer's call
    got = lines(out)
    assert len(got) == 2, got
    assert got[0]["msg"] == "reader r1 antenna 9 is not in [[rfid.antennas]]" and "repeated" not in got[0]
    assert got[1]["repeated"] == 149 and got[1]["msg"].endswith("(repeated 149 times in 60 s)")
    assert got[1]["priority"] == 4


def _camera_child(q: object) -> None:
    child_logging(q, logging.INFO, camera="door")
    log = logging.getLogger("edge_agent.vision.capture")
    log.info("camera %s opened", "door")
    for _ in range(5):
        log.warning("stream %s stalled", "door")
    try:
        raise RuntimeError("decoder broke")
    except RuntimeError:
        log.exception("frame failed")


def test_camera_process_lines_go_through_the_main_process(logged: tuple[io.StringIO, VirtualClock]) -> None:
    out, _clock = logged
    ctx = mp.get_context("spawn")  # as VisionService starts its cameras
    q = ctx.Queue()
    listener = camera_log_listener(q)
    p = ctx.Process(target=_camera_child, args=(q,), name="camera-door")
    p.start()
    p.join(60)
    assert p.exitcode == 0
    listener.stop()
    got = lines(out)
    assert [g["msg"] for g in got] == ["camera door opened", "stream door stalled", "frame failed"]
    assert {g["camera"] for g in got} == {"door"} and {g["process"] for g in got} == {"camera-door"}
    assert "RuntimeError: decoder broke" in got[2]["exc"] and got[2]["priority"] == 3


def test_unmapped_antenna_flood_is_bounded_in_lines_and_transactions(
        tmp_path: Path, logged: tuple[io.StringIO, VirtualClock]) -> None:
    """150 payloads of an unmapped antenna (the field report: 150 warnings a minute, a synced transaction per
    quarantined record): now a bounded number of lines and one quarantine transaction per payload."""
    out, clock = logged
    ob = Outbox(tmp_path / "o.db", clock)
    cfg = RfidConfig(enabled=True, antennas=[{"reader": "r1", "port": 1, "zone": "salesfloor"}])
    pipe = RfidPipeline(cfg, InventoryBook(ob, clock), ob, clock)
    commits: list[str] = []
    ob.conn.set_trace_callback(lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None)
    per_payload = 10
    for i in range(150):
        events = [{"epc": sgtin96_hex("0614141", "812345", i * per_payload + j), "antenna": 9, "rssi": -50, "reader": "r1",
                   "ts": clock.now()} for j in range(per_payload)]
        pipe.ingest(json.dumps(events).encode(), "rfid.http")
        clock.advance(0.4)
    ob.conn.set_trace_callback(None)
    logging.getLogger().handlers[0].tick()  # type: ignore[attr-defined]
    assert len(commits) == 150, f"{len(commits)} transactions for 150 payloads"
    rows = ob.read("SELECT count(*) FROM quarantine")[0][0]
    assert rows == 150 * per_payload
    assert pipe.health()["rfid.bad.unknown"] == 150 * per_payload
    warnings = [g for g in lines(out) if g["priority"] <= 4]
    assert len(warnings) == 2, warnings  # the first, then "repeated 149 times in 60 s"
    assert warnings[1]["repeated"] == 149
    ob.close()


def test_the_timer_sums_up_a_flood_that_stopped() -> None:
    """On the real clock nobody calls tick: the handler's own timer closes the window."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    out = io.StringIO()
    try:
        setup_logging("INFO", coalesce_s=0.3, stream=out)
        for _ in range(20):
            logging.getLogger("edge_agent.test").warning("antenna %d silent", 4)
        deadline = time.monotonic() + 10
        while len(lines(out)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:], root.level = saved, level
    got = lines(out)
    assert [g.get("repeated") for g in got] == [None, 19]
