"""Operating evtool: where its state lives, which database it picks, readers that never write."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest

from evtool.config import PG_VARS

from .conftest import Serve, event_line, evtool, evtool_cmd, exact, totals


def _journal(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def _without_db_settings(**extra: str) -> dict[str, str]:
    """The environment with no database chosen (no EVTOOL_DSN, DATABASE_URL or PG*), plus `extra`."""
    drop = {"EVTOOL_DSN", "DATABASE_URL", "EVTOOL_HOME", "XDG_DATA_HOME", *PG_VARS}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def _run(args: list[str], env: dict[str, str], cwd: Path):
    return subprocess.run(evtool_cmd(*args), cwd=cwd, env=env, capture_output=True,
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


# -- errors and everyday use (item 10.5) ------------------------------------------------------


@pytest.mark.parametrize("url, says", [
    ("notaurl", "is not an http:// URL"),
    ("ftp://host", "is not an http:// URL"),
    ("http://127.0.0.1:99999", "is not a valid URL"),
    ("http://no-such-host.invalid:8000", "cannot resolve the host 'no-such-host.invalid'"),
])
def test_a_bad_url_is_one_line_and_exit_1(dsn, tmp_path, url, says):
    source = _journal(tmp_path / "events.jsonl", event_line("u1", "1"))
    r = evtool("send", str(source), "--url", url, "--max-retries", "0", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("Error:")] == r.stderr.splitlines()[-1:]
    assert "unknown error" not in r.stderr


def test_https_to_a_plain_receiver_is_one_line(dsn, tmp_path):
    source = _journal(tmp_path / "events.jsonl", event_line("u1", "1"))
    with Serve(tmp_path) as serve:
        r = evtool("send", str(source), "--url", serve.url.replace("http:", "https:"), "--max-retries", "0",
                   cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1].startswith("Error: cannot reach the receiver at https://")


def test_an_unusable_state_directory_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = _without_db_settings(EVTOOL_HOME=str(blocker / "home"))
    r = _run(["revenue", "u1"], env, tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"Error: cannot use {blocker / 'home'} for the embedded PostgreSQL: not a directory; set EVTOOL_HOME "
        "to a writable directory, or choose a server with --dsn, EVTOOL_DSN or PG* variables"]


def test_refused_sends_do_not_advise_running_again(dsn, tmp_path):
    # user_id: valid for the sender (it normalizes), refused (422) by a --strict receiver
    source = _journal(tmp_path / "events.jsonl", event_line("u1", "1", "e1"),
                      b'{"user_id": "u2", "name": "add_revenue", "value": 1, "eventId": "e2"}')
    with Serve(tmp_path, "--strict") as serve:
        wrong_token = evtool("send", str(source), "--url", serve.url, "--token", "nope", cwd=tmp_path)
        not_found = evtool("send", str(source), "--url", serve.url + "/nothing-here", cwd=tmp_path)
        invalid = evtool("send", str(source), "--url", serve.url, "--batch", "1", cwd=tmp_path)
    for r, status in ((wrong_token, "HTTP 401"), (not_found, "HTTP 404"), (invalid, "HTTP 422")):
        assert r.returncode == 1, r.stderr
        assert status in r.stderr
        assert "run the same command again" not in r.stderr, r.stderr
        assert r.stderr.splitlines()[-1].startswith("Error: ") and "the receiver refused" in r.stderr


def test_a_dead_receiver_still_advises_running_again(dsn, tmp_path):
    source = _journal(tmp_path / "events.jsonl", event_line("u1", "1", "e1"))
    with Serve(tmp_path) as serve:
        url = serve.url
    r = evtool("send", str(source), "--url", url, "--max-retries", "0", cwd=tmp_path)
    assert r.returncode == 1 and "is `evtool serve` running?" in r.stderr, r.stderr


def test_send_reads_standard_input_and_fail_on_invalid(dsn, tmp_path):
    lines = event_line("u1", "1.5") + b"\n" + b'{"not": "an event"}\n' + event_line("u2", "2") + b"\n"
    with Serve(tmp_path) as serve:
        cmd = ["send", "-", "--url", serve.url, "--json", "--fail-on-invalid"]
        first = subprocess.run(evtool_cmd(*cmd), input=lines, capture_output=True, cwd=tmp_path, timeout=120)
        assert first.returncode == 1, first.stderr  # one line was invalid
        report = json.loads(first.stdout)
        assert (report["sent"], report["skipped_invalid"]) == (2, 1)
        assert b"1 invalid line(s) skipped" in first.stderr
        # The same input again: nothing new is sent (same source, same generated ids).
        again = subprocess.run(evtool_cmd("send", "-", "--url", serve.url, "--json"), input=lines,
                               capture_output=True, cwd=tmp_path, timeout=120)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["sent"] == 0
        assert evtool("process", cwd=tmp_path).returncode == 0
    assert exact(totals(dsn)) == exact({"u1": "1.5", "u2": "2"})


def test_verbose_after_the_subcommand(dsn, tmp_path):
    before = evtool("-v", "revenue", "nobody", cwd=tmp_path)
    after = evtool("revenue", "nobody", "-v", cwd=tmp_path)
    assert after.returncode == before.returncode == 1
    assert "Traceback" in before.stderr and "Traceback" in after.stderr
    assert evtool("revenue", "nobody", cwd=tmp_path).stderr.count("\n") == 1


def test_every_option_has_an_environment_variable(dsn, tmp_path):
    from click import Option

    from evtool.cli import cli

    def walk(cmd, path):
        for p in cmd.params:
            if isinstance(p, Option) and "--version" not in p.opts:
                yield path, p
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    for path, p in walk(cli, []):
        if "--verbose" in p.opts and path:
            continue  # -v after a subcommand is the root's --verbose (EVTOOL_VERBOSE)
        assert p.envvar and p.show_envvar, (path, p.opts)
        if path and p.envvar not in ("EVTOOL_DSN", "EVTOOL_URL", "EVTOOL_TOKEN", "EVTOOL_MAPPING"):
            assert p.envvar.startswith("EVTOOL_" + "_".join(path).upper() + "_"), (path, p.envvar)
    assert "EVTOOL_REVENUE_JSON" in evtool("revenue", "--help").stdout
    _journal(tmp_path / "server-events.jsonl", event_line("u1", "4", "e1"))
    assert evtool("process", cwd=tmp_path).returncode == 0
    r = evtool("revenue", "u1", cwd=tmp_path, env={"EVTOOL_REVENUE_JSON": "1"})
    assert r.stdout.strip() == '{"userId": "u1", "revenue": 4}', r.stderr
