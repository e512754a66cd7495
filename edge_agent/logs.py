"""Structured log lines: one JSON object per line, from every process, so a box's journal can be searched and
shipped.

- **One formatter for every process.** Camera processes put their records on a multiprocessing queue
  (``child_logging``); a listener in the main process (``camera_log_listener``) hands them to the main
  process's handler, so their lines are formatted, coalesced and written in one place and carry
  ``"process"`` and ``"camera"``.
- **Repeats are coalesced** (``Coalescer``, pure, on an injected clock). Records of WARNING and above with the
  same logger, level and message template within ``coalesce_s`` of the first: the first is written, the rest
  only counted, and when the window closes one line says ``repeated N times in T s`` (with ``"repeated": N``).
  One unmapped antenna used to write 150 warnings a minute; now it writes one, then a summary a minute.
- **Levels are journald priorities.** Every line carries ``"priority"``, the syslog number (DEBUG 7, INFO 6,
  WARNING 4, ERROR 3, CRITICAL 2). When stderr is the journal (systemd sets ``JOURNAL_STREAM`` to the
  device and inode of that stream) each line is also prefixed ``<N>``, which journald takes as the line's
  priority (``SyslogLevelPrefix=``, on by default), so ``journalctl -p warning`` filters the agent's lines.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, TextIO

from .clock import Clock, RealClock, rfc3339

PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
COALESCE_FROM = logging.WARNING  # below this, lines are rare or asked for (DEBUG): never held back
COALESCE_KEYS_MAX = 10_000  # distinct templates tracked at once; a flood of unique messages is written as is


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (levels between the named ones round towards less severe)."""
    return next((p for lv, p in sorted(PRIORITY.items(), reverse=True) if levelno >= lv), 7)


class JsonFormatter(logging.Formatter):
    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": rfc3339(record.created),
            "level": record.levelname.lower(),
            "priority": priority(record.levelno),
            "logger": record.name,
            "process": record.processName,
            "msg": record.getMessage(),
        }
        for extra in ("camera", "repeated"):
            if (v := getattr(record, extra, None)) is not None:
                line[extra] = v
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:  # formatted in a camera process: the traceback objects do not cross
            line["exc"] = record.exc_text
        text = json.dumps(line, ensure_ascii=False)
        return f"<{line['priority']}>{text}" if self.journal else text


def stderr_is_journal(stream: TextIO | None = None) -> bool:
    """True when systemd connected this stream to the journal (JOURNAL_STREAM is ``device:inode``; a child
    that inherited the variable but writes elsewhere must not prefix its lines)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat((stream or sys.stderr).fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


# ---------------------------------------------------------------- coalescing (pure)


@dataclass
class _Window:
    opened: float
    suppressed: int = 0
    last: logging.LogRecord | None = None


@dataclass(frozen=True, slots=True)
class Summary:
    """A window closed with ``count`` repeats held back; ``last`` is the last of them."""

    count: int
    span_s: float
    last: logging.LogRecord


class Coalescer:
    """Decides which records of a flood are written. The rules:

    - A record whose key (logger, level, template) has no open window is written and opens one of
      ``window_s`` seconds.
    - A record whose key has an open window is held back and counted.
    - A window that has ended is closed: if it held records back, one ``Summary`` is due for it; the next
      record of its key is written and opens a new window.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._open: dict[tuple[str, int, str], _Window] = {}

    def admit(self, record: logging.LogRecord, now: float) -> bool:
        if self.window_s <= 0 or record.levelno < COALESCE_FROM:
            return True
        key = (record.name, record.levelno, str(getattr(record, "template", record.msg)))
        w = self._open.get(key)
        if w is not None and now - w.opened < self.window_s:
            w.suppressed += 1
            w.last = record
            return False
        if len(self._open) < COALESCE_KEYS_MAX or key in self._open:
            self._open[key] = _Window(now)
        return True

    def due(self, now: float) -> list[Summary]:
        """Close every window that has ended; a summary for each that held records back."""
        out = []
        for key, w in list(self._open.items()):
            if now - w.opened >= self.window_s:
                del self._open[key]
                if w.last is not None:
                    out.append(Summary(w.suppressed, now - w.opened, w.last))
        return out

    def flush(self) -> list[Summary]:
        """Every window, ended or not (the process is stopping)."""
        out = [Summary(w.suppressed, self.window_s, w.last) for w in self._open.values() if w.last is not None]
        self._open.clear()
        return out


def summary_record(s: Summary) -> logging.LogRecord:
    r = logging.makeLogRecord(s.last.__dict__)
    r.msg, r.args = f"{s.last.getMessage()} (repeated {s.count} times in {s.span_s:.0f} s)", None
    r.exc_info = r.exc_text = None
    r.repeated = s.count
    return r


class CoalescingHandler(logging.Handler):
    """Writes through ``target`` what the coalescer admits, and the summaries of closed windows (on the next
    record, or at ``tick``, which a timer calls every few seconds so that a flood that stops is still summed
    up; ``timer=False`` leaves the calls to the caller, as tests on a virtual clock do)."""

    def __init__(self, target: logging.Handler, window_s: float, clock: Clock | None = None,
                 timer: bool = True) -> None:
        super().__init__()
        self.target = target
        self.clock = clock or RealClock()
        self.coalescer = Coalescer(window_s)
        self._guard = threading.Lock()
        self._closed = threading.Event()
        if window_s > 0 and timer:
            threading.Thread(target=self._ticker, args=(min(window_s, 5.0),), name="log-coalesce",
                             daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        with self._guard:
            now = self.clock.now()
            out = [summary_record(s) for s in self.coalescer.due(now)]
            if self.coalescer.admit(record, now):
                out.append(record)
        for r in out:
            self.target.handle(r)

    def _ticker(self, every: float) -> None:
        while not self._closed.wait(every):
            self.tick()

    def tick(self) -> None:
        with self._guard:
            out = [summary_record(s) for s in self.coalescer.due(self.clock.now())]
        for r in out:
            self.target.handle(r)

    def close(self) -> None:
        self._closed.set()
        with self._guard:
            out = [summary_record(s) for s in self.coalescer.flush()]
        for r in out:
            self.target.handle(r)
        self.target.close()
        super().close()


def setup_logging(level: str = "INFO", component: str = "edge-agent", *, coalesce_s: float = 60.0,
                  stream: TextIO | None = None, clock: Clock | None = None, timer: bool = True) -> CoalescingHandler:
    """JSON lines on stderr (or ``stream``) for this process; returns the handler camera logs go to."""
    out = stream or sys.stderr
    writer = logging.StreamHandler(out)
    writer.setFormatter(JsonFormatter(journal=stderr_is_journal(out)))
    handler = CoalescingHandler(writer, coalesce_s, clock, timer)
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger(component).debug("logging ready")
    return handler


# ---------------------------------------------------------------- camera processes


class _MessageOnly(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


class _TemplateQueueHandler(logging.handlers.QueueHandler):
    """Sends a formatted record, keeping its template (``prepare`` replaces ``msg`` with the text), so that
    the main process coalesces a camera's repeats as it does its own."""

    def __init__(self, queue: Any, camera: str) -> None:
        super().__init__(queue)
        self.camera = camera
        self.setFormatter(_MessageOnly())  # the traceback travels in exc_text, not inside the message

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        template = str(record.msg)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        r = super().prepare(record)
        r.template, r.camera, r.exc_text = template, self.camera, record.exc_text
        return r


def child_logging(queue: Any, level: int | str, camera: str) -> None:
    """In a camera process: every record goes to the main process over ``queue``."""
    root = logging.getLogger()
    root.handlers[:] = [_TemplateQueueHandler(queue, camera)]
    root.setLevel(level)


def camera_log_listener(queue: Any) -> logging.handlers.QueueListener:
    """In the main process: the camera processes' records, written by this process's handlers."""
    handlers = logging.getLogger().handlers
    listener = logging.handlers.QueueListener(queue, *handlers, respect_handler_level=True)
    listener.start()
    return listener

