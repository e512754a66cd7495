"""sd_notify(3): tell systemd the agent is ready, alive, reloading or stopping.

A datagram to the unix socket named by ``$NOTIFY_SOCKET`` (a name starting with '@' is in the abstract
namespace); with no such variable (not under a Type=notify unit) every call does nothing. The protocol is
a few newline-separated ``KEY=value`` lines, so this needs no library (systemd-python wants libsystemd's
headers to build).

Watchdog: systemd sets ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``) from WatchdogSec=. ``watchdog()`` is
called by the loop whose ticking proves the agent alive, every round; it sends ``WATCHDOG=1`` at most four
times an interval, so a loop that stops ticking stops the pings and systemd restarts the agent.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        name = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + name[1:] if name.startswith("@") else name
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if name else None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())  # a watchdog meant for another process is not ours to feed
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None
        self._pinged = float("-inf")
        self._failed = False

    def send(self, *lines: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as e:
            if not self._failed:  # once: a vanished socket would otherwise log every watchdog round
                self._failed = True
                log.warning("cannot notify systemd at %s: %s", self._address.lstrip("\0"), e)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        if self.watchdog_s is None:
            return
        now = time.monotonic()
        if now - self._pinged >= self.watchdog_s / 4:
            self._pinged = now
            self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")
