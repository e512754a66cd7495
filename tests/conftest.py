from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulators.mosquitto import Mosquitto
from simulators.postgres import Postgres

from .browser import browser  # noqa: F401 - the fixture, for every browser test
from .helpers import HqBackend

os.environ.setdefault("YOLO_OFFLINE", "1")
# Relative config paths resolve against $STATE_DIRECTORY when it is set (edge_agent.config.state_dir): a CI
# runner that is itself a systemd service with StateDirectory= must not move the tests' files into its own.
os.environ.pop("STATE_DIRECTORY", None)

# ---------------------------------------------------------------- no secret in any log line
# Tests give the agents they run distinctive secrets, "<kind>-canary-<6 hex>-..." (reader tokens, broker
# and uplink passwords, camera URL passwords). None may appear in a log line of the run. Watched: every
# log record of the test process that reaches the root logger, every test's captured stdout, stderr and
# log text, and at the end every *.log file under the run's temporary folder (agent, HQ and mosquitto
# processes the tests started write theirs there). A hit fails the run and names where it was.
CANARY = re.compile(r"\b[a-z]{3}-canary-[0-9a-f]{6}")
_leaks: list[str] = []


class _CanaryWatch(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage() + (record.exc_text or "")
        if m := CANARY.search(text):
            _leaks.append(f"log record {record.name}: {m.group()} in {text[:200]!r}")


_watch = _CanaryWatch()


def pytest_sessionstart(session: pytest.Session) -> None:
    logging.getLogger().addHandler(_watch)


@pytest.fixture(autouse=True)
def _canary_watch_stays() -> None:
    """Code under test may replace the root handlers (setup_logging does): put the watch back."""
    root = logging.getLogger()
    if _watch not in root.handlers:
        root.addHandler(_watch)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for what, text in (("stdout", report.capstdout), ("stderr", report.capstderr), ("log", report.caplog)):
        if m := CANARY.search(text):
            _leaks.append(f"{report.nodeid} ({report.when}) captured {what}: {m.group()}")


@pytest.hookimpl(tryfirst=True)  # before tmp_path's own hook may remove the folders of passed tests
def pytest_sessionfinish(session: pytest.Session) -> None:
    factory = getattr(session.config, "_tmp_path_factory", None)
    base = getattr(factory, "_basetemp", None)
    if base is not None and Path(base).is_dir():
        for log in sorted(Path(base).rglob("*.log")):
            text = log.read_text(errors="replace")
            for found in sorted({m.group() for m in CANARY.finditer(text)}):
                _leaks.append(f"{log}: {found}")
    if _leaks:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _leaks:
        terminalreporter.section("secrets in log lines", red=True)
        for leak in _leaks:
            terminalreporter.line(leak, red=True)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real mosquitto on a free loopback port, private to the test; stop/start it to cut the uplink."""
    b = Mosquitto(workdir=tmp_path / "mosquitto").start()
    yield b
    b.kill()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One private PostgreSQL cluster for the session (simulators/postgres.py); tests take databases of it."""
    pg = Postgres().start()
    yield pg
    pg.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def hq_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HqBackend]:
    """Each HQ test runs on both backends: the same test function, SQLite and PostgreSQL."""
    pg = request.getfixturevalue("postgres") if request.param == "postgres" else None
    backend = HqBackend(tmp_path, pg)
    yield backend
    for store in backend.opened:
        store.close()
