"""The agent as a system service: `edge-agent install` into a scratch root, the unit through
`systemd-analyze verify`, the installed layout run as a non-root user against a real mosquitto with
sd_notify on a real socket, SIGHUP reloads, and a SIGTERM that ends within a container engine's 10 s."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.config import AgentConfig, load_config
from edge_agent.hq.receiver import HqReceiver
from edge_agent.service.install import CONFIG_DIR, STATE_DIR, UNIT, under, unreachable
from edge_agent.service.notify import Notifier
from simulators.mosquitto import Mosquitto, free_port
from simulators.toml_files import write_toml

from .helpers import REPO, AgentProcess, CuttableLink, HqProcess, agent_config, local_status, start_hq, wait_for

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


# ---------------------------------------------------------------- sd_notify on a real socket


class NotifySocket:
    """What systemd listens on: a unix datagram socket, here in the abstract namespace ('@' in the variable)."""

    def __init__(self) -> None:
        self.name = f"@edge-agent-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.setblocking(False)
        self.got: list[str] = []

    def drain(self) -> list[str]:
        """Everything received so far (what has arrived by now; callers poll)."""
        while True:
            try:
                self.got += self.sock.recv(4096).decode().split("\n")
            except BlockingIOError:
                return self.got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    s = NotifySocket()
    yield s
    s.close()


def test_notifier_speaks_sd_notify(notify_socket: NotifySocket, tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": notify_socket.name, "WATCHDOG_USEC": "400000"})
    n.ready("running")
    n.watchdog()
    n.watchdog()  # within a quarter of the interval: not sent again
    time.sleep(0.11)
    n.watchdog()
    n.stopping()
    assert notify_socket.drain() == ["READY=1", "STATUS=running", "WATCHDOG=1", "WATCHDOG=1", "STOPPING=1",
                                     "STATUS=stopping"]
    # a socket file as well as an abstract name; a watchdog meant for another process is not fed
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}).watchdog()
        Notifier({"NOTIFY_SOCKET": str(path)}).ready("up")
        assert s.recv(4096) == b"READY=1\nSTATUS=up"
    # not under systemd: nothing to do, no error
    Notifier({}).ready("running")


def test_watchdog_pings_stop_while_the_housekeeping_loop_hangs(tmp_path: Path, notify_socket: NotifySocket,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """What makes systemd restart a hung agent: no WATCHDOG=1 while the loop is stuck, pings again after."""
    import threading

    from edge_agent.agent import Agent

    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.name)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping at most every 50 ms
    agent = Agent(load_config(agent_config(tmp_path, 1, outbox={"cap_check_interval_s": 0.02}), env={}))
    gate = threading.Event()
    gate.set()
    enforce = agent.outbox.enforce_cap
    monkeypatch.setattr(agent.outbox, "enforce_cap", lambda: (gate.wait(), enforce())[1])
    agent._housekeeper.start()
    try:
        wait_for(lambda: notify_socket.drain().count("WATCHDOG=1") >= 3, 5, "pings while the loop ticks")
        gate.clear()  # the next round hangs in the outbox
        time.sleep(0.2)
        notify_socket.drain()
        notify_socket.got.clear()
        time.sleep(0.5)  # ten watchdog quarters
        assert notify_socket.drain().count("WATCHDOG=1") == 0
        gate.set()
        wait_for(lambda: "WATCHDOG=1" in notify_socket.drain(), 5, "pings once the loop is back")
    finally:
        gate.set()
        agent._stop.set()
        agent._housekeeper.join(5)
        agent.outbox.close()


# ---------------------------------------------------------------- SIGHUP, in-process


def test_reload_applies_live_keys_and_lists_the_rest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from edge_agent.agent import Agent
    from edge_agent.service.reload import reload

    conf = agent_config(tmp_path, 1, rfid={"enabled": True}, esl={"enabled": True, "urls": ["http://127.0.0.1:9"]})
    agent = Agent(load_config(conf, env={}))
    root_level = logging.getLogger().level
    try:
        text = conf.read_text()
        conf.write_text(text.replace('level = "INFO"', 'level = "DEBUG"').replace("interval_s = 5.0", "interval_s = 7.0")
                        .replace("connect_timeout_s", "keepalive_s = 45\nconnect_timeout_s")
                        .replace("[rfid]", "[rfid]\nsilent_antenna_s = 60.0") + "low_battery_mv = 2500\n")
        with caplog.at_level(logging.INFO, logger="edge_agent.service.reload"):
            applied, restart = reload(agent, lambda: load_config(conf, env={}))
        assert applied == ["esl.low_battery_mv", "health.interval_s", "log.level", "rfid.silent_antenna_s"]
        assert restart == ["mqtt.keepalive_s"]
        assert agent.health.interval_s == 7.0 and agent.esl is not None and agent.esl.engine.p.low_battery_mv == 2500
        assert logging.getLogger().level == logging.DEBUG and agent.cfg.log.level == "DEBUG"
        assert agent.rfid is not None and agent.rfid.cfg.silent_antenna_s == 60.0  # the object the pipeline reads
        assert agent.cfg.mqtt.keepalive_s == 30  # the running value until a restart
        (line,) = [r.getMessage() for r in caplog.records if "reloaded" in r.getMessage()]
        assert line == ("config reloaded: applied esl.low_battery_mv, health.interval_s, log.level, "
                        "rfid.silent_antenna_s; needs a restart: mqtt.keepalive_s")
        # a broken file changes nothing and names the key and its line
        conf.write_text(conf.read_text().replace("interval_s = 7.0", 'interval_s = "often"'))
        caplog.clear()
        assert reload(agent, lambda: load_config(conf, env={})) == ([], [])
        assert agent.health.interval_s == 7.0
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and re.search(rf"{re.escape(str(conf))}:\d+: health.interval_s: ", errors[0]), errors
    finally:
        logging.getLogger().setLevel(root_level)
        agent.outbox.close()


# ---------------------------------------------------------------- install, the unit


@pytest.fixture
def scratch_root() -> Iterator[Path]:
    """A scratch root other users can enter (pytest's tmp_path is private to whoever runs the tests)."""
    root = Path(tempfile.mkdtemp(prefix="edge-agent-root-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def service_user() -> Iterator[pwd.struct_passwd]:
    """The non-root user the service runs as: a throwaway system user when the tests run as root (CI),
    else whoever runs them (not root already)."""
    if os.geteuid() != 0:
        yield pwd.getpwuid(os.geteuid())
        return
    name = f"ea-test-{os.getpid()}"
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False)


def as_user(user: pwd.struct_passwd) -> dict[str, Any]:
    """subprocess arguments that run a child as ``user``, with its group only, as User= and Group= do; nothing
    when the tests already run as that user (only root may drop supplementary groups)."""
    if os.geteuid() != 0:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def service_python(root: Path) -> Path:
    """A virtual environment in the scratch root that the service user can run. This test's interpreter may
    sit where other users cannot enter (a pyenv under /root), so: a system Python of the same minor version,
    reaching this checkout and the test environment's packages through a .pth file."""
    minor = f"python3.{sys.version_info.minor}"
    base = shutil.which(minor, path="/usr/bin:/usr/local/bin")
    purelib = Path(sysconfig.get_paths()["purelib"])
    if base is None:
        pytest.skip(f"no system {minor} for the service user to run")
    for needed in (Path(base), REPO / "edge_agent" / "cli.py", purelib / "pydantic"):
        if (folder := unreachable(needed)) is not None:
            pytest.skip(f"other users cannot enter {folder}, where {needed} is")
    venv = root / "opt" / "edge-agent"
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python3.*/site-packages"))
    (site / "edge-agent-test.pth").write_text(f"{REPO}\n{purelib}\n")
    return venv / "bin" / "python"


def verify_unit(unit: Path) -> None:
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on what it ignores (a misspelt value is a warning): any word about our unit fails it
    ours = [line for line in (r.stdout + r.stderr).splitlines() if unit.name in line]
    assert r.returncode == 0 and ours == [], r.stdout + r.stderr
    r = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", str(unit)], capture_output=True, text=True,
                       timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", r.stdout)
    assert m and float(m.group(1)) <= 3.0, r.stdout[-2000:]  # 0 (locked down) .. 10 (UNSAFE); ours: 2.3 OK


def test_install_lays_out_the_box_and_keeps_the_operators_config(scratch_root: Path,
                                                                 service_user: pwd.struct_passwd) -> None:
    cli = [sys.executable, "-m", "edge_agent.cli"]
    out = subprocess.run([*cli, "install", "--root", str(scratch_root), "--user", service_user.pw_name],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    config, state, unit = (under(scratch_root, CONFIG_DIR) / "config.toml", scratch_root / "var/lib/edge-agent",
                           under(scratch_root, UNIT))
    assert f"wrote {config} from config.example.toml" in out
    assert config.read_text() == (REPO / "config.example.toml").read_text()
    assert isinstance(load_config(config, env={}), AgentConfig)
    assert (config.stat().st_mode & 0o777, config.stat().st_gid) == (0o640, service_user.pw_gid)
    assert (state.stat().st_mode & 0o777, state.stat().st_uid) == (0o750, service_user.pw_uid)
    text = unit.read_text()
    assert f"\nUser={service_user.pw_name}\nGroup={grp.getgrgid(service_user.pw_gid).gr_name}\n" in text
    assert "\nType=notify\n" in text
    assert f"\nExecStart={sys.executable} -m edge_agent.cli run -c /etc/edge-agent/config.toml\n" in text
    verify_unit(unit)
    # again, over an operator's edits: the config is kept, the unit rewritten
    config.write_text('[store]\nid = "S777"\n')
    unit.write_text("")
    (config.parent / "var").mkdir()  # an outbox where the old rule put it, beside the config
    (config.parent / "var" / "outbox.db").write_bytes(b"")
    out = subprocess.run([*cli, "install", "--root", str(scratch_root), "--user", service_user.pw_name],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert f"kept {config}" in out and config.read_text() == '[store]\nid = "S777"\n' and unit.read_text() == text
    assert f"warning: state from before the state directory is in {config.parent / 'var'}" in out
    # a user that does not exist is not invented inside a scratch root
    r = subprocess.run([*cli, "install", "--root", str(scratch_root), "--user", "no-such-user-here"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and "no user 'no-such-user-here'" in r.stderr


@dataclass
class InstalledAgent:
    """The agent installed into a scratch root and running from it as the service user, as systemd would run
    it; ``cli`` runs other commands the same way (what `edge-agent status` checks need)."""

    root: Path
    user: pwd.struct_passwd
    python: Path  # the service's interpreter, in the scratch root's venv
    config: Path
    tables: dict[str, Any]  # the config as the operator left it
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Path
    hq: HqReceiver
    notify: NotifySocket
    total: int

    @property
    def state(self) -> Path:
        return under(self.root, STATE_DIR)

    def facts(self) -> int:
        return next((s["facts"] for s in self.hq.db.stream_stats() if s["store"] == "S042"
                     and s["stream"] == "inventory/delta"), 0)

    def logged(self, text: str) -> bool:
        return text in self.log.read_text()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.python), "-m", "edge_agent.cli", *args], env=self.env, cwd=self.state,
                              capture_output=True, text=True, timeout=60, **as_user(self.user))


@pytest.fixture
def installed_agent(scratch_root: Path, service_user: pwd.struct_passwd, broker: Mosquitto,
                    notify_socket: NotifySocket, tmp_path: Path) -> Iterator[InstalledAgent]:
    python = service_python(scratch_root)
    out = subprocess.run([str(python), "-m", "edge_agent.cli", "install", "--root", str(scratch_root), "--user",
                          service_user.pw_name], capture_output=True, text=True, check=True).stdout
    assert "warning" not in out, out
    unit = under(scratch_root, UNIT)
    verify_unit(unit)
    # The operator's edits: the store, the broker, and a simulated feed to have facts to send.
    config = under(scratch_root, CONFIG_DIR) / "config.toml"
    tables = tomllib.loads(config.read_text())
    total = 3_000
    tables["store"]["id"] = "S042"
    tables["mqtt"] |= {"port": broker.port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5}
    tables["sources"]["simulated_inventory"] |= {"enabled": True, "total": total, "rate_per_s": 3_000.0}
    tables["outbox"]["cap_check_interval_s"] = 0.2
    tables["status"]["port"] = free_port()  # not 8782: other runs on the box may hold it
    write_toml(config, tables)
    # As systemd would start it: ExecStart's command line, as the unit's user, with $STATE_DIRECTORY and
    # $NOTIFY_SOCKET set; the target's /etc/edge-agent is the scratch root's.
    exec_start = re.search(r"^ExecStart=(.*)$", unit.read_text(), re.M)
    assert exec_start is not None
    argv = [str(under(scratch_root, Path(a))) if a.startswith(str(CONFIG_DIR)) else a
            for a in shlex.split(exec_start.group(1))]
    state = under(scratch_root, STATE_DIR)
    env = {"PATH": "/usr/bin:/bin", "STATE_DIRECTORY": str(state), "NOTIFY_SOCKET": notify_socket.name,
           "WATCHDOG_USEC": "2000000", "PYTHONUNBUFFERED": "1", "YOLO_OFFLINE": "1"}
    hq = start_hq(tmp_path, broker.port)
    log = tmp_path / "agent.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(argv, env=env, cwd=state, stdout=sink, stderr=subprocess.STDOUT,
                                **as_user(service_user))
    installed = InstalledAgent(scratch_root, service_user, python, config, tables, env, proc, log, hq, notify_socket,
                               total)
    try:
        wait_for(lambda: "READY=1" in notify_socket.drain(), 30, f"READY=1; log: {log.read_text()[-2000:]}")
        wait_for(lambda: installed.facts() == total, 60, "every simulated fact applied at HQ")
        yield installed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        hq.stop()


def test_installed_agent_answers_status_healthz_readyz_and_metrics(installed_agent: InstalledAgent) -> None:
    """The acceptance's local status: the installed agent, as the service user, answers with live figures."""
    a = installed_agent
    port = a.tables["status"]["port"]
    assert local_status(port, "/healthz") == (200, {"alive": True, "loop_age_s": pytest.approx(0.1, abs=2)})
    code, ready = local_status(port, "/readyz")
    assert code == 200 and all(c["ok"] for c in ready["checks"]), ready
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        m = {s.name: s.value for fam in text_string_to_metric_families(r.read().decode()) for s in fam.samples
             if not s.labels}
    assert m["edge_outbox_facts_enqueued_total"] >= a.total  # the feed's deltas, and health reports
    assert m["edge_uplink_connected"] == 1
    assert m["edge_uplink_messages_acked_total"] > 0 and m["edge_alive"] == 1
    out = a.cli("status", "-c", str(a.config))
    assert out.returncode == 0, out
    assert "store S042" in out.stdout and "alive  ready" in out.stdout and "uplink: connected" in out.stdout


def test_installed_layout_runs_as_the_service_user(installed_agent: InstalledAgent) -> None:
    a = installed_agent
    outbox = a.state / "var" / "outbox.db"
    assert outbox.stat().st_uid == a.user.pw_uid
    assert not (a.config.parent / "var").exists()  # no state beside the config
    wait_for(lambda: a.notify.drain().count("WATCHDOG=1") >= 2, 10, "the watchdog fed while alive")
    version = a.cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("edge-agent "), version
    check = a.cli("check-config", str(a.config))  # the user reads its 0640 config; paths go to the state dir
    assert check.returncode == 0 and f"relative paths resolve against {a.state}\n" in check.stdout, check
    # SIGHUP: the live key applied, the other listed, the agent still running.
    write_toml(a.config, a.tables | {"log": {"level": "WARNING"}, "mqtt": a.tables["mqtt"] | {"keepalive_s": 45}})
    a.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: a.logged("config reloaded: applied log.level; needs a restart: mqtt.keepalive_s"), 10,
             "the reload's line")
    wait_for(lambda: "STATUS=running; needs a restart for mqtt.keepalive_s" in a.notify.drain(), 5,
             "the status systemctl shows")
    # A broken file: refused with its key and line, the running config kept.
    a.config.write_text(a.config.read_text().replace('level = "WARNING"', 'level = "LOUD"'))
    a.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: a.logged("reload refused, running config kept"), 10, "the refused reload")
    assert re.search(rf"{re.escape(str(a.config))}:\d+: log.level: ", a.log.read_text())
    time.sleep(0.5)
    assert a.proc.poll() is None
    began = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(10) == 0
    assert time.monotonic() - began < 10
    assert "STOPPING=1" in a.notify.drain()
    conn = sqlite3.connect(outbox)
    try:
        assert conn.execute("SELECT count(*) FROM pending").fetchone()[0] == 0
    finally:
        conn.close()


# ---------------------------------------------------------------- shutdown within 10 s


@pytest.mark.parametrize("uplink", ["broker killed", "link black-holed"])
def test_sigterm_with_a_dead_uplink_and_a_backlog_ends_within_10s(tmp_path: Path, broker: Mosquitto,
                                                                 uplink: str) -> None:
    """docker stop / podman stop: SIGTERM, then SIGKILL 10 s later. The agent must be gone by then with a
    backlog it cannot flush, whether the broker is gone (refused) or the link silently dead (no answer)."""
    link = CuttableLink(broker.port)
    cfg = agent_config(tmp_path, link.port, sim={"total": 0, "rate_per_s": 2_000.0, "batch": 20},
                       outbox={"ack_window": 4})  # no HQ: nothing is acked, the backlog only grows
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    outbox = tmp_path / "outbox-S001.db"

    def pending() -> int:
        if not outbox.exists():
            return 0
        conn = sqlite3.connect(outbox, timeout=10)
        try:
            return conn.execute("SELECT count(*) FROM pending").fetchone()[0]
        except sqlite3.OperationalError:
            return 0
        finally:
            conn.close()

    try:
        wait_for(lambda: pending() > 1_000, 30, "a backlog")
        if uplink == "broker killed":
            broker.kill()
        else:
            link.cut()
        time.sleep(1.0)
        began = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        code = agent.proc.wait(30)  # type: ignore[union-attr]
        took = time.monotonic() - began  # asserted below, so a failure says by how much
    finally:
        agent.kill9()
        link.close()
    assert code == 0 and took < 10, (code, took)
    assert "facts left in the outbox for next start" in (tmp_path / "agent.log").read_text()
    assert pending() > 1_000



def test_sighup_does_not_kill_the_hq_receiver(tmp_path: Path, broker: Mosquitto) -> None:
    """A service manager's reload sends SIGHUP, whose default action ends a process; HQ says so and runs on."""
    hq = HqProcess(tmp_path, broker.port).start()
    try:
        wait_for(lambda: hq.log.exists() and "connected" in hq.log.read_text(errors="replace"), 30, "HQ to connect")
        assert hq.proc is not None
        hq.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloads nothing" in hq.log.read_text(errors="replace"), 10, "HQ's SIGHUP line")
        time.sleep(0.5)
        assert hq.proc.poll() is None, hq.log.read_text()
    finally:
        hq.terminate()
    assert hq.proc.returncode == 0
