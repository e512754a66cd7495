"""Shared pieces for the integration tests: config files, agent subprocesses, HQ in-process, waiting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.config import HqFileConfig
from edge_agent.hq.receiver import HqReceiver
from simulators.toml_files import write_toml

REPO = Path(__file__).resolve().parents[1]


def agent_config(
    tmp: Path, port: int, *, store: str = "S001", sim: dict[str, Any] | None = None, **tables: dict[str, Any]
) -> Path:
    t: dict[str, dict[str, Any]] = {
        "store": {"id": store},
        "mqtt": {"port": port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5, "connect_timeout_s": 2.0},
        "outbox": {"path": str(tmp / f"outbox-{store}.db"), "cap_check_interval_s": 0.2},
        "health": {"interval_s": 5.0},
        "log": {"level": "INFO"},
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

    def start(self) -> AgentProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_agent.cli", "run", "-c", str(self.config)],
                stdout=out, stderr=out, cwd=REPO, env=env,
            )
        return self

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


def start_hq(
    tmp: Path, port: int, *, name: str = "hq", reorder_window_s: float = 0.5, mqtt: dict[str, Any] | None = None,
    **hq: Any,
) -> HqReceiver:
    cfg = HqFileConfig.model_validate(
        {
            "mqtt": {"port": port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5, **(mqtt or {})},
            "hq": {"db_path": str(tmp / f"{name}.db"), "http_port": 0, "print_applied": False,
                   "reorder_window_s": reorder_window_s, "resync_retry_s": 3.0, **hq},
        }
    )
    rx = HqReceiver(cfg)
    rx.start()
    return rx


def wait_for(pred: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
