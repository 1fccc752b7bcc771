"""Scenario 3: the database goes away under `evtool process`.

The processor's backend is terminated mid-run; the server is stopped during a run and started
again within `--retry-for`; `process` starts while the server stays down longer than that. Never
a partial batch: at every moment the committed state is the reference model of the journal up to
the committed offset. Stopping a server needs one of our own, not the session's shared one.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from evtool import embedded

from .helpers import (
    build_journal,
    committed_state,
    diff,
    evtool_cmd,
    journal_events,
    model_upto,
    start,
)


@pytest.fixture(scope="module")
def own_pg():
    """A separate embedded PostgreSQL that tests may stop and start: (data directory, DSN)."""
    base = Path(tempfile.mkdtemp(prefix="evtool-faults-pg-"))
    pgdata = base / "data"
    dsn = embedded.ensure_running(pgdata)
    yield pgdata, dsn
    embedded.stop(pgdata)
    shutil.rmtree(base, ignore_errors=True)


def new_database(server_dsn: str) -> str:
    name = "f_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_dsn.replace("/postgres?", f"/{name}?")


def assert_consistent(dsn: str, path: Path, lines: list) -> int:
    """The committed state is the model of the journal up to the committed offset; return it."""
    offset, applied, duplicates, got = committed_state(dsn, path)
    want = model_upto(lines, offset)
    assert not diff(got, want.totals), f"partial batch at offset {offset}"
    assert (applied, duplicates) == (want.applied, want.duplicates)
    return offset


def processor_backends(conn: psycopg.Connection) -> list[int]:
    return [r[0] for r in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid() AND backend_type = 'client backend'")]


def test_backend_terminated_mid_run_is_retried_and_exact(dsn, tmp_path):
    work = build_journal(tmp_path / "j.jsonl", 240_000, seed=31)
    lines = journal_events(work.path)
    rng = random.Random(31)
    proc = start(evtool_cmd("process", "--batch-mb", "1", "--json", str(work.path)), tmp_path,
                 tmp_path / "process.log")
    terminated = 0
    with psycopg.connect(dsn, autocommit=True) as admin:
        while proc.poll() is None:
            time.sleep(rng.uniform(0.3, 0.7))
            for pid in processor_backends(admin):
                if admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]:
                    terminated += 1
            assert_consistent(dsn, work.path, lines)
    out = (tmp_path / "process.log").read_text()
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    report = json.loads(out.splitlines()[-1])
    assert terminated >= 3 and report["retries"] >= 1
    assert "retrying" in out
    offset = assert_consistent(dsn, work.path, lines)
    assert offset == work.path.stat().st_size
    print(f"\npg_terminate_backend: {terminated} terminations, {report['retries']} retries, "
          f"{work.events} events, exact")


def test_server_stopped_during_a_run_and_back_within_the_window(own_pg, tmp_path):
    pgdata, server = own_pg
    db = new_database(server)
    work = build_journal(tmp_path / "j.jsonl", 240_000, seed=32)
    lines = journal_events(work.path)
    size = work.path.stat().st_size
    proc = start(evtool_cmd("process", "--dsn", db, "--batch-mb", "1", "--retry-for", "30", "--json",
                            str(work.path)), tmp_path, tmp_path / "process.log")
    outages = 0
    try:
        seen = 0
        for _ in range(2):
            # Stop the server right after the processor committed a batch, in the first half of
            # the journal: a timed pause could land after a fast run had already finished.
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                offset = committed_state(db, work.path)[0]
                if offset > seen:
                    break
                time.sleep(0.01)
            if proc.poll() is not None or offset > size // 2:
                break
            seen = offset
            embedded.stop(pgdata)
            outages += 1
            time.sleep(1.5)
            assert proc.poll() is None, "process gave up inside its retry window"
            embedded.ensure_running(pgdata)
            assert_consistent(db, work.path, lines)
        assert proc.wait(timeout=120) == 0
    finally:
        embedded.ensure_running(pgdata)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = (tmp_path / "process.log").read_text()
    assert outages >= 1 and "retrying" in out and "Traceback" not in out
    assert json.loads(out.splitlines()[-1])["retries"] >= outages
    assert assert_consistent(db, work.path, lines) == work.path.stat().st_size
    print(f"\nserver stopped {outages} times mid-run, {work.events} events, exact")


def test_database_down_longer_than_the_window_exits_1_then_recovers(own_pg, tmp_path):
    pgdata, server = own_pg
    db = new_database(server)
    work = build_journal(tmp_path / "j.jsonl", 20_000, seed=33)
    lines = journal_events(work.path)
    cmd = evtool_cmd("process", "--dsn", db, "--retry-for", "2", str(work.path))
    embedded.stop(pgdata)
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    finally:
        embedded.ensure_running(pgdata)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: database unavailable"), result.stderr
    assert result.stderr.count("retrying for up to 2 s") == 1  # said once, not at every backoff step
    assert assert_consistent(db, work.path, lines) == 0  # nothing, not half a batch
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert assert_consistent(db, work.path, lines) == work.path.stat().st_size
    assert committed_state(db, work.path)[3] == work.expected


def test_follow_outlives_an_outage_longer_than_the_window(own_pg, tmp_path):
    """`process --follow` as a service: the database gone for longer than --retry-for is retried
    with backoff (not an exit), said once when it starts and once when it ends (item 10.4)."""
    import signal
    import urllib.request

    from ..conftest import free_port

    pgdata, server = own_pg
    db = new_database(server)
    journal = tmp_path / "server-events.jsonl"
    journal.write_text('{"userId": "u1", "name": "add_revenue", "value": 1, "eventId": "a"}\n')
    port = free_port()
    log = tmp_path / "follow.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(evtool_cmd("--log-format", "json", "process", "--follow", "--dsn", db,
                                           "--retry-for", "0.5", "--metrics", f"127.0.0.1:{port}"),
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err)

    def metric(name: str) -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def until(check, what: str) -> None:
        for _ in range(3000):  # a bound on polls, not a time limit on evtool
            if check():
                return
            assert proc.poll() is None, log.read_text()
            time.sleep(0.01)
        raise AssertionError(f"never: {what}\n{log.read_text()}")

    try:
        until(lambda: metric("evtool_process_events_applied_total") == 1, "the first line applied")
        embedded.stop(pgdata)
        with open(journal, "a") as f:
            f.write('{"userId": "u1", "name": "add_revenue", "value": 2, "eventId": "b"}\n')
        # longer than --retry-for: the processor gave up its window, the follower keeps going
        until(lambda: metric("evtool_process_database_outages_total") == 1, "an outage counted")
        assert metric("evtool_process_database_up") == 0
        embedded.ensure_running(pgdata)
        until(lambda: metric("evtool_process_events_applied_total") == 2, "the second line applied")
        assert metric("evtool_process_database_up") == 1
    finally:
        embedded.ensure_running(pgdata)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert code == 0, records
    said = [r["event"] for r in records if r.get("event") in ("outage", "recovered")]
    assert said == ["outage", "recovered"]  # once each, not once per backoff step
    assert committed_state(db, journal)[3] == {"u1": 3}
