"""Two simulated access points behind one ControllerGroup, over real HTTP, on a virtual clock."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.clock import VirtualClock
from edge_agent.config import EslConfig
from edge_agent.contract import EslBindArgs, PriceSetArgs
from edge_agent.esl.controller import ControllerError, LabelContent
from edge_agent.esl.group import ControllerGroup
from edge_agent.esl.openepaperlink import OpenEPaperLinkController
from edge_agent.esl.service import EslService
from edge_agent.sync.outbox import Outbox
from simulators.esl_controller import SimulatedAccessPoint
from simulators.esl_store import gtin

CONTENT = LabelContent(gtin=gtin(1), price="1.99", currency="EUR")


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def aps(clock: VirtualClock) -> Iterator[list[SimulatedAccessPoint]]:
    started = [SimulatedAccessPoint(30, seed=f"ap{i}", clock=clock).start() for i in range(2)]
    yield started
    for ap in started:
        ap.stop()


def group(aps: list[SimulatedAccessPoint]) -> ControllerGroup:
    return ControllerGroup([OpenEPaperLinkController(ap.url, timeout=2.0) for ap in aps])


def test_poll_merges_and_send_goes_to_the_access_point_that_has_the_label(aps: list[SimulatedAccessPoint]) -> None:
    g = group(aps)
    assert {r.label for r in g.poll().reports} == set(aps[0].macs()) | set(aps[1].macs())
    g.send(aps[1].macs()[3], CONTENT)
    assert (aps[0].stats().uploads, aps[1].stats().uploads) == (0, 1)
    with pytest.raises(ControllerError, match="no access point has reported"):
        g.send("00000000000000AA", CONTENT)


def test_one_access_point_down_the_others_labels_still_come(aps: list[SimulatedAccessPoint]) -> None:
    g = group(aps)
    aps[0].stop()
    assert {r.label for r in g.poll().reports} == set(aps[1].macs()) and g.down == {0}
    aps[1].stop()
    with pytest.raises(ControllerError, match="controller 1: .*controller 2: "):
        g.poll()


def test_the_service_makes_labels_on_both_access_points_show_the_price(
        tmp_path: Path, clock: VirtualClock, aps: list[SimulatedAccessPoint]) -> None:
    outbox = Outbox(tmp_path / "outbox.db", clock)
    cfg = EslConfig(enabled=True, urls=[ap.url for ap in aps], poll_interval_s=10.0)
    svc = EslService(cfg, group(aps), outbox, clock)
    labels = aps[0].macs() + aps[1].macs()
    svc.bind(None, EslBindArgs.model_validate({"items": [{"label": m, "gtin": gtin(1)} for m in labels]}))  # type: ignore[arg-type]
    svc.price_set(None, PriceSetArgs(gtin=gtin(1), price="1.99", currency="EUR", version=1))  # type: ignore[arg-type]
    stop = threading.Event()
    listener = threading.Thread(target=svc.controller.listen, args=(svc.ingest, stop), daemon=True)  # type: ignore[attr-defined]
    listener.start()
    try:
        for _ in range(12):
            clock.advance(10)
            svc.step()
        assert all(ap.displayed(m)["price"] == "1.99" for ap in aps for m in ap.macs())
        assert svc.integrity == (60, 60)
    finally:
        stop.set()
        listener.join(5)
        outbox.close()
