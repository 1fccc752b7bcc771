"""The processor against a real PostgreSQL: exactly once, rejects, partial lines, concurrency."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import psycopg
from click.testing import CliRunner

from evtool.cli import cli
from evtool.processor import process

from .conftest import GEN_EVENTS, evtool, totals


def line(user: str, name: str, value, event_id: str | None = None) -> str:
    obj = {"userId": user, "name": name, "value": value}
    if event_id:
        obj["eventId"] = event_id
    return json.dumps(obj).replace('"__raw__', "").replace('__raw__"', "") + "\n"


def write(path: Path, *lines: str) -> None:
    with open(path, "a", encoding="utf-8", newline="") as f:
        f.write("".join(lines))


def test_generated_workload_totals_exact_and_rerun_is_a_noop(dsn, tmp_path):
    journal = tmp_path / "j.jsonl"
    subprocess.run([sys.executable, str(GEN_EVENTS), str(journal), "20000", "--users", "300",
                    "--decimals", "0.3", "--with-ids", "0.5", "--repeat-ids", "0.1"],
                   check=True, capture_output=True)
    expected = json.loads((tmp_path / "j.jsonl.expected.json").read_text())
    report = process(dsn, [journal], batch_bytes=256 * 1024)
    assert report.rejected == 0
    assert report.applied == expected["events"]
    got = totals(dsn)
    assert got == {u: Decimal(v) for u, v in expected["per_user"].items()}
    again = process(dsn, [journal])
    assert again.applied == 0 and again.duplicates == 0
    assert totals(dsn) == got


def test_parallel_parsing_over_many_batches_is_exact(dsn, tmp_path):
    """Batches split across worker processes, parsed in small pieces, read ahead of commits."""
    journal = tmp_path / "j.jsonl"
    subprocess.run([sys.executable, str(GEN_EVENTS), str(journal), "30000", "--users", "500",
                    "--decimals", "0.2", "--with-ids", "0.3", "--repeat-ids", "0.2", "--invalid", "0.01"],
                   check=True, capture_output=True)
    expected = json.loads((tmp_path / "j.jsonl.expected.json").read_text())
    report = process(dsn, [journal], batch_bytes=300_000, workers=2, inline_bytes=0, piece_bytes=20_000)
    assert report.applied == expected["events"]
    assert report.rejected > 0
    assert totals(dsn) == {u: Decimal(v) for u, v in expected["per_user"].items()}
    assert process(dsn, [journal], workers=2, inline_bytes=0).applied == 0


def test_sender_ids_resent_in_later_batches_count_once(dsn, tmp_path):
    """`<source>:<line>` ids: overlap with applied ranges, and repeats within one batch."""
    journal = tmp_path / "j.jsonl"
    src = "0123456789abcdef"
    lines = [line(f"u{n % 7}", "add_revenue", n, f"{src}:{n}") for n in range(1, 2001)]
    write(journal, *lines)
    write(journal, *lines[500:1500])  # a re-send, in later batches
    write(journal, lines[0], lines[0], line("u1", "add_revenue", 1, f"{src}:01"))  # not canonical: opaque
    report = process(dsn, [journal], batch_bytes=50_000, workers=2, inline_bytes=0, piece_bytes=8_000)
    assert (report.applied, report.duplicates) == (2001, 1002)
    want: dict[str, int] = {}
    for n in range(1, 2001):
        want[f"u{n % 7}"] = want.get(f"u{n % 7}", 0) + n
    want["u1"] += 1
    assert totals(dsn) == want


def test_identical_lines_count_twice_and_repeated_event_id_once(dsn, tmp_path):
    journal = tmp_path / "j.jsonl"
    same = line("u1", "add_revenue", 10)
    write(journal, same, same, line("u2", "add_revenue", 5, "id-1"), line("u2", "add_revenue", 5, "id-1"))
    report = process(dsn, [journal])
    assert (report.applied, report.duplicates) == (3, 1)
    assert totals(dsn) == {"u1": 20, "u2": 5}


def test_repeated_event_id_in_a_later_batch_and_file_counts_once(dsn, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write(a, line("u1", "add_revenue", 7, "x"), line("u1", "add_revenue", 1))
    write(b, line("u9", "add_revenue", 3), line("u1", "add_revenue", 7, "x"))
    report = process(dsn, [a, b], batch_bytes=1)
    assert report.duplicates == 1
    assert totals(dsn) == {"u1": 8, "u9": 3}


def test_appended_lines_apply_only_the_new_ones(dsn, tmp_path):
    journal = tmp_path / "j.jsonl"
    write(journal, line("u1", "add_revenue", 1))
    process(dsn, [journal])
    write(journal, line("u1", "add_revenue", 2), line("u1", "subtract_revenue", 0.5))
    report = process(dsn, [journal])
    assert report.applied == 2
    assert totals(dsn) == {"u1": Decimal("2.5")}


def test_decimals_sum_exactly(dsn, tmp_path):
    journal = tmp_path / "j.jsonl"
    write(journal, '{"userId": "d", "name": "add_revenue", "value": 0.1}\n',
          '{"userId": "d", "name": "add_revenue", "value": 0.2}\n',
          '{"userId": "d", "name": "add_revenue", "value": 12.345}\n',
          '{"userId": "e", "name": "add_revenue", "value": 12345678901234567.89}\n')
    process(dsn, [journal])
    assert totals(dsn) == {"d": Decimal("12.645"), "e": Decimal("12345678901234567.89")}


def test_bad_lines_are_recorded_once_and_the_rest_applied(dsn, tmp_path):
    journal = tmp_path / "j.jsonl"
    write(journal, line("u1", "add_revenue", 1), '{"userId": "u1", "name": \n',
          line("u1", "refund", 5), line("u1", "add_revenue", 2), "\n",
          '{"userId": "u1", "name": "add_revenue", "value": 0.1000000000000000000001}\n')
    result = CliRunner().invoke(cli, ["process", str(journal)])
    assert result.exit_code == 0, result.output
    assert "rejected 3 lines" in result.output
    assert "j.jsonl:2: rejected: malformed JSON" in result.output
    assert "j.jsonl:3: rejected: name must be add_revenue or subtract_revenue" in result.output
    assert "cannot be kept exactly" in result.output
    assert totals(dsn) == {"u1": 3}
    strict = CliRunner().invoke(cli, ["process", "--fail-on-reject", str(journal)])
    assert strict.exit_code == 0  # nothing new was rejected in this run
    with psycopg.connect(dsn) as conn:
        rows = conn.execute('SELECT line_no, reason FROM rejected_lines ORDER BY "offset"').fetchall()
    assert [r[0] for r in rows] == [2, 3, 6]
    write(journal, "not json\n")
    strict = CliRunner().invoke(cli, ["process", "--fail-on-reject", str(journal)])
    assert strict.exit_code == 1


def test_trailing_partial_line_waits_until_completed(dsn, tmp_path):
    journal = tmp_path / "j.jsonl"
    write(journal, line("u1", "add_revenue", 1), '{"userId": "u1", "name": "add_revenue", "val')
    assert process(dsn, [journal]).applied == 1
    assert process(dsn, [journal]).applied == 0
    write(journal, 'ue": 5}\n')
    assert process(dsn, [journal]).applied == 1
    assert totals(dsn) == {"u1": 6}


def test_truncated_journal_is_refused_with_a_message(dsn, tmp_path):
    journal = tmp_path / "j.jsonl"
    write(journal, line("u1", "add_revenue", 1), line("u1", "add_revenue", 2))
    process(dsn, [journal])
    journal.write_text(line("u1", "add_revenue", 1))
    result = CliRunner().invoke(cli, ["process", str(journal)])
    assert result.exit_code == 1
    assert "shorter" in result.output and "truncated or replaced" in result.output
    assert totals(dsn) == {"u1": 3}


def test_two_processes_at_once_on_one_file_are_exact(dsn, tmp_path):
    journal = tmp_path / "j.jsonl"
    subprocess.run([sys.executable, str(GEN_EVENTS), str(journal), "30000", "--users", "200"],
                   check=True, capture_output=True)
    expected = json.loads((tmp_path / "j.jsonl.expected.json").read_text())
    procs = [subprocess.Popen([sys.executable, "-m", "evtool", "process", "--batch-mb", "1", str(journal)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    got = totals(dsn)
    assert got == {u: Decimal(v) for u, v in expected["per_user"].items()}


def test_revenue_command(dsn, tmp_path):
    journal = tmp_path / "j.jsonl"
    write(journal, line("u1", "add_revenue", 10),
          '{"userId": "u1", "name": "subtract_revenue", "value": 0.25}\n')
    process(dsn, [journal])
    ok = evtool("revenue", "u1")
    assert (ok.returncode, ok.stdout) == (0, "9.75\n")
    as_json = evtool("revenue", "u1", "--json")
    assert json.loads(as_json.stdout) == {"userId": "u1", "revenue": 9.75}
    assert '"revenue": 9.75}' in as_json.stdout
    missing = evtool("revenue", "nobody")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "Error: unknown user 'nobody': no events applied for it"
    assert "Traceback" not in missing.stderr


def test_unreachable_database_exits_1_with_one_line(tmp_path):
    result = evtool("process", str(tmp_path / "x.jsonl"), "--retry-for", "0",
                    env={"EVTOOL_DSN": "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2"})
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ")
    assert "Traceback" not in result.stderr


def test_opaque_ids_parsed_by_workers_keep_their_lines_repeats_and_conflicts(dsn, tmp_path):
    """Workers ship opaque ids as rendered rows and a count (the all-new case is decided by
    that count); every digest is recorded at its own line, whatever part of the batch it was
    in, and a batch with repeats or reused ids is decided event by event."""
    journal = tmp_path / "j.jsonl"
    ids = [f"order-{n:05d}" for n in range(1, 3001)]
    write(journal, *(line(f"u{n % 11}", "add_revenue", n, ids[n - 1]) for n in range(1, 3001)))
    tuning = {"workers": 2, "inline_bytes": 0, "piece_bytes": 8_000}
    report = process(dsn, [journal], **tuning)
    assert (report.applied, report.duplicates, report.rejected) == (3000, 0, 0)
    with psycopg.connect(dsn) as conn:
        stored = conn.execute("SELECT digest, line_no FROM applied_events").fetchall()
    from evtool.identity import event_digest
    assert dict((bytes(d), n) for d, n in stored) == {event_digest(e): n for n, e in enumerate(ids, 1)}

    # later batches: a re-send (duplicate), a reused id with other content (reject, naming
    # where it was first seen), a repeat within the batch, and a new id
    write(journal, line("u1", "add_revenue", 12, ids[11]), line("u2", "add_revenue", 999, ids[12]),
          line("u3", "add_revenue", 5, "fresh-1"), line("u3", "add_revenue", 5, "fresh-1"))
    report = process(dsn, [journal], **tuning)
    assert (report.applied, report.duplicates, report.rejected) == (1, 2, 1)
    with psycopg.connect(dsn) as conn:
        reason, line_no = conn.execute("SELECT reason, line_no FROM rejected_lines").fetchone()
    assert line_no == 3002
    assert f"eventId {ids[12]} was already applied with different content" in reason
    assert "line 13)" in reason
    want: dict[str, int] = {}
    for n in range(1, 3001):
        want[f"u{n % 11}"] = want.get(f"u{n % 11}", 0) + n
    want["u3"] += 5
    assert totals(dsn) == want


def minute_sums(dsn: str) -> dict[str, Decimal]:
    """Every user's revenue summed over revenue_by_minute (what reports by event time read)."""
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT user_id, sum(added - subtracted) FROM revenue_by_minute"
                                 " GROUP BY user_id").fetchall())


def test_totals_are_updated_in_place_and_minutes_appended_then_compacted(dsn, tmp_path):
    """Issue 11: every batch updates a user's total in place (fillfactor 70 leaves room for HOT
    updates) and appends its per-minute rows (no per-user probe); reports sum the rows, and
    `evtool db compact` folds them to one per (user, minute) without changing a figure."""
    path = tmp_path / "server-events.jsonl"
    stamp = b'"timestamp":"2026-11-2%dT10:0%d:00Z"}\n'
    path.write_bytes(b"".join(b'{"userId":"u%d","name":"add_revenue","value":1,' % (i % 300)
                              + stamp % (i // 300 % 2, i // 600 % 3) for i in range(3000)))
    # many small batches: each one adds to the 300 users written by the first
    report = process(dsn, [path], batch_bytes=16 << 10, workers=0)
    assert report.applied == 3000 and report.files[0].batches > 5
    with psycopg.connect(dsn) as conn:
        opts = dict(conn.execute("SELECT relname, reloptions FROM pg_class WHERE relname = ANY(%s)",
                                 (["users_revenue", "revenue_by_minute"],)).fetchall())
        appended = conn.execute("SELECT count(*) FROM revenue_by_minute").fetchone()[0]
    assert opts == {"users_revenue": ["fillfactor=70"], "revenue_by_minute": None}
    want = {f"u{i}": 10 for i in range(300)}
    assert totals(dsn) == want and minute_sums(dsn) == want
    assert appended > 300 * 6  # 6 distinct (day, minute) per user, and more than one row for some
    by_day = json.loads(evtool("report", "--by", "day", "--json", check=True).stdout)

    done = evtool("db", "compact", "--before", "2026-11-21T10:01Z", check=True)
    assert done.stdout.startswith("folded ") and "minutes before 2026-11-21T10:01:00+00:00" in done.stdout
    out = json.loads(evtool("db", "compact", "--before", "2100-01-01", "--json", check=True).stdout)
    with psycopg.connect(dsn) as conn:
        left, groups = conn.execute("SELECT count(*), count(DISTINCT (user_id, minute))"
                                    " FROM revenue_by_minute").fetchone()
    assert left == groups == 300 * 6 and out["rows_written"] > 0
    assert totals(dsn) == want and minute_sums(dsn) == want
    assert json.loads(evtool("report", "--by", "day", "--json", check=True).stdout) == by_day
    assert json.loads(evtool("db", "compact", "--json", check=True).stdout)["rows_removed"] == 0


def test_compaction_racing_processors_and_itself_changes_no_figure(dsn, tmp_path):
    """Two compactions folding everything in a loop while a processor appends batch after batch:
    each folds only the rows its own statement deleted, so no row is counted twice or lost."""
    import threading

    from evtool.store import Store

    path = tmp_path / "server-events.jsonl"
    path.write_bytes(b"".join(b'{"userId":"u%d","name":"add_revenue","value":%d}\n' % (i % 50, i % 7)
                              for i in range(6000)))
    want: dict[str, Decimal] = {}
    for i in range(6000):
        want[f"u{i % 50}"] = want.get(f"u{i % 50}", Decimal(0)) + i % 7
    with Store.connect(dsn) as store:
        store.migrate()
    stop = threading.Event()
    folds: list[int] = []
    errors: list[BaseException] = []

    def compact_loop() -> None:
        try:
            with Store.connect(dsn) as store:
                while not stop.is_set():
                    folds.append(store.compact_minutes(datetime(2100, 1, 1, tzinfo=UTC))[0])
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=compact_loop) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        report = process(dsn, [path], batch_bytes=4 << 10, workers=0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert report.applied == 6000 and report.files[0].batches > 20
    assert sum(folds) > 0, "no compaction overlapped the batches: the test proves nothing"
    assert totals(dsn) == want and minute_sums(dsn) == want
