"""Replaying a recording: the same pipeline objects, on a virtual clock, in one thread.

The agent is built from the store's config as ``edge-agent run`` builds it (RFID pipeline, inventory book,
ESL service, downlink and its command handlers), with what would reach outside switched off: no reader
intake listens, no broker is connected, the access point is a ``RecordedAccessPoint`` answering from the
recording, and the outbox is the replay's own. Nothing runs on a thread of its own; the player does
everything the agent's threads would, in one order fixed by the recording:

- Each entry runs at its recorded time ``t``: a reader payload is ingested, a command handled, a push
  taken in, a camera's tracks fed to its ``TrackFeed`` and the result to the ``VisionService``.
- Between entries the clock moves to every moment a timer of the agent would fire: the RFID tick (every
  ``rfid.tick_s``, which also runs the downlink's and the store-wide merge's deadlines), and an ESL step
  without a poll after a push or a label command (``PUSH_BATCH_S`` later) or when a price takes effect.
- An ESL poll step runs where the recording shows the poll began: the first access point's
  ``GET /get_db?pos=0``. Every request then gets the answer recorded for the same access point, method
  and path, in recorded order.
- At the end, cameras still running are ended as a stopping agent ends them.

Same recording, same output: the output is every fact the outbox took (stream, fact time, key, body, in
commit order), then the alerts and the quarantine, with ids made at random (ULIDs of snapshots and cycle
counts) numbered by first appearance. ``speed`` only paces the run (0: as fast as it goes).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from ..agent import Agent
from ..clock import VirtualClock, rfc3339
from ..config import AgentConfig
from ..esl.controller import ControllerError
from ..esl.group import ControllerGroup
from ..esl.openepaperlink import OpenEPaperLinkController, parse_push
from ..esl.service import PUSH_BATCH_S
from ..vision.analytics import Track
from ..vision.feed import TrackFeed
from ..vision.service import VisionService
from .recording import (
    ApHttp,
    ApPush,
    CameraDone,
    Entry,
    HqCommand,
    ReaderPayload,
    RecordingError,
    Start,
    Tracks,
    read_recording,
    without_credentials,
)

log = logging.getLogger(__name__)

LABEL_COMMANDS = frozenset({"price.set", "esl.bind", "esl.flash"})  # the ESL thread wakes on these
POLL_START = ("GET", "/get_db?pos=0")
_ULID = re.compile(r"\b[0-9A-HJKMNP-TV-Z]{26}\b")


class RecordedAnswers:
    """Every recorded exchange with the access points, answered in recorded order per (AP, method, path)."""

    def __init__(self, entries: Iterable[Entry]) -> None:
        self._q: dict[tuple[str, str, str], deque[ApHttp]] = defaultdict(deque)
        for e in entries:
            if isinstance(e, ApHttp):
                self._q[(e.ap, e.method, e.path)].append(e)

    def answer(self, ap: str, method: str, path: str) -> bytes:
        q = self._q.get((ap, method, path))
        if not q:
            raise ControllerError(f"{method} {path}: not in the recording")
        e = q.popleft()
        if e.error is not None:
            raise ControllerError(e.error)
        return e.data


class RecordedAccessPoint(OpenEPaperLinkController):
    """The OEPL adapter itself (its parsing and its rules), with the AP's answers read from a recording."""

    def __init__(self, base_url: str, answers: RecordedAnswers) -> None:
        super().__init__(base_url)
        self.recorded_as = without_credentials(base_url)
        self.answers = answers

    def _fetch(self, method: Literal["GET", "POST"], path: str, form: bytes | None) -> bytes:
        return self.answers.answer(self.recorded_as, method, path)


def replay_config(cfg: AgentConfig, workdir: Path) -> AgentConfig:
    """The store's config for a replay: nothing that listens, connects or signs, and an outbox of its own."""
    rfid = cfg.rfid.model_copy(update={"mqtt": cfg.rfid.mqtt.model_copy(update={"enabled": False}),
                                       "http": cfg.rfid.http.model_copy(update={"enabled": False}), "llrp": []})
    sim = cfg.sources.simulated_inventory.model_copy(update={"enabled": False})
    return cfg.model_copy(update={
        "rfid": rfid,
        "sources": cfg.sources.model_copy(update={"simulated_inventory": sim}),
        "outbox": cfg.outbox.model_copy(update={"path": workdir / "replay.db", "synchronous": "NORMAL"}),
        "signing": cfg.signing.model_copy(update={"key_file": None}),
        "vision": cfg.vision.model_copy(update={"enabled": False}),  # the player runs its own, on the clock
    })


class Player:
    def __init__(self, cfg: AgentConfig, recording: Path, workdir: Path) -> None:
        """``recording`` is read twice, never held in memory: once for the access points' answers, once to
        replay it."""
        start = next(read_recording(recording))
        assert isinstance(start, Start)  # read_recording checks the first line
        if start.store != cfg.store.id:
            log.warning("the recording is of store %s, the config of %s", start.store, cfg.store.id)
        if (workdir / "replay.db").exists():  # its state would carry into this replay
            raise FileExistsError(f"{workdir / 'replay.db'} exists: replay into an empty folder")
        self.recording = recording
        self.start = start
        self.taken = 0
        self.clock = VirtualClock(start.t)
        self.agent = Agent(replay_config(cfg, workdir), clock=self.clock)
        self.first_ap: str | None = None
        if self.agent.esl is not None:
            answers = RecordedAnswers(read_recording(recording))
            aps = [RecordedAccessPoint(u, answers) for u in cfg.esl.urls]
            self.agent.esl.controller = ControllerGroup(aps)
            self.first_ap = aps[0].recorded_as
        self.vision: VisionService | None = None
        self.feeds: dict[str, TrackFeed] = {}
        if cfg.vision.enabled and cfg.vision.cameras:
            self.vision = VisionService(cfg.vision, self.agent.outbox, monotonic=self.clock.now)
            self.feeds = {c.camera: TrackFeed(c, cfg.vision.flush_s) for c in cfg.vision.cameras}
        self.tick_s = cfg.rfid.tick_s
        self._next_tick = start.t + self.tick_s
        self._esl_wake = math.inf

    # ------------------------------------------------------------ running

    def run(self, speed: float = 0.0) -> None:
        """Every entry at its time; ``speed`` N paces it at N times real time (0: no pacing)."""
        began, t0 = time.monotonic(), self.start.t
        entries = read_recording(self.recording)
        next(entries)  # the start line
        for e in entries:
            self.taken += 1
            if speed > 0 and (ahead := (e.t - t0) / speed - (time.monotonic() - began)) > 0:
                time.sleep(ahead)
            self._until(e.t)
            self._take(e)
        for camera in self.feeds:  # still running when the recording ended: stopped as the agent stops them
            self._camera_done(camera)
        if self.vision is not None:
            self.vision.finish()

    def _until(self, t: float) -> None:
        """Move the clock to ``t``, firing on the way every timer that falls due."""
        while True:
            esl_due = self._esl_due()
            due = min(self._next_tick, esl_due)
            if due > t:
                break
            self.clock.set(max(due, self.clock.now()))
            if due == esl_due:
                self._esl_wake = math.inf
                self._esl_step(poll=False)
            else:
                self._next_tick += self.tick_s
                self._tick()
        self.clock.set(max(t, self.clock.now()))

    def _esl_due(self) -> float:
        esl = self.agent.esl
        if esl is None:
            return math.inf
        boundary = esl.next_due(math.inf)  # a price taking effect, a pick ending
        return min(self._esl_wake, boundary if boundary > self.clock.now() else math.inf)

    def _tick(self) -> None:
        if self.agent.rfid is not None:
            self.agent.rfid.tick()
        self.agent.downlink.flush(due_only=True)
        if self.vision is not None:
            self.vision.take(None)

    def _esl_step(self, poll: bool) -> None:
        assert self.agent.esl is not None
        try:
            self.agent.esl.step(poll=poll)
        except Exception:
            log.exception("ESL step failed")  # as the agent's ESL thread: the next step goes on

    def _take(self, e: Entry) -> None:
        if isinstance(e, ReaderPayload):
            if self.agent.rfid is not None:
                try:
                    self.agent.rfid.ingest(e.data, e.source, e.reader)
                except Exception:  # as the intake worker: one bad payload does not stop the replay
                    log.exception("RFID payload from %s failed", e.source)
        elif isinstance(e, HqCommand):
            outcome = self.agent.downlink.handle(e.topic, e.data, e.size)
            if self.agent.esl is not None and outcome.name in LABEL_COMMANDS:
                self._esl_wake = min(self._esl_wake, e.t + PUSH_BATCH_S)
        elif isinstance(e, ApHttp):
            if e.ap == self.first_ap and (e.method, e.path) == POLL_START:
                self._esl_step(poll=True)
        elif isinstance(e, ApPush):
            result = parse_push(e.data)
            if self.agent.esl is not None and result is not None:
                self.agent.esl.ingest(result)
                self._esl_wake = min(self._esl_wake, e.t + PUSH_BATCH_S)
        elif isinstance(e, Tracks):
            feed = self.feeds.get(e.camera)
            if feed is not None and self.vision is not None:
                facts = feed.frame(e.ts, [Track(int(r[0]), (r[1], r[2], r[3], r[4]), r[5]) for r in e.tracks])
                if facts is not None:
                    self.vision.take(facts)
        elif isinstance(e, CameraDone):
            self._camera_done(e.camera)

    def _camera_done(self, camera: str) -> None:
        feed = self.feeds.pop(camera, None)
        if feed is None or self.vision is None:
            return
        if (facts := feed.end()) is not None:
            self.vision.take(facts)
        self.vision.take(("done", camera, {}))

    # ------------------------------------------------------------ what it produced

    def output(self) -> Iterator[dict[str, Any]]:
        """The facts in commit order, then the alerts and the quarantine; random ids numbered."""
        ids: dict[str, str] = {}

        def same(text: str) -> str:
            return _ULID.sub(lambda m: ids.setdefault(m.group(0), f"<id {len(ids) + 1}>"), text)

        ob = self.agent.outbox
        for stream, ts, key, body in ob.read("SELECT stream, ts, key, body FROM pending ORDER BY id"):
            yield {"stream": stream, "ts": rfc3339(ts), "key": key, "body": json.loads(same(body))}
        for ts, kind, message in ob.read("SELECT ts, kind, message FROM alerts ORDER BY id"):
            yield {"alert": kind, "ts": rfc3339(ts), "message": same(message)}
        for at, source, reason in ob.read("SELECT at, source, reason FROM quarantine ORDER BY id"):
            yield {"quarantined": source, "ts": rfc3339(at), "reason": same(reason)}

    def close(self) -> None:
        self.agent.outbox.close()


def replay(cfg: AgentConfig, recording: Path, workdir: Path, out: Path | None,
           speed: float = 0.0) -> tuple[int, int]:
    """Replay ``recording``; write the output as JSON lines to ``out`` (None: standard output). Returns the
    inputs taken and the lines written."""
    import sys

    player = Player(cfg, recording, workdir)
    try:
        player.run(speed)
        lines = [json.dumps(o, sort_keys=True, separators=(",", ":")) for o in player.output()]
    finally:
        player.close()
    text = "".join(line + "\n" for line in lines)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
    return player.taken, len(lines)


def replay_command(cfg: AgentConfig, recording: Path, speed: float, out: Path | None, workdir: Path | None) -> int:
    """``edge-agent replay``: the exit status; what went wrong on stderr."""
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edge-agent-replay-") as tmp:
        try:
            taken, n = replay(cfg, recording, workdir or Path(tmp), out, speed)
        except (OSError, RecordingError) as e:  # FileExistsError: a workdir with a replay in it
            print(e, file=sys.stderr)
            return 2
    print(f"{recording}: {taken} inputs replayed, {n} output lines", file=sys.stderr)
    return 0
