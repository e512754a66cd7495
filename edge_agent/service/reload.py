"""SIGHUP: read the config file again and apply what can change while the agent runs.

Rules:
- The file is loaded exactly as at start (same state directory, same environment overrides). If it has an
  error, nothing changes: the running config stays and every error is logged with its key and line.
- A changed key listed in ``live_setters`` is applied in place. Each of those is read where it is used
  every time (or its holder's copy is replaced), so the new value counts from the next use on.
- Every other changed key needs a restart: one log line lists them all, and the running config keeps its
  old value, so the next reload lists them again until the agent restarts.
- A reload never stops the agent, whatever the file says.

Label bindings are not in the config: HQ sets them with ``esl.bind`` commands, live already.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ..config import AgentConfig, ConfigError

if TYPE_CHECKING:
    from ..agent import Agent

log = logging.getLogger(__name__)

# Keys their components read from the running config object at every use: setting the value there is enough.
READ_LIVE = ("rfid.silent_antenna_s", "rfid.snapshot_interval_s", "esl.poll_interval_s",
             "esl.max_sends_per_poll", "esl.low_stock_below", "esl.low_stock_zones")
# The label reconcile engine's thresholds, copied into its frozen ReconcileParams at start.
ESL_ENGINE = ("resend_after_s", "mismatch_deadline_s", "pending_deadline_s", "silent_after_s", "low_battery_mv",
              "retry_min_s", "retry_max_s")


def flatten(model: BaseModel) -> dict[str, Any]:
    """Dotted key -> value; a list (of cameras, antennas ...) is one value."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = node

    walk("", model.model_dump())
    return out


def live_setters(agent: Agent) -> dict[str, Callable[[Any], None]]:
    """What each live key's new value must reach beyond the running config object."""
    setters: dict[str, Callable[[Any], None]] = {key: lambda _v: None for key in READ_LIVE}
    setters["log.level"] = lambda v: logging.getLogger().setLevel(v)  # the root logger's, as setup_logging set
    setters["health.interval_s"] = lambda v: setattr(agent.health, "interval_s", v)
    setters["outbox.hq_silent_alert_s"] = lambda v: setattr(agent.uplink, "hq_silent_alert_s", v)
    setters["outbox.resend_after_s"] = lambda v: setattr(agent.uplink, "resend_after_s", v)
    setters["outbox.hold_when_silent_s"] = lambda v: setattr(agent.uplink, "hold_when_silent_s", v)
    if agent.esl is not None:
        engine = agent.esl.engine
        for name in ESL_ENGINE:
            setters[f"esl.{name}"] = lambda v, n=name: setattr(engine, "p", dataclasses.replace(engine.p, **{n: v}))
    return setters


def reload(agent: Agent, reread: Callable[[], AgentConfig]) -> tuple[list[str], list[str]]:
    """Apply the file's live changes to ``agent``; returns (applied, needing a restart)."""
    try:
        new = reread()
    except ConfigError as e:
        for issue in e.issues:
            log.error("reload refused, running config kept: %s", issue.render(e.path))
        return [], []
    old, now = flatten(agent.cfg), flatten(new)
    changed = sorted(k for k in old.keys() | now.keys() if old.get(k) != now.get(k))
    setters = live_setters(agent)
    applied = [k for k in changed if k in setters]
    for key in applied:
        section, name = key.rsplit(".", 1)
        holder: Any = agent.cfg
        for part in section.split("."):
            holder = getattr(holder, part)
        setattr(holder, name, now[key])
        setters[key](now[key])
    restart = [k for k in changed if k not in setters]
    # A warning when something waits for a restart: it must show even at log.level = "WARNING".
    log.log(logging.WARNING if restart else logging.INFO, "config reloaded: applied %s; needs a restart: %s",
            ", ".join(applied) or "nothing", ", ".join(restart) or "nothing")
    # What `systemctl status` shows until the next reload or restart.
    agent.notifier.status(f"running; needs a restart for {', '.join(restart)}" if restart else "running")
    return applied, restart
