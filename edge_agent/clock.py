"""Clocks. Engines take one of these instead of calling time.time(), so a recorded feed replayed
on a VirtualClock produces byte-identical output."""

from __future__ import annotations

import functools
import threading
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the Unix epoch."""
        ...


class RealClock:
    def now(self) -> float:
        return time.time()


class VirtualClock:
    """A clock that only moves when told to; safe to read from several threads."""

    def __init__(self, start: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self._t = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._t

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a virtual clock never goes backwards")
        with self._lock:
            self._t += seconds
            return self._t

    def set(self, t: float) -> None:
        with self._lock:
            if t < self._t:
                raise ValueError("a virtual clock never goes backwards")
            self._t = t


@functools.lru_cache(maxsize=1024)  # pure; facts of one batch share a timestamp, so most calls hit
def rfc3339(t: float) -> str:
    """RFC 3339 UTC with millisecond precision, e.g. 2026-11-25T01:48:26.123Z."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_rfc3339(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
