"""Scenario 5: the receiver cannot write its journal (RLIMIT_FSIZE on the `serve` process).

503 with Retry-After and nothing partial in the journal; the server keeps serving what still
fits and recovers when space returns (the limit is lifted on the live process with prlimit);
the sender retries, a sender that gave up resumes on a re-run, and nothing is lost.
"""

from __future__ import annotations

import json
import resource
import subprocess
import time
from decimal import Decimal

from ..conftest import evtool
from .helpers import Serve, db_totals, evtool_cmd, exact, generate, http, journal_lines, start

LIMIT = 300_000  # bytes: about 3,000 events of the generated source fit
AUTH = {"Authorization": "secret"}


def probe(url: str, n: int, value: int = 1) -> tuple[int, dict, dict]:
    """A bulk of `n` events for user `probe`, with ids; ~100 bytes a line."""
    body = b"".join(b'{"userId": "probe", "name": "add_revenue", "value": %d, "eventId": "probe-%d-%d"}\n'
                    % (value, n, i) for i in range(n))
    return http(f"{url}/liveEvent", "POST", body, {**AUTH, "Content-Type": "application/x-ndjson"})


def test_journal_write_failure_is_503_nothing_partial_and_nothing_lost(dsn, tmp_path):
    source = tmp_path / "events.jsonl"
    expected = exact(generate(source, 20_000, "--users", "300", "--decimals", "0.3", "--seed", "51")
                     ["per_user"])
    journal = tmp_path / "server-events.jsonl"

    def limit() -> None:
        # soft limit only: lifting it again later needs no privilege
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.RLIM_INFINITY))

    serve = Serve(tmp_path, preexec_fn=limit).start()
    try:
        assert probe(serve.url, 10)[0] == 200
        # A request that would cross the limit: 503 + Retry-After, not a byte of it stays.
        before = journal.read_bytes()
        status, body, headers = probe(serve.url, 4000)
        assert status == 503 and "Retry-After" in headers, body
        assert "journal write failed" in body["error"] and "retry" in body["error"]
        assert journal.read_bytes() == before
        assert http(f"{serve.url}/healthz")[0] == 503
        # ... and the server keeps serving what still fits.
        assert probe(serve.url, 5, 2)[0] == 200
        assert http(f"{serve.url}/healthz")[0] == 200

        # A sender that gives up quickly: exit 1, saying how to retry; confirmed lines are stored.
        send = evtool_cmd("send", str(source), "--url", serve.url, "--batch", "200")
        first = subprocess.run([*send, "--max-retries", "1"], cwd=tmp_path, capture_output=True, text=True,
                               timeout=120)
        assert first.returncode == 1, first.stderr
        assert "not delivered" in first.stderr and "Traceback" not in first.stderr
        stored = journal_lines(journal)
        assert journal.stat().st_size <= LIMIT
        for line in stored:
            json.loads(line)  # whole lines only

        # A patient sender: retrying (on 503 + Retry-After) while the disk is full...
        patient = start([*send, "--max-retries", "30", "--json"], tmp_path, tmp_path / "send.log")
        time.sleep(2.5)
        assert patient.poll() is None, (tmp_path / "send.log").read_text()
        assert journal.stat().st_size <= LIMIT and len(journal_lines(journal)) < 20_000 + 15
        # ... finishes once space returns, without restarting anything.
        resource.prlimit(serve.proc.pid, resource.RLIMIT_FSIZE,
                         (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert patient.wait(timeout=120) == 0, (tmp_path / "send.log").read_text()
        report = json.loads((tmp_path / "send.log").read_text().splitlines()[-1])
        assert report["failed"] == 0 and report["retried"] > 0
        assert http(f"{serve.url}/healthz")[0] == 200
    finally:
        serve.stop()

    # A restart without the limit and a full re-send only adds duplicates.
    with Serve(tmp_path) as again:
        resent = subprocess.run([*evtool_cmd("send", str(source), "--url", again.url, "--from-start")],
                                cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert resent.returncode == 0, resent.stderr
    result = json.loads(evtool("process", "--json", cwd=tmp_path, check=True).stdout)
    assert result["rejected"] == 0 and result["applied"] == 20_000 + 15
    expected["probe"] = Decimal(10 + 5 * 2)
    assert db_totals(dsn) == expected
