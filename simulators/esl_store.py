"""A store's shelf labels on a virtual clock: the simulated access point, the agent's ESL service and
its command path (downlink -> price book), and the ground truth to judge them by.

One driver for the tests and the price-integrity benchmark: HQ commands go through the real
downlink (validation, dedupe, cmd-result in the outbox); the service talks to the simulated AP over
real HTTP; time is a VirtualClock both share, so a simulated day runs in a minute.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.clock import VirtualClock, rfc3339
from edge_agent.config import EslConfig
from edge_agent.contract import DEFAULT_PREFIX, command_topic
from edge_agent.esl.controller import LabelContent
from edge_agent.esl.openepaperlink import OpenEPaperLinkController
from edge_agent.esl.service import EslService
from edge_agent.rfid.epc import gtin_check_digit
from edge_agent.sync.downlink import Downlink, Outcome
from edge_agent.sync.outbox import Outbox

from .esl_controller import SimulatedAccessPoint, label_macs

STORE = "S001"


def gtin(i: int) -> str:
    """A valid GTIN-14 (check digit included) for product number ``i``."""
    body = f"0950600{i:06d}"
    return body + gtin_check_digit(body)


def cents(c: int) -> str:
    return f"{c // 100}.{c % 100:02d}"


@dataclass
class Change:
    """A price HQ set: when it takes effect, and which labels must show it."""

    gtin: str
    price: str
    effective: float
    labels: list[str]


class EslStore:
    def __init__(self, workdir: Path, *, labels: int = 1000, gtins: int = 500, seed: int = 1,
                 checkin_s: float = 40.0, refresh_s: float = 4.0, transfer_fail_rate: float = 0.0,
                 upload_fail_rate: float = 0.0, silent: float = 0.0, low_battery: float = 0.0,
                 firmware: dict[str, float] | None = None, **esl: Any) -> None:
        """``firmware``: more of the simulated AP's behaviours (``render_s``, ``timeout_rate``,
        ``reboots_per_day``); ``esl``: the agent's ``[esl]`` settings."""
        self.clock = VirtualClock()
        macs = label_macs(labels, seed)
        self.gtin_of = {mac: gtin(i % gtins) for i, mac in enumerate(macs)}
        # Labels start showing yesterday's prices, as when a store's agent is first switched on.
        initial = {mac: LabelContent(gtin=g, price="9.99", currency="EUR") for mac, g in self.gtin_of.items()}
        self.ap = SimulatedAccessPoint(labels, seed, self.clock, checkin_s=checkin_s, refresh_s=refresh_s,
                                       transfer_fail_rate=transfer_fail_rate, upload_fail_rate=upload_fail_rate,
                                       silent=silent, low_battery=low_battery, initial=initial,
                                       **(firmware or {})).start()
        self.outbox = Outbox(workdir / "outbox.db", self.clock)
        self.cfg = EslConfig.model_validate({"enabled": True, "urls": [self.ap.url], **esl})
        self.service = EslService(self.cfg, OpenEPaperLinkController(self.ap.url, timeout=5.0), self.outbox,
                                  self.clock)
        self.downlink = Downlink(STORE, DEFAULT_PREFIX, self.outbox, self.clock)
        for name, handler in (("price.set", self.service.price_set), ("esl.bind", self.service.bind),
                              ("esl.flash", self.service.flash)):
            self.downlink.register(name, handler)
        self._ids = itertools.count(1)
        self.silent = self.ap.silent_macs()

    def close(self) -> None:
        self.ap.stop()
        self.outbox.close()

    # ---------------------------------------------------------------- HQ's side

    def command(self, name: str, args: dict[str, Any], cmd_id: str | None = None) -> Outcome:
        cid = cmd_id or f"c{next(self._ids)}"
        payload = json.dumps({"v": 1, "id": cid, "name": name, "store": STORE, "ts": rfc3339(self.clock.now()),
                              "args": args})
        return self.downlink.handle(command_topic(DEFAULT_PREFIX, STORE, name), payload.encode())

    def bind_all(self) -> None:
        items = [{"label": mac, "gtin": g} for mac, g in self.gtin_of.items()]
        for i in range(0, len(items), 5000):
            assert self.command("esl.bind", {"items": items[i : i + 5000]}).status == "ok"

    def set_prices(self, gtins: list[str], version: int, price_of: dict[str, str], *, after_s: float = 0.0,
                   promo: str | None = None) -> list[Change]:
        """HQ sets a price for each GTIN, effective ``after_s`` from now."""
        eff = self.clock.now() + after_s
        changes = []
        for g in gtins:
            args: dict[str, Any] = {"gtin": g, "price": price_of[g], "currency": "EUR", "version": version,
                                    "promo": promo}
            if after_s:
                args["effective_from"] = rfc3339(eff)
            out = self.command("price.set", args)
            assert out.status == "ok", out
            changes.append(Change(g, price_of[g], eff, [m for m, x in self.gtin_of.items() if x == g]))
        self.service.step(poll=False)  # the agent's ESL thread wakes on a price.set, between polls
        return changes

    # ---------------------------------------------------------------- time

    def run(self, seconds: float, step_s: float | None = None) -> None:
        """Advance the clock to each moment the agent's ESL thread would wake (its next poll, or a price
        taking effect), running a step at each."""
        end = self.clock.now() + seconds
        while self.clock.now() < end - 1e-9:
            due = self.service.next_due() if step_s is None else self.clock.now() + step_s
            self.clock.set(min(due, end))
            self.service.step()

    def run_until_right(self, timeout_s: float, step_s: float | None = None) -> float | None:
        """Virtual seconds until every label that checks in shows HQ's price; None if not by the timeout."""
        t0 = self.clock.now()
        while self.clock.now() - t0 < timeout_s:
            self.run(step_s or self.cfg.poll_interval_s, step_s)
            if not self.wrong():
                return self.clock.now() - t0
        return None

    # ---------------------------------------------------------------- truth

    def hq_price(self, mac: str) -> tuple[str, str, str | None] | None:
        v = self.service.book.effective(self.gtin_of[mac], self.clock.now())
        return None if v is None else (v.price, v.currency, v.promo)

    def shows(self, mac: str) -> tuple[str, str, str | None] | None:
        d = self.ap.displayed(mac)
        return None if d is None else (d["price"], d["currency"], d["promo"])

    def wrong(self, include_silent: bool = False) -> list[str]:
        """Labels whose e-paper does not show HQ's price in effect now (ground truth, not the agent's view)."""
        return [m for m in self.gtin_of if (include_silent or m not in self.silent)
                and self.hq_price(m) is not None and self.shows(m) != self.hq_price(m)]

    def lies(self) -> list[str]:
        """Labels the agent reports as showing HQ's price while their e-paper shows something else: the one
        failure the price-integrity figure must never hide."""
        out = []
        for mac, st in self.service.engine.labels.items():
            want = self.hq_price(mac)
            shown = st.shown
            if want is not None and shown is not None and (shown.price, shown.currency, shown.promo) == want \
                    and self.shows(mac) != want:
                out.append(mac)
        return out

    def uplinked(self, stream: str) -> list[dict[str, Any]]:
        """Items of a stream waiting in the outbox (this driver has no uplink)."""
        return [json.loads(b) for (b,) in self.outbox.read("SELECT body FROM pending WHERE stream = ? ORDER BY id",
                                                          (stream,))]
