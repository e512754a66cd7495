"""Supervision: the restart rules (pure, on a made-up clock), and the shell restarting a real thread and
writing its alerts to a real outbox."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from edge_agent.clock import RealClock
from edge_agent.supervise import Backoff, SupervisedThread, Supervision, Supervisor
from edge_agent.sync.outbox import Outbox

from .helpers import wait_for

CAM = ("vision.camera_down", "vision.camera_recovered")


def engine(**kw: float) -> Supervision:
    s = Supervision(Backoff(**({"min_s": 1.0, "max_s": 8.0, "stable_s": 10.0} | kw)))
    s.add("camera-a", CAM)
    return s


def test_backoff_doubles_up_to_its_cap() -> None:
    b = Backoff(min_s=1.0, max_s=8.0)
    assert [b.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 8, 8]
    assert Backoff(min_s=0.5, max_s=60).delay(10_000) == 60  # no overflow on a long crash loop


def test_one_alert_per_episode_restarts_with_growing_backoff_then_one_recovered_note() -> None:
    s = engine()
    n = s.died("camera-a", "killed by SIGKILL", 100.0)
    assert n is not None and n.kind == "vision.camera_down" and "SIGKILL" in n.message and "1.0 s" in n.message
    assert s.due(100.9) == [] and s.due(101.0) == ["camera-a"]
    s.restarted("camera-a")
    # It dies again before it works (loading its model): no second alert, a longer wait.
    assert s.died("camera-a", "exit code 1", 101.5) is None
    assert s.due(102.5) == [] and s.due(103.5) == ["camera-a"]
    s.restarted("camera-a")
    assert s.tick(120.0) == []  # running, but not working yet: the episode goes on
    s.working("camera-a", 108.0)  # its first frames
    s.working("camera-a", 110.0)  # (the first call counts)
    assert s.tick(117.9) == []  # not working long enough yet
    [note] = s.tick(118.0)
    assert note.kind == "vision.camera_recovered" and "2 restarts" in note.message
    assert "without it 8.0 s" in note.message
    c = s.children["camera-a"]
    assert (c.state, c.restarts, c.deaths, c.down_since) == ("up", 2, 0, None)
    assert s.tick(200.0) == []  # the note goes once
    # The next death is a new episode: a new alert, and the backoff starts from the minimum again.
    assert s.died("camera-a", "killed by SIGKILL", 300.0) is not None
    assert s.children["camera-a"].restart_at == 301.0


def test_a_crash_loop_costs_a_restart_per_max_s_and_never_recovers() -> None:
    s = engine(max_s=4.0)
    t, alerts = 0.0, []
    for _ in range(10):
        alerts.append(s.died("camera-a", "exit code 1", t))
        t = s.children["camera-a"].restart_at or t
        assert s.due(t) == ["camera-a"]
        s.restarted("camera-a")
        s.working("camera-a", t)
        assert s.tick(t + 0.1) == []
    assert sum(a is not None for a in alerts) == 1
    assert s.children["camera-a"].restarts == 10 and t == 1 + 2 + 4 * 8


def test_a_finished_child_is_not_restarted() -> None:
    s = engine()
    s.finished("camera-a")
    assert s.due(1e9) == [] and s.tick(1e9) == [] and s.children["camera-a"].state == "finished"


def _alerts(ob: Outbox) -> list[tuple[str, str]]:
    return [(k, m) for k, m in ob.read("SELECT kind, message FROM alerts ORDER BY id")]


def test_a_source_thread_that_dies_is_restarted_and_hq_is_told(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.db", RealClock())
    runs: list[int] = []
    stop = threading.Event()

    def loop() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("a bug outside the loop's own try")
        stop.wait()

    finished = SupervisedThread("one-shot", lambda: None)
    t = SupervisedThread("rfid-intake", loop)
    sup = Supervisor([t, finished], Backoff(min_s=0.3, max_s=1.0, stable_s=0.5), ob.alert, poll_s=0.05)
    t.start()
    finished.start()
    began = time.monotonic()
    sup.start()
    try:
        wait_for(lambda: len(runs) == 2 and t.is_alive(), 5, "the thread to be restarted")
        assert time.monotonic() - began >= 0.3  # after its backoff, not at once
        wait_for(lambda: len(_alerts(ob)) == 2, 5, "the recovered note")
        (k1, m1), (k2, m2) = _alerts(ob)
        assert k1 == "source.down" and "rfid-intake died (RuntimeError: a bug outside the loop's own try)" in m1
        assert k2 == "source.recovered" and "1 restart," in m2
        states = {c.name: c for c in sup.states()}
        assert states["rfid-intake"].restarts == 1 and states["one-shot"].state == "finished"
        assert sup.figures() == {"supervise.rfid-intake.restarts": 1.0, "supervise.one-shot.restarts": 0.0}
    finally:
        sup.stop()
        stop.set()
        t.join(5)
        ob.close()


def test_alerts_wait_while_the_disk_refuses_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent.sync.diskstate import WriteFailed

    ob = Outbox(tmp_path / "outbox.db", RealClock())
    refusing = [True]

    def alert(kind: str, message: str) -> None:
        if refusing[0]:
            raise WriteFailed("full", sqlite3.OperationalError("database or disk is full"))
        ob.alert(kind, message)

    dead = SupervisedThread("esl", lambda: (_ for _ in ()).throw(ValueError("boom")))
    sup = Supervisor([dead], Backoff(min_s=10.0, max_s=10.0), alert, poll_s=0.05)
    dead.start()
    dead.join(5)
    sup.step()
    sup.step()
    assert _alerts(ob) == []
    refusing[0] = False
    sup.step()
    assert [k for k, _ in _alerts(ob)] == ["source.down"]
    ob.close()
