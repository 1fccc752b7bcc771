"""`evtool status`: journals, lag, counters, database and receiver, as a table and as JSON."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from evtool.cli import cli
from evtool.processor import process
from evtool.reports import count_lines, mask_dsn

from .conftest import evtool
from .test_pipeline import free_port

DEAD_URL = "http://127.0.0.1:9"  # discard port: nothing answers


def ev(user: str, value: int, name: str = "add_revenue") -> str:
    return json.dumps({"userId": user, "name": name, "value": value}) + "\n"


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture
def workdir(dsn, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_json_has_the_processors_figures_and_lag(dsn, workdir):
    journal = workdir / "server-events.jsonl"
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    timed = f'{{"userId": "b", "name": "add_revenue", "value": 2, "timestamp": "{now}"}}\n'
    journal.write_text(ev("a", 1) + timed + "not json\n")
    process(dsn, [journal])
    waiting = ev("a", 3) + ev("c", 4)
    with open(journal, "a") as f:
        f.write(waiting + '{"partial": ')
    result = run("status", "--json", "--url", DEAD_URL)
    assert result.exit_code == 0, result.output
    s = json.loads(result.output)
    assert set(s) == {"time", "database", "receiver", "journals", "totals", "rates", "window"}
    # the last 15 minutes of event time: b's event (a's has no time)
    assert s["window"] == {"minutes": 15, "events": 1, "revenue": 2, "users": 1}
    assert s["rates"] is None  # one snapshot: a rate needs two
    assert s["database"]["reachable"] is True and s["database"]["kind"] == "dsn"
    assert s["database"]["version"] and s["database"]["error"] is None
    assert s["receiver"] == {"url": DEAD_URL, "reachable": False, "healthy": False,
                             "error": s["receiver"]["error"]}
    [j] = s["journals"]
    size = journal.stat().st_size
    processed = size - len(waiting) - len('{"partial": ')
    assert j["path"] == "server-events.jsonl" and j["state"] == "ok" and j["exists"] is True
    assert (j["size"], j["offset"], j["lag_bytes"], j["lag_lines"]) == (size, processed, size - processed, 2)
    assert (j["applied"], j["duplicates"], j["rejected"], j["rejects_pending"]) == (2, 0, 1, 1)
    assert j["last_processed"].startswith("20") and len(j["fingerprint"]) == 32
    assert s["totals"] == {"applied": 2, "duplicates": 0, "rejected": 1, "rejects_pending": 1,
                           "lag_bytes": size - processed, "lag_lines": 2}


def test_table_for_people(dsn, workdir):
    journal = workdir / "server-events.jsonl"
    journal.write_text(ev("a", 1) * 3)
    process(dsn, [journal])
    result = run("status", "--url", DEAD_URL)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("database  dsn postgresql://") and ": reachable (PostgreSQL " in lines[0]
    assert lines[1] == f"receiver  {DEAD_URL}: not answering"
    assert lines[2] == "totals    applied 3  dups 0  rejected 0  lag 0 lines"
    assert lines[3] == "last 15 min  0 events  revenue 0  0 users (event time)"  # no event has a time
    assert lines[5:8] == ["server-events.jsonl  ok", "  applied 3  dups 0  rejected 0",
                          "  lag 0 lines, 0 B  processed 153 B of 153 B"]
    assert lines[8].startswith("  last processed ") and lines[8].endswith(" s ago)")


def test_readable_at_80_columns(dsn, tmp_path):
    """A real terminal width: whole numbers (not `624,…`), times on one line (item 10.5)."""
    journal = tmp_path / "a-journal-with-a-rather-long-name-for-the-width.jsonl"
    journal.write_text("".join(ev(f"u{i % 50}", 1) for i in range(123_456 // 100)) + "bad\n")
    process(dsn, [journal])
    with open(journal, "a") as f:
        f.write(ev("late", 1) * 7)
    r = evtool("status", str(journal), "--url", DEAD_URL, cwd=tmp_path, env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "…" not in r.stdout
    assert all(len(line) <= 80 for line in lines[1:]), lines  # the first holds the DSN
    assert "  applied 1,234  dups 0  rejected 1 (1 pending)" in lines
    assert any(line.startswith("  lag 7 lines, ") for line in lines)
    [last] = [line for line in lines if line.startswith("  last processed ")]
    assert last.endswith(" s ago)")


def test_new_missing_and_renamed_journals(dsn, workdir):
    first = workdir / "one.jsonl"
    first.write_text(ev("a", 1))
    process(dsn, [first])
    renamed = workdir / "rotated.jsonl"
    first.rename(renamed)
    fresh = workdir / "two.jsonl"
    fresh.write_text(ev("b", 1) + ev("b", 2))
    s = json.loads(run("status", str(renamed), str(fresh), "--json", "--url", DEAD_URL).output)
    by_path = {j["path"]: j for j in s["journals"]}
    assert set(by_path) == {str(renamed), str(fresh)}  # the renamed one is matched by its first line
    assert by_path[str(renamed)]["state"] == "ok" and by_path[str(renamed)]["applied"] == 1
    assert by_path[str(fresh)]["state"] == "new"
    assert (by_path[str(fresh)]["offset"], by_path[str(fresh)]["lag_lines"]) == (0, 2)
    assert by_path[str(fresh)]["applied"] is None
    # without arguments (and no ./server-events.jsonl) the known journal is shown at its old path
    [j] = json.loads(run("status", "--json", "--url", DEAD_URL).output)["journals"]
    assert j["path"] == str(first) and j["state"] == "missing" and j["exists"] is False
    assert j["lag_bytes"] is None and j["applied"] == 1


def test_truncated_journal(dsn, workdir):
    journal = workdir / "server-events.jsonl"
    journal.write_text(ev("a", 1) + ev("a", 2))
    process(dsn, [journal])
    journal.write_text(ev("a", 1))
    [j] = json.loads(run("status", "--json", "--url", DEAD_URL).output)["journals"]
    assert j["state"] == "truncated" and j["lag_bytes"] is None


def test_unreachable_database_exits_1(workdir, monkeypatch):
    monkeypatch.delenv("EVTOOL_DSN")
    bad = f"postgresql://me:hunter2@127.0.0.1:{free_port()}/db"
    result = run("status", "--json", "--dsn", bad, "--url", DEAD_URL)
    assert result.exit_code == 1
    s = json.loads(result.output)
    assert s["database"]["reachable"] is False and "unavailable" in s["database"]["error"]
    assert "hunter2" not in result.output and s["database"]["dsn"].startswith("postgresql://me:***@")


def test_receiver_health_is_checked(dsn, workdir):
    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            ok = self.path == "/healthz"
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}')

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = run("status", "--url", url)
        s = json.loads(run("status", "--json", "--url", url).output)
    finally:
        server.shutdown()
    assert f"receiver  {url}: ok" in result.output
    assert s["receiver"] == {"url": url, "reachable": True, "healthy": True, "error": None}


def test_watch_refreshes_until_ctrl_c(dsn, workdir, monkeypatch):
    import time

    calls = []

    def sleep(seconds):
        calls.append(seconds)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", sleep)
    result = run("status", "--watch", "--interval", "0.5", "--url", DEAD_URL)
    assert result.exit_code == 0, result.output
    assert calls == [0.5, 0.5]
    assert "evtool status, every 0.5 s" in result.output
    # from the second frame on, rates between frames (vector top's accepted/s, applied/s)
    assert "rates     accepted 0/s  applied 0/s" in result.output
    assert run("status", "--watch", "--json").exit_code == 2


def test_helpers(tmp_path):
    assert mask_dsn("postgresql://u:p%40ss@h:5/db?sslmode=require") == "postgresql://u:***@h:5/db?sslmode=require"
    assert mask_dsn("host=h password=secret dbname=x") == "host=h password=*** dbname=x"
    assert mask_dsn("host=h password='a b' dbname=x") == "host=h password=*** dbname=x"
    assert mask_dsn("postgresql://u@/db?host=/tmp") == "postgresql://u@/db?host=/tmp"
    f = tmp_path / "f"
    f.write_bytes(b"a\n" * 1000 + b"tail")
    assert count_lines(f, 0, f.stat().st_size) == 1000
    assert count_lines(f, 1990, f.stat().st_size) == 5
