"""Configuration: the example passes check-config; every error names its dotted key and its line;
the environment overrides secrets; relative paths are relative to the config file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from edge_agent import cli
from edge_agent.clock import VirtualClock
from edge_agent.config import AgentConfig, ConfigError, HqFileConfig, load_config
from edge_agent.hq.api import token_owner
from edge_agent.sync.outbox import Outbox

from .helpers import REPO

EXAMPLE = REPO / "config.example.toml"

# Each mistake is on a line ending with "# <- dotted.key" so the test knows where it is.
BAD = """\
# a config with several mistakes
[store]   # <- store.id
# the id is missing
name_of_store = "Main Street"   # <- store.name_of_store

[mqtt]
host = "broker.local"
port = "not-a-port"   # <- mqtt.port
keepalive_s = 30
colour = "blue"   # <- mqtt.colour
tls.insecure = "perhaps"   # <- mqtt.tls.insecure

[mqtt.tsl]   # <- mqtt.tsl
enabled = true

[outbox]
path = "var/outbox.db"
inflight_window = 0   # <- outbox.inflight_window
"cap_bytes" = 1024   # <- outbox.cap_bytes

[sources.simulated_inventory]
enabled = true
zones = 5   # <- sources.simulated_inventory.zones
rate_per_s = -1.0   # <- sources.simulated_inventory.rate_per_s

[hq]
client_id = "hq"
reorder_window_s = "two"   # <- hq.reorder_window_s
"""

SYNTAX = """\
[store]
id = "S001"

[mqtt]
host = "127.0.0.1"
port = = 1883
"""


def marked_lines(text: str) -> dict[str, int]:
    return {
        m.group(1): n for n, line in enumerate(text.splitlines(), start=1) if (m := re.search(r"# <- (\S+)$", line))
    }


ISSUE = re.compile(r"^(?P<path>.+?):(?P<line>\d+): (?P<key>\S+): (?P<msg>.+)$")


def check_config(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    rc = cli.main(["check-config", str(path)])
    out, err = capsys.readouterr()
    return rc, err.splitlines(), out


def test_example_config_passes(capsys: pytest.CaptureFixture[str]) -> None:
    rc, err, out = check_config(EXAMPLE, capsys)
    assert rc == 0, err
    assert err == []
    assert "ok" in out
    cfg = load_config(EXAMPLE, env={})
    assert cfg.store.id == "S001"
    # the example documents the defaults: loading it equals the defaults (paths aside)
    defaults = AgentConfig.model_validate({"store": {"id": "S001"}})
    assert cfg.mqtt.model_dump(exclude={"tls"}) == defaults.mqtt.model_dump(exclude={"tls"})
    assert cfg.outbox.model_dump(exclude={"path"}) == defaults.outbox.model_dump(exclude={"path"})
    assert cfg.hq.model_dump(exclude={"db_path"}) == defaults.hq.model_dump(exclude={"db_path"})
    assert cfg.sources == defaults.sources and cfg.health == defaults.health and cfg.log == defaults.log


def test_every_error_names_its_key_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    rc, err, _ = check_config(path, capsys)
    assert rc == 2
    *issues, summary = err
    expected = marked_lines(BAD)
    assert summary == f"{len(expected)} error(s) in {path}"
    found: dict[str, int] = {}
    for line in issues:
        m = ISSUE.match(line)
        assert m, f"error line without file:line: key: message: {line!r}"
        assert m["path"] == str(path)
        assert m["key"] not in found, f"{m['key']} reported twice"
        found[m["key"]] = int(m["line"])
    assert found == expected
    text = "\n".join(issues)
    assert "store.id: required key is missing" in text
    assert "mqtt.colour: unknown key" in text
    assert "mqtt.tsl: unknown key" in text


def test_config_error_carries_issues(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    with pytest.raises(ConfigError) as ei:
        load_config(path, env={})
    assert {i.key: i.line for i in ei.value.issues} == marked_lines(BAD)
    assert ei.value.path == path


def test_syntax_error_names_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "syntax.toml"
    path.write_text(SYNTAX)
    rc, err, _ = check_config(path, capsys)
    assert rc == 2
    assert len(err) == 2
    m = ISSUE.match(err[0])
    assert m and m["path"] == str(path) and m["key"] == "(syntax)" and int(m["line"]) == 6, err
    assert err[1] == f"1 error(s) in {path}"


def test_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err, _ = check_config(tmp_path / "missing.toml", capsys)
    assert rc == 2
    assert "(file): cannot read" in err[0]


@pytest.mark.slow
def test_check_config_exit_codes_as_a_process(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD)
    syntax = tmp_path / "syntax.toml"
    syntax.write_text(SYNTAX)

    def run(p: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edge_agent.cli", "check-config", str(p)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)

    ok = run(EXAMPLE)
    assert ok.returncode == 0, ok.stderr
    r = run(bad)
    assert r.returncode == 2
    assert sum(1 for line in r.stderr.splitlines() if ISSUE.match(line)) == len(marked_lines(BAD))
    r = run(syntax)
    assert r.returncode == 2
    assert f"{syntax}:6: (syntax):" in r.stderr


# ---------------------------------------------------------------- environment


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def secret(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


def test_env_password_wins_over_file(tmp_path: Path) -> None:
    path = write(tmp_path / "a.toml", '[store]\nid = "S001"\n[mqtt]\nusername = "u-file"\npassword = "p-file"\n')
    assert secret(load_config(path, env={}).mqtt.password) == "p-file"
    cfg = load_config(path, env={"EDGE_AGENT_MQTT_PASSWORD": "p-env"})
    assert secret(cfg.mqtt.password) == "p-env"
    assert cfg.mqtt.username == "u-file"
    cfg = load_config(path, env={"EDGE_AGENT_MQTT_USERNAME": "u-env", "EDGE_AGENT_MQTT_PORT": "2883",
                                 "EDGE_AGENT_MQTT_HOST": "10.0.0.5", "UNRELATED": "x"})
    assert (cfg.mqtt.username, secret(cfg.mqtt.password), cfg.mqtt.port, cfg.mqtt.host) == ("u-env", "p-file", 2883, "10.0.0.5")
    # the HQ's view of the same file gets the same override
    assert secret(load_config(path, env={"EDGE_AGENT_MQTT_PASSWORD": "p-env"}, model=HqFileConfig).mqtt.password) == "p-env"


def test_env_supplies_a_secret_the_file_lacks(tmp_path: Path) -> None:
    path = write(tmp_path / "a.toml", '[store]\nid = "S001"\n')  # no [mqtt] table at all
    cfg = load_config(path, env={"EDGE_AGENT_MQTT_PASSWORD": "p-env"})
    assert secret(cfg.mqtt.password) == "p-env"
    assert load_config(path, env={}).mqtt.password is None


def test_process_environment_is_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "a.toml", '[store]\nid = "S001"\n[mqtt]\npassword = "p-file"\n')
    monkeypatch.setenv("EDGE_AGENT_MQTT_PASSWORD", "p-os")
    assert secret(load_config(path).mqtt.password) == "p-os"
    assert secret(load_config(path, env={}).mqtt.password) == "p-file"


# ---------------------------------------------------------------- relative paths


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = write(
        tmp_path / "etc" / "agent.toml",
        '[store]\nid = "S001"\n[outbox]\npath = "var/outbox.db"\n[hq]\ndb_path = "../hq/hq.db"\n'
        '[mqtt.tls]\nenabled = true\nca_file = "certs/ca.pem"\n',
    )
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    for given in (conf, Path("../../etc/agent.toml")):
        cfg = load_config(given, env={})
        assert cfg.outbox.path.resolve() == (tmp_path / "etc" / "var" / "outbox.db").resolve()
        assert cfg.hq.db_path.resolve() == (tmp_path / "hq" / "hq.db").resolve()
        assert cfg.mqtt.tls.ca_file is not None
        assert cfg.mqtt.tls.ca_file.resolve() == (tmp_path / "etc" / "certs" / "ca.pem").resolve()
    # the outbox really lands there, not in the current directory
    ob = Outbox(load_config(conf, env={}).outbox.path, VirtualClock())
    ob.close()
    assert (tmp_path / "etc" / "var" / "outbox.db").exists()
    assert not (elsewhere / "var").exists()


def test_default_and_absolute_paths(tmp_path: Path) -> None:
    absolute = tmp_path / "abs" / "o.db"
    conf = write(tmp_path / "etc" / "a.toml", f'[store]\nid = "S001"\n[outbox]\npath = "{absolute}"\n')
    cfg = load_config(conf, env={})
    assert cfg.outbox.path == absolute
    assert cfg.hq.db_path.resolve() == (tmp_path / "etc" / "var" / "hq.db").resolve()  # default, relative to file
    conf2 = write(tmp_path / "etc2" / "a.toml", '[store]\nid = "S001"\n')
    assert load_config(conf2, env={}).outbox.path.resolve() == (tmp_path / "etc2" / "var" / "outbox.db").resolve()


HOMOGRAPHY = "homography = {image = [[0, 0], [1, 0], [1, 1], [0, 1]], floor = [[0, 0], [1, 0], [1, 1], [0, 1]]}\n"


def test_every_relative_path_resolves_against_the_state_directory(tmp_path: Path) -> None:
    """$STATE_DIRECTORY (systemd's StateDirectory=) or --state-dir: one rule for every path key, the ones the
    agent writes and the ones it reads, vision.model, debug_snapshot_dir and a camera's video file included."""
    conf = write(
        tmp_path / "etc" / "agent.toml",
        '[store]\nid = "S001"\n[mqtt.tls]\nenabled = true\nca_file = "certs/ca.pem"\n'
        '[vision]\nmodel = "models/m.onnx"\ndebug_snapshot_dir = "snapshots"\n'
        + "".join(f'[[vision.cameras]]\ncamera = "{cam}"\nurl = "{url}"\n{HOMOGRAPHY}' for cam, url in
                  (("door", "clips/door.mp4"), ("aisle", "rtsp://cam/stream"), ("usb", "/dev/video0"))),
    )
    state = tmp_path / "state"
    for cfg in (load_config(conf, env={"STATE_DIRECTORY": f"{state}:{tmp_path / 'other'}"}),
                load_config(conf, env={"STATE_DIRECTORY": str(tmp_path / "not-this")}, state=state)):
        assert cfg.outbox.path == state / "var" / "outbox.db"
        assert cfg.hq.db_path == state / "var" / "hq.db"
        assert cfg.mqtt.tls.ca_file == state / "certs" / "ca.pem"
        assert cfg.vision.model == state / "models" / "m.onnx"
        assert cfg.vision.debug_snapshot_dir == state / "snapshots"
        assert [c.url.get_secret_value() for c in cfg.vision.cameras] == [str(state / "clips" / "door.mp4"), "rtsp://cam/stream",
                                                        "/dev/video0"]
    # without either, the config file's folder, as before (a checkout, the demo)
    cfg = load_config(conf, env={})
    assert cfg.vision.model == tmp_path / "etc" / "models" / "m.onnx"
    assert cfg.vision.debug_snapshot_dir == tmp_path / "etc" / "snapshots"


def test_bad_environment_override_names_the_variable(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[store]\nid = "S001"\n[mqtt]\nport = 1883\n')
    with pytest.raises(ConfigError) as e:
        load_config(cfg, env={"EDGE_AGENT_MQTT_PORT": "abc"})
    (issue,) = e.value.issues
    assert issue.key == "mqtt.port"
    assert "EDGE_AGENT_MQTT_PORT" in issue.message
    assert issue.line is None


def _keys(model: type, prefix: str = "") -> list[str]:
    from pydantic import BaseModel

    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if getattr(ann, "__origin__", None) is list:  # an array of tables: document its keys
            ann = ann.__args__[0]  # type: ignore[union-attr]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _keys(ann, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def test_every_key_is_documented_in_the_example() -> None:
    """config.example.toml documents every key (set, or shown commented out) of every table."""
    text = (REPO / "config.example.toml").read_text()
    table, seen = "", set()
    for raw in text.splitlines():
        line = raw.strip().lstrip("#").strip()
        if m := re.match(r"^\[\[?([^\]]+)\]\]?\s*(#.*)?$", line):
            table = m.group(1)
            seen.add(table)
            seen.add(table.rsplit(".", 1)[0])  # [a.lines.door] documents the a.lines table too
        elif m := re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=", line):
            seen.add(f"{table}.{m.group(1)}" if table else m.group(1))
    missing = [k for k in _keys(AgentConfig) if k not in seen]
    assert missing == [], f"undocumented keys: {missing}"


# ---------------------------------------------------------------- signing keys

PUB = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="  # RFC 8032 test 1's public key, base64

SIGNING_CASES = {
    "a bad HQ key and an unknown key": (AgentConfig, f"""\
[store]
id = "S001"
[signing]
hq_public_key = "AAAA"   # <- signing.hq_public_key
colour = "red"   # <- signing.colour
[hq.signing.keys]
S001 = "{PUB}"
"""),
    "signed commands without HQ's key": (AgentConfig, """\
[store]
id = "S001"
[signing]
require_signed_commands = true   # <- signing.require_signed_commands
"""),
    "the store's key file missing": (AgentConfig, """\
[store]
id = "S001"
[signing]
key_file = "keys/none.key"   # <- signing.key_file
[hq.signing]
key_file = "keys/not-read-by-the-agent.key"
"""),
    "signatures required without keys": (HqFileConfig, """\
[hq.signing]
require_signatures = true   # <- hq.signing.require_signatures
"""),
    "bad store keys": (HqFileConfig, f"""\
[hq.signing]
require_signatures = true
[hq.signing.keys]
S002 = "not base64!"   # <- hq.signing.keys.S002
"bad/id" = "{PUB}"   # <- hq.signing.keys.bad/id.[key]
"""),
    "HQ's key files missing": (HqFileConfig, """\
[signing]
key_file = "keys/the-store's-not-read-by-HQ.key"
[hq.signing]
key_file = "hq.key"   # <- hq.signing.key_file
keys_file = "stores.toml"   # <- hq.signing.keys_file
"""),
}


@pytest.mark.parametrize("case", SIGNING_CASES)
def test_signing_errors_name_their_key_and_line(tmp_path: Path, case: str) -> None:
    model, text = SIGNING_CASES[case]
    path = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError) as e:
        load_config(path, env={}, model=model)
    assert {i.key: i.line for i in e.value.issues} == marked_lines(text), e.value
    assert e.value.path == path


def test_a_junk_key_file_is_named(tmp_path: Path) -> None:
    write(tmp_path / "junk.key", "-----BEGIN PRIVATE KEY-----\n")
    path = write(tmp_path / "c.toml", '[store]\nid = "S001"\n[signing]\nkey_file = "junk.key"\n')
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    (issue,) = e.value.issues
    assert (issue.key, issue.line) == ("signing.key_file", 4)
    assert "not an Ed25519 private key" in issue.message


def test_keys_file_errors_name_the_keys_file_and_line(tmp_path: Path) -> None:
    conf = write(tmp_path / "hq.toml", '[hq.signing]\nkeys_file = "stores.toml"\n')
    keys = write(tmp_path / "stores.toml", f'S001 = "{PUB}"\nS002 = "short"\n')
    with pytest.raises(ConfigError) as e:
        load_config(conf, env={}, model=HqFileConfig)
    assert e.value.path == keys
    assert [(i.key, i.line) for i in e.value.issues] == [("S002", 2)]


def test_keys_file_merges_with_the_table_but_never_twice(tmp_path: Path) -> None:
    write(tmp_path / "stores.toml", f'S001 = "{PUB}"\n')
    conf = write(tmp_path / "hq.toml", f'[hq.signing]\nkeys_file = "stores.toml"\n[hq.signing.keys]\nS002 = "{PUB}"\n')
    cfg = load_config(conf, env={}, model=HqFileConfig)
    assert cfg.hq.signing.keys == {"S001": PUB, "S002": PUB}
    conf = write(tmp_path / "hq.toml", f'[hq.signing]\nkeys_file = "stores.toml"\n[hq.signing.keys]\nS001 = "{PUB}"\n')
    with pytest.raises(ConfigError) as e:
        load_config(conf, env={}, model=HqFileConfig)
    (issue,) = e.value.issues
    assert (issue.key, issue.line) == ("hq.signing.keys.S001", 4) and "also in" in issue.message



def test_api_tokens_file_is_merged_and_its_errors_name_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["hq-token", "--name", "alice"]) == 0
    out = capsys.readouterr()
    token = out.err.splitlines()[-1].removeprefix("# ")
    write(tmp_path / "tokens.toml", out.out)
    conf = write(tmp_path / "hq.toml", '[hq]\napi_tokens_file = "tokens.toml"\n[hq.api_tokens]\nbob = "sha256:' + "0" * 64 + '"\n')
    cfg = load_config(conf, env={}, model=HqFileConfig)
    assert token_owner(f"Bearer {token}", cfg.hq.api_tokens) == "alice" and set(cfg.hq.api_tokens) == {"alice", "bob"}
    tokens = write(tmp_path / "tokens.toml", out.out + 'carol = "plain-text-token"\n')
    with pytest.raises(ConfigError) as e:
        load_config(conf, env={}, model=HqFileConfig)
    assert e.value.path == tokens and [(i.key, i.line) for i in e.value.issues] == [("carol", 2)]

RFID_SETUPS = """\
[store]
id = "S001"

[rfid]
enabled = true

[[rfid.antennas]]
reader = "r1"
name = "dock door"
zone = "backroom"

[[rfid.antennas]]
reader = "fx"
port = 1
zone = "salesfloor"

[[rfid.readers]]
name = "fx"
default_antenna = 1
timezone = "Europe/Berlin"
"""


def test_rfid_reader_setups_are_checked_and_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 13: name-identified antennas, a reader's default antenna and time zone. check-config accepts them
    and says what each set-up cannot tell; a mistake names its key and line."""
    path = tmp_path / "agent.toml"
    path.write_text(RFID_SETUPS)
    rc, err, out = check_config(path, capsys)
    assert rc == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert any("'dock door'" in n and "by name" in n for n in notes)
    assert any("fx" in n and "cannot tell its antennas apart" in n for n in notes)
    assert any("Europe/Berlin" in n for n in notes) and any("company_prefixes is empty" in n for n in notes)
    bad = (RFID_SETUPS.replace('timezone = "Europe/Berlin"', 'timezone = "Mars/Olympus"')
           .replace("port = 1\n", "port = 1\nname = \"both\"\n"))
    path.write_text(bad)
    with pytest.raises(ConfigError) as ei:
        load_config(path, env={})
    where = {i.key: i.line for i in ei.value.issues}
    lines = bad.splitlines()
    assert "Mars/Olympus" in lines[where["rfid.readers.0.timezone"] - 1]
    assert "rfid.antennas.1" in where and any("port or its name" in i.message for i in ei.value.issues)
    path.write_text(RFID_SETUPS.replace("default_antenna = 1", "default_antenna = 2"))
    with pytest.raises(ConfigError) as ei:
        load_config(path, env={})
    assert any("default_antenna 2 is not mapped" in i.message for i in ei.value.issues)
