"""TLS, passwords, ACLs and MQTT 3.1.1 against a real mosquitto configured for them."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.config import MqttConfig, TlsConfig
from edge_agent.sync.mqtt_client import connect, make_client
from simulators.inventory_feed import InventoryFeed
from simulators.mosquitto import Mosquitto

from .helpers import REPO, AgentProcess, agent_config, start_hq, wait_for

DEPLOY = REPO / "deploy" / "mosquitto"

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


# Canaries: tests/conftest.py fails the run if a log line shows one.
ACCOUNTS = {"S001": "agt-canary-51c0a2-s001", "S002": "agt-canary-52d1b3-s002", "hq": "hqp-canary-4e7f10-hq"}
# Directives of deploy/mosquitto/mosquitto.conf the Mosquitto class writes itself (its port, folder, log)
# or that would write outside the test's folder (pid_file).
_OURS = {"pid_file", "listener", "allow_anonymous", "persistence", "persistence_location", "log_dest", "log_type"}


def deploy_conf(pki: Path, passwd: Path, acl: Path) -> str:
    """The production mosquitto.conf with this test's port, certificates and files put in."""
    paths = {"cafile": pki / "ca.pem", "certfile": pki / "server.pem", "keyfile": pki / "server.key",
             "password_file": passwd, "acl_file": acl}
    kept, seen = [], set()
    for line in (DEPLOY / "mosquitto.conf").read_text().splitlines():
        word = line.split(" ", 1)[0]
        if not word or word.startswith("#") or word in _OURS:
            continue
        seen.add(word)
        kept.append(f"{word} {paths[word]}" if word in paths else line)
    assert paths.keys() <= seen, f"deploy/mosquitto/mosquitto.conf lacks {paths.keys() - seen}"
    return "\n".join(kept) + "\n"


@pytest.fixture
def secure_broker(tmp_path: Path, pki: Path) -> Iterator[Mosquitto]:
    """A mosquitto configured as deploy/mosquitto says: TLS, passwords, the production ACL."""
    work = tmp_path / "mosq-secure"
    work.mkdir()
    pw = work / "passwd"
    pw.touch()
    os.chmod(pw, 0o600)
    for user, secret in ACCOUNTS.items():
        subprocess.run(["mosquitto_passwd", "-b", str(pw), user, secret], check=True, capture_output=True)
    acl = work / "acl"
    shutil.copyfile(DEPLOY / "acl", acl)
    os.chmod(acl, 0o600)
    b = Mosquitto(workdir=work, anonymous=False, listener_conf=deploy_conf(pki, pw, acl))
    b.start()
    yield b
    b.kill()


def _tls(pki: Path) -> dict:
    return {"enabled": True, "ca_file": str(pki / "ca.pem")}


@pytest.mark.slow
def test_tls_password_and_acl(tmp_path: Path, secure_broker: Mosquitto, pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The password comes from the environment, not the file.
    monkeypatch.setenv("EDGE_AGENT_MQTT_PASSWORD", ACCOUNTS["S001"])
    cfg = agent_config(tmp_path, secure_broker.port, sim=SIM, mqtt={"username": "S001"}, mqtt__tls=_tls(pki))
    assert ACCOUNTS["S001"] not in cfg.read_text()
    hq = start_hq(tmp_path, secure_broker.port, mqtt={"username": "hq", "password": ACCOUNTS["hq"], "tls": _tls(pki)})
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
    cfg = agent_config(tmp_path, secure_broker.port, sim=SIM, mqtt={"username": "S001"}, mqtt__tls=_tls(pki))
    hq = start_hq(tmp_path, secure_broker.port, mqtt={"username": "hq", "password": ACCOUNTS["hq"], "tls": _tls(pki)})
    log = tmp_path / "agent.log"
    agent = AgentProcess(cfg, log).start()
    try:
        wait_for(lambda: "connection refused" in log.read_text(), 20, "the broker to refuse the wrong password")
        assert agent.alive
        assert hq.db.inventory("S001") == {}
        assert agent.terminate() == 0
        monkeypatch.setenv("EDGE_AGENT_MQTT_PASSWORD", ACCOUNTS["S001"])
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


# ---------------------------------------------------------------- the production ACL, topic by topic

UPLINK = ["status", "inventory/delta", "inventory/snapshot", "inventory/count", "epcis/events", "traffic/stats",
          "traffic/heatmap", "esl/state", "esl/alert", "cmd-result", "health"]


class Peer:
    """One authenticated MQTT 5 client over TLS (the agent's own client builder). It subscribes again
    on every connect, records what it receives, and each publish waits for the broker's PUBACK."""

    def __init__(self, user: str, port: int, pki: Path, subscribe: tuple[str, ...] = (), client_id: str = "") -> None:
        self.user = user
        self.got: list[tuple[str, bytes]] = []
        self.session_present = False
        self._acks: dict[int, ReasonCode] = {}
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._cv = threading.Condition()
        cfg = MqttConfig(port=port, username=user, password=ACCOUNTS[user], tls=TlsConfig(**_tls(pki)))
        self.client = make_client(cfg, client_id or f"peer-{user}")

        def on_connect(c: mqtt.Client, _u: object, flags: mqtt.ConnectFlags, rc: ReasonCode, _p: object) -> None:
            self.session_present = flags.session_present
            if not rc.is_failure and subscribe:
                c.subscribe([(t, 1) for t in subscribe])
            self._connected.set()

        def on_subscribe(_c: object, _u: object, _mid: int, _codes: object, _p: object) -> None:
            self._subscribed.set()

        def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
            with self._cv:
                self.got.append((msg.topic, bytes(msg.payload)))
                self._cv.notify_all()

        def on_publish(_c: object, _u: object, mid: int, rc: ReasonCode, _p: object) -> None:
            with self._cv:
                self._acks[mid] = rc
                self._cv.notify_all()

        self.client.on_connect, self.client.on_subscribe = on_connect, on_subscribe
        self.client.on_message, self.client.on_publish = on_message, on_publish
        connect(self.client, cfg)
        self.client.loop_start()
        assert self._connected.wait(10), f"{user}: no CONNACK"
        if subscribe:
            assert self._subscribed.wait(10), f"{user}: no SUBACK"

    def publish(self, topic: str, payload: bytes) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK's reason code. mosquitto routes a message to the
        subscribers before it acks it, so whatever was allowed is on its way once this returns."""
        mid = self.client.publish(topic, payload, qos=1).mid
        with self._cv:
            assert self._cv.wait_for(lambda: mid in self._acks, 10), f"{self.user}: no PUBACK for {topic}"
            return self._acks.pop(mid)

    def received(self, topic: str, payload: bytes, timeout: float = 10.0) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: (topic, payload) in self.got, timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _fence(sender: Peer, topic: str, watchers: list[Peer]) -> None:
    """Send an allowed message after the ones under test and wait until every watcher has it: a message
    published before it by the same client would have reached them first."""
    payload = os.urandom(8).hex().encode()
    assert not sender.publish(topic, payload).is_failure
    for w in watchers:
        assert w.received(topic, payload), f"{w.user} never got the fence on {topic}"


@pytest.mark.slow
def test_production_acl_binds_each_store_to_its_own_topics(secure_broker: Mosquitto, pki: Path) -> None:
    port = secure_broker.port
    # The witness is HQ: it reads everything it is allowed to.
    hq = Peer("hq", port, pki, subscribe=("retail/v1/#",))
    s001 = Peer("S001", port, pki, subscribe=("retail/v1/S001/cmd/#", "retail/v1/S001/ack"))
    # S002 tries to read S001's commands, and everything else.
    s002 = Peer("S002", port, pki, subscribe=("retail/v1/S001/cmd/#", "#"))
    try:
        # S001 may publish each of its uplink streams, and HQ receives them.
        for stream in UPLINK:
            topic = f"retail/v1/S001/{stream}"
            assert not s001.publish(topic, stream.encode()).is_failure, topic
            assert hq.received(topic, stream.encode()), f"HQ did not receive {topic}"

        # It may not speak for S002, nor command itself, nor forge HQ's ack, nor invent a stream.
        forged = ["retail/v1/S002/inventory/delta", "retail/v1/S002/status", "retail/v1/S001/cmd/inventory.resync",
                  "retail/v1/S001/ack", "retail/v1/S001/other", "retail/v1/S001", "retail/v1/hq/cmd/x", "elsewhere"]
        for topic in forged:
            rc = s001.publish(topic, b"forged")
            assert rc.is_failure and rc.getName() == "Not authorized", (topic, rc)
        _fence(s001, "retail/v1/S001/health", [hq])
        assert all(payload != b"forged" for _, payload in hq.got + s001.got + s002.got)

        # HQ commands S001 and acks it; S001 receives both, S002 (subscribed to them) neither.
        for topic in ("retail/v1/S001/cmd/inventory.resync", "retail/v1/S001/ack"):
            assert not hq.publish(topic, b"for S001 only").is_failure
            assert s001.received(topic, b"for S001 only")
        _fence(hq, "retail/v1/S002/cmd/inventory.resync", [s002])
        assert [t for t, _ in s002.got] == ["retail/v1/S002/cmd/inventory.resync"], s002.got

        # S002 speaks for itself as S001 does.
        assert not s002.publish("retail/v1/S002/inventory/delta", b"from S002").is_failure
        assert hq.received("retail/v1/S002/inventory/delta", b"from S002")
    finally:
        for p in (hq, s001, s002):
            p.close()


@pytest.mark.slow
def test_a_store_using_anothers_client_id_gets_nothing_of_it(secure_broker: Mosquitto, pki: Path) -> None:
    """The ACL binds topics to usernames, not client ids: S002 can resume S001's session and push S001
    off, but every publish and every delivery is checked against S002's name."""
    port = secure_broker.port
    hq = Peer("hq", port, pki, subscribe=("retail/v1/#",))
    Peer("S001", port, pki, subscribe=("retail/v1/S001/cmd/#",)).close()  # offline, its session kept
    assert not hq.publish("retail/v1/S001/cmd/price.set", b"queued for S001").is_failure
    thief = Peer("S002", port, pki, client_id="peer-S001")
    try:
        assert thief.session_present
        rc = thief.publish("retail/v1/S001/inventory/delta", b"as S001")
        assert rc.getName() == "Not authorized"
        # The broker sends a resumed session's queue right after CONNACK, before the PUBACK above.
        _fence(thief, "retail/v1/S002/health", [hq])
        assert thief.got == []
        assert all(payload != b"as S001" for _, payload in hq.got)
    finally:
        thief.close()
        hq.close()


def _connack(port: int, pki: Path, username: str | None, password: str | None) -> ReasonCode:
    cfg = MqttConfig(port=port, username=username, password=password, tls=TlsConfig(**_tls(pki)))
    client = make_client(cfg, "stranger")
    answers: list[ReasonCode] = []
    answered = threading.Event()

    def on_connect(_c: object, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        answers.append(rc)
        answered.set()

    client.on_connect = on_connect
    connect(client, cfg)
    client.loop_start()
    try:
        assert answered.wait(10), f"no CONNACK for {username!r}"
    finally:
        client.disconnect()
        client.loop_stop()
    return answers[0]


@pytest.mark.slow
def test_production_broker_refuses_strangers(secure_broker: Mosquitto, pki: Path) -> None:
    for username, password in ((None, None), ("S001", "wrong"), ("S003", ACCOUNTS["S001"])):
        rc = _connack(secure_broker.port, pki, username, password)
        assert rc.is_failure, f"broker let {username!r} in"
    assert not _connack(secure_broker.port, pki, "S001", ACCOUNTS["S001"]).is_failure
