"""Recording a live store: a recorder attached to the agent's input edges (``edge-agent record``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from .. import __version__
from ..agent import Agent
from ..config import AgentConfig
from ..esl.openepaperlink import OpenEPaperLinkController
from .recording import Recorder

log = logging.getLogger(__name__)


def attach(agent: Agent, recorder: Recorder) -> None:
    """Have ``recorder`` take every raw input the agent takes in from now on: reader payloads, HQ commands,
    access point answers and pushes, camera tracks. Call it before ``agent.start()``."""
    if agent.rfid is not None:
        agent.rfid_intake.tap = recorder.reader
    agent.downlink.tap = recorder.command
    if agent.esl is not None:
        for c in getattr(agent.esl.controller, "controllers", [agent.esl.controller]):
            if isinstance(c, OpenEPaperLinkController):
                c.tap = recorder
    if agent.vision is not None:
        agent.vision.record_tracks(recorder)


def record(cfg: AgentConfig, out: Path, reread: Callable[[], AgentConfig]) -> int:
    """Run the agent as ``edge-agent run`` does (``reread``: the config again, for SIGHUP), recording its
    inputs into ``out`` until it is stopped."""
    agent = Agent(cfg)
    recorder = Recorder(out, agent.clock, cfg.store.id, __version__)
    attach(agent, recorder)
    log.info("recording the store's inputs into %s", out)
    try:
        agent.run_until_signalled(reread)
    finally:
        recorder.close()
    log.info("recording %s closed: %d lines", out, recorder.lines)
    return 0
