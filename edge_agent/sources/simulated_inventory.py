"""A source that replays the simulated inventory feed into the book at a steady rate.

Its position is committed with each batch (in the same transaction as the deltas), so a kill -9
resumes exactly where the book left off: no delta skipped, none applied twice. For the same reason a
batch the disk refuses is simply given again, until it commits or the source is stopped.
"""

from __future__ import annotations

import functools
import logging
import threading
import time

from simulators.inventory_feed import InventoryFeed

from ..clock import Clock
from ..config import SimulatedInventoryConfig
from ..inventory.book import Delta, InventoryBook
from ..supervise import SupervisedThread
from ..sync.diskstate import until_written

log = logging.getLogger(__name__)

NAME = "sim-inventory"


class SimulatedInventorySource:
    def __init__(self, cfg: SimulatedInventoryConfig, book: InventoryBook, clock: Clock) -> None:
        self.cfg = cfg
        self.book = book
        self.clock = clock
        self.feed = InventoryFeed(cfg.seed, cfg.zones, cfg.gtins)
        self._stop = threading.Event()
        self._thread = SupervisedThread(NAME, self._run)
        self.supervised = [self._thread]
        self.done = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        pos = self.book.cursor(NAME)
        total = self.cfg.total or None
        log.info("%s: resuming at delta %d of %s", NAME, pos, total or "unbounded")
        it = self.feed.iter_from(pos, total)
        interval = self.cfg.batch / self.cfg.rate_per_s
        next_at = time.monotonic()
        while not self._stop.is_set():
            batch = [d for _, d in zip(range(self.cfg.batch), it, strict=False)]
            if not batch:
                break
            now = self.clock.now()
            pos = batch[-1].index + 1
            deltas = [Delta(now, d.zone, d.gtin, d.delta) for d in batch]
            if not until_written(functools.partial(self.book.apply, deltas, cursor=(NAME, pos)), self._stop):
                return  # stopped while the disk refused the batch: the committed cursor is where to resume
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            elif delay < -1.0:
                next_at = time.monotonic()  # fell behind (e.g. disk stall): don't burst to catch up
        if not self._stop.is_set():
            log.info("%s: feed complete at delta %d", NAME, pos)
            self.done.set()
