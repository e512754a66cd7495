"""The local status server of a real agent (in-process: its engines, outbox, uplink to a real mosquitto
and HQ): /healthz, /readyz, /metrics (parsed by prometheus-client), /status.json and `edge-agent status`
answer with live figures; /readyz follows the uplink; /healthz follows the main loop; the token."""

from __future__ import annotations

import http.client
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.agent import Agent
from edge_agent.cli import main as cli
from edge_agent.config import ConfigError, load_config
from simulators.mosquitto import Mosquitto, free_port
from simulators.rfid_reader import sgtin96_hex

from .helpers import agent_config, start_hq, wait_for

ANTENNAS = [{"reader": "r1", "port": 1, "zone": "salesfloor"}, {"reader": "r1", "port": 2, "zone": "backroom"}]
EPCS = [sgtin96_hex("0614141", "812345", n) for n in range(1, 6)]
TOKEN = "s3cret-status-token-0123"


def get(port: int, path: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), body


def metrics(port: int, token: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, _, body = get(port, "/metrics", token)
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def reads(t: float, n: int) -> bytes:
    return json.dumps([{"epc": EPCS[i % len(EPCS)], "antenna": 1 + i % 2, "rssi": -50.0, "ts": t, "reader": "r1"}
                       for i in range(n)]).encode()


def make_agent(tmp_path: Path, mqtt_port: int, **status: Any) -> Agent:
    cfg = agent_config(tmp_path, mqtt_port, sim={"rate_per_s": 200.0, "total": 0, "batch": 10},
                       rfid={"enabled": True, "antennas": ANTENNAS, "tick_s": 0.2},
                       status={"port": free_port(), "stale_after_s": 1.5, **status})
    return Agent(load_config(cfg))


def test_status_endpoints_answer_with_live_figures(tmp_path: Path, broker: Mosquitto,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rx = start_hq(tmp_path, broker.port)
    agent = make_agent(tmp_path, broker.port)
    agent.start()
    assert agent.status is not None and agent.status.port is not None
    port = agent.status.port
    try:
        wait_for(lambda: agent.uplink.connected, 10, "the uplink")
        for _ in range(5):  # 20 reads a second for 2.5 s
            assert agent.rfid_intake.submit(reads(time.time(), 10), "rfid.http")
            time.sleep(0.5)
        wait_for(lambda: agent.rfid is not None and agent.rfid.engine.reads_seen >= 50, 10, "the reads taken in")

        assert get(port, "/healthz")[0] == 200
        status, _, body = get(port, "/readyz")
        assert status == 200, body
        assert {c["name"]: c["ok"] for c in json.loads(body)["checks"]} == {"database": True, "uplink": True,
                                                                             "sources": True}
        wait_for(lambda: metrics(port)[("edge_outbox_facts_sealed_total", ())] > 0, 10, "facts sealed")
        m = metrics(port)
        assert m[("edge_rfid_reads_total", (("antenna", "1"), ("reader", "r1"), ("zone", "salesfloor")))] == 25
        assert m[("edge_rfid_reads_total", (("antenna", "2"), ("reader", "r1"), ("zone", "backroom")))] == 25
        assert 0 < m[("edge_rfid_reads_per_second", (("antenna", "1"), ("reader", "r1")))] <= 20
        assert m[("edge_uplink_connected", ())] == 1 and m[("edge_ready", ())] == 1 and m[("edge_alive", ())] == 1
        assert m[("edge_outbox_facts_enqueued_total", ())] >= m[("edge_outbox_facts_sealed_total", ())] > 0
        wait_for(lambda: metrics(port)[("edge_uplink_messages_acked_total", ())] > 0, 10, "HQ's acks")
        for name in ("edge_outbox_backlog_facts", "edge_outbox_queued_bytes", "edge_outbox_db_bytes",
                     "edge_uplink_unacked_messages", "edge_main_loop_age_seconds"):
            assert (name, ()) in m, name
        assert m[("edge_child_up", (("child", "sim-inventory"),))] == 1
        assert m[("edge_child_restarts_total", (("child", "rfid-intake"),))] == 0

        s = json.loads(get(port, "/status.json")[2])
        assert s["store"] == "S001" and s["alive"] and s["ready"]
        assert [(a["reader"], a["antenna"], a["zone"], a["reads"]) for a in s["antennas"]] == [
            ("r1", "1", "salesfloor", 25), ("r1", "2", "backroom", 25)]
        assert s["antennas"][0]["last_read_age_s"] < 10

        assert cli(["status", "-c", str(tmp_path / "agent-S001.toml")]) == 0
        out = capsys.readouterr().out
        assert "store S001" in out and "alive  ready" in out
        assert re.search(r"^r1 +1 +salesfloor +[0-9.]+ +\d+ s ago +25$", out, re.M), out
        assert "uplink: connected" in out

        # The uplink goes: not ready, and why; back: ready again.
        broker.stop()
        wait_for(lambda: get(port, "/readyz")[0] == 503, 15, "/readyz to say not ready")
        checks = {c["name"]: c for c in json.loads(get(port, "/readyz")[2])["checks"]}
        assert not checks["uplink"]["ok"] and "not connected" in checks["uplink"]["detail"]
        assert cli(["status", "-c", str(tmp_path / "agent-S001.toml")]) == 1
        assert "NOT READY" in capsys.readouterr().out
        broker.start()
        wait_for(lambda: get(port, "/readyz")[0] == 200, 20, "/readyz ready again")

        # The main loop stops ticking: unhealthy within stale_after_s.
        agent._stop.set()
        agent._housekeeper.join(5)
        wait_for(lambda: get(port, "/healthz")[0] == 503, 5, "/healthz to say the main loop stalled")
        assert json.loads(get(port, "/healthz")[2])["alive"] is False
        assert metrics(port)[("edge_alive", ())] == 0
    finally:
        agent.stop()
        rx.stop()
    with pytest.raises(OSError):  # stopped with the agent
        get(port, "/healthz")


def test_a_token_guards_every_figure_but_not_the_page(tmp_path: Path, broker: Mosquitto) -> None:
    agent = make_agent(tmp_path, broker.port, token=TOKEN)
    agent.start()
    assert agent.status is not None and agent.status.port is not None
    port = agent.status.port
    try:
        for path in ("/healthz", "/readyz", "/metrics", "/status.json"):
            status, headers, _ = get(port, path)
            assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), path
            assert get(port, path, "wrong-token-wrong-token")[0] == 401, path
            assert get(port, path, TOKEN)[0] in (200, 503), path
        status, headers, page = get(port, "/")
        assert status == 200 and b"edge-agent status" in page and "default-src 'self'" in headers["Content-Security-Policy"]
        assert get(port, "/nothing-here", TOKEN)[0] == 404
        # The CLI reads the token from the config file.
        assert cli(["status", "-c", str(tmp_path / "agent-S001.toml")]) in (0, 1)
    finally:
        agent.stop()


def test_bound_beyond_loopback_without_a_token_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    cfg = agent_config(tmp_path, 1883, status={"host": "0.0.0.0"})
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    [issue] = e.value.issues
    assert issue.key == "status.token" and "beyond loopback" in issue.message and issue.line is not None
    load_config(agent_config(tmp_path, 1883, status={"host": "0.0.0.0", "token": TOKEN}))
    load_config(agent_config(tmp_path, 1883, status={"host": "::1"}))


def test_a_port_already_taken_costs_the_status_server_not_the_agent(tmp_path: Path, broker: Mosquitto) -> None:
    import socket

    taken = socket.create_server(("127.0.0.1", 0))
    agent = make_agent(tmp_path, broker.port, port=taken.getsockname()[1])
    try:
        agent.start()
        assert agent.status is not None and agent.status.port is None
        wait_for(lambda: agent.uplink.connected, 10, "the agent to run on")
    finally:
        agent.stop()
        taken.close()


def test_status_command_says_when_no_agent_answers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["status", "-c", str(agent_config(tmp_path, 1883, status={"port": free_port()}))]) == 3
    assert "cannot read the agent's status at http://127.0.0.1:" in capsys.readouterr().err
    assert cli(["status", "-c", str(agent_config(tmp_path, 1883))]) == 3  # port 0: nothing to ask
    assert "status.port is 0" in capsys.readouterr().err
