"""A real Eclipse Mosquitto on a free loopback port, for the demo, the tests and the benchmarks.

It can be stopped gracefully (it saves its persistent sessions), killed, and restarted on the same
port, which is how the tests cut the uplink on purpose.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM (so it can save its state), then SIGKILL if it has not gone within ``timeout``."""
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str:
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise FileNotFoundError("mosquitto not found: install the Debian package 'mosquitto' (scripts/bootstrap.sh does)")


class Mosquitto:
    def __init__(
        self,
        port: int | None = None,
        workdir: Path | None = None,
        extra_conf: str = "",
        *,
        listener_conf: str = "",
        anonymous: bool = True,
        persistence: bool = True,
    ) -> None:
        self.port = port or free_port()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mosq-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.extra_conf = extra_conf
        self.listener_conf = listener_conf  # e.g. TLS certfile/keyfile for the one listener
        self.anonymous = anonymous
        self.persistence = persistence
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = self.workdir / "mosquitto.conf"
        self.log = self.workdir / "mosquitto.log"

    def _write_conf(self) -> None:
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"{self.listener_conf}\n"
            f"allow_anonymous {'true' if self.anonymous else 'false'}\n"
            # Started as root, mosquitto would drop to user 'mosquitto' and could then not write its
            # persistence file in our private folder; stay as whoever started it.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
            f"persistence {'true' if self.persistence else 'false'}\n"
            f"persistence_location {self.workdir}/\n"
            # Queue without limit for offline persistent sessions (HQ restarts) and allow big batches.
            "max_queued_messages 0\n"
            "max_queued_bytes 0\n"
            "max_inflight_messages 0\n"
            "message_size_limit 0\n"
            f"log_dest file {self.log}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            f"{self.extra_conf}\n"
        )

    def start(self, timeout: float = 10.0) -> Mosquitto:
        self._write_conf()
        self.proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}; see {self.log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"mosquitto did not listen on {self.port} within {timeout}s")

    def stop(self) -> None:
        """Graceful stop: mosquitto writes its persistence file on SIGTERM."""
        stop_process(self.proc)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: mosquitto saves nothing (it writes persistence only on a clean exit or every
        autosave_interval, 1,800 s by default), so whatever it held for offline sessions is lost."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
