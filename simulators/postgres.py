"""A private PostgreSQL cluster for the tests: initdb and pg_ctl in a temporary directory, on a free
loopback port, never the machine's own service (which a CI box may lack, or run with other settings).

fsync is off: the tests kill HQ's process, never the machine, and a cluster that fsyncs every commit
makes the PostgreSQL half of the HQ suite several times slower for nothing it could catch.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from .mosquitto import free_port


def postgres_bindir() -> Path:
    """Where initdb and pg_ctl are: on PATH, pg_config's bindir, or Debian's /usr/lib/postgresql/<v>/bin."""
    if found := shutil.which("initdb"):
        return Path(found).resolve().parent
    if pg_config := shutil.which("pg_config"):
        bindir = Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True).stdout.strip())
        if (bindir / "initdb").exists():
            return bindir
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if debian:
        return Path(debian[-1]).parent
    raise FileNotFoundError("no initdb: install PostgreSQL (scripts/bootstrap.sh does, with apt)")


class Postgres:
    def __init__(self) -> None:
        self.bindir = postgres_bindir()
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="edge-agent-pg-"))
        self.data = self.workdir / "data"
        self._names = itertools.count(1)
        # initdb refuses to run as root: as root, run the server as the postgres (or nobody) user.
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = "postgres" if _user_exists("postgres") else "nobody"
            shutil.chown(self.workdir, user)
            self._as = ["runuser", "-u", user, "--"]

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self._as, str(self.bindir / tool), *args], check=True, capture_output=True, cwd=self.workdir)

    def start(self) -> Postgres:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8",
                  "--locale=C")
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.workdir} -c fsync=off"
                " -c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.workdir / "log"), "-w", "-t", "60", "-o", opts, "start")
        return self

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = f"hq_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.workdir, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
