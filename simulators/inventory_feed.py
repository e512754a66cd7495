"""A deterministic feed of inventory deltas with exact ground truth.

The n-th delta depends only on (seed, n), so a source can resume at any position after a crash and
a test can recompute the truth of the first n deltas without running anything.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

CHUNK = 1000
# Restocks outweigh sales so counts drift upwards, like a store being filled.
DELTA_CHOICES = (1, 1, 2, 3, -1, -1, -2)


@dataclass(frozen=True)
class FeedDelta:
    index: int
    zone: str
    gtin: str
    delta: int


def gtin_for(n: int) -> str:
    """A valid GTIN-14 (with its mod-10 check digit) for item number n."""
    body = f"04{n:011d}"
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(body))
    return body + str((10 - total % 10) % 10)


class InventoryFeed:
    def __init__(self, seed: int, zones: list[str], gtins: int) -> None:
        self.seed = seed
        self.zones = list(zones)
        self.gtins = [gtin_for(i) for i in range(gtins)]

    def _chunk(self, k: int) -> list[FeedDelta]:
        rng = random.Random(f"{self.seed}:{k}")
        return [
            FeedDelta(k * CHUNK + i, rng.choice(self.zones), rng.choice(self.gtins), rng.choice(DELTA_CHOICES))
            for i in range(CHUNK)
        ]

    def iter_from(self, start: int, stop: int | None = None) -> Iterator[FeedDelta]:
        k = start // CHUNK
        while True:
            for d in self._chunk(k):
                if d.index < start:
                    continue
                if stop is not None and d.index >= stop:
                    return
                yield d
            k += 1

    def truth(self, n: int) -> dict[tuple[str, str], int]:
        """On-hand per (zone, GTIN) after the first n deltas; zero counts left out."""
        levels: dict[tuple[str, str], int] = {}
        for d in self.iter_from(0, n):
            levels[(d.zone, d.gtin)] = levels.get((d.zone, d.gtin), 0) + d.delta
        return {k: v for k, v in levels.items() if v != 0}
