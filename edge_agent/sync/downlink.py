"""Downlink: HQ commands on ``{prefix}/{store}/cmd/{name}``, validated, dispatched, answered.

Every command gets a ``cmd-result`` through the outbox (so the answer survives outages). A malformed
or unknown command, or one addressed to another store, gets an error result, is quarantined with its
reason, and changes nothing. Command ids are remembered, so a QoS 1 redelivery runs nothing twice.
The id and the result commit together; if the disk refuses that, the command is handled again once it
takes writes, with the outcome of the first run: a handler is not run twice for it.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from pydantic import BaseModel, ValidationError

from ..clock import Clock, rfc3339
from ..contract import COMMAND_ARGS, Command, split_topic
from .diskstate import WriteFailed, until_written
from .outbox import Fact, Outbox

log = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 64 * 1024
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
    detail: dict[str, Any]


def _short(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in e.errors()[:5])


class Downlink:
    def __init__(self, store: str, prefix: str, outbox: Outbox, clock: Clock,
                 check: Callable[[bytes], str | None] | None = None) -> None:
        self.store = store
        self._check = check  # HQ's signature: None if acceptable, else why not
        self.prefix = prefix
        self.outbox = outbox
        self.clock = clock
        self.topic = f"{prefix}/{store}/cmd/#"
        self._handlers: dict[str, tuple[type[BaseModel], Handler]] = {}
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=10_000)
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
        """Network-thread callback: never blocks, never raises."""
        try:
            self._queue.put_nowait((msg.topic, bytes(msg.payload)))
        except queue.Full:
            try:
                self.outbox.quarantine(SOURCE, "command queue full; command dropped", bytes(msg.payload))
            except WriteFailed:
                log.warning("command queue full and the disk refuses writes: dropped a command on %s", msg.topic)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if not until_written(functools.partial(self.handle, *item), self._stop):
                    return  # stopping while the disk refuses writes: left unanswered, as by a crash
            except Exception:
                log.exception("command handling failed")

    def handle(self, topic: str, payload: bytes) -> Outcome:
        """Validate and run one command; always returns the outcome it also uplinked. Raises WriteFailed
        if the disk refused to record it: give it again."""
        outcome, ran = self._decide(topic, payload)
        with self.outbox.transaction() as tx:
            if ran:
                tx.conn.execute(
                    "INSERT OR IGNORE INTO commands(id, name, at, status) VALUES (?,?,?,?)",
                    (outcome.cmd_id, outcome.name, self.clock.now(), outcome.status),
                )
            if outcome.status == "ok" or outcome.reason != "duplicate":
                tx.enqueue("cmd-result", [self._result_fact(outcome)])
        if ran:
            self._unrecorded.pop(outcome.cmd_id, None)
        return outcome

    def _decide(self, topic: str, payload: bytes) -> tuple[Outcome, bool]:
        """The outcome, and whether a handler ran for it (then its id is to be recorded)."""
        guess_id, guess_name = self._guess(payload, topic)

        def reject(reason: str) -> tuple[Outcome, bool]:
            self.outbox.quarantine(SOURCE, f"{topic}: {reason}", payload)
            return Outcome(guess_id, guess_name, "error", reason, {}), False

        if len(payload) > MAX_COMMAND_BYTES:
            return reject(f"command of {len(payload)} bytes exceeds {MAX_COMMAND_BYTES}")
        parts = split_topic(self.prefix, topic)
        if parts is None or parts.stream != "cmd" or not parts.command:
            return reject("not a command topic")
        if parts.store != self.store:
            return reject(f"command for store {parts.store!r} reached store {self.store!r}")
        if self._check is not None and (why := self._check(payload)):
            return reject(f"signature: {why}")
        try:
            cmd = Command.model_validate_json(payload)
        except ValidationError as e:
            return reject(f"invalid command: {_short(e)}")
        if cmd.store != self.store:
            return reject(f"command names store {cmd.store!r}, this is {self.store!r}")
        if cmd.name != parts.command:
            return reject(f"command name {cmd.name!r} does not match topic {parts.command!r}")
        entry = self._handlers.get(cmd.name)
        if entry is None:
            return reject(f"unknown command {cmd.name!r}")
        model, handler = entry
        try:
            args = model.model_validate(cmd.args)
        except ValidationError as e:
            return reject(f"invalid args: {_short(e)}")
        if self._seen(cmd.id):
            log.info("command %s (%s) already handled; ignoring redelivery", cmd.id, cmd.name)
            return Outcome(cmd.id, cmd.name, "error", "duplicate", {}), False
        if (earlier := self._unrecorded.get(cmd.id)) is not None:
            return earlier, True
        try:
            detail = handler(cmd, args)
            outcome = Outcome(cmd.id, cmd.name, "ok", None, detail)
        except CommandRejected as e:
            outcome = Outcome(cmd.id, cmd.name, "error", str(e), {})
        except WriteFailed:
            raise  # the handler changed nothing: run it again when the disk takes writes
        except Exception as e:
            log.exception("handler for %s failed", cmd.name)
            outcome = Outcome(cmd.id, cmd.name, "error", f"handler failed: {type(e).__name__}: {e}", {})
        self._unrecorded[cmd.id] = outcome
        return outcome, True

    def _seen(self, cmd_id: str) -> bool:
        return bool(self.outbox.read("SELECT 1 FROM commands WHERE id = ?", (cmd_id,)))

    @staticmethod
    def _guess(payload: bytes, topic: str) -> tuple[str, str]:
        """Best-effort id and name of a command that may not parse, so its error result can be matched."""
        name = topic.rsplit("/cmd/", 1)[-1][:128] if "/cmd/" in topic else "?"
        try:
            data = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):  # nesting too deep for the json module
            return "?", name
        if isinstance(data, dict):
            cid = data.get("id")
            # A lone surrogate (JSON "\ud800") would make the whole cmd-result message invalid JSON for HQ.
            return (cid[:64].encode("utf-8", "replace").decode() if isinstance(cid, str) and cid else "?"), name
        return "?", name

    def _result_fact(self, o: Outcome) -> Fact:
        now = self.clock.now()
        item = {"ts": rfc3339(now), "cmd_id": o.cmd_id, "name": o.name, "status": o.status, "reason": o.reason,
                "detail": o.detail}
        body = json.dumps(item, separators=(",", ":"))
        # A hostile command can make its own reason (validation errors quote its keys) outgrow a message.
        while len(body) > self.outbox.max_body_bytes and item["reason"]:
            item["reason"] = item["reason"][: len(item["reason"]) // 2]
            body = json.dumps(item, separators=(",", ":"))
        return Fact(ts=now, body=body)
