"""Settings from the environment, ``*_FILE`` and systemd credentials (edge_agent/config_sources.py), secrets
kept out of reprs, and URL redaction (edge_agent/redact.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from edge_agent import cli
from edge_agent.config import AgentConfig, ConfigError, HqFileConfig, load_config
from edge_agent.config_sources import FILE_SUFFIX, env_name, keys
from edge_agent.redact import redact_url

from .helpers import REPO

BASE = '[store]\nid = "S001"\n'
CAMERA = """\
[[vision.cameras]]
camera = "door"
url = "rtsp://10.0.0.7/stream"
[vision.cameras.homography]
image = [[0, 0], [1000, 0], [1000, 1000], [0, 1000]]
floor = [[0, 0], [10, 0], [10, 10], [0, 10]]
"""


def conf(tmp_path: Path, text: str = BASE) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_every_secret_from_the_environment(tmp_path: Path) -> None:
    """The variable the issue found ignored, a camera URL with credentials, the store broker's account."""
    cfg = load_config(conf(tmp_path, BASE + CAMERA), env={
        "EDGE_AGENT_RFID_MQTT_PASSWORD": "reader-broker-pw",
        "EDGE_AGENT_RFID_MQTT_USERNAME": "agent",
        "EDGE_AGENT_VISION_CAMERAS_0_URL": "rtsp://admin:cam-pw@10.0.0.7/stream",
        "EDGE_AGENT_MQTT_PASSWORD": "uplink-pw",
    })
    assert cfg.rfid.mqtt.password is not None and cfg.rfid.mqtt.password.get_secret_value() == "reader-broker-pw"
    assert cfg.rfid.mqtt.username == "agent"
    assert cfg.vision.cameras[0].url.get_secret_value() == "rtsp://admin:cam-pw@10.0.0.7/stream"
    assert cfg.vision.cameras[0].camera == "door"  # the file's other keys stay
    assert cfg.mqtt.password is not None and cfg.mqtt.password.get_secret_value() == "uplink-pw"
    shown = repr(cfg) + str(cfg) + cfg.model_dump_json()
    for secret in ("reader-broker-pw", "cam-pw", "uplink-pw"):
        assert secret not in shown


def test_a_file_named_by_the_environment(tmp_path: Path) -> None:
    secret = tmp_path / "run" / "pw"
    secret.parent.mkdir()
    secret.write_text("from-a-file\n")  # the newline an editor adds is not part of it
    cfg = load_config(conf(tmp_path), env={"EDGE_AGENT_RFID_MQTT_PASSWORD_FILE": str(secret)})
    assert cfg.rfid.mqtt.password is not None and cfg.rfid.mqtt.password.get_secret_value() == "from-a-file"


def test_systemd_credentials_directory(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt.password").write_text("from-systemd")
    (creds / "vision.cameras.0.url").write_text("rtsp://u:p@cam/1")
    cfg = load_config(conf(tmp_path, BASE + CAMERA), env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.mqtt.password is not None and cfg.mqtt.password.get_secret_value() == "from-systemd"
    assert cfg.vision.cameras[0].url.get_secret_value() == "rtsp://u:p@cam/1"
    # The environment wins over the credential, the credential over the file.
    cfg = load_config(conf(tmp_path, BASE + '[mqtt]\npassword = "in-file"\n'),
                      env={"CREDENTIALS_DIRECTORY": str(creds), "EDGE_AGENT_MQTT_PASSWORD": "from-env"})
    assert cfg.mqtt.password is not None and cfg.mqtt.password.get_secret_value() == "from-env"


def test_value_and_file_for_one_key_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("x")
    with pytest.raises(ConfigError) as e:
        load_config(conf(tmp_path), env={"EDGE_AGENT_MQTT_PASSWORD": "x", "EDGE_AGENT_MQTT_PASSWORD_FILE": str(f)})
    (issue,) = e.value.issues
    assert issue.key == "mqtt.password" and "EDGE_AGENT_MQTT_PASSWORD_FILE" in issue.message


def test_unreadable_file_and_bad_value_name_their_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(conf(tmp_path), env={"EDGE_AGENT_MQTT_PASSWORD_FILE": str(tmp_path / "missing")})
    (issue,) = e.value.issues
    assert issue.key == "mqtt.password" and "missing" in issue.message and "No such file" in issue.message
    port = tmp_path / "port"
    port.write_text("abc\n")
    with pytest.raises(ConfigError) as e:
        load_config(conf(tmp_path), env={"EDGE_AGENT_MQTT_PORT_FILE": str(port)})
    (issue,) = e.value.issues
    assert issue.key == "mqtt.port" and str(port) in issue.message and issue.line is None


def test_unknown_variables_are_warned_about_by_name(tmp_path: Path) -> None:
    heard: list[str] = []
    env = {"EDGE_AGENT_RFID_MQTT_PASWORD": "typo", "EDGE_AGENT_MODEL_CACHE": "/x", "EDGE_AGENT_MQTT_HOST": "h",
           "EDGE_AGENT_VISION_CAMERAS_1_URL": "rtsp://second-camera-the-file-lacks", "OTHER": "x"}
    cfg = load_config(conf(tmp_path, BASE + CAMERA), env=env, warn=heard.append)
    assert cfg.mqtt.host == "h"
    assert len(heard) == 2, heard
    assert "EDGE_AGENT_RFID_MQTT_PASWORD" in heard[0] and "EDGE_AGENT_VISION_CAMERAS_1_URL" in heard[1]
    # A credential file that is no key's: systemd's LoadCredential= with a mistyped name.
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt.pasword").write_text("x")
    heard.clear()
    load_config(conf(tmp_path), env={"CREDENTIALS_DIRECTORY": str(creds)}, warn=heard.append)
    assert heard == [f"credential {creds / 'mqtt.pasword'} names no setting (see edge_agent/config_sources.py)"]
    # HQ's process reads the same variables without calling the agent's ones unknown.
    heard.clear()
    load_config(conf(tmp_path), env={"EDGE_AGENT_RFID_MQTT_PASSWORD": "x"}, model=HqFileConfig, warn=heard.append)
    assert heard == []


def test_environment_names_are_unambiguous() -> None:
    """One name per key over the whole example file (arrays included), and no key's name is another's
    ``_FILE`` form."""
    data = tomllib.loads((REPO / "config.example.toml").read_text())
    data["vision"]["cameras"] = [{}]  # one of each array of tables (commented out in the example)
    data["rfid"] |= {"antennas": [{}], "readers": [{}], "llrp": [{}]}
    names = [env_name(k) for k in keys(AgentConfig, data)]
    assert len(names) > 140 and {"EDGE_AGENT_VISION_CAMERAS_0_URL", "EDGE_AGENT_RFID_LLRP_0_HOST"} <= set(names)
    assert len(set(names)) == len(names)
    assert not {n + FILE_SUFFIX for n in names} & set(names)
    # The names of earlier versions are among them.
    assert {"EDGE_AGENT_MQTT_USERNAME", "EDGE_AGENT_MQTT_PASSWORD", "EDGE_AGENT_MQTT_HOST",
            "EDGE_AGENT_MQTT_PORT"} <= set(names)


def test_check_config_warns_about_an_open_intake_beyond_loopback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in [v for v in __import__("os").environ if v.startswith("EDGE_AGENT_")]:
        monkeypatch.delenv(var)
    open_lan = conf(tmp_path, BASE + '[rfid.http]\nenabled = true\nhost = "0.0.0.0"\n')
    assert cli.main(["check-config", str(open_lan)]) == 0
    err = capsys.readouterr().err
    assert "warning: rfid.http is bound to '0.0.0.0', beyond loopback, without rfid.http.tokens" in err
    for quiet in ('[rfid.http]\nenabled = true\nhost = "127.0.0.1"\n',
                  '[rfid.http]\nenabled = true\nhost = "0.0.0.0"\n[rfid.http.tokens]\n'
                  f'fx9600-door = "sha256:{"ab" * 32}"\n'):
        assert cli.main(["check-config", str(conf(tmp_path, BASE + quiet))]) == 0
        assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(("url", "shown"), [
    ("rtsp://admin:s3cr@t@10.0.0.7:554/s?channel=1&password=x", "rtsp://admin:***@10.0.0.7:554/s?channel=1&password=***"),
    ("rtsp://10.0.0.7/stream", "rtsp://10.0.0.7/stream"),
    ("rtsp://viewer@10.0.0.7/stream", "rtsp://viewer@10.0.0.7/stream"),
    ("postgresql://hq:pw@db:5432/hq", "postgresql://hq:***@db:5432/hq"),
    ("http://ap.local/?token=abc&page=2", "http://ap.local/?token=***&page=2"),
    ("rtsp://a:b[c@cam:55x/", "rtsp://***@cam:55x/"),  # unparseable: everything before the last @
    ("/dev/video0", "/dev/video0"),
    ("clip.mp4", "clip.mp4"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
