"""Several label controllers as one: a store with more labels than one access point serves (the OEPL
firmware lists at most about 255 tags through ``get_db``, as it reads ``pos`` into a byte) or more floor
than one radio covers. The engine sees one controller either way."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from .controller import ControllerError, EslController, LabelContent, LabelReport, PollResult, SendReceipt

log = logging.getLogger(__name__)


class ControllerGroup:
    def __init__(self, controllers: Sequence[EslController]) -> None:
        if not controllers:
            raise ValueError("a controller group needs at least one controller")
        self.controllers = list(controllers)
        self._home: dict[str, int] = {}  # label -> the controller that last reported it most recently seen
        self._lock = threading.Lock()
        self.down: set[int] = set()  # controllers whose last poll failed

    def poll(self) -> PollResult:
        """Every controller's labels. One that cannot be reached is skipped (its labels simply go
        unreported, so they turn silent in time); only if none answers is it an error."""
        out = PollResult()
        best: dict[str, tuple[LabelReport, int]] = {}
        errors: list[str] = []
        for i, c in enumerate(self.controllers):
            try:
                r = c.poll()
            except ControllerError as e:
                errors.append(f"controller {i + 1}: {e}")
                self.down.add(i)
                continue
            self.down.discard(i)
            out.rejected += r.rejected
            for rep in r.reports:  # a label heard by two access points: the one that heard it last has it
                seen = best.get(rep.label)
                if seen is None or _newer(rep, seen[0]):
                    best[rep.label] = (rep, i)
        if len(errors) == len(self.controllers):
            raise ControllerError("; ".join(errors))
        for e in errors:
            log.warning("ESL %s", e)
        with self._lock:
            self._home.update({label: i for label, (_, i) in best.items()})
        out.reports = [rep for rep, _ in best.values()]
        return out

    def send(self, label: str, content: LabelContent, flash: bool = False) -> SendReceipt:
        with self._lock:
            i = self._home.get(label, 0 if len(self.controllers) == 1 else None)
        if i is None:
            raise ControllerError(f"no access point has reported label {label} yet")
        return self.controllers[i].send(label, content, flash)

    def listen(self, on_result: Callable[[PollResult], None], stop: threading.Event) -> None:
        """Follow every controller that pushes, until ``stop`` is set."""
        threads = [threading.Thread(target=listen, args=(on_result, stop), name=f"esl-push-{i + 1}", daemon=True)
                   for i, c in enumerate(self.controllers) if (listen := getattr(c, "listen", None)) is not None]
        for t in threads:
            t.start()
        stop.wait()
        for t in threads:
            t.join(5)


def _newer(a: LabelReport, b: LabelReport) -> bool:
    if a.last_seen is None:
        return False
    return b.last_seen is None or a.last_seen > b.last_seen
