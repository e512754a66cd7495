"""The reconcile engine: what each label should show against what it shows, as a plan of sends.

Pure: it is told the time and what the controller reported, and answers with the labels to send,
the ``esl/state`` changes and the alerts. The service does the I/O.

What a label shows is known only from evidence: content counts as displayed once the controller
reports, for that label, the hash it gave back when it accepted our content, and no longer pending.
Anything else (a hash we never sent, content lost by a rebooted access point) is "unknown", which
is never the HQ price, so it gets sent again. A label that already holds our content but has not
fetched it yet is left alone (the label retries by itself at each check-in) until ``resend_after_s``;
a send that fails is retried with exponential backoff and jitter.

An alert or ``esl/state`` change counts as raised only once the service has committed it: inside
``atomic()``, what ``assess`` and ``state_changes`` mark is unmarked again if the block raises.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from ..retry import backoff_delay
from .controller import LabelContent, LabelReport, SendReceipt

ALERT_KINDS = ("price_mismatch", "stuck_pending", "low_battery", "label_silent")


@dataclass(frozen=True)
class ReconcileParams:
    resend_after_s: float = 300.0  # a label pending this long gets its content sent again
    mismatch_deadline_s: float = 600.0  # wrong this long: price_mismatch alert
    pending_deadline_s: float = 900.0  # pending this long: stuck_pending alert
    silent_after_s: float = 3600.0  # not seen this long: label_silent alert
    low_battery_mv: int = 2400
    retry_min_s: float = 5.0
    retry_max_s: float = 300.0
    battery_step_mv: int = 50  # smaller battery changes are not worth an esl/state message
    rssi_step: int = 6


@dataclass
class LabelState:
    label: str
    first_known: float
    report: LabelReport | None = None
    sent: LabelContent | None = None  # last content the controller accepted for this label
    sent_hash: str | None = None  # the controller's hash of the sent content, once known
    hash_before: str | None = None  # the controller's hash for the label when it accepted the send
    sent_at: float | None = None
    shown: LabelContent | None = None  # confirmed displayed; None = unknown
    attempts: int = 0  # consecutive failed or unconfirmed sends
    next_try: float = 0.0  # after a refused send: not before this
    observed_at: float = 0.0
    wrong_since: float | None = None
    pending_since: float | None = None
    alerted: list[str] = field(default_factory=list)
    emitted: list[Any] | None = None  # what the last esl/state item said, to send only changes

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["report"] = self.report.model_dump(mode="json") if self.report else None
        d["sent"] = self.sent.model_dump(mode="json") if self.sent else None
        d["shown"] = self.shown.model_dump(mode="json") if self.shown else None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LabelState:
        d = dict(d)
        d["report"] = LabelReport.model_validate(d["report"]) if d["report"] else None
        d["sent"] = LabelContent.model_validate(d["sent"]) if d["sent"] else None
        d["shown"] = LabelContent.model_validate(d["shown"]) if d["shown"] else None
        return cls(**d)


@dataclass(frozen=True)
class Alert:
    label: str
    kind: str
    detail: str


def same_price(shown: LabelContent | None, desired: LabelContent | None) -> bool:
    """Whether a label shows HQ's price (overlays like PICK or LOW STOCK do not change the price)."""
    return (shown is not None and desired is not None and shown.gtin == desired.gtin and shown.price == desired.price
            and shown.currency == desired.currency and shown.promo == desired.promo)


class Reconciler:
    def __init__(self, params: ReconcileParams, seed: int = 0) -> None:
        self.p = params
        self.labels: dict[str, LabelState] = {}
        self._rng = random.Random(seed)
        self.dirty: set[str] = set()  # states changed since the service last saved them

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """What is marked as raised or emitted inside is unmarked if the block raises, so the next
        ``assess`` and ``state_changes`` produce those alerts and changes again."""
        marks = {label: (st.alerted, st.emitted) for label, st in self.labels.items()}
        try:
            yield
        except BaseException:
            for label, st in self.labels.items():
                st.alerted, st.emitted = marks.get(label, ([], None))
            raise

    def state(self, label: str, now: float) -> LabelState:
        st = self.labels.get(label)
        if st is None:
            st = self.labels[label] = LabelState(label, now)
            self.dirty.add(label)
        return st

    # ---------------------------------------------------------------- evidence

    def observe(self, r: LabelReport, now: float) -> None:
        st = self.state(r.label, now)
        st.observed_at = now
        if st.report == r:
            return
        st.report = r
        self.dirty.add(r.label)
        if st.sent is not None and st.sent_at is not None:
            if st.sent_hash is not None:
                holds_ours = r.content_hash == st.sent_hash
            else:  # the controller could not tell the hash in advance: a new hash since the send is the proof
                # (lastseen is whole seconds: a check-in in the second of the send counts)
                holds_ours = (r.content_hash != st.hash_before and r.last_seen is not None
                              and r.last_seen.timestamp() >= math.floor(st.sent_at))
            if holds_ours and not r.pending:
                st.shown = st.sent
                st.sent_hash = r.content_hash  # learnt: another hash later means someone else's content
                st.attempts = 0
            elif not holds_ours and st.sent_hash is not None and r.content_hash is not None:
                st.shown = None  # the label holds something we did not send
        if r.pending:
            if st.pending_since is None:
                st.pending_since = st.sent_at if st.sent_at is not None else now
        else:
            st.pending_since = None

    def sent(self, rc: SendReceipt, content: LabelContent, now: float) -> None:
        st = self.state(rc.label, now)
        st.sent, st.sent_hash, st.sent_at, st.hash_before = content, rc.content_hash, now, rc.hash_before
        st.attempts += 1
        st.next_try = 0.0
        self.dirty.add(rc.label)

    def failed(self, label: str, now: float) -> None:
        st = self.state(label, now)
        st.attempts += 1
        st.next_try = now + backoff_delay(st.attempts - 1, self.p.retry_min_s, self.p.retry_max_s, self._rng)
        self.dirty.add(label)

    # ---------------------------------------------------------------- decisions

    def plan(self, desired: dict[str, LabelContent], now: float, limit: int) -> list[tuple[str, LabelContent]]:
        """Labels to send now, the longest-wrong first, at most ``limit``."""
        todo: list[tuple[float, str, LabelContent]] = []
        for label, want in desired.items():
            st = self.state(label, now)
            if st.shown == want or now < st.next_try:  # right, or the controller refused lately: back off
                continue
            if st.sent == want and st.sent_at is not None:
                r = st.report
                lost = (r is not None and st.observed_at > st.sent_at and st.sent_hash is not None
                        and r.content_hash != st.sent_hash)
                # The controller holds it and the label fetches it at its next check-in: wait,
                # unless the controller lost it or the label has been pending too long.
                if not lost and now < st.sent_at + self.p.resend_after_s:
                    continue
            todo.append((st.wrong_since if st.wrong_since is not None else now, label, want))
        todo.sort(key=lambda x: (x[0], x[1]))
        return [(label, want) for _, label, want in todo[:limit]]

    def assess(self, desired: dict[str, LabelContent], hq: dict[str, LabelContent], now: float) -> list[Alert]:
        """Track how long each label has been wrong, pending or silent; new alerts, each once per episode.

        ``desired`` is every overlay included (what to send); ``hq`` is the bare HQ price per label
        (what price integrity is judged on)."""
        p = self.p
        raised: list[Alert] = []
        for label, st in self.labels.items():
            want = hq.get(label)
            full = desired.get(label)
            if full is None or st.shown == full:
                st.wrong_since = None
            elif st.wrong_since is None:
                st.wrong_since = now
                self.dirty.add(label)
            r = st.report
            active: dict[str, str] = {}
            if (st.wrong_since is not None and now - st.wrong_since >= p.mismatch_deadline_s and want is not None
                    and not same_price(st.shown, want)):
                shows = f"{st.shown.price} {st.shown.currency}" if st.shown else "unknown content"
                active["price_mismatch"] = (f"shows {shows}, HQ price {want.price} {want.currency} for {want.gtin}, "
                                            f"wrong for {now - st.wrong_since:.0f} s")
            if st.pending_since is not None and now - st.pending_since >= p.pending_deadline_s:
                active["stuck_pending"] = f"pending for {now - st.pending_since:.0f} s after {st.attempts} sends"
            if r is not None and r.battery_mv is not None and r.battery_mv < p.low_battery_mv:
                active["low_battery"] = f"battery {r.battery_mv} mV, below {p.low_battery_mv} mV"
            seen = r.last_seen.timestamp() if r is not None and r.last_seen is not None else st.first_known
            if now - seen >= p.silent_after_s:
                active["label_silent"] = f"not seen for {now - seen:.0f} s"
            now_alerted = [k for k in ALERT_KINDS if k in active]
            for k in now_alerted:
                if k not in st.alerted:
                    raised.append(Alert(label, k, active[k]))
            if now_alerted != st.alerted:
                st.alerted = now_alerted
                self.dirty.add(label)
        return raised

    def state_changes(self, hq: dict[str, LabelContent], gtins: dict[str, str | None]) -> list[tuple[LabelState, bool | None]]:
        """Labels whose reportable state changed since last emitted, with whether they match HQ."""
        out = []
        p = self.p
        for label, st in self.labels.items():
            r = st.report
            want = hq.get(label)
            matches = None if want is None else same_price(st.shown, want)
            s = st.shown
            battery = None if r is None or r.battery_mv is None else r.battery_mv // p.battery_step_mv
            rssi = None if r is None or r.rssi is None else r.rssi // p.rssi_step
            key = [gtins.get(label), s.price if s else None, s.currency if s else None, s.promo if s else None,
                   bool(s and s.pick), st.pending_since is not None, battery, rssi, matches]
            if key != st.emitted:
                st.emitted = key
                self.dirty.add(label)
                out.append((st, matches))
        return out

    @staticmethod
    def integrity(shown: dict[str, LabelContent | None], hq: dict[str, LabelContent]) -> tuple[int, int]:
        """(labels showing HQ's price, labels HQ has a price for)."""
        return sum(same_price(shown.get(label), want) for label, want in hq.items()), len(hq)
