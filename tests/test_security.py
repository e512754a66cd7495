"""TLS, passwords, ACLs and MQTT 3.1.1 against a real mosquitto configured for them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from simulators.inventory_feed import InventoryFeed
from simulators.mosquitto import Mosquitto

from .helpers import AgentProcess, agent_config, start_hq, wait_for

ZONES = ["backroom", "salesfloor"]
SIM = {"seed": 3, "total": 3000, "rate_per_s": 5000, "batch": 100, "zones": ZONES, "gtins": 10}


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl CLI."""
    d = tmp_path / "pki"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=edge-test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
             "-out", "server.csr", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "san.ext", "-out", "server.pem", cwd=d)
    return d


@pytest.fixture
def secure_broker(tmp_path: Path, pki: Path) -> Mosquitto:
    work = tmp_path / "mosq-secure"
    work.mkdir()
    pw = work / "passwd"
    pw.touch()
    for user, secret in (("store-s001", "s001-secret"), ("hq", "hq-secret")):
        subprocess.run(["mosquitto_passwd", "-b", str(pw), user, secret], check=True, capture_output=True)
    acl = work / "acl"
    acl.write_text(
        "user store-s001\ntopic write retail/v1/S001/#\ntopic read retail/v1/S001/cmd/#\n\n"
        "user hq\ntopic read retail/v1/#\ntopic write retail/v1/+/cmd/#\n"
    )
    os.chmod(pw, 0o600)
    os.chmod(acl, 0o600)
    b = Mosquitto(
        workdir=work,
        anonymous=False,
        listener_conf=f"cafile {pki / 'ca.pem'}\ncertfile {pki / 'server.pem'}\nkeyfile {pki / 'server.key'}\n",
        extra_conf=f"password_file {pw}\nacl_file {acl}\n",
    )
    b.start()
    yield b
    b.kill()


def _tls(pki: Path) -> dict:
    return {"enabled": True, "ca_file": str(pki / "ca.pem")}


@pytest.mark.slow
def test_tls_password_and_acl(tmp_path: Path, secure_broker: Mosquitto, pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The password comes from the environment, not the file.
    monkeypatch.setenv("EDGE_AGENT_MQTT_PASSWORD", "s001-secret")
    cfg = agent_config(tmp_path, secure_broker.port, sim=SIM, mqtt={"username": "store-s001"}, mqtt__tls=_tls(pki))
    assert "s001-secret" not in cfg.read_text()
    hq = start_hq(tmp_path, secure_broker.port, mqtt={"username": "hq", "password": "hq-secret", "tls": _tls(pki)})
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    try:
        truth = InventoryFeed(3, ZONES, 10).truth(3000)
        wait_for(lambda: hq.db.inventory("S001") == truth, 60, "HQ inventory over TLS with passwords and ACLs")
        # The ACL lets the store's account read only its own commands: a resync from HQ must work.
        hq.send_command("S001", "inventory.resync", {})
        wait_for(lambda: bool(hq.db.read("SELECT 1 FROM snapshots WHERE store='S001'")), 30, "snapshot after resync")
    finally:
        assert agent.terminate() == 0
        hq.stop()


@pytest.mark.slow
def test_wrong_password_keeps_facts_until_fixed(
    tmp_path: Path, secure_broker: Mosquitto, pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_AGENT_MQTT_PASSWORD", "wrong")
    cfg = agent_config(tmp_path, secure_broker.port, sim=SIM, mqtt={"username": "store-s001"}, mqtt__tls=_tls(pki))
    hq = start_hq(tmp_path, secure_broker.port, mqtt={"username": "hq", "password": "hq-secret", "tls": _tls(pki)})
    log = tmp_path / "agent.log"
    agent = AgentProcess(cfg, log).start()
    try:
        wait_for(lambda: "connection refused" in log.read_text(), 20, "the broker to refuse the wrong password")
        assert agent.alive
        assert hq.db.inventory("S001") == {}
        assert agent.terminate() == 0
        monkeypatch.setenv("EDGE_AGENT_MQTT_PASSWORD", "s001-secret")
        agent = AgentProcess(cfg, log).start()
        truth = InventoryFeed(3, ZONES, 10).truth(3000)
        wait_for(lambda: hq.db.inventory("S001") == truth, 60, "the buffered facts after fixing the password")
    finally:
        agent.terminate()
        hq.stop()


@pytest.mark.slow
def test_mqtt_311(tmp_path: Path, broker: Mosquitto) -> None:
    cfg = agent_config(tmp_path, broker.port, sim=SIM, mqtt={"protocol": "3.1.1"})
    hq = start_hq(tmp_path, broker.port, mqtt={"protocol": "3.1.1"})
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    try:
        truth = InventoryFeed(3, ZONES, 10).truth(3000)
        wait_for(lambda: hq.db.inventory("S001") == truth, 60, "HQ inventory over MQTT 3.1.1")
    finally:
        assert agent.terminate() == 0
        hq.stop()
