"""The store broker link (the in-store mosquitto the readers publish to) with the uplink's TLS and
credentials: a real mosquitto with a TLS listener and a password file on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.config import MqttConfig, ReaderMqttConfig, TlsConfig, load_config
from edge_agent.rfid.sources import MqttReaderSource, ReaderIntake
from edge_agent.sync.mqtt_client import connect, make_client
from simulators.mosquitto import Mosquitto

from .helpers import wait_for
from .test_rfid_pipeline import EPCS, T0, generic, make
from .test_security import pki  # noqa: F401 -- the fixture: a throwaway CA and a server certificate

AGENT_PASSWORD = "brk-canary-6d2e90-agent"  # canaries: tests/conftest.py fails the run if a log shows one
READER_PASSWORD = "brk-canary-0f71c4-reader"


@pytest.fixture
def store_broker(tmp_path: Path, pki: Path) -> Iterator[Mosquitto]:  # noqa: F811
    work = tmp_path / "store-broker"
    work.mkdir()
    pw = work / "passwd"
    pw.touch()
    os.chmod(pw, 0o600)
    for user, secret in (("agent", AGENT_PASSWORD), ("r1", READER_PASSWORD)):
        subprocess.run(["mosquitto_passwd", "-b", str(pw), user, secret], check=True, capture_output=True)
    b = Mosquitto(workdir=work, anonymous=False, listener_conf=(
        f"cafile {pki / 'ca.pem'}\ncertfile {pki / 'server.pem'}\nkeyfile {pki / 'server.key'}\n"
        f"password_file {pw}\n"))
    b.start()
    yield b
    b.kill()


def test_reader_events_over_tls_with_a_password(tmp_path: Path, store_broker: Mosquitto, pki: Path) -> None:  # noqa: F811
    _clock, ob, _book, pipe = make(tmp_path)
    intake = ReaderIntake(pipe, maxsize=100, tick_s=3600)
    tls = TlsConfig(enabled=True, ca_file=pki / "ca.pem")
    src = MqttReaderSource(ReaderMqttConfig(enabled=True, port=store_broker.port, username="agent",
                                            password=AGENT_PASSWORD, tls=tls), intake, "S001")
    intake.start()
    src.start()
    reader = make_client(MqttConfig(port=store_broker.port, username="r1", password=READER_PASSWORD, tls=tls), "r1")
    try:
        wait_for(src.conn.connected.is_set, 20, "the agent on the store broker over TLS")
        connect(reader, MqttConfig(port=store_broker.port))
        reader.loop_start()
        reader.publish("readers/r1/events", json.dumps([generic(EPCS[0], 1, T0)]), qos=1).wait_for_publish(10)
        wait_for(lambda: pipe.engine.reads_seen == 1, 20, "the reader's event through the TLS broker")
    finally:
        reader.disconnect()
        reader.loop_stop()
        src.stop()
        intake.stop()
        ob.close()


def test_wrong_password_or_no_tls_is_refused(tmp_path: Path, store_broker: Mosquitto, pki: Path) -> None:  # noqa: F811
    _clock, ob, _book, pipe = make(tmp_path)
    intake = ReaderIntake(pipe, maxsize=100, tick_s=3600)
    tls = TlsConfig(enabled=True, ca_file=pki / "ca.pem")
    for cfg in (ReaderMqttConfig(port=store_broker.port, username="agent", password="wrong", tls=tls),
                ReaderMqttConfig(port=store_broker.port, username="agent", password=AGENT_PASSWORD)):
        src = MqttReaderSource(cfg, intake, "S001")
        src.start()
        try:
            wait_for(lambda src=src: src.conn.attempts >= 2, 20, "two refused attempts")
            assert not src.conn.connected.is_set()
            assert AGENT_PASSWORD not in src.conn.last_error
        finally:
            src.stop()
    ob.close()


def test_store_broker_tls_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "agent.toml"
    path.parent.mkdir()
    path.write_text('[store]\nid = "S001"\n[rfid.mqtt.tls]\nenabled = true\nca_file = "certs/store-ca.pem"\n')
    tls = load_config(path, env={}).rfid.mqtt.tls
    assert tls.ca_file == tmp_path / "etc" / "certs" / "store-ca.pem"
