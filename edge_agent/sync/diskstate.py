"""A full disk is a state, not a crash: the outbox's refused writes, as episodes.

- A transaction the disk refuses (SQLite's SQLITE_FULL or SQLITE_IOERR class: full, or an I/O error)
  leaves nothing behind. SQLite rolls it back, and every engine that had run ahead of it rolls back
  too. The caller gets ``WriteFailed``, keeps what it was writing, and tries again (``until_written``),
  so sources push back on their inputs instead of losing them.
- The first refusal begins an episode; the outbox says ``write_failing`` until a transaction commits
  again. That transaction also carries the episode's alert, ``outbox.disk_full`` or ``outbox.io_error``:
  when the episode began and ended and how many transactions were refused. It goes to HQ with the next
  health report, the first moment there is room to say so. If the alert cannot be written either, the
  episode goes on.
- One log line when an episode begins and one when it ends, however many writes fail in between.

Pure: time comes in as an argument; the outbox does the I/O.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..clock import rfc3339

DISK_FULL = "outbox.disk_full"
IO_ERROR = "outbox.io_error"
_KIND_OF_CODE = {sqlite3.SQLITE_FULL: DISK_FULL, sqlite3.SQLITE_IOERR: IO_ERROR}
# SQLite's wording, for errors that come without a code.
_KIND_OF_TEXT = (("database or disk is full", DISK_FULL), ("disk i/o error", IO_ERROR))


def refusal_kind(e: sqlite3.Error) -> str | None:
    """The alert kind if ``e`` means the disk refused a write; None for any other error."""
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        # Extended codes (SQLITE_IOERR_WRITE, SQLITE_IOERR_FSYNC, ...) keep the primary code in the low byte.
        return _KIND_OF_CODE.get(code & 0xFF)
    text = str(e).lower()
    return next((kind for words, kind in _KIND_OF_TEXT if words in text), None)


class WriteFailed(sqlite3.OperationalError):
    """The disk refused an outbox transaction (full, or an I/O error): nothing of it was kept.
    Keep what was being written and try again later."""

    def __init__(self, kind: str, cause: sqlite3.Error) -> None:
        super().__init__(f"{kind}: {cause}")
        self.kind = kind


@dataclass
class Episode:
    kind: str
    began: float
    error: str  # the first refusal, in SQLite's words
    refused: int = 0


class DiskState:
    def __init__(self) -> None:
        self.episode: Episode | None = None
        self.refused_total = 0  # over the life of the process, for the health figures

    @property
    def failing(self) -> bool:
        return self.episode is not None

    def refused(self, kind: str, now: float, error: str, times: int = 1) -> bool:
        """Count refused writes (a transaction, or attempts to open the database). True if this begins an
        episode."""
        self.refused_total += times
        began = self.episode is None
        if self.episode is None:
            self.episode = Episode(kind, now, error)
        self.episode.refused += times
        return began

    def closing_alert(self, now: float) -> tuple[str, str] | None:
        """(kind, message) of the alert that a transaction about to commit must carry, or None if no
        episode is open. The episode ends only with ``committed``, once that transaction is in."""
        ep = self.episode
        if ep is None:
            return None
        return ep.kind, (
            f"outbox writes refused from {rfc3339(ep.began)} to {rfc3339(now)} ({now - ep.began:.1f} s), "
            f"{ep.refused} times ({ep.error}); the sources held their input back and retried"
        )

    def committed(self) -> None:
        self.episode = None


def until_written(write: Callable[[], object], stop: threading.Event, *, first_s: float = 0.05,
                  max_s: float = 1.0) -> bool:
    """Call ``write`` until the outbox takes it: True once it has, False if ``stop`` is set first.
    The wait doubles after each refusal up to ``max_s``, so a source resumes within about a second
    of space coming back without spinning on a full disk."""
    delay = first_s
    while True:
        try:
            write()
            return True
        except WriteFailed:
            if stop.wait(delay):
                return False
            delay = min(delay * 2, max_s)
