"""The whole path for shelf labels: HQ -> MQTT -> agent process -> OpenEPaperLink AP (simulated, real
HTTP) -> e-paper, and label state, alerts and command results back to HQ; with HQ's broker stopped
while price changes are pending."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edge_agent.clock import rfc3339
from simulators.esl_controller import SimulatedAccessPoint
from simulators.esl_store import gtin
from simulators.mosquitto import Mosquitto

from .helpers import AgentProcess, agent_config, start_hq, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

LABELS = 20


def hq_rows(rx, stream: str) -> list[dict]:  # type: ignore[no-untyped-def]
    return [it for b in rx.db.bodies(stream)
            for it in json.loads(b)["items"]]


def test_prices_apply_on_schedule_with_the_broker_down_and_results_reach_hq_after(
        tmp_path: Path, broker: Mosquitto) -> None:
    ap = SimulatedAccessPoint(LABELS, seed=3, checkin_s=1.0, refresh_s=0.2, silent=1 / LABELS).start()
    macs = ap.macs()
    silent = ap.silent_macs()
    gtin_of = {m: gtin(i % 10) for i, m in enumerate(macs)}
    cfg = agent_config(tmp_path, broker.port, esl={
        "enabled": True, "urls": [ap.url], "poll_interval_s": 0.5, "resend_after_s": 5.0, "mismatch_deadline_s": 6.0,
        "silent_after_s": 600.0,
    })
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    rx = start_hq(tmp_path, broker.port)
    try:
        def shows(price_of: dict[str, str]) -> bool:
            return all((ap.displayed(m) or {}).get("price") == price_of[gtin_of[m]] for m in macs if m not in silent)

        wait_for(lambda: rx.db.read("SELECT state FROM status WHERE store = 'S001'") == [("online",)], 30,
                 "the agent online at HQ")
        rx.send_command("S001", "esl.bind", {"items": [{"label": m, "gtin": g} for m, g in gtin_of.items()]})
        wait_for(lambda: any(r["name"] == "esl.bind" for r in hq_rows(rx, "cmd-result")), 30, "the planogram bound")
        first = {g: f"{i + 1}.00" for i, g in enumerate(sorted(set(gtin_of.values())))}
        for g, p in first.items():
            rx.send_command("S001", "price.set", {"gtin": g, "price": p, "currency": "EUR", "version": 1})
        wait_for(lambda: shows(first), 30, "labels showing the first prices")

        later = dict(first)
        effective = time.time() + 4.0
        for g in sorted(first)[:3]:
            later[g] = "0.99"
            rx.send_command("S001", "price.set", {"gtin": g, "price": "0.99", "currency": "EUR", "version": 2,
                                                  "promo": "TODAY",
                                                  "effective_from": rfc3339(effective)})
        wait_for(lambda: sum(r["name"] == "price.set" for r in hq_rows(rx, "cmd-result")) == 13, 15,
                 "the agent to answer every price.set")
        broker.stop()  # HQ's link is cut while the change is pending
        wait_for(lambda: shows(later), 30, "the scheduled prices on the labels while HQ's broker is down")
        assert time.time() >= effective  # not before their time
        wait_for(lambda: agent.alive and time.time() > effective + 8, 15, "the mismatch deadline to pass")
        broker.start()

        def hq_sees_new_prices() -> bool:
            labels = {lb["label"]: lb for lb in rx.db.labels("S001")}
            return all(labels.get(m, {}).get("price") == later[gtin_of[m]] for m in macs if m not in silent)

        wait_for(hq_sees_new_prices, 30, "HQ's label view to show the new prices")
        alerts = {(a["label"], a["kind"]) for a in hq_rows(rx, "esl/alert")}
        for m in silent:
            assert (m, "price_mismatch") in alerts  # a label that never checks in cannot show the price
        labels = rx.db.labels("S001")
        assert sum(lb["matches_hq"] is True for lb in labels) == LABELS - len(silent)
        promo = [lb for lb in labels if lb["price"] == "0.99"]
        assert promo and all(lb["promo"] == "TODAY" for lb in promo)
        assert datetime.fromisoformat(promo[0]["ts"].replace("Z", "+00:00")) >= datetime.fromtimestamp(effective, UTC)
        assert agent.alive
    finally:
        agent.terminate()
        rx.stop()
        ap.stop()
