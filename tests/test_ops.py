"""Operating evtool: where its state lives, which database it picks, readers that never write."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import psycopg
import pytest

from evtool.config import PG_VARS

from .conftest import event_line, evtool, totals


def _journal(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def _without_db_settings(**extra: str) -> dict[str, str]:
    """The environment with no database chosen (no EVTOOL_DSN, DATABASE_URL or PG*), plus `extra`."""
    drop = {"EVTOOL_DSN", "DATABASE_URL", "EVTOOL_HOME", "XDG_DATA_HOME", *PG_VARS}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def _run(args: list[str], env: dict[str, str], cwd: Path):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "evtool", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_state_lives_in_the_data_directory_not_the_working_directory(tmp_path):
    """`revenue` from another directory reaches the same embedded database (item 10.2)."""
    a, b, xdg = tmp_path / "a", tmp_path / "b", tmp_path / "xdg"
    a.mkdir()
    b.mkdir()
    env = _without_db_settings(XDG_DATA_HOME=str(xdg))
    _journal(a / "server-events.jsonl", event_line("u1", "2.5", "e1"))
    try:
        first = _run(["process"], env, a)
        assert first.returncode == 0, first.stderr
        started = [line for line in first.stderr.splitlines() if "started embedded PostgreSQL" in line]
        assert len(started) == 1 and str(xdg / "evtool" / "pg") in started[0], first.stderr
        assert "`evtool db stop` stops it" in started[0]
        other = _run(["revenue", "u1"], env, b)
        assert (other.returncode, other.stdout.strip()) == (0, "2.5"), other.stderr
        assert "started embedded" not in other.stderr  # it was running already: said once
        assert not (a / ".evtool").exists() and not (b / ".evtool").exists()
    finally:
        _run(["db", "stop"], env, a)


def test_pgservice_alone_picks_the_database(dsn, pg_server, tmp_path):
    """Only PGSERVICE + PGSERVICEFILE set: libpq's service is used, not the embedded server."""
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    service = tmp_path / "pg_service.conf"
    service.write_text(f"[evtest]\nhost={params['host']}\nport={params['port']}\nuser={params['user']}\n"
                       f"dbname={params['dbname']}\n")
    home = tmp_path / "home"
    env = _without_db_settings(PGSERVICE="evtest", PGSERVICEFILE=str(service), EVTOOL_HOME=str(home))
    _journal(tmp_path / "server-events.jsonl", event_line("u1", "7", "e1"))
    done = _run(["process"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert totals(dsn) == {"u1": 7}
    assert not (home / "pg").exists()  # no embedded server was created
    read = _run(["revenue", "u1"], env, tmp_path)
    assert read.stdout.strip() == "7", read.stderr


@pytest.fixture
def reader(dsn, pg_server):
    """A SELECT-only role on the test database, and a DSN that logs in as it."""
    role = "reader_" + uuid.uuid4().hex[:8]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    yield role, psycopg.conninfo.make_conninfo(**{**params, "user": role})
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")


def _grant_select(dsn: str, role: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")


def test_a_select_only_role_reads(dsn, reader, tmp_path):
    role, as_reader = reader
    _journal(tmp_path / "server-events.jsonl", event_line("u1", "3", "e1"), b'{"bad": 1}')
    assert evtool("process", cwd=tmp_path).returncode == 0
    _grant_select(dsn, role)
    env = {"EVTOOL_DSN": as_reader}
    read = evtool("revenue", "u1", env=env, cwd=tmp_path)
    assert (read.returncode, read.stdout.strip()) == (0, "3"), read.stderr
    for args in (["report", "--json"], ["status", "--json"], ["rejects"], ["revenue", "--all"]):
        r = evtool(*args, env=env, cwd=tmp_path)
        assert r.returncode == 0, (args, r.stderr)
        assert "permission denied" not in r.stdout + r.stderr
    assert '"reachable":true' in evtool("status", "--json", env=env, cwd=tmp_path).stdout
    # Nothing to apply: `db migrate` only reads the version. A writer fails with one line.
    w = evtool("db", "migrate", env=env)
    assert w.returncode == 0 and w.stdout.startswith("schema up to date (version "), w.stderr
    _journal(tmp_path / "server-events.jsonl", event_line("u1", "3", "e1"), event_line("u2", "1", "e2"))
    w = evtool("process", env=env, cwd=tmp_path)
    assert w.returncode == 1 and "permission denied" in w.stderr and "Traceback" not in w.stderr


def test_readers_never_migrate_and_say_what_to_run(dsn, reader, tmp_path):
    role, as_reader = reader
    env = {"EVTOOL_DSN": as_reader}
    for args in (["revenue", "u1"], ["report"], ["rejects"], ["status"]):
        r = evtool(*args, env=env, cwd=tmp_path)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert "run `evtool db migrate`" in r.stdout + r.stderr, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
    with psycopg.connect(dsn) as conn:  # nothing was created by the readers
        assert conn.execute("SELECT to_regclass('schema_migrations')").fetchone() == (None,)
    check = evtool("db", "migrate", "--check")
    assert check.returncode == 1 and "evtool db migrate" in check.stderr
    done = evtool("db", "migrate")
    assert done.returncode == 0 and "schema at version" in done.stdout, done.stderr
    assert evtool("db", "migrate", "--check").returncode == 0
    _grant_select(dsn, role)
    r = evtool("revenue", "u1", env=env)
    assert r.returncode == 1 and "unknown user" in r.stderr  # now it reads: the user is unknown
