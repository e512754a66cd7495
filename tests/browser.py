"""Pages in a real headless Chromium: Debian's chromium and chromium-driver (scripts/bootstrap.sh installs both),
driven by Selenium; screenshots kept in test-artifacts/ at the repository root. Used by HQ's dashboard test and
the agent's status page test."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from .helpers import REPO

ARTEFACTS = REPO / "test-artifacts"


def chromium() -> tuple[str, str]:
    """Debian's browser and its driver; scripts/bootstrap.sh installs both. Missing is a failure, not a skip."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    if not browser or not driver:
        pytest.fail("chromium and chromium-driver are not installed: run scripts/bootstrap.sh")
    return browser, driver


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    binary, driver_path = chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--lang=en-GB"):
        opts.add_argument(arg)
    # The driver named outright: Selenium Manager would otherwise try to download one. The browser in
    # Paris, so that the page's two clocks (UTC and the viewer's) differ.
    d = webdriver.Chrome(options=opts, service=Service(driver_path, env={**os.environ, "TZ": "Europe/Paris"}))
    d.set_page_load_timeout(30)
    yield d
    d.quit()


def save(d: webdriver.Chrome, tmp: Path, name: str) -> Path:
    """A screenshot of the whole page (the window grown to it), in tmp and in test-artifacts/."""
    height = d.execute_script("return document.documentElement.scrollHeight")
    d.set_window_size(1280, max(900, min(int(height) + 40, 6000)))
    path = tmp / name
    assert d.save_screenshot(str(path)), name
    ARTEFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTEFACTS / name)
    d.set_window_size(1280, 900)
    return path


def until(d: webdriver.Chrome, what: str, timeout: float, pred) -> object:  # noqa: ANN001 - a WebDriverWait predicate
    try:
        return WebDriverWait(d, timeout, poll_frequency=0.2).until(pred)
    except TimeoutException:
        save(d, d.tmp, f"failed-{re.sub(r'[^a-z]+', '-', what.lower())}.png")  # type: ignore[attr-defined]
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None
