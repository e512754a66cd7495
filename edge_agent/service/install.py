"""``edge-agent install``: the layout a store box runs the agent from.

- ``/etc/edge-agent/config.toml``: a copy of config.example.toml, written only if there is none (an
  operator's config is never overwritten), owned root with the service user's group, mode 0640 (it may
  hold secrets).
- ``/var/lib/edge-agent/``: the state directory, owned by the service user, mode 0750. systemd's
  StateDirectory= would make it too; making it here lets the layout be checked and run without systemd.
- ``/etc/systemd/system/edge-agent.service``: the unit, from the template beside this module, always
  rewritten (settings of the operator's own go in drop-ins).
- The service user (``useradd --system``), only when installing into ``/`` as root and it is missing.

``root`` puts all of it under another folder (an image being built, a test); paths written into the
files stay those of the target (``/etc/edge-agent/config.toml``), as with DESTDIR. The unit runs the
interpreter this command runs on, so install from the environment the service is to use.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
from importlib import resources
from pathlib import Path

CONFIG_DIR = Path("/etc/edge-agent")
STATE_DIR = Path("/var/lib/edge-agent")  # StateDirectory=edge-agent in the unit
UNIT = Path("/etc/systemd/system/edge-agent.service")


class InstallError(Exception):
    pass


def under(root: Path, path: Path) -> Path:
    return root / path.relative_to("/")


def _shipped(name: str) -> str:
    """A file shipped beside this module as package data."""
    return (resources.files("edge_agent.service") / name).read_text(encoding="utf-8")


def unit_text(user: str, group: str) -> str:
    template = _shipped("edge-agent.service")
    return (template.replace("@EXEC@", f"{sys.executable} -m edge_agent.cli")
            .replace("@CONFIG@", str(CONFIG_DIR / "config.toml")).replace("@USER@", user).replace("@GROUP@", group))


def unreachable(path: Path) -> Path | None:
    """The first folder above ``path`` that other users cannot enter (a venv under /root, say)."""
    for folder in reversed(path.resolve().parents):
        if not folder.stat().st_mode & stat.S_IXOTH:
            return folder
    return None


def _create_user(user: str) -> str:
    subprocess.run(["useradd", "--system", "--user-group", "--home-dir", str(STATE_DIR), "--no-create-home",
                    "--shell", "/usr/sbin/nologin", "--comment", "edge-agent service", user], check=True)
    return f"created system user {user}"


def install(root: Path, user: str, *, create_user: bool = True) -> list[str]:
    """Lay out the files under ``root``; returns what was done and what to do next, a line each."""
    done: list[str] = []
    real_root = root.resolve() == Path("/")
    if real_root and os.geteuid() != 0:
        raise InstallError("installing into / needs root (to write /etc and /var/lib, and make the user)")
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        if not (create_user and real_root):
            raise InstallError(f"no user {user!r} on this machine: create it first (useradd --system {user}), or "
                               "install into / as root, which creates it") from None
        done.append(_create_user(user))
        pw = pwd.getpwnam(user)
    group = grp.getgrgid(pw.pw_gid).gr_name

    etc, state, unit = under(root, CONFIG_DIR), under(root, STATE_DIR), under(root, UNIT)
    for folder in (etc, state, unit.parent):
        folder.mkdir(parents=True, exist_ok=True)
    config = etc / "config.toml"
    if config.exists():
        done.append(f"kept {config} (an existing config is never overwritten)")
    else:
        config.write_text(_shipped("config.example.toml"), encoding="utf-8")
        done.append(f"wrote {config} from config.example.toml: set store.id and [mqtt] there")
    config.chmod(0o640)
    state.chmod(0o750)
    if os.geteuid() == 0:
        shutil.chown(config, "root", group)
        shutil.chown(state, user, group)
    elif pw.pw_uid != os.geteuid():
        done.append(f"warning: not root, so {config} and {state} are not given to {user}")
    if (etc / "var").is_dir() and not (state / "var").exists():
        # Before the state directory, relative paths resolved against the config's folder: an outbox left
        # there holds facts HQ has not had, and a fresh one would start the streams' seqs again.
        done.append(f"warning: state from before the state directory is in {etc / 'var'}: with the agent "
                    f"stopped, move it before starting the service: mv {etc / 'var'} {state}/ && chown -R {user}: {state}")
    unit.write_text(unit_text(user, group), encoding="utf-8")
    done.append(f"wrote {unit} (runs {sys.executable} as {user})")
    for what, path in (("the interpreter", Path(sys.executable)), ("the agent's code", Path(__file__))):
        if (folder := unreachable(path)) is not None:
            done.append(f"warning: {user} cannot enter {folder}, where {what} is: install the agent into a "
                        "virtual environment others can read (e.g. python3 -m venv /opt/edge-agent)")
        if str(path.resolve()).startswith(("/home/", "/root/")):
            done.append(f"warning: {what} is under /home or /root, which the unit's ProtectHome=yes hides")
    if real_root:
        done.append("next: edit the config, `edge-agent check-config --state-dir /var/lib/edge-agent "
                    f"{CONFIG_DIR / 'config.toml'}`, then `systemctl daemon-reload && systemctl enable --now "
                    "edge-agent`")
    return done
