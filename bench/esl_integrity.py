"""Price integrity over a simulated trading day: does every shelf label show HQ's price, and how soon?

A store of 1,000 OpenEPaperLink labels (simulators/esl_controller.py: 40 s check-ins, a 4 s e-paper
redraw, 2% of label transfers and 2% of uploads failing) is driven by the agent's ESL service over
real HTTP, on a virtual clock. HQ's commands go through the real downlink. Over the day HQ changes
prices every hour: most at once, some scheduled for a later time (promotions that start and end).
The firmware's other paths run too (``--plain`` turns them off): templates drawn 1 s after an upload,
1% of transfers timing out, each label rebooting 0.1 times a day, 20 refreshes an hour from the AP's
web page, 30 online orders an hour flashing PICK on their labels, and the AP's nightly reboot at 03:56
with its clock unset for a minute.
Judged by what the simulated e-paper shows (ground truth), not by the agent's view:

- ``esl_price_integrity_min`` share of labels showing HQ's price in effect, sampled at every step,
  counting labels still inside the retry deadline of a change as wrong; ``esl_labels_wrong_mean_pct``
  the mean share of labels not showing it, in %
- ``esl_integrity_past_deadline_min`` the same, counting only labels wrong for longer than the deadline
  (target 1.0)
- ``esl_within_deadline`` share of (label, price change) pairs shown before the mismatch deadline
  (target 1.0)
- ``esl_set_to_displayed_p50_s`` / ``_p99_s`` / ``_max_s`` time from a price taking effect (its
  ``price.set`` arriving, or its effective time) to the label showing it
- ``esl_sends_per_change`` uploads per (label, change), retries included
- ``esl_step_ms`` wall time of one agent step (poll 1,000 labels, reconcile, send)
- ``esl_lies_max`` the most labels, at any step, that the agent reported as showing HQ's price while their
  e-paper showed something else (target 0), and ``esl_lie_label_steps`` the sum over all steps

    python bench/esl_integrity.py                 # 1,000 labels, 24 h
    python bench/esl_integrity.py --hours 2       # quick
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from _common import emit, header, note

from simulators.esl_store import Change, EslStore, cents


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", type=int, default=1000)
    ap.add_argument("--gtins", type=int, default=500)
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--fail", type=float, default=0.02, help="transfer and upload failure rate")
    ap.add_argument("--poll", type=float, default=30.0, help="the agent's poll interval, s")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--plain", action="store_true", help="without the firmware's reboots, refreshes, flashes...")
    a = ap.parse_args()
    header("esl_integrity", labels=a.labels, gtins=a.gtins, hours=a.hours, fail=a.fail, poll_s=a.poll,
           firmware_paths=not a.plain)
    rng = random.Random(a.seed)
    firmware = {} if a.plain else {"render_s": 1.0, "timeout_rate": 0.01, "reboots_per_day": 0.1}
    with tempfile.TemporaryDirectory() as tmp:
        s = EslStore(Path(tmp), labels=a.labels, gtins=a.gtins, seed=a.seed, transfer_fail_rate=a.fail,
                     upload_fail_rate=a.fail, poll_interval_s=a.poll, firmware=firmware)
        try:
            run(s, a, rng)
        finally:
            s.close()


def run(s: EslStore, a: argparse.Namespace, rng: random.Random) -> None:
    deadline = s.cfg.mismatch_deadline_s
    gtins = sorted(set(s.gtin_of.values()))
    s.bind_all()
    s.set_prices(gtins, 1, {g: cents(rng.randint(100, 5000)) for g in gtins})
    took = s.run_until_right(3600)
    note(f"initial sync of {a.labels} labels from yesterday's prices: {took} s")
    version = 1
    waiting: dict[str, Change] = {}  # label -> the price change it has yet to show (a newer one supersedes)
    latencies: list[float] = []
    late = 0
    pairs = 0
    integrity: list[float] = []
    past_deadline: list[float] = []
    step_ms: list[float] = []
    sends0 = s.ap.stats().uploads
    t_end = s.clock.now() + a.hours * 3600
    next_change = s.clock.now()
    lies: list[int] = []
    events = Disturbances(s, rng, enabled=not a.plain)
    while s.clock.now() < t_end:
        events.due()
        if s.clock.now() >= next_change:
            version += 1
            now_set = rng.sample(gtins, k=max(1, len(gtins) // 20))  # 5% of products, effective at once
            changes = s.set_prices(now_set, version, {g: cents(rng.randint(100, 5000)) for g in now_set})
            version += 1
            promo = rng.sample(gtins, k=max(1, len(gtins) // 50))  # 2% more, from 20 minutes later
            changes += s.set_prices(promo, version, {g: cents(rng.randint(50, 900)) for g in promo},
                                    after_s=1200, promo="PROMO")
            for c in changes:
                for mac in c.labels:
                    if mac not in s.silent:
                        waiting[mac] = c
                        pairs += 1
            next_change += 3600
        t0 = time.perf_counter()
        due = s.service.next_due()
        s.clock.set(min(due, t_end))
        s.service.step()
        step_ms.append(1000 * (time.perf_counter() - t0))
        now = s.clock.now()
        for mac, c in list(waiting.items()):
            if now < c.effective:
                continue
            shown = s.shows(mac)
            if shown is not None and shown[0] == c.price:
                at = s.ap.shown_at(mac) or now
                latencies.append(max(0.0, at - c.effective))
                late += at - c.effective > deadline
                del waiting[mac]
            elif now - c.effective > deadline:
                late += 1
                del waiting[mac]
        lies.append(len(s.lies()))
        wrong = s.wrong()
        integrity.append(1 - len(wrong) / (len(s.gtin_of) - len(s.silent)))
        past_deadline.append(1 - sum(m not in waiting for m in wrong) / (len(s.gtin_of) - len(s.silent)))
    late += len(waiting)  # still not shown at the end of the day: counted against the target
    latencies.sort()
    emit("esl_price_integrity_min", min(integrity))
    emit("esl_labels_wrong_mean_pct", 100 * (1 - statistics.fmean(integrity)))
    emit("esl_integrity_past_deadline_min", min(past_deadline))
    emit("esl_within_deadline", 1 - late / max(pairs, 1))
    emit("esl_set_to_displayed_p50_s", latencies[len(latencies) // 2])
    emit("esl_set_to_displayed_p99_s", latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))])
    emit("esl_set_to_displayed_max_s", latencies[-1])
    emit("esl_sends_per_change", (s.ap.stats().uploads - sends0) / max(pairs, 1))
    emit("esl_step_ms", statistics.median(step_ms))
    emit("esl_lies_max", max(lies))
    emit("esl_lie_label_steps", sum(lies))
    st = s.ap.stats()
    note(f"{pairs} (label, change) pairs over {a.hours} h, deadline {deadline:.0f} s; {st.uploads} uploads, "
         f"{st.upload_failures} refused, {st.transfer_failures} failed transfers; {len(s.silent)} silent labels")
    note(f"firmware paths: {st.transfer_timeouts} transfer timeouts, {st.tag_reboots} label reboots, "
         f"{st.refreshes} refreshes, {events.orders} PICK orders ({st.led_commands} LED flashes), "
         f"{st.ap_reboots} AP reboots; {len(lies)} steps checked for lies")


class Disturbances:
    """What happens to a store's labels besides price changes, at realistic rates (per hour): staff pressing
    "refresh" in the AP's web page, online orders flashing PICK, and the AP's nightly reboot (firmware default
    ``nightlyreboot``: 03:56), after which its clock is unset until NTP answers."""

    REFRESHES_PER_H = 20.0
    ORDERS_PER_H = 30.0
    AP_REBOOT_EVERY_S = 86_400.0
    CLOCK_UNSET_S = 60.0

    def __init__(self, s: EslStore, rng: random.Random, enabled: bool) -> None:
        self.s, self.rng, self.enabled = s, rng, enabled
        self.orders = 0
        now = s.clock.now()
        self.next_refresh = now + rng.expovariate(self.REFRESHES_PER_H / 3600)
        self.next_order = now + rng.expovariate(self.ORDERS_PER_H / 3600)
        self.next_ap_reboot = now + self.AP_REBOOT_EVERY_S / 2
        self.macs = sorted(s.gtin_of)

    def due(self) -> None:
        if not self.enabled:
            return
        s, rng, now = self.s, self.rng, self.s.clock.now()
        while now >= self.next_refresh:
            s.ap.tag_cmd({"mac": [rng.choice(self.macs)], "cmd": ["refresh"]})
            self.next_refresh += rng.expovariate(self.REFRESHES_PER_H / 3600)
        while now >= self.next_order:
            self.orders += 1
            g = s.gtin_of[rng.choice(self.macs)]
            s.command("esl.flash", {"gtin": g, "order_id": f"WEB-{self.orders}", "duration_s": 900})
            self.next_order += rng.expovariate(self.ORDERS_PER_H / 3600)
        if now >= self.next_ap_reboot:
            s.ap.reboot_ap(clock_unset_s=self.CLOCK_UNSET_S)
            self.next_ap_reboot += self.AP_REBOOT_EVERY_S


if __name__ == "__main__":
    main()
