"""The ESL service: the imperative shell around the price book and the reconcile engine.

Each step polls the controller, feeds its reports to the engine, sends what the plan says, and
writes label state, ``esl/state`` changes and ``esl/alert`` items in one outbox transaction. Steps
run every ``poll_interval_s`` and at once after a command that changes what labels should show, on
the agent's clock: replayed on a virtual clock, prices take effect at their virtual times.

Commands: ``price.set`` (the price book), ``esl.bind`` (which label is for which product) and
``esl.flash`` (show "PICK" for an online order). The price book is stored before the command is
answered, so a price received while HQ's broker is down still applies on schedule.

If the disk refuses one of these transactions, the price book, bindings and picks are read back from
the database and the engine unmarks the alerts and state changes it had counted as sent: a command
is answered once it is stored (the downlink gives it again), and a step's items come again next step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..clock import Clock, rfc3339
from ..config import EslConfig
from ..contract import Command, EslBindArgs, EslFlashArgs, PriceSetArgs
from ..supervise import SupervisedThread
from ..sync.diskstate import WriteFailed
from ..sync.downlink import CommandRejected
from ..sync.outbox import Fact, Outbox, OutboxTx
from .controller import ControllerError, EslController, LabelContent, PollResult
from .pricebook import ROWS, PriceBook, VersionConflict
from .reconcile import LabelState, ReconcileParams, Reconciler

log = logging.getLogger(__name__)

SOURCE = "esl"
LOW_STOCK_NOTE = "LOW STOCK"
PRUNE_EVERY_S = 3600.0
PUSH_BATCH_S = 0.2
MAX_QUARANTINE_PER_POLL = 50  # a controller spewing garbage is counted in full, stored in part

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS esl_bindings(label TEXT PRIMARY KEY, gtin TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS esl_picks(gtin TEXT, order_id TEXT, until REAL, PRIMARY KEY (gtin, order_id))"
    " WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS esl_labels(label TEXT PRIMARY KEY, state TEXT NOT NULL) WITHOUT ROWID",
)

StockLevels = Callable[[], dict[tuple[str, str], int]]


@dataclass
class StepReport:
    polled: int = 0
    rejected: int = 0
    sent: int = 0
    failed: int = 0
    alerts: int = 0
    state_items: int = 0
    poll_error: str | None = None


class EslService:
    def __init__(self, cfg: EslConfig, controller: EslController, outbox: Outbox, clock: Clock,
                 stock: StockLevels | None = None) -> None:
        self.cfg = cfg
        self.controller = controller
        self.outbox = outbox
        self.clock = clock
        self.stock = stock
        self.engine = Reconciler(ReconcileParams(
            resend_after_s=cfg.resend_after_s, mismatch_deadline_s=cfg.mismatch_deadline_s,
            pending_deadline_s=cfg.pending_deadline_s, silent_after_s=cfg.silent_after_s,
            low_battery_mv=cfg.low_battery_mv, retry_min_s=cfg.retry_min_s, retry_max_s=cfg.retry_max_s,
        ))
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._halt = threading.Event()
        self._thread = SupervisedThread("esl", self._run)
        self.supervised = [self._thread]
        self._listener: threading.Thread | None = None
        self.counters: Counter[str] = Counter()
        self.integrity: tuple[int, int] = (0, 0)
        self._pruned_at = 0.0
        self._clock_unset = False  # an esl.ap_clock_unset episode is open
        self.bindings: dict[str, str] = {}
        self.picks: dict[tuple[str, str], float] = {}
        with outbox.transaction() as tx:
            for sql in SCHEMA:
                tx.conn.execute(sql)
            self.book = PriceBook(tx.conn)
            self._load_bindings(lambda sql: tx.conn.execute(sql).fetchall())
            for label, state in tx.conn.execute("SELECT label, state FROM esl_labels"):
                self.engine.labels[label] = LabelState.from_json(json.loads(state))

    def _load_bindings(self, read: Callable[[str], list[tuple]]) -> None:
        self.bindings = dict(read("SELECT label, gtin FROM esl_bindings"))
        self.picks = {(g, o): u for g, o, u in read("SELECT gtin, order_id, until FROM esl_picks")}

    @contextlib.contextmanager
    def _tx(self) -> Iterator[OutboxTx]:
        """An outbox transaction after which, if the disk refuses it, the price book, bindings and picks
        are what the database holds again (they change in memory inside the transaction)."""
        try:
            with self.outbox.transaction() as tx:
                yield tx
        except WriteFailed:
            self.book.reload(self.outbox.read(ROWS))
            self._load_bindings(self.outbox.read)
            raise

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._thread.start()
        listen = getattr(self.controller, "listen", None)
        if listen is not None:  # a controller that pushes label changes (the OEPL AP's websocket)
            self._listener = threading.Thread(target=listen, args=(self.ingest, self._halt), name="esl-push",
                                              daemon=True)
            self._listener.start()

    def stop(self) -> None:
        self._halt.set()
        self._wake.set()
        self._thread.join(10)
        if self._listener is not None:
            self._listener.join(5)

    def _run(self) -> None:
        next_poll = 0.0
        while not self._halt.is_set():
            poll = self.clock.now() >= next_poll
            try:
                self.step(poll=poll)
            except WriteFailed:
                pass  # nothing of the step was kept; the next one tries again (the outbox logs the episode)
            except Exception:
                log.exception("ESL step failed")
            if poll:
                next_poll = self.clock.now() + self.cfg.poll_interval_s
            if self._wake.wait(max(0.0, self.next_due(next_poll) - self.clock.now())):
                self._halt.wait(PUSH_BATCH_S)  # let a burst of pushes or commands land in one step
            self._wake.clear()

    def next_due(self, next_poll: float | None = None) -> float:
        """When the next step should run: the next poll, or sooner if a price takes effect before it."""
        now = self.clock.now()
        with self._lock:
            boundary = self.book.next_boundary(now)
            picks_end = min((u for u in self.picks.values() if u > now), default=None)
        due = now + self.cfg.poll_interval_s if next_poll is None else next_poll
        return min(t for t in (due, boundary, picks_end) if t is not None)

    def ingest(self, result: PollResult) -> None:
        """Label reports pushed by the controller: taken at once, acted on at the next (early) step."""
        try:
            self._quarantine(result)
        except WriteFailed:
            pass  # the garbage is not kept while the disk refuses writes; the good reports still count
        now = self.clock.now()
        with self._lock:
            for r in result.reports:
                self.engine.observe(r, now)
        self.counters["pushed"] += len(result.reports)
        self._wake.set()

    def _quarantine(self, result: PollResult) -> None:
        self.outbox.quarantine_many(SOURCE, [(b.reason, b.raw) for b in result.rejected], MAX_QUARANTINE_PER_POLL)

    # ---------------------------------------------------------------- commands

    def price_set(self, cmd: Command, args: PriceSetArgs) -> dict:  # type: ignore[override]
        with self._lock:
            labels = sum(1 for g in self.bindings.values() if g == args.gtin)
            if not labels and args.gtin not in self.book.gtins() and not self._stocked(args.gtin):
                raise CommandRejected(f"unknown GTIN {args.gtin}: no label is bound to it and the store holds none")
            try:
                with self._tx() as tx:
                    outcome = self.book.set(tx.conn, args, self.clock.now())
            except VersionConflict as e:
                raise CommandRejected(str(e)) from e
        self._wake.set()
        return {"gtin": args.gtin, "version": args.version, "outcome": outcome.value, "labels": labels}

    def bind(self, cmd: Command, args: EslBindArgs) -> dict:  # type: ignore[override]
        with self._lock, self._tx() as tx:
            for b in args.items:
                if b.gtin is None:
                    self.bindings.pop(b.label, None)
                    tx.conn.execute("DELETE FROM esl_bindings WHERE label = ?", (b.label,))
                else:
                    self.bindings[b.label] = b.gtin
                    tx.conn.execute("INSERT OR REPLACE INTO esl_bindings(label, gtin) VALUES (?,?)", (b.label, b.gtin))
        self._wake.set()
        return {"bound": sum(1 for b in args.items if b.gtin), "unbound": sum(1 for b in args.items if not b.gtin)}

    def flash(self, cmd: Command, args: EslFlashArgs) -> dict:  # type: ignore[override]
        with self._lock:
            labels = [label for label, g in self.bindings.items() if g == args.gtin]
            if not labels:
                raise CommandRejected(f"no label is bound to GTIN {args.gtin}")
            until = self.clock.now() + args.duration_s
            with self._tx() as tx:
                self.picks[(args.gtin, args.order_id)] = until
                tx.conn.execute("INSERT OR REPLACE INTO esl_picks(gtin, order_id, until) VALUES (?,?,?)",
                                (args.gtin, args.order_id, until))
        self._wake.set()
        return {"gtin": args.gtin, "labels": sorted(labels), "until": rfc3339(until)}

    # ---------------------------------------------------------------- the step

    def step(self, poll: bool = True) -> StepReport:
        """One round: poll (unless told not to: pushes keep the state fresh), reconcile, send, report.
        Safe to call directly (tests, replays)."""
        rep = StepReport()
        polled: PollResult | None = PollResult()
        if poll:
            try:
                polled = self.controller.poll()
            except ControllerError as e:
                polled = None
                rep.poll_error = str(e)
                self.counters["poll_errors"] += 1
                log.warning("ESL controller poll failed: %s", e)
        now = self.clock.now()
        if polled is not None:
            rep.polled, rep.rejected = len(polled.reports), len(polled.rejected)
            self._quarantine(polled)
        with self._lock:
            if polled is not None:
                for r in polled.reports:
                    self.engine.observe(r, now)
            desired, _ = self._desired(now)
            plan = self.engine.plan(desired, now, self.cfg.max_sends_per_poll) if polled is not None else []
            plan = [(label, content, self.engine.flash_due(label, content)) for label, content in plan]
        for label, content, flash in plan:  # I/O outside the lock: commands are never held up by a slow controller
            try:
                receipt = self.controller.send(label, content, flash)
            except ControllerError as e:
                rep.failed += 1
                log.info("ESL send to %s failed: %s", label, e)
                with self._lock:
                    self.engine.failed(label, self.clock.now())
                continue
            rep.sent += 1
            with self._lock:
                self.engine.sent(receipt, content, self.clock.now())
        self.counters["sends"] += rep.sent
        self.counters["send_failures"] += rep.failed
        with self._lock:
            with self.engine.atomic(), self._tx() as tx:
                now = self.clock.now()
                # Again, not the plan's: commands may have changed the book while the sends ran unlocked, and
                # what is judged and uplinked must match the book as committed with it.
                desired, hq = self._desired(now)
                alerts = self.engine.assess(desired, hq, now)
                changes = self.engine.state_changes(hq, self.bindings)
                shown = {label: st.shown for label, st in self.engine.labels.items()}
                self.integrity = self.engine.integrity(shown, hq)
                if alerts:
                    tx.enqueue("esl/alert", [
                        Fact(now, json.dumps({"ts": rfc3339(now), "label": a.label, "kind": a.kind,
                                              "detail": a.detail}, separators=(",", ":")))
                        for a in alerts
                    ])
                if changes:
                    tx.enqueue("esl/state", [self._state_fact(st, matches, now) for st, matches in changes])
                clock_unset = self._clock_episode(tx, polled)
                self._save(tx, now)
            self.engine.dirty.clear()  # saved in that transaction
            self._clock_unset = clock_unset
        rep.alerts, rep.state_items = len(alerts), len(changes)
        return rep

    def _clock_episode(self, tx: OutboxTx, polled: PollResult | None) -> bool:
        """Raise ``esl.ap_clock_unset`` once while a poll finds reports stamped by an unset clock; the reports
        are used all the same, with their check-in times unknown. Whether the episode is open afterwards."""
        if polled is None or not polled.reports:
            return self._clock_unset
        unset = sum(r.clock_unset for r in polled.reports)
        if unset and not self._clock_unset:
            tx.alert("esl.ap_clock_unset", (
                f"{unset} of {len(polled.reports)} label reports carry times from before 2020: the access point's "
                "clock is not set (no NTP since it restarted). Labels are still reconciled; their last check-in "
                "times are unknown until the AP's time is set (NTP, or POST /set_time)"))
        return unset > 0

    def _desired(self, now: float) -> tuple[dict[str, LabelContent], dict[str, LabelContent]]:
        """(what each label should show, overlays included; HQ's bare price per label)."""
        low = self._low_stock()
        picking = {g for (g, _), until in self.picks.items() if until > now}
        cache: dict[str, tuple[LabelContent, LabelContent] | None] = {}
        desired: dict[str, LabelContent] = {}
        hq: dict[str, LabelContent] = {}
        for label, gtin in self.bindings.items():
            if gtin not in cache:
                v = self.book.effective(gtin, now)
                if v is None:
                    cache[gtin] = None
                else:
                    base = LabelContent(gtin=gtin, price=v.price, currency=v.currency, promo=v.promo)
                    over = {"pick": gtin in picking, "stock_note": LOW_STOCK_NOTE if gtin in low else None}
                    cache[gtin] = (base, base.model_copy(update=over) if any(over.values()) else base)
            pair = cache[gtin]
            if pair is not None:
                hq[label], desired[label] = pair
        return desired, hq

    def _low_stock(self) -> set[str]:
        if not self.cfg.low_stock_below or self.stock is None:
            return set()
        zones = set(self.cfg.low_stock_zones)
        qty: Counter[str] = Counter()
        for (zone, gtin), n in self.stock().items():
            if not zones or zone in zones:
                qty[gtin] += n
        return {g for g in set(self.bindings.values()) if qty[g] < self.cfg.low_stock_below}

    def _stocked(self, gtin: str) -> bool:
        return self.stock is not None and any(g == gtin and n > 0 for (_, g), n in self.stock().items())

    def _state_fact(self, st: LabelState, matches: bool | None, now: float) -> Fact:
        r, s = st.report, st.shown
        item = {
            "ts": rfc3339(now), "label": st.label, "gtin": self.bindings.get(st.label),
            "price": s.price if s else None, "currency": s.currency if s else None, "promo": s.promo if s else None,
            "battery_mv": r.battery_mv if r else None, "rssi": r.rssi if r else None, "lqi": r.lqi if r else None,
            "last_seen": rfc3339(r.last_seen.timestamp()) if r and r.last_seen else None,
            "pending_since": rfc3339(st.pending_since) if st.pending_since is not None else None,
            "pick": bool(s and s.pick), "matches_hq": matches,
        }
        return Fact(now, json.dumps(item, separators=(",", ":")), key=f"esl|{st.label}")

    def _save(self, tx: OutboxTx, now: float) -> None:
        tx.conn.executemany("INSERT OR REPLACE INTO esl_labels(label, state) VALUES (?,?)",
                            [(label, json.dumps(self.engine.labels[label].to_json()))
                             for label in sorted(self.engine.dirty)])
        expired = [k for k, until in self.picks.items() if until <= now]
        for k in expired:
            del self.picks[k]
        tx.conn.executemany("DELETE FROM esl_picks WHERE gtin = ? AND order_id = ?", expired)
        if now - self._pruned_at >= PRUNE_EVERY_S:
            self._pruned_at = now
            self.book.prune(tx.conn, now)

    # ---------------------------------------------------------------- figures

    def attention(self, limit: int = 50) -> tuple[int, list[tuple[str, str | None, list[str], float | None]]]:
        """Labels needing someone: those not showing what they should or with an alert open (mismatch past
        its deadline, stuck, low battery, silent). (how many, the first ``limit`` of them: label, GTIN,
        alert kinds, since when it has been wrong on the agent's clock), longest wrong first."""
        with self._lock:
            rows = [(st.label, self.bindings.get(st.label), list(st.alerted), st.wrong_since)
                    for st in self.engine.labels.values() if st.alerted or st.wrong_since is not None]
        rows.sort(key=lambda r: (r[3] is None, r[3] or 0.0, r[0]))
        return len(rows), rows[:limit]

    def figures(self) -> dict[str, float]:
        ok, total = self.integrity
        with self._lock:
            return {
                "esl.labels": float(len(self.engine.labels)),
                "esl.bound": float(len(self.bindings)),
                "esl.price_integrity": ok / total if total else 1.0,
                "esl.showing_hq_price": float(ok),
                "esl.with_hq_price": float(total),
                "esl.sends": float(self.counters["sends"]),
                "esl.send_failures": float(self.counters["send_failures"]),
                "esl.poll_errors": float(self.counters["poll_errors"]),
                "esl.pushed_reports": float(self.counters["pushed"]),
            }

