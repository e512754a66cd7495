"""HQ's price book as the store holds it: every version of every price, and which one is in effect.

Of the versions whose effective window contains a moment, the highest version wins. That one rule
makes the book independent of arrival order: ``price.set`` commands may repeat, arrive late or out of
order, and the book ends up the same; an older version can never overwrite a newer one. A promo
(version 7, Friday to Sunday) over a base price (version 6, open-ended) falls back to the base price
on Monday without HQ having to send it again.

The book lives in the agent's SQLite file, written in the caller's transaction, and is mirrored in
memory so that computing 10,000 labels' desired content does not touch the disk.
"""

from __future__ import annotations

import sqlite3
from bisect import insort
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from ..contract import PriceSetArgs

SCHEMA = """
CREATE TABLE IF NOT EXISTS esl_prices(
    gtin TEXT NOT NULL, version INTEGER NOT NULL, price TEXT NOT NULL, currency TEXT NOT NULL, promo TEXT,
    eff_from REAL, eff_until REAL, received REAL NOT NULL, PRIMARY KEY (gtin, version)) WITHOUT ROWID
"""


@dataclass(frozen=True, order=True)
class PriceVersion:
    version: int
    price: str
    currency: str
    promo: str | None
    eff_from: float | None  # None: since ever
    eff_until: float | None  # None: until superseded

    def in_effect(self, t: float) -> bool:
        return (self.eff_from is None or self.eff_from <= t) and (self.eff_until is None or t < self.eff_until)

    @classmethod
    def of(cls, a: PriceSetArgs) -> PriceVersion:
        return cls(a.version, a.price, a.currency, a.promo,
                   a.effective_from.timestamp() if a.effective_from else None,
                   a.effective_until.timestamp() if a.effective_until else None)


class SetOutcome(Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # the same version with the same content: nothing to do


class VersionConflict(ValueError):
    """The same version of a price was sent twice with different content: HQ's book is inconsistent."""


ROWS = "SELECT gtin, version, price, currency, promo, eff_from, eff_until FROM esl_prices ORDER BY gtin, version"


class PriceBook:
    def __init__(self, conn: sqlite3.Connection) -> None:
        conn.execute(SCHEMA)
        self.reload(conn.execute(ROWS))

    def reload(self, rows: Iterable[tuple]) -> None:
        """Mirror these rows (of ``ROWS``) instead of what was held: after a transaction that changed the
        book in memory was refused, memory goes back to what the database holds."""
        by_gtin: dict[str, list[PriceVersion]] = {}  # sorted by version
        for gtin, *row in rows:
            by_gtin.setdefault(gtin, []).append(PriceVersion(*row))
        self._by_gtin = by_gtin

    def set(self, conn: sqlite3.Connection, args: PriceSetArgs, now: float) -> SetOutcome:
        """Store one version, in the caller's transaction."""
        new = PriceVersion.of(args)
        versions = self._by_gtin.get(args.gtin, [])
        for v in versions:
            if v.version == new.version:
                if v != new:
                    raise VersionConflict(
                        f"version {new.version} of {args.gtin} is already {v.price} {v.currency}"
                        f"{' ' + v.promo if v.promo else ''} with another content or window"
                    )
                return SetOutcome.DUPLICATE
        conn.execute(
            "INSERT INTO esl_prices(gtin, version, price, currency, promo, eff_from, eff_until, received)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (args.gtin, new.version, new.price, new.currency, new.promo, new.eff_from, new.eff_until, now),
        )
        insort(self._by_gtin.setdefault(args.gtin, []), new)
        return SetOutcome.STORED

    def effective(self, gtin: str, t: float) -> PriceVersion | None:
        for v in reversed(self._by_gtin.get(gtin, ())):
            if v.in_effect(t):
                return v
        return None

    def next_boundary(self, after: float) -> float | None:
        """The first moment after ``after`` at which some price window opens or closes."""
        times = [t for vs in self._by_gtin.values() for v in vs for t in (v.eff_from, v.eff_until)
                 if t is not None and t > after]
        return min(times, default=None)

    def prune(self, conn: sqlite3.Connection, now: float) -> int:
        """Forget versions that can never be in effect again: ended ones, and those below an
        open-ended version already in effect. Keeps the book from growing over months."""
        dead: list[tuple[str, int]] = []
        for gtin, vs in self._by_gtin.items():
            floor = max((v.version for v in vs if v.eff_until is None and (v.eff_from or 0) <= now), default=0)
            keep = []
            for v in vs:
                if (v.eff_until is not None and v.eff_until <= now) or v.version < floor:
                    dead.append((gtin, v.version))
                else:
                    keep.append(v)
            vs[:] = keep
        conn.executemany("DELETE FROM esl_prices WHERE gtin = ? AND version = ?", dead)
        return len(dead)

    def gtins(self) -> set[str]:
        return {g for g, vs in self._by_gtin.items() if vs}

    def knows(self, gtin: str) -> bool:
        """HQ has priced this GTIN: a product the store sells (RFID's catalogue)."""
        return bool(self._by_gtin.get(gtin))

    def __len__(self) -> int:
        return len(self._by_gtin)
