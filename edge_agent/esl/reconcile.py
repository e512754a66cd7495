"""The reconcile engine: what each label should show against what it shows, as a plan of sends.

Pure: it is told the time and what the controller reported, and answers with the labels to send,
the ``esl/state`` changes and the alerts. The service does the I/O.

What a label shows is known only from evidence, and the rule is built from the ways an OpenEPaperLink
access point changes a tag's hash for reasons other than our content (its firmware's ``newproto.cpp``;
the adapter's docstring lists them). Content we sent counts as displayed only when a report shows:

1. a content hash (not a zero hash from a reboot or a refresh, not a command's payload: the adapter
   reports those as no hash), other than the one the controller reported right after accepting the send;
2. a transfer completed after the send: the controller's update count moved past its count at the send
   (without counts, a check-in no earlier than the send's second);
3. nothing pending, and no reboot standing (a booting tag draws its own screen);
4. only one of our sends could have produced it: a send made while an earlier one of other content was
   still unconfirmed takes the first such change as the earlier send's and waits for the next.

That hash is then learnt as the content's: the same hash again (the AP re-sending the same image after a
refresh or a reboot) shows it again; any other hash, no hash, or a reboot makes it "unknown", which is
never the HQ price, so it gets sent again. A send the label holds but has not fetched is left alone (the
label retries at each check-in) until ``resend_after_s``, unless the controller dropped it: neither pending
nor changed after it was seen pending, or after a check-in ``dropped_after_s`` past the send with no
transfer (a transfer that timed out, a rebooted AP that forgot its queue); then it goes again at once.
A send that fails is retried with exponential backoff and jitter.

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
    # A label that checked in this long after a send, took nothing and holds nothing: the controller dropped
    # it (or never queued it). Long enough for the AP to have drawn the template by then.
    dropped_after_s: float = 30.0
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
    sent_hash: str | None = None  # the hash the controller said the sent content would have, if it could tell
    shown_hash: str | None = None  # the hash the label reported when ``shown`` was proven
    hash_before: str | None = None  # the controller's hash for the label when it accepted the send
    count_before: int | None = None  # and its count of completed transfers then
    sent_at: float | None = None
    confirmed: bool = False  # the last send was seen displayed
    overlap: bool = False  # the last send went while an earlier one was unconfirmed: one change is ambiguous
    queued_seen: bool = False  # the controller was seen holding content after the last send
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
        if r.rebooted or r.content_hash is None:
            st.shown = None  # a boot screen, a refreshed or a flashed label: whatever it shows, unproven
        else:
            if st.sent is not None and st.sent_at is not None and not st.confirmed and not r.pending:
                if st.sent_hash is not None:
                    ours = r.content_hash == st.sent_hash
                else:
                    ours = self._transferred(st, r)
                    if ours and st.overlap:  # perhaps the earlier send's image: wait for the next transfer
                        st.hash_before, st.count_before, st.overlap, ours = r.content_hash, r.update_count, False, False
                if ours:
                    st.shown, st.shown_hash, st.confirmed, st.attempts = st.sent, r.content_hash, True, 0
            if r.content_hash != st.shown_hash:
                st.shown = None  # the label holds something we did not prove
            elif st.shown is None and st.confirmed and not r.pending:
                st.shown = st.sent  # the controller sent the same image again (after a refresh or a reboot)
        if r.pending:
            if st.pending_since is None:
                st.pending_since = st.sent_at if st.sent_at is not None else now
            st.queued_seen = st.sent_at is not None
        else:
            st.pending_since = None

    @staticmethod
    def _transferred(st: LabelState, r: LabelReport) -> bool:
        """Whether the report shows a transfer of new content completed since the last send."""
        if r.content_hash == st.hash_before:
            return False
        if r.update_count is not None and st.count_before is not None:
            return r.update_count > st.count_before
        # no counts: lastseen is whole seconds, so a check-in in the second of the send counts
        return r.last_seen is not None and st.sent_at is not None and r.last_seen.timestamp() >= math.floor(st.sent_at)

    def _idle_checkin(self, st: LabelState, r: LabelReport) -> bool:
        """A check-in well after the send with no transfer completed since (by the controller's clock: an
        unset or wrong one only delays this to ``resend_after_s``)."""
        return (st.sent_at is not None and r.last_seen is not None and r.update_count == st.count_before
                and r.last_seen.timestamp() >= st.sent_at + self.p.dropped_after_s)

    def sent(self, rc: SendReceipt, content: LabelContent, now: float) -> None:
        st = self.state(rc.label, now)
        # An unconfirmed earlier send of other content may yet be what the next transfer brings; of the same
        # content (a resend) it would be proof all the same.
        st.overlap = (st.sent is not None and st.sent != content and not st.confirmed and rc.content_hash is None) \
            or (st.overlap and st.sent == content)
        st.sent, st.sent_hash, st.sent_at, st.hash_before = content, rc.content_hash, now, rc.hash_before
        st.count_before, st.confirmed, st.queued_seen = rc.count_before, False, False
        st.attempts += 1
        st.next_try = 0.0
        self.dirty.add(rc.label)

    def flash_due(self, label: str, content: LabelContent) -> bool:
        """Whether sending ``content`` should flash the label's LED: when a PICK first goes to it, not on a
        resend (each flash is a command transfer the label pays for with its battery)."""
        st = self.labels.get(label)
        return content.pick and (st is None or st.sent is None or not st.sent.pick)

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
                lost = r is not None and st.observed_at > st.sent_at and (
                    (st.sent_hash is not None and r.content_hash != st.sent_hash)
                    or (st.confirmed and (r.rebooted or r.content_hash != st.shown_hash))
                    or (not r.pending and not st.confirmed and r.content_hash in (st.hash_before, None)
                        and (st.queued_seen or self._idle_checkin(st, r))))
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
