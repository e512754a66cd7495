from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulators.mosquitto import Mosquitto

os.environ.setdefault("YOLO_OFFLINE", "1")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real mosquitto on a free loopback port, private to the test; stop/start it to cut the uplink."""
    b = Mosquitto(workdir=tmp_path / "mosquitto").start()
    yield b
    b.kill()
