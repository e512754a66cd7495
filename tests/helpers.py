"""Shared pieces for the integration tests: config files, agent subprocesses, HQ in-process, waiting."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.config import HqFileConfig
from edge_agent.hq.pg_store import PgStore
from edge_agent.hq.receiver import HqReceiver
from edge_agent.hq.sqlite_store import SqliteStore
from edge_agent.hq.store import HqStore
from simulators.live_camera import LiveCamera
from simulators.postgres import Postgres
from simulators.toml_files import write_toml

REPO = Path(__file__).resolve().parents[1]
CAVIAR_CLIP = REPO.parent / "shared" / "data" / "caviar" / "EnterExitCrossingPaths1cor.mpg"


def live_door_camera() -> tuple[LiveCamera, dict[str, Any]]:
    """A live MJPEG camera at 10 fps (real footage when the CAVIAR clip is there, a pattern otherwise) and
    [vision] keys for an agent that analyses it as camera "door", small and fast."""
    live = LiveCamera(CAVIAR_CLIP if CAVIAR_CLIP.exists() else None, fps=10.0).start()
    return live, {"enabled": True, "imgsz": 320, "flush_s": 2.0, "cameras": [
        {"camera": "door", "url": live.url, "fps_cap": 5.0,
         "homography": {"image": [[0, 0], [320, 0], [320, 240], [0, 240]], "floor": [[0, 0], [8, 0], [8, 6], [0, 6]]}}]}


def agent_config(
    tmp: Path, port: int, *, store: str = "S001", sim: dict[str, Any] | None = None, **tables: dict[str, Any]
) -> Path:
    t: dict[str, dict[str, Any]] = {
        "store": {"id": store},
        "mqtt": {"port": port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5, "connect_timeout_s": 2.0},
        "outbox": {"path": str(tmp / f"outbox-{store}.db"), "cap_check_interval_s": 0.2},
        "health": {"interval_s": 5.0},
        "log": {"level": "INFO"},
        "status": {"port": 0},  # any free port: test agents (and other runs on the box) never collide on 8782
    }
    if sim is not None:
        t["sources.simulated_inventory"] = {"enabled": True, **sim}
    for name, keys in tables.items():
        t.setdefault(name.replace("__", "."), {}).update(keys)
    return write_toml(tmp / f"agent-{store}.toml", t)


class AgentProcess:
    """`edge-agent run` as a real subprocess, so it can be kill -9'd."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self._starts_seen = 0

    def start(self) -> AgentProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_agent.cli", "run", "-c", str(self.config)],
                stdout=out, stderr=out, cwd=REPO, env=env,
            )
        return self

    def wait_started(self, timeout: float = 30.0) -> None:
        """Until this run has logged its start line: imports take seconds on a loaded box, and a kill
        that lands before the agent runs tests nothing."""
        def starts() -> int:
            return self.log.read_text(errors="replace").count("starting for store") if self.log.exists() else 0

        before = self._starts_seen
        wait_for(lambda: starts() > before, timeout, f"the agent to start; log: {self.log}")
        self._starts_seen = starts()

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"agent ignored SIGTERM for {timeout}s; log: {self.log}") from None
        return self.proc.returncode

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class HqProcess:
    """`edge-agent hq` as a real subprocess, so the receiver itself can be kill -9'd. ``hq``: more [hq]
    keys (``HqBackend.config()`` for its database, ``share_group`` to be one of several receivers)."""

    def __init__(self, tmp: Path, port: int, *, name: str = "hq", client_id: str = "edge-hq", **hq: Any) -> None:
        self.db_path = tmp / f"{name}.db"
        self.log = tmp / f"{name}-proc.log"
        self.config = write_toml(
            tmp / f"{name}-proc.toml",
            {
                "mqtt": {"port": port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5},
                "hq": ({} if "database" in hq else {"db_path": str(self.db_path)})
                | {"client_id": client_id, "reorder_window_s": 0.5, "resync_retry_s": 3.0, "print_applied": False, **hq},
                "log": {"level": "INFO"},
            },
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> HqProcess:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_agent.cli", "hq", "-c", str(self.config), "--http-port", "0"],
                stdout=out, stderr=out, cwd=REPO,
            )
        return self

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()

    def facts(self, store: str = "S001") -> int:
        """Delta facts applied (read from its SQLite file)."""
        conn = sqlite3.connect(self.db_path, timeout=10)
        try:
            rows = conn.execute("SELECT facts FROM streams WHERE store = ? AND stream = 'inventory/delta'",
                                (store,)).fetchall()
        except sqlite3.OperationalError:  # schema not created yet
            rows = []
        finally:
            conn.close()
        return rows[0][0] if rows else 0


def start_hq(
    tmp: Path, port: int, *, name: str = "hq", reorder_window_s: float = 0.5, mqtt: dict[str, Any] | None = None,
    **hq: Any,
) -> HqReceiver:
    cfg = HqFileConfig.model_validate(
        {
            "mqtt": {"port": port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5, **(mqtt or {})},
            # hq={"database": ...} (HqBackend.config) puts HQ on PostgreSQL instead of its SQLite file.
            "hq": ({} if "database" in hq else {"db_path": str(tmp / f"{name}.db")})
            | {"http_port": 0, "print_applied": False, "reorder_window_s": reorder_window_s, "resync_retry_s": 3.0, **hq},
        }
    )
    rx = HqReceiver(cfg)
    rx.start()
    return rx


def local_status(port: int, path: str = "/status.json") -> tuple[int, Any]:
    """(HTTP status, JSON) of an agent's status server on 127.0.0.1; (0, None) while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return 0, None


def wait_for(pred: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class CuttableLink:
    """A TCP relay on 127.0.0.1 between the agent and the broker whose links can be cut silently:
    bytes in both directions fall on the floor and nobody gets a FIN or RST, like a dead uplink,
    until :meth:`drop` closes the cut links (what a keepalive timeout would eventually do)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._links: list[dict[str, Any]] = []
        self._closed = False
        # Cleared, new connections are refused at once (as by a broker that is not up yet).
        self.gate = threading.Event()
        self.gate.set()
        threading.Thread(target=self._accept, name="link-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            if not self.gate.is_set():
                down.close()
                continue
            try:
                up = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            link = {"socks": (down, up), "cut": False}
            with self._lock:
                if self._closed:
                    down.close()
                    up.close()
                    return
                self._links.append(link)
            for src, dst in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(link, src, dst), daemon=True).start()

    def _pump(self, link: dict[str, Any], src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not link["cut"]:
                    dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            if link in self._links:
                self._links.remove(link)
        self._close(link)

    @staticmethod
    def _close(link: dict[str, Any]) -> None:
        for sock in link["socks"]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def cut(self) -> int:
        """Silently black-hole every open link; new connections still go through."""
        with self._lock:
            live = [link for link in self._links if not link["cut"]]
            for link in live:
                link["cut"] = True
        return len(live)

    def drop(self) -> None:
        with self._lock:
            cut = [link for link in self._links if link["cut"]]
            self._links = [link for link in self._links if not link["cut"]]
        for link in cut:
            self._close(link)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            links, self._links = self._links, []
        self._listener.close()
        for link in links:
            self._close(link)


class HqBackend:
    """One test's HQ store of record on one backend: ``config(name)`` gives the [hq] keys that name it
    (for a receiver), ``store(name)`` opens it (for an applier); the same name is the same database,
    so a test can reopen it as a restarted HQ would."""

    def __init__(self, tmp: Path, pg: Postgres | None) -> None:
        self._tmp = tmp
        self._pg = pg
        self._urls: dict[str, str] = {}
        self.opened: list[HqStore] = []

    def config(self, name: str = "hq") -> dict[str, Any]:
        if self._pg is None:
            return {"db_path": str(self._tmp / f"{name}.db")}
        if name not in self._urls:
            self._urls[name] = self._pg.create_database()
        return {"database": self._urls[name]}

    def store(self, name: str = "hq", synchronous: str = "FULL") -> HqStore:
        """``synchronous``: SQLite's, for tests that open many stores (the test cluster runs without fsync)."""
        keys = self.config(name)
        store = SqliteStore(keys["db_path"], synchronous) if self._pg is None else PgStore(keys["database"])
        self.opened.append(store)
        return store
