from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulators.mosquitto import Mosquitto
from simulators.postgres import Postgres

from .browser import browser  # noqa: F401 - the fixture, for every browser test
from .helpers import HqBackend

os.environ.setdefault("YOLO_OFFLINE", "1")


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
