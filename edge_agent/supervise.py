"""Supervision: camera processes and source threads that die are restarted, with backoff, and HQ is told.

The rules (``Supervision``, pure: time comes in as an argument):

- A child that *finishes* (a video file ended, a simulated feed is complete) is left alone. One that
  *dies* (killed by a signal, a non-zero exit, an exception out of a thread's loop) is restarted after
  ``min_s``, doubling with each death of the same episode up to ``max_s``: a child that dies at once
  on every start costs a restart a minute, not a busy loop.
- An *episode* starts with the first death: one alert then (``vision.camera_down``, ``source.down``),
  however often the child dies again within it. It ends when the restarted child has been *working*
  for ``stable_s`` (a thread: running; a camera: analysing frames again, its model loaded): one note
  (``vision.camera_recovered``, ``source.recovered``), and the backoff starts again from ``min_s`` at
  the next death.
- Restarts are counted per child and never reset, so the status page and /metrics show a crash loop.

``Supervisor`` is the shell: a thread that polls each child, applies the rules, restarts what is
due and writes the alerts to the outbox (held and retried while the disk refuses writes).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from .sync.diskstate import WriteFailed

log = logging.getLogger(__name__)

State = Literal["up", "down", "finished"]


@dataclass(frozen=True)
class Backoff:
    min_s: float = 1.0
    max_s: float = 60.0
    stable_s: float = 30.0  # working this long after a restart: the episode is over

    def delay(self, deaths: int) -> float:
        """Wait before the restart that follows the ``deaths``-th death of an episode (1-based)."""
        return min(self.max_s, self.min_s * 2 ** min(deaths - 1, 30))


@dataclass(frozen=True, slots=True)
class Notice:
    """An alert to raise: the child's down or recovered kind."""

    child: str
    kind: str
    message: str


@dataclass(slots=True)
class ChildState:
    name: str
    alerts: tuple[str, str]  # its alert kinds: down, recovered
    state: State = "up"
    restarts: int = 0
    deaths: int = 0  # in the current episode
    last_reason: str = ""
    down_since: float | None = None  # when the episode began
    restart_at: float | None = None  # while down
    working_since: float | None = None  # since its restart


@dataclass
class Supervision:
    backoff: Backoff
    children: dict[str, ChildState] = field(default_factory=dict)

    def add(self, name: str, alerts: tuple[str, str]) -> None:
        self.children[name] = ChildState(name, alerts)

    def died(self, name: str, reason: str, now: float) -> Notice | None:
        """A child found dead: when to restart it, and the alert if this starts an episode."""
        c = self.children[name]
        c.state, c.last_reason, c.working_since = "down", reason, None
        c.deaths += 1
        c.restart_at = now + self.backoff.delay(c.deaths)
        if c.down_since is not None:
            return None  # the episode's alert is out already
        c.down_since = now
        return Notice(name, c.alerts[0],
                      f"{name} died ({reason}); restarting in {c.restart_at - now:.1f} s")

    def finished(self, name: str) -> None:
        self.children[name].state = "finished"

    def due(self, now: float) -> list[str]:
        """Children whose restart time has come, in name order."""
        return sorted(n for n, c in self.children.items() if c.state == "down" and c.restart_at is not None
                      and now >= c.restart_at)

    def restarted(self, name: str) -> None:
        c = self.children[name]
        c.state, c.restart_at = "up", None
        c.restarts += 1

    def working(self, name: str, now: float) -> None:
        """The child does its job again (called while it does; the first call after a restart counts)."""
        c = self.children[name]
        if c.state == "up" and c.working_since is None:
            c.working_since = now

    def tick(self, now: float) -> list[Notice]:
        """Episodes that are over: their children have been working ``stable_s`` since their restart."""
        out = []
        for c in self.children.values():
            if c.state == "up" and c.down_since is not None and c.working_since is not None \
                    and now - c.working_since >= self.backoff.stable_s:
                out.append(Notice(c.name, c.alerts[1],
                                  f"{c.name} is back: working for {now - c.working_since:.0f} s after {c.deaths} "
                                  f"restart{'s' * (c.deaths != 1)}, without it {c.working_since - c.down_since:.1f} s"))
                c.down_since, c.deaths = None, 0
        return out


class Child(Protocol):
    """Something a Supervisor restarts: a camera process, a source's thread."""

    name: str
    alerts: tuple[str, str]  # down, recovered

    def exit(self) -> tuple[Literal["running", "finished", "died"], str]:
        """Whether it runs, finished, or died (and why)."""
        ...

    def working(self) -> bool:
        """Whether it does its job since its last (re)start, not only runs."""
        ...

    def restart(self) -> None: ...


class Supervisor:
    def __init__(self, children: Sequence[Child], backoff: Backoff, alert: Callable[[str, str], None],
                 *, poll_s: float = 0.2, mono: Callable[[], float] = time.monotonic) -> None:
        self._children = {c.name: c for c in children}
        self._alert = alert
        self._poll_s = poll_s
        self._mono = mono
        self.engine = Supervision(backoff)
        for c in children:
            self.engine.add(c.name, c.alerts)
        self._lock = threading.Lock()  # the engine's state, read by the status page
        self._unsent: list[Notice] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def start(self) -> None:
        if self._children:
            self._thread.start()

    def stop(self) -> None:
        """Before the children are stopped: a child stopping must not be taken for one dying."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def states(self) -> list[ChildState]:
        with self._lock:
            return [dataclasses.replace(c) for c in self.engine.children.values()]

    def figures(self) -> dict[str, float]:
        """Restarts per child, for the health report (HQ sees a crash loop between its alerts)."""
        with self._lock:
            return {f"supervise.{c.name}.restarts": float(c.restarts) for c in self.engine.children.values()}

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.step()
            except Exception:
                log.exception("supervision round failed")

    def step(self) -> None:
        now = self._mono()
        notices: list[Notice] = []
        for name, child in self._children.items():
            with self._lock:
                if self.engine.children[name].state != "up":
                    continue
            status, reason = child.exit()
            with self._lock:
                if status == "running" and child.working():
                    self.engine.working(name, now)
                elif status == "finished":
                    self.engine.finished(name)
                elif status == "died":
                    log.error("%s died (%s)", name, reason)
                    if (n := self.engine.died(name, reason, now)) is not None:
                        notices.append(n)
        with self._lock:
            due = self.engine.due(now)
        for name in due:
            if self._stop.is_set():
                return
            try:
                self._children[name].restart()
            except Exception as e:  # a restart that fails is one more death of the episode
                log.exception("%s could not be restarted", name)
                with self._lock:
                    self.engine.died(name, f"restart failed: {e}", now)
                continue
            with self._lock:
                self.engine.restarted(name)
                log.warning("%s restarted (restart %d)", name, self.engine.children[name].restarts)
        with self._lock:
            notices += self.engine.tick(now)
        self._unsent += notices
        while self._unsent:
            n = self._unsent[0]
            try:
                self._alert(n.kind, n.message)
            except WriteFailed:
                return  # held: the next round tries again (the outbox logs the episode)
            self._unsent.pop(0)


class SupervisedThread:
    """A source's daemon thread that a Supervisor restarts when its target dies of an exception (a target
    that returns has finished). The target must be safe to run again: the sources' loops are, since what
    they hold in memory changes only with the commit that records it."""

    alerts = ("source.down", "source.recovered")

    def __init__(self, name: str, target: Callable[[], None]) -> None:
        self.name = name
        self._target = target
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    def start(self) -> None:
        self._error = None
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    restart = start

    def _run(self) -> None:
        try:
            self._target()
        except BaseException as e:  # a thread's death is the supervisor's business, whatever killed it
            self._error = f"{type(e).__name__}: {e}"
            log.exception("thread %s died", self.name)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def working(self) -> bool:
        return self.is_alive()

    def exit(self) -> tuple[Literal["running", "finished", "died"], str]:
        if self._thread is None or self._thread.is_alive():
            return "running", ""
        return ("died", self._error) if self._error is not None else ("finished", "")
