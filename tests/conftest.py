"""Fixtures: one real embedded PostgreSQL per test session, a fresh database per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest

from evtool import embedded

ROOT = Path(__file__).resolve().parent.parent
# A copy of shared/tools/gen_events.py, kept here so a bare clone can run the tests.
GEN_EVENTS = ROOT / "tests" / "gen_events.py"


@pytest.fixture(scope="session")
def pg_server():
    """DSN of the session's embedded server (maintenance database).

    Its data lives outside pytest's tmp_path tree, which pytest prunes when other sessions run.
    """
    base = Path(tempfile.mkdtemp(prefix="evtool-test-pg-"))
    pgdata = base / "data"
    dsn = embedded.ensure_running(pgdata)
    yield dsn
    embedded.stop(pgdata)
    shutil.rmtree(base, ignore_errors=True)


def _with_db(dsn: str, name: str) -> str:
    return dsn.replace("/postgres?", f"/{name}?")


@pytest.fixture
def dsn(pg_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A fresh, empty database; EVTOOL_DSN and EVTOOL_HOME point at it and a temp dir."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = _with_db(pg_server, name)
    monkeypatch.setenv("EVTOOL_DSN", url)
    monkeypatch.setenv("EVTOOL_HOME", str(tmp_path / "home"))
    for var in ("DATABASE_URL", "PGHOST", "PGDATABASE", "EVTOOL_TOKEN", "EVTOOL_URL"):
        monkeypatch.delenv(var, raising=False)
    yield url
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def evtool(*args: str, cwd: Path | None = None, timeout: float = 120, check: bool = False,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (environment inherited, so EVTOOL_DSN applies)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "evtool", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"evtool {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def totals(dsn: str) -> dict:
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT user_id, revenue FROM users_revenue").fetchall())


def event_line(user: str = "u1", value: object = "1", event_id: str | None = None,
               name: str = "add_revenue") -> bytes:
    """One event as a client writes it (no newline); `value` is put in as text, so "0.10" stays."""
    extra = f', "eventId": "{event_id}"' if event_id is not None else ""
    return f'{{"userId": "{user}", "name": "{name}", "value": {value}{extra}}}'.encode()
