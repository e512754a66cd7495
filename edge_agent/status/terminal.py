"""``edge-agent status``: the page's figures as compact text tables, read from a running agent's
``/status.json``. Plain columns: an engineer on a serial console or over ssh has no colours to rely on,
and a table library would add a dependency for what fits in forty lines."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence

from .snapshot import Status


def fetch(url: str, token: str | None, timeout: float = 5.0) -> Status:
    """The status of the agent at ``url`` (its base address). Raises OSError when it cannot be read."""
    req = urllib.request.Request(url.rstrip("/") + "/status.json",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Status.model_validate(json.loads(r.read()))
    except urllib.error.HTTPError as e:
        raise OSError(f"{url}: HTTP {e.code}{' (a token is required: status.token)' if e.code == 401 else ''}") from e


def table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    cells = [[_text(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(head)]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
            for r in ([list(head)] + cells)]


def _text(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def _age(s: float | None) -> str:
    return "never" if s is None else f"{s:.0f} s ago" if s < 90 else f"{s / 60:.0f} min ago"


def render(s: Status) -> str:
    o, u = s.outbox, s.uplink
    out = [f"store {s.store}  edge-agent {s.version}  up {s.uptime_s:.0f} s  "
           f"{'alive' if s.alive else f'MAIN LOOP STALLED {s.loop_age_s:.0f} s'}  {'ready' if s.ready else 'NOT READY'}"]
    out += [f"  {c.name:<9} {'ok' if c.ok else 'FAILING':<8} {c.detail}" for c in s.checks]
    out += ["", f"outbox: {o.pending_facts} pending facts, {o.sealed_messages} sealed messages awaiting HQ's ack, "
            f"oldest {_text(o.oldest_age_s)} s, {o.queued_bytes / 1e6:.1f} of {o.cap_bytes / 1e6:.0f} MB; "
            f"dropped {sum(o.dropped.values())}, quarantined {sum(o.quarantined.values())}",
            f"uplink: {'connected' if u.connected else 'NOT CONNECTED'}, {u.published_messages} published, "
            f"{u.acked_messages} acked, {u.unacked_messages} unacked"]
    if s.cameras:
        out += ["", *table(("camera", "state", "fps", "infer ms", "last frame", "skipped", "restarts"),
                           [(c.camera, c.state, c.fps, c.inference_ms, _age(c.last_frame_age_s), c.skipped, c.restarts)
                            for c in s.cameras])]
    if s.antennas:
        out += ["", *table(("reader", "antenna", "zone", "reads/s", "last read", "reads"),
                           [(a.reader, a.antenna, a.zone, a.reads_per_s, _age(a.last_read_age_s), a.reads)
                            for a in s.antennas])]
    if s.labels is not None:
        lb = s.labels
        out += ["", f"labels: {lb.known} known, price integrity {100 * lb.price_integrity:.1f}%, "
                f"{lb.attention_count} need attention"]
        if lb.attention:
            out += table(("label", "gtin", "why", "wrong for s"),
                         [(x.label, x.gtin, ", ".join(x.alerts) or "not showing its content yet", x.wrong_for_s)
                          for x in lb.attention])
    down = [c for c in s.children if c.state != "up" or c.restarts]
    if down:
        out += ["", *table(("process/thread", "state", "restarts", "restart in s", "last death"),
                           [(c.name, c.state, c.restarts, c.restart_in_s, c.reason or None) for c in down])]
    out += ["", "alerts (newest first):" if s.alerts else "alerts: none"]
    out += [f"  {a.ts}  {a.kind}  {a.message}" for a in s.alerts]
    return "\n".join(out)
