"""HQ's dashboard in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium):
six stores send over a real mosquitto through the agent's own outbox and uplink; the fleet page lists them
by attention, a search and a click open one store (in the URL), its floor heatmap is drawn, and an alert
the store raised is at the top. A screenshot of each page is kept in test-artifacts/ at the repository root."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By

from edge_agent.clock import RealClock, rfc3339
from edge_agent.config import MqttConfig
from edge_agent.health import HealthReporter
from edge_agent.hq.receiver import HqReceiver
from edge_agent.sync.outbox import Fact, Outbox
from edge_agent.sync.uplink import Uplink
from simulators.mosquitto import Mosquitto, free_port

from .browser import save, until
from .helpers import start_hq, wait_for

pytestmark = pytest.mark.slow

STORES = ["S001", "S002", "S003", "S004", "S005", "S006"]
ALERT = "backroom reader R2 silent for 15 min (raised by the browser test)"


class Store:
    """One store's real upstream path, in-process: its outbox, uplink (MQTT) and health reporter."""

    def __init__(self, tmp: Path, port: int, store: str, timezone: str | None = None) -> None:
        clock = RealClock()
        self.outbox = Outbox(tmp / f"outbox-{store}.db", clock, synchronous="OFF")
        mqtt = MqttConfig(port=port, reconnect_min_s=0.05, reconnect_max_s=0.5)
        self.uplink = Uplink(mqtt, store, self.outbox, clock)
        self.health = HealthReporter(self.outbox, clock, 3600.0, connected=lambda: self.uplink.connected,
                                     timezone=timezone)
        self.uplink.start()

    def send(self, stream: str, items: list[dict]) -> None:
        now = time.time()
        self.outbox.enqueue(stream, [Fact(ts=now, body=json.dumps(it, separators=(",", ":"))) for it in items])

    def stop(self) -> None:
        self.uplink.stop()
        self.outbox.close()


def heatmap(cols: int = 24, rows: int = 14) -> dict:
    """A floor of 12 m x 7 m in 0.5 m cells, people mostly along an aisle and by the tills."""
    cells = [round(30 * max(0.0, 1 - abs(r - 7) / 5) + (60 if c > 18 and r > 10 else 0) + (c % 3), 3)
             for r in range(rows) for c in range(cols)]
    return {"camera": "*", "bucket_start": rfc3339(time.time() // 60 * 60), "bucket_s": 60, "cell_m": 0.5,
            "cols": cols, "rows": rows, "cells": cells, "origin": [1.0, 2.0],
            "doors": [{"name": "entrance", "a": [4.0, 2.0], "b": [6.0, 2.0]}]}  # on the grid's top edge


def door_pixels(d: webdriver.Chrome) -> int:
    """Canvas pixels in the door's blue (#1565c0), which no heat colour comes near."""
    return d.execute_script("""
        const c = document.getElementById('heat'), px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < px.length; i += 4)
          if (Math.abs(px[i] - 21) < 12 && Math.abs(px[i + 1] - 101) < 12 && Math.abs(px[i + 2] - 192) < 12) n++;
        return n;""")


def fleet_rows(d: webdriver.Chrome) -> list[str]:
    return d.execute_script("return [...document.querySelectorAll('#fleet tbody tr')].map(tr => tr.dataset.store)")


def painted(d: webdriver.Chrome) -> int:
    """Canvas pixels in a heat colour (neither white, grey nor black: the cells, not the axes and text)."""
    return d.execute_script("""
        const c = document.getElementById('heat'), px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < px.length; i += 4) {
          const [r, g, b, a] = [px[i], px[i + 1], px[i + 2], px[i + 3]];
          if (a > 0 && Math.max(r, g, b) - Math.min(r, g, b) > 40) n++;
        }
        return n;""")


def test_the_fleet_lists_the_stores_a_click_opens_one_with_its_heatmap_and_alert(
    tmp_path: Path, broker: Mosquitto, browser: webdriver.Chrome
) -> None:
    browser.tmp = tmp_path  # type: ignore[attr-defined]
    rx: HqReceiver = start_hq(tmp_path, broker.port, http_port=free_port())
    stores = {s: Store(tmp_path, broker.port, s, "Asia/Tokyo" if s == "S002" else None) for s in STORES}
    try:
        assert rx.http is not None
        base = f"http://127.0.0.1:{rx.http.server_address[1]}"
        stores["S002"].send("traffic/heatmap", [heatmap()])
        stores["S002"].outbox.alert("rfid.reader_silent", ALERT)
        label = {"ts": rfc3339(time.time()), "label": "0000021234567890", "gtin": "09506000134352", "price": "2.49",
                 "currency": "EUR", "matches_hq": False}
        stores["S004"].send("esl/state", [label])
        for s in stores.values():
            s.health.tick(force=True)
        wait_for(lambda: len(rx.db.read("SELECT store FROM streams WHERE stream = 'health' AND last_seq >= 1")) == 6,
                 30, "every store's health at HQ")
        wait_for(lambda: rx.db.traffic("S002")["heatmap"] is not None and rx.db.labels("S004"), 30,
                 "S002's heatmap and S004's label at HQ")
        stores["S003"].stop()  # a clean stop: its status says offline
        wait_for(lambda: rx.db.read("SELECT state FROM status WHERE store = 'S003'") == [("offline",)], 30,
                 "S003's offline status")

        # The fleet: every store, by attention: S003 offline, S002 with an alert, S004 a label off HQ's price.
        browser.get(f"{base}/dashboard")
        until(browser, "the fleet's rows", 20, lambda d: len(fleet_rows(d)) == 6)
        assert fleet_rows(browser)[:3] == ["S003", "S002", "S004"] and sorted(fleet_rows(browser)) == STORES
        first = browser.find_element(By.CSS_SELECTOR, "#fleet tbody tr")
        assert "offline" in first.text and re.search(r"\d+ s ago", first.text), first.text
        assert "1 alert open" in browser.find_element(By.CSS_SELECTOR, "#fleet tr[data-store=S002]").text
        save(browser, tmp_path, "dashboard-fleet.png")

        # Search, then a click on the one row left: the store page, named in the URL.
        box = browser.find_element(By.ID, "q")
        box.send_keys("s002")
        until(browser, "the search to leave one store", 10, lambda d: fleet_rows(d) == ["S002"])
        assert "q=s002" in browser.current_url
        browser.find_element(By.CSS_SELECTOR, "#fleet tr[data-store=S002] td:nth-child(3)").click()
        until(browser, "the store page", 10, lambda d: d.find_element(By.ID, "s-name").text == "S002")
        assert "store=S002" in browser.current_url
        alerts = until(browser, "the store's alert", 10,
                       lambda d: ALERT in (t := d.find_element(By.ID, "s-alerts").text) and t)
        assert "1 alert open" in str(alerts) and "rfid.reader_silent" in str(alerts)
        heard = browser.find_element(By.ID, "s-heard").text
        assert re.fullmatch(r"last heard \d+ s ago", heard), heard
        until(browser, "the heatmap drawn", 10, lambda d: painted(d) > 1000)
        size = browser.execute_script("const c = document.getElementById('heat'); return [c.width, c.height]")
        note = browser.find_element(By.ID, "heat-note").text
        assert "24 × 14 cells of 0.5 m (12.0 m × 7.0 m)" in note and "Doors (blue): entrance" in note, note
        # The door is drawn where it is: 2 m long on the top edge, 3 to 5 m from the left (origin x = 1 m).
        assert door_pixels(browser) > 50, door_pixels(browser)
        assert "Asia/Tokyo" in browser.find_element(By.ID, "s-tz").text
        # Square cells: the 24 x 14 grid sits in the canvas at one pixel size for both axes.
        cell = painted(browser)
        assert cell >= 24 * 14 and size[0] > size[1], (size, cell)
        # The alert is above the heatmap, and both near the top of the page.
        top = {i: browser.find_element(By.ID, i).location["y"] for i in ("s-alerts", "heat", "streams")}
        assert top["s-alerts"] < top["heat"] < top["streams"] and top["heat"] < 400, top
        assert re.search(r"\d\d:\d\d:\d\d UTC \(\d\d:\d\d:\d\d Europe/Paris; store \d\d:\d\d:\d\d Asia/Tokyo\)",
                         str(alerts)), alerts
        save(browser, tmp_path, "dashboard-store.png")

        # The URL alone opens a store; "all stores" goes back to the fleet, search kept.
        browser.get(f"{base}/dashboard#store=S004")
        until(browser, "S004's page from its URL", 10,
              lambda d: "1 label not showing HQ's price" in d.find_element(By.ID, "s-why").text)
        browser.find_element(By.ID, "back").click()
        until(browser, "the fleet again", 10, lambda d: len(fleet_rows(d)) == 6)

        # A chain of 600: the page shows the first 100 by attention, more on demand, and a search finds one.
        with rx.db.tx() as c:
            c.executemany("INSERT INTO status(store, state, at) VALUES (?, 'online', ?)",
                          [(f"F{i:04d}", time.time()) for i in range(594)])
        browser.get(f"{base}/dashboard")
        until(browser, "a page of the 600 stores", 20, lambda d: len(fleet_rows(d)) == 100)
        assert browser.find_element(By.ID, "fleet-head").text.startswith("600 stores")
        assert fleet_rows(browser)[:3] == ["S003", "S002", "S004"]
        browser.find_element(By.ID, "more").click()
        until(browser, "the next 100", 10, lambda d: len(fleet_rows(d)) == 200)
        browser.find_element(By.ID, "q").send_keys("F059")
        until(browser, "the search in 600", 10, lambda d: fleet_rows(d) == [f"F{i:04d}" for i in range(590, 594)])
    finally:
        for s in stores.values():
            if s.uplink._pump_thread.is_alive():
                s.stop()
        rx.stop()
