"""A real PostgreSQL server for the tests: Debian's binaries, a private data directory and port on
127.0.0.1, password authentication over TCP, run as the ``postgres`` user and stopped by PID.

Make installs Debian's ``postgresql`` when it is missing; without it these tests skip (and fail
under CI=true, like the browser tests).
"""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from raynodes import free_port, wait_for


def binaries() -> Path | None:
    """The folder of initdb and postgres (Debian: /usr/lib/postgresql/<version>/bin)."""
    found = shutil.which("initdb")
    if found and Path(found).resolve().with_name("postgres").exists():
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


def available() -> str | None:
    """None when a server can be started here, else why not."""
    if binaries() is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no 'postgres' user to run the server as"
    if os.geteuid() != 0:
        return "starting a private PostgreSQL server as the postgres user needs root"
    return None


class PostgresServer:
    """One private server; ``database()`` makes a fresh database owned by a password-protected role."""

    USER = "bnnctl"

    def __init__(self) -> None:
        self.bin = binaries()
        self.folder = Path(tempfile.mkdtemp(prefix="bnnctl-pg-"))  # not under pytest's root-only tmp
        pw = pwd.getpwnam("postgres")
        os.chown(self.folder, pw.pw_uid, pw.pw_gid)
        self.data = self.folder / "data"
        self.port = free_port()
        self.password = "pw-" + secrets.token_hex(12)  # tests assert it is never printed
        self._n = 0
        superpw = self.folder / "superpw"
        superpw.write_text(secrets.token_hex(12))
        os.chown(superpw, pw.pw_uid, pw.pw_gid)
        self._as_postgres([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                           "--auth-host=scram-sha-256", f"--pwfile={superpw}", "-E", "UTF8"])
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-h", "127.0.0.1",
             "-k", str(self.folder), "-c", "max_connections=200", "-c", "fsync=off"],
            user="postgres", group=pw.pw_gid, stdout=open(self.folder / "server.log", "w"),
            stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._ready, 60, f"PostgreSQL on port {self.port}")
        self.sql(f"CREATE ROLE {self.USER} LOGIN PASSWORD '{self.password}' CREATEDB")

    def _as_postgres(self, cmd: list[str]) -> str:
        out = subprocess.run(cmd, user="postgres", capture_output=True, text=True, cwd=self.folder)
        if out.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {out.stdout}{out.stderr}")
        return out.stdout

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError("postgres exited: " + (self.folder / "server.log").read_text()[-2000:])
        try:
            self.sql("SELECT 1")
            return True
        except RuntimeError:
            return False

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run SQL as the superuser over the server's Unix socket."""
        return self._as_postgres([str(self.bin / "psql"), "-h", str(self.folder), "-p", str(self.port), "-U",
                                  "postgres", "-d", database, "-v", "ON_ERROR_STOP=1", "-Atc", statement])

    def database(self, name: str | None = None) -> str:
        """A new, empty database owned by the password role; returns its SQLAlchemy URL."""
        self._n += 1
        name = name or f"t{self._n}_{secrets.token_hex(3)}"
        self.sql(f"CREATE DATABASE {name} OWNER {self.USER}")
        return f"postgresql+psycopg://{self.USER}:{self.password}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        """Stop the postmaster by its PID (a fast shutdown), then remove the data directory."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        time.sleep(0.2)
        shutil.rmtree(self.folder, ignore_errors=True)
