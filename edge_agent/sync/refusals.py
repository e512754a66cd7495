"""Refused commands, coalesced: one answer per kind of refusal per interval, not one per command.

A flood of garbage commands must neither flood the uplink and the quarantine (one error result and
one fsync'ed transaction each) nor vanish. The rules:

- A refusal has a kind (the downlink's: too big, not a command topic, another store's, not a valid
  command, named unlike its topic, unknown, invalid args, no room in the command queue). Every
  refusal is counted under its kind.
- The first refusal after a flush opens an interval; ``interval_s`` later the tallies are due, and
  each kind seen gives one answer: a lone refusal its own (its id and reason, as any command gets),
  several one between them, with their count and the ids of the first ``samples``.
- Those first ``samples`` of each kind keep their raw bytes (cut to ``sample_bytes``) for
  quarantine; the rest are only counted.

So memory is bounded by kinds x samples x sample_bytes whatever the flood, and every refused command
is in a count. Time comes in as an argument; the caller serialises calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Refusal:
    topic: str
    name: str  # the command's name as far as it could be read ("?" if not at all)
    cmd_id: str | None  # None: not read (yet); the answer guesses it from raw
    reason: str
    raw: bytes


@dataclass(slots=True)
class Tally:
    kind: str
    count: int = 0
    name: str = "?"  # the name all of them had, or "*"
    samples: list[Refusal] = field(default_factory=list)


class Refusals:
    def __init__(self, interval_s: float = 1.0, samples: int = 3, sample_bytes: int = 64 * 1024) -> None:
        if samples < 1:
            raise ValueError("a refusal must keep at least one sample: a lone one is answered from it")
        self.interval_s = interval_s
        self.samples = samples
        self.sample_bytes = sample_bytes
        self._tallies: dict[str, Tally] = {}
        self._opened: float | None = None

    def add(self, now: float, kind: str, topic: str, name: str, reason: str, raw: bytes,
            cmd_id: str | None = None) -> None:
        if self._opened is None:
            self._opened = now
        t = self._tallies.get(kind)
        if t is None:
            t = self._tallies[kind] = Tally(kind, name=name)
        elif t.name != name:
            t.name = "*"
        t.count += 1
        if len(t.samples) < self.samples:
            t.samples.append(Refusal(topic, name, cmd_id, reason, raw[: self.sample_bytes]))

    def due(self, now: float) -> bool:
        return self._opened is not None and now - self._opened >= self.interval_s

    def take(self) -> list[Tally]:
        """The tallies so far, in the order their kinds first came; a new interval starts empty."""
        tallies, self._tallies, self._opened = list(self._tallies.values()), {}, None
        return tallies
