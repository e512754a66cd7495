"""Downlink: HQ commands on ``{prefix}/{store}/cmd/{name}``, validated, dispatched, answered.

Every command gets a ``cmd-result`` through the outbox (so the answer survives outages). A command
that parses and reaches its handler is answered on its own, whatever the handler says; ids are
remembered, so a QoS 1 redelivery runs nothing twice (and the first answer stands). A command refused
before that changes nothing and is answered by ``Refusals``: within a second, one result per kind of
refusal, a lone one as itself, several as one result with their count and a few ids. The kinds
(counted in ``health.refused_commands``): ``oversize``, ``not_command_topic``, ``wrong_store``,
``invalid_command``, ``name_mismatch``, ``unknown_command``, ``invalid_args``, and ``queue_full`` for a
command that arrived while the queue in front of the handlers was full. A sample of each kind is
quarantined with its reason; the rest are counted in ``health.quarantined``. With HQ's public key
configured, a command that fails its signature check is refused the same way (``unsigned``,
``bad_signature``, ``malformed_signature``). The id and the result of a command that ran commit
together; if the disk refuses that, the command is handled again once it takes writes, with the
outcome of the first run: a handler is not run twice for it.

The MQTT network thread only queues: no parsing, no disk. The queue holds the first
``MAX_COMMAND_BYTES + 1`` bytes of each command (a longer one is refused for its size anyway) and at
most ``QUEUE_MAX_BYTES`` in all, so a flood costs bounded memory.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from pydantic import BaseModel, ValidationError

from ..clock import Clock, rfc3339
from ..contract import COMMAND_ARGS, Command, split_topic
from .diskstate import WriteFailed, until_written
from .outbox import QUARANTINE_RAW_MAX, Fact, Outbox
from .refusals import Refusals, Tally

log = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 64 * 1024
QUEUE_MAX = 10_000
QUEUE_MAX_BYTES = 16 * 1024 * 1024
TICK_S = 0.1  # how often an idle worker looks whether refusals are due
SOURCE = "downlink"

Handler = Callable[[Command, BaseModel], dict[str, Any]]


class CommandRejected(Exception):
    """Raised by a handler for a command it understood but will not carry out; the message is the reason."""


@dataclass(frozen=True)
class Outcome:
    cmd_id: str
    name: str
    status: str
    reason: str | None
    detail: dict[str, Any] = field(default_factory=dict)
    refused: str | None = None  # the kind of refusal, for a command refused before its handler


def _short(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in e.errors()[:5])


def _name_of(topic: str) -> str:
    return topic.rsplit("/cmd/", 1)[-1][:128] if "/cmd/" in topic else "?"


class Downlink:
    def __init__(self, store: str, prefix: str, outbox: Outbox, clock: Clock, *,
                 check: Callable[[bytes], str | None] | None = None,
                 queue_max: int = QUEUE_MAX, queue_max_bytes: int = QUEUE_MAX_BYTES) -> None:
        self.store = store
        self._check = check  # HQ's signature: None if acceptable, else why not
        self.prefix = prefix
        self.outbox = outbox
        self.clock = clock
        self.tap: Callable[[str, bytes, int], None] | None = None  # a recorder: each command queued
        self.topic = f"{prefix}/{store}/cmd/#"
        self._handlers: dict[str, tuple[type[BaseModel], Handler]] = {}
        self._queue: queue.Queue[tuple[str, bytes, int] | None] = queue.Queue(maxsize=queue_max)
        self._queue_max_bytes = queue_max_bytes
        self._lock = threading.Lock()  # the queue's byte count and the refusals, shared with the network thread
        self._queued_bytes = 0
        self._refusals = Refusals(sample_bytes=QUARANTINE_RAW_MAX)
        self._thread = threading.Thread(target=self._work, name="downlink", daemon=True)
        self._stop = threading.Event()
        self._unrecorded: dict[str, Outcome] = {}  # ran, but the disk refused to record id and result
        with outbox.transaction() as tx:
            tx.conn.execute(
                "CREATE TABLE IF NOT EXISTS commands(id TEXT PRIMARY KEY, name TEXT, at REAL, status TEXT) WITHOUT ROWID"
            )

    def register(self, name: str, handler: Handler, args: type[BaseModel] | None = None) -> None:
        model = args or COMMAND_ARGS.get(name)
        if model is None:
            raise ValueError(f"no args model for command {name!r}")
        self._handlers[name] = (model, handler)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self._queue.put(None, timeout=5)
        except queue.Full:
            pass
        self._thread.join(5)

    def on_message(self, msg: mqtt.MQTTMessage) -> None:
        """Network-thread callback: never blocks, never raises, never touches the disk."""
        size = len(msg.payload)
        payload = bytes(msg.payload[: MAX_COMMAND_BYTES + 1])
        with self._lock:
            room = self._queued_bytes + len(payload) <= self._queue_max_bytes
            if room:
                try:
                    self._queue.put_nowait((msg.topic, payload, size))
                    self._queued_bytes += len(payload)
                    if self.tap is not None:
                        self.tap(msg.topic, payload, size)
                except queue.Full:
                    room = False
            if not room:
                self._refusals.add(self.clock.now(), "queue_full", msg.topic, _name_of(msg.topic),
                                   "command queue full; command dropped", payload)

    def _work(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=TICK_S)
            except queue.Empty:
                item = ()
            if item is None:
                break
            try:
                if item:
                    topic, payload, size = item
                    with self._lock:
                        self._queued_bytes -= len(payload)
                    if not until_written(functools.partial(self.handle, topic, payload, size), self._stop):
                        return  # stopping while the disk refuses writes: left unanswered, as by a crash
                self.flush(due_only=True)
            except WriteFailed:
                pass  # the answers to one interval of refused commands; the disk state logs the episode
            except Exception:
                log.exception("command handling failed")
        try:
            self.flush()
        except Exception:
            log.exception("answering refused commands failed")

    def handle(self, topic: str, payload: bytes, size: int | None = None) -> Outcome:
        """Validate and run one command and return its outcome. It is uplinked at once, or, for a command
        refused before its handler, by the next ``flush``. ``size``: the payload's length before
        ``on_message`` cut it."""
        outcome, ran = self._decide(topic, payload, len(payload) if size is None else size)
        if outcome.refused is not None:
            with self._lock:
                self._refusals.add(self.clock.now(), outcome.refused, topic, outcome.name, outcome.reason or "",
                                   payload, None if outcome.cmd_id == "?" else outcome.cmd_id)
        elif outcome.status == "ok" or outcome.reason != "duplicate":
            with self.outbox.transaction() as tx:
                if ran:
                    tx.conn.execute(
                        "INSERT OR IGNORE INTO commands(id, name, at, status) VALUES (?,?,?,?)",
                        (outcome.cmd_id, outcome.name, self.clock.now(), outcome.status),
                    )
                tx.enqueue("cmd-result", [self._result_fact(outcome)])
        if ran:
            self._unrecorded.pop(outcome.cmd_id, None)
        return outcome

    def flush(self, *, due_only: bool = False) -> int:
        """Answer, count and quarantine the commands refused since the last flush (with ``due_only``, only
        once their interval has passed). Returns how many commands that answered."""
        with self._lock:
            if due_only and not self._refusals.due(self.clock.now()):
                return 0
            tallies = self._refusals.take()
        if not tallies:
            return 0
        # The samples first, in one transaction of their own; a crash before the answers below loses one
        # interval's answers to garbage, whose MQTT delivery was acknowledged anyway.
        samples = [(f"{s.topic}: {s.reason}", s.raw) for t in tallies for s in t.samples]
        self.outbox.quarantine_many(SOURCE, samples, len(samples))
        with self.outbox.transaction() as tx:
            tx.enqueue("cmd-result", [self._tally_fact(t) for t in tallies])
            for t in tallies:
                tx.bump(f"refused.{t.kind}", t.count)
                if t.count > len(t.samples):
                    tx.bump(f"quarantined.{SOURCE}", t.count - len(t.samples))
        n = sum(t.count for t in tallies)
        if n > len(tallies):
            log.warning("refused %d commands: %s", n, ", ".join(f"{t.kind} {t.count}" for t in tallies))
        return n

    def _decide(self, topic: str, payload: bytes, size: int) -> tuple[Outcome, bool]:
        """The outcome, and whether a handler ran for it (then its id is to be recorded)."""
        name = _name_of(topic)

        def refuse(kind: str, reason: str, cmd_id: str = "?") -> tuple[Outcome, bool]:
            # The id of a command that did not parse is guessed only for the few refusals that are answered
            # with it (at flush): in a flood, guessing every one cost as much as the rest of the check.
            return Outcome(cmd_id, name, "error", reason, refused=kind), False

        if size > MAX_COMMAND_BYTES:
            return refuse("oversize", f"command of {size} bytes exceeds {MAX_COMMAND_BYTES}")
        parts = split_topic(self.prefix, topic)
        if parts is None or parts.stream != "cmd" or not parts.command:
            return refuse("not_command_topic", "not a command topic")
        if parts.store != self.store:
            return refuse("wrong_store", f"command for store {parts.store!r} reached store {self.store!r}")
        if self._check is not None and (why := self._check(payload)):
            return refuse(why.replace(" ", "_") if why in ("unsigned", "bad signature") else "malformed_signature",
                          f"signature: {why}")
        try:
            cmd = Command.model_validate_json(payload)
        except ValidationError as e:
            return refuse("invalid_command", f"invalid command: {_short(e)}")
        if cmd.store != self.store:
            return refuse("wrong_store", f"command names store {cmd.store!r}, this is {self.store!r}", cmd.id)
        if cmd.name != parts.command:
            return refuse("name_mismatch", f"command name {cmd.name!r} does not match topic {parts.command!r}", cmd.id)
        entry = self._handlers.get(cmd.name)
        if entry is None:
            return refuse("unknown_command", f"unknown command {cmd.name!r}", cmd.id)
        model, handler = entry
        try:
            args = model.model_validate(cmd.args)
        except ValidationError as e:
            return refuse("invalid_args", f"invalid args: {_short(e)}", cmd.id)
        if self._seen(cmd.id):
            log.info("command %s (%s) already handled; ignoring redelivery", cmd.id, cmd.name)
            return Outcome(cmd.id, cmd.name, "error", "duplicate"), False
        if (earlier := self._unrecorded.get(cmd.id)) is not None:
            return earlier, True
        try:
            detail = handler(cmd, args)
            outcome = Outcome(cmd.id, cmd.name, "ok", None, detail)
        except WriteFailed:
            raise  # the handler changed nothing: run it again when the disk takes writes
        except CommandRejected as e:
            outcome = Outcome(cmd.id, cmd.name, "error", str(e))
        except Exception as e:
            log.exception("handler for %s failed", cmd.name)
            outcome = Outcome(cmd.id, cmd.name, "error", f"handler failed: {type(e).__name__}: {e}")
        self._unrecorded[cmd.id] = outcome
        return outcome, True

    def _seen(self, cmd_id: str) -> bool:
        return bool(self.outbox.read("SELECT 1 FROM commands WHERE id = ?", (cmd_id,)))

    @staticmethod
    def _guess_id(payload: bytes) -> str:
        """Best-effort id of a command that may not parse, so its error result can be matched."""
        try:
            data = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):  # nesting too deep for the json module
            return "?"
        cid = data.get("id") if isinstance(data, dict) else None
        # A lone surrogate (JSON "\ud800") would make the whole cmd-result message invalid JSON for HQ.
        return cid[:64].encode("utf-8", "replace").decode() if isinstance(cid, str) and cid else "?"

    def _tally_fact(self, t: Tally) -> Fact:
        """A lone refusal is answered as itself; several by one result with their count and first ids."""
        ids = [s.cmd_id if s.cmd_id is not None else self._guess_id(s.raw) for s in t.samples]
        first = t.samples[0]
        if t.count == 1:
            return self._result_fact(Outcome(ids[0], first.name, "error", first.reason))
        return self._result_fact(Outcome("*", t.name, "error", first.reason),
                                 count=t.count, sample_ids=[i for i in ids if i != "?"])

    def _result_fact(self, o: Outcome, **coalesced: Any) -> Fact:
        now = self.clock.now()
        item = {"ts": rfc3339(now), "cmd_id": o.cmd_id, "name": o.name, "status": o.status, "reason": o.reason,
                "detail": o.detail, **coalesced}
        body = json.dumps(item, separators=(",", ":"))
        # A hostile command can make its own reason (validation errors quote its keys) outgrow a message.
        while len(body) > self.outbox.max_body_bytes and item["reason"]:
            item["reason"] = item["reason"][: len(item["reason"]) // 2]
            body = json.dumps(item, separators=(",", ":"))
        return Fact(ts=now, body=body)
