"""The processor against a real PostgreSQL: exactly once, rejects, partial lines, concurrency."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from evtool import journal
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


def test_a_file_of_sender_ids_sent_twice_drops_the_copy_whole_and_a_changed_line_still_counts(dsn, tmp_path):
    """The copy of a file already applied (every line's (source, line, chain) stored): its
    sources' sums are dropped whole, each line a duplicate, nothing read again. One line of the
    copy carrying another chain (another event under the same line number) makes that source
    go line by line, and that line counts, once, however often it comes."""
    journal = tmp_path / "j.jsonl"
    src, chains = "0123456789abcdef", [f"{n:016x}" for n in range(3000)]
    lines = [line(f"u{n % 7}", "add_revenue", n, f"{src}:{n}:{chains[n]}") for n in range(1, 2500)]
    write(journal, *lines)
    tuning = {"workers": 2, "inline_bytes": 0, "piece_bytes": 8_000}
    assert process(dsn, [journal], **tuning).applied == 2499
    want = totals(dsn)
    write(journal, *lines)  # sent twice
    report = process(dsn, [journal], **tuning)
    assert (report.applied, report.duplicates) == (0, 2499) and totals(dsn) == want
    other = line("u1", "add_revenue", 1000, f"{src}:1300:{'f' * 16}")
    write(journal, *lines[1000:1500], other, *lines[1500:2000], other)
    report = process(dsn, [journal], **tuning)
    assert (report.applied, report.duplicates) == (1, 1001)
    assert totals(dsn) == {**want, "u1": want["u1"] + 1000}


def per_minute(dsn: str) -> dict[tuple[str, object], tuple[int, Decimal, int, Decimal]]:
    """(user, minute) -> (adds, added, subtracts, subtracted), both minute tables summed."""
    from evtool.store import MINUTES

    with psycopg.connect(dsn) as conn:
        rows = conn.execute(f"SELECT user_id, minute, sum(adds), sum(added), sum(subtracts), sum(subtracted)"
                            f" FROM {MINUTES} GROUP BY 1, 2").fetchall()
    return {(u, m): (int(a), Decimal(x), int(s), Decimal(y)) for u, m, a, x, s, y in rows if a or s}


def sender_lines(n: int, src: str = "0123456789abcdef", minute: str = "10") -> list[str]:
    """Lines 1..n of a sender source, as `send` writes them (with a receive time)."""
    return [line(f"u{k % 7}", "add_revenue" if k % 5 else "subtract_revenue", k,
                 f"{src}:{k}:{k * 7919:016x}")[:-2] + f', "timestamp": "2026-11-24T09:{minute}:00Z"}}\n'
            for k in range(1, n + 1)]


def no_line_by_line(monkeypatch) -> None:
    """Make the slow path (every line of a source decided one by one) fail the test."""
    def never(*args, **kwargs):
        raise AssertionError("a source was decided line by line")

    monkeypatch.setattr("evtool.parser.source_events", never)


def test_a_retried_bulk_of_sender_lines_is_taken_back_without_deciding_the_source_line_by_line(
        dsn, tmp_path, monkeypatch):
    """A POST that landed and was retried writes its lines again, in the batch (in one part or
    two) or after lines already applied: only those lines are found in the journal and taken
    back, each once and in its own minute (the copy came in another minute: the first counts);
    the rest of the source stands as the workers summed it."""
    no_line_by_line(monkeypatch)
    journal = tmp_path / "j.jsonl"
    tuning = {"workers": 2, "inline_bytes": 0, "piece_bytes": 8_000}
    lines = sender_lines(3000)
    retry = [x.replace("T09:10:", "T09:11:") for x in lines[1000:1100]]  # received a minute later
    write(journal, *lines[:1500], *retry, *lines[1500:1600], lines[5], lines[5])
    report = process(dsn, [journal], **tuning)
    assert (report.applied, report.duplicates) == (1600, 102)
    write(journal, *lines[1550:1650], *lines[1600:3000])  # straddling what was applied
    report = process(dsn, [journal], **tuning)
    assert (report.applied, report.duplicates) == (1400, 100)
    want: dict[str, int] = {}
    minutes: dict[tuple[str, str], list] = {}
    for k in range(1, 3001):
        sign = 1 if k % 5 else -1
        want[f"u{k % 7}"] = want.get(f"u{k % 7}", 0) + sign * k
        m = minutes.setdefault((f"u{k % 7}", "2026-11-24 09:10"), [0, 0, 0, 0])
        m[0 if sign > 0 else 2] += 1
        m[1 if sign > 0 else 3] += k
    assert totals(dsn) == want
    got = {(u, str(m)[:16]): v for (u, m), v in per_minute(dsn).items()}
    assert got == {k: (a, Decimal(x), s, Decimal(y)) for k, (a, x, s, y) in minutes.items()}
    assert process(dsn, [journal], **tuning).applied == 0
    # the search's pattern (up to ~1 MB) is not left in re's cache of 512 (a follower's months)
    assert not any(b"|" in key[1] for key in getattr(re, "_cache", {}) if type(key[1]) is bytes)


@pytest.mark.parametrize("why", ["escaped", "escaped, and a decoy", "over the limit", "too many in a part",
                                 "old ids"])
def test_a_retry_whose_lines_cannot_all_be_found_goes_line_by_line_and_stays_exact(
        dsn, tmp_path, monkeypatch, why):
    """The retried lines are found by their id's text and counted against what the workers saw:
    an id written with a JSON escape is not found as often (nor when another line carries its
    text in another field, making up the count: each line found is parsed), more lines than TAKE_BACK_MAX are
    not looked for, a part that saw more later occurrences than it keeps (EXTRA_MAX) cannot name
    them, an old `<S>:<n>` id has no chain to look for: the source then goes line by line, with
    the same totals."""
    from evtool import parser

    calls = []
    real = parser.source_events
    monkeypatch.setattr(parser, "source_events", lambda *a, **k: calls.append(1) or real(*a, **k))
    if why == "over the limit":
        monkeypatch.setattr("evtool.identity.TAKE_BACK_MAX", 5)
    tuning = {"workers": 2, "inline_bytes": 0, "piece_bytes": 8_000}
    if why == "too many in a part":
        monkeypatch.setattr(parser, "EXTRA_MAX", 5)
        tuning = {"workers": 1}  # one part: the repeats are its own
    journal = tmp_path / "j.jsonl"
    lines = sender_lines(400)
    if why == "old ids":
        lines = [x.replace(f":{k * 7919:016x}", "") for k, x in enumerate(lines, 1)]
    retry = lines[100:110]
    if why.startswith("escaped"):
        retry[3] = retry[3].replace('0123456789abcdef:104:', '0123456789abcdef:10\\u0034:')
    decoy = line(f"0123456789abcdef:104:{104 * 7919:016x}", "add_revenue", 3,
                 f"0123456789abcdef:401:{401 * 7919:016x}") if "decoy" in why else ""
    write(journal, *lines[:200], *retry, *lines[200:], decoy)
    report = process(dsn, [journal], **tuning)
    assert (report.applied, report.duplicates) == (400 + bool(decoy), 10)
    assert calls
    want = {f"u{u}": sum((k if k % 5 else -k) for k in range(1, 401) if k % 7 == u) for u in range(7)}
    if decoy:
        want[f"0123456789abcdef:104:{104 * 7919:016x}"] = 3
    assert totals(dsn) == want


def test_a_retried_line_overwritten_before_it_is_taken_back_stops_the_batch(dsn, tmp_path, monkeypatch):
    """The journal changed in place between the parse and the search for a retry's lines (the
    retry's amount rewritten): the batch stops with a message, nothing of it applied; the next
    run applies the journal as it now is."""
    from evtool import processor
    from evtool.errors import JournalChanged

    journal = tmp_path / "j.jsonl"
    lines = sender_lines(300)
    write(journal, *lines[:200], lines[50], *lines[200:])
    real = processor.find_lines

    def overwritten(f, start, end, pattern):
        data = journal.read_bytes()
        at = data.index(lines[50].encode(), data.index(lines[199].encode()))
        with open(journal, "r+b") as w:  # the retry of line 51 now says 59 instead of 51
            w.seek(at + lines[50].index('"value": 51') + len('"value": 5'))
            w.write(b"9")
        return real(f, start, end, pattern)

    monkeypatch.setattr(processor, "find_lines", overwritten)
    with pytest.raises(JournalChanged, match="while a batch of it was being processed"):
        process(dsn, [journal], workers=2, inline_bytes=0, piece_bytes=8_000)
    assert totals(dsn) == {}
    monkeypatch.setattr(processor, "find_lines", real)
    report = process(dsn, [journal])  # (a sender id names its line: the copy is a duplicate)
    assert (report.applied, report.duplicates) == (300, 1)


@pytest.mark.parametrize("chunk", [1, 7, 64, 4 << 20])
def test_read_lines_and_find_lines_see_the_lines_whatever_the_blocks(tmp_path, monkeypatch, chunk):
    """The two one-pass readers of a batch (processor._blocks): lines longer than a block,
    CRLF ends, a range that starts and ends inside the file."""
    from evtool import processor

    monkeypatch.setattr(processor, "READ_LINES_CHUNK", chunk)
    lines = [b"x" * (n * 13 % 50) + b"-%d" % n + (b"\r" if n % 3 == 0 else b"") for n in range(60)]
    data = b"".join(x + b"\n" for x in lines)
    path = tmp_path / "j"
    path.write_bytes(b"head\n" + data + b"tail")
    start, end = 5, 5 + len(data)
    offsets = [start + sum(len(x) + 1 for x in lines[:i]) for i in range(len(lines))]
    with open(path, "rb") as f:
        wanted = [0, 1, 2, 17, 18, 59]
        assert list(processor.read_lines(f, start, end, wanted)) == [
            (i, offsets[i], lines[i].rstrip(b"\r")) for i in wanted]
        assert list(processor.read_lines(f, start, end, [])) == []
        found = list(processor.find_lines(f, start, end, re.compile(rb"-(?:5|4\d)\b|x-")))
        want = [i for i, x in enumerate(lines) if re.search(rb"-(?:5|4\d)\b|x-", x)]
        assert found == [(offsets[i], lines[i].rstrip(b"\r")) for i in want] and len(want) > 5


def test_within_says_whether_a_cells_entries_are_all_stored_as_sets_would():
    """identity.within, the subset test of a resent cell: a run of the stored entries found as
    bytes must start at an entry's boundary (a match across two entries is no match)."""
    import random

    from evtool.identity import ENTRY, entries, within

    rng = random.Random(1)
    for _ in range(3000):  # few distinct bytes: many runs found out of step with the entries
        pool = sorted({bytes([rng.randrange(3)]) * 2 + bytes([rng.randrange(3)]) * 8 for _ in range(12)})
        have = b"".join(sorted(rng.sample(pool, rng.randrange(0, len(pool) + 1))))
        packed = b"".join(sorted(rng.sample(pool, rng.randrange(1, len(pool) + 1))))
        assert within(packed, have) == (set(entries(packed)) <= set(entries(have))), (packed, have)
    a, c = b"\x00\x01" + b"\x02" * 8, b"\x02\x02" + b"\x09" * 8
    assert (a + c).find(b"\x02" * ENTRY) == 2  # found two bytes into the first entry: not an entry
    assert not within(b"\x02" * ENTRY, a + c) and within(c, a + c) and within(a + c, a + c)


def test_a_cells_lines_claimed_one_by_one_are_the_stored_set_and_pack_as_it_would():
    """identity._CellLines (a chain per slot and the rare others, no object per line) decides
    and packs as a set of entries would."""
    import random

    from evtool import identity

    rng = random.Random(7)
    for _ in range(200):
        chains = [rng.randbytes(8) for _ in range(3)]
        stored = sorted({identity.entry(rng.randint(1, 1024), rng.choice(chains))
                         for _ in range(rng.randint(0, 40))})
        cell, ref = identity._CellLines(b"".join(stored)), set(stored)
        for _ in range(rng.randint(0, 60)):
            n, chain = rng.randint(1, 1024), rng.choice(chains)
            e = identity.entry(n, chain)
            assert cell.add((n - 1) % identity.CELL_LINES, chain) == (e not in ref)
            ref.add(e)
        assert cell.packed() == b"".join(sorted(ref))


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


@pytest.mark.parametrize("appended", [False, True], ids=["upserted", "appended"])
def test_a_batch_of_new_opaque_ids_is_copied_straight_in_and_one_seen_before_undoes_it(dsn, tmp_path,
                                                                                      monkeypatch, appended):
    """The all-new case copies the parts' rows, merged in digest order, straight into
    applied_events (store.claim_new_digests). One id recorded before, or the same id in two
    parts of the batch (each part's own check cannot see it), fails that copy: it is undone
    and the batch decided event by event, every new id recorded once at its own line. Only the
    lines not applied are read again; their events are taken back out of the workers' sums
    (negative rows, summed per user and minute whether the minutes are upserted or appended:
    store.PENDING_MINUTE_ROWS), and a user left with no event is not touched at all."""
    from evtool import store
    from evtool.identity import event_digest

    if appended:
        monkeypatch.setattr(store, "PENDING_MINUTE_ROWS", 1)
    monkeypatch.setattr("evtool.processor.DECIDE_LINES", 2)  # decided a few at a time, read once

    journal = tmp_path / "j.jsonl"
    tuning = {"workers": 2, "inline_bytes": 0, "piece_bytes": 4_000}
    write(journal, *(line(f"u{n % 7}", "add_revenue", n, f"a-{n}") for n in range(1, 200)),
          line("u9", "add_revenue", 3, "c-1"))
    assert process(dsn, [journal], **tuning).applied == 200
    first = {event_digest(f"a-{n}"): n for n in range(1, 200)}
    assert stored_digests(dsn) == {**first, event_digest("c-1"): 200}
    # the next batch: new ids in several parts, one id of the first batch (a late retry), and
    # a new id both near the start and near the end (two parts)
    later = [line(f"u{n % 7}", "add_revenue", n, f"b-{n}") for n in range(201, 401)]
    later[50] = line("u3", "add_revenue", 17, "a-17")  # as the first batch had it
    later[3] = later[190] = line("u2", "add_revenue", 1000, "twice")
    later[100] = line("u8", "subtract_revenue", 5, "other")  # a new user
    later[120] = line("u8", "add_revenue", 6, "other")  # the same id, other content: a reject
    later[150] = line("u8", "subtract_revenue", 5, "other")  # and a plain retry
    later[170] = line("u9", "add_revenue", 3, "c-1")  # a user whose only event is a retry
    later[180] = line("u10", "add_revenue", 4, "c-1")  # a new user whose only event is a reject
    write(journal, *later)
    report = process(dsn, [journal], **tuning)
    assert report.files[0].batches == 1
    assert (report.applied, report.duplicates, report.rejected) == (194, 4, 2)
    assert len(report.users) == 8  # u0-u6 and u8: u9's only event was not applied
    want: dict[str, int] = {}
    for n in range(201, 401):
        if n not in (251, 204, 391, 301, 321, 351, 371, 381):  # not "b-n" lines
            want[f"u{n % 7}"] = want.get(f"u{n % 7}", 0) + n
    for n in range(1, 200):
        want[f"u{n % 7}"] += n
    want["u2"] += 1000
    want["u8"], want["u9"] = -5, 3
    assert totals(dsn) == want  # and no row for u10, nor for anyone with nothing applied
    with psycopg.connect(dsn) as conn:
        (reason, line_no), (_, other) = conn.execute(
            "SELECT reason, line_no FROM rejected_lines ORDER BY line_no").fetchall()
    assert (line_no, other) == (321, 381)
    assert reason.startswith(f"eventId other was already applied with different content (first seen in "
                             f"{journal.resolve()} line 301)")
    got = stored_digests(dsn)
    assert len(got) == 200 + 194  # one a line applied
    assert got[event_digest("twice")] == 204 and got[event_digest("a-17")] == 17
    assert got[event_digest("other")] == 301
    taken = (251, 204, 391, 301, 321, 351, 371, 381)
    assert all(got[event_digest(f"b-{n}")] == n for n in range(201, 401) if n not in taken)
    assert sum(minute_sums(dsn).values()) == sum(want.values())


@pytest.mark.parametrize("held", [None, 1], ids=["shortcut", "too many conflicts"])
def test_a_file_of_opaque_ids_sent_twice_drops_the_copy_whole_reading_only_its_conflicts(
        dsn, tmp_path, monkeypatch, held):
    """A batch none of whose opaque ids is new (the copy of a file applied before): the workers'
    sums are dropped whole and only the lines whose id came with other content are read again,
    each rejected naming where the id was first seen. More conflicts than the shortcut holds
    (DECIDE_LINES) and the batch is decided line by line instead: the same outcome."""
    from evtool import processor

    if held:
        monkeypatch.setattr(processor, "DECIDE_LINES", held)
    journal = tmp_path / "j.jsonl"
    lines = [line(f"u{n % 5}", "add_revenue" if n % 4 else "subtract_revenue", n, f"id-{n}")
             for n in range(1, 301)]
    write(journal, *lines)
    tuning = {"workers": 2, "inline_bytes": 0, "piece_bytes": 4_000}
    assert process(dsn, [journal], **tuning).applied == 300
    want, minutes = totals(dsn), minute_sums(dsn)
    copy = list(lines)
    copy[41] = line("u1", "add_revenue", 999, "id-42")  # the id of line 42, another event
    copy[250] = line("u7", "add_revenue", 5, "id-251")  # and a new user's only event
    write(journal, *copy)
    read: list[int] = []
    real = processor.read_lines

    def counted(f, start, end, wanted):
        for got in real(f, start, end, wanted):
            read.append(got[0])
            yield got

    monkeypatch.setattr(processor, "read_lines", counted)
    report = process(dsn, [journal], **tuning)
    assert (report.applied, report.duplicates, report.rejected, report.files[0].batches) == (0, 298, 2, 1)
    assert len(report.users) == 0
    assert totals(dsn) == want and minute_sums(dsn) == minutes
    if not held:
        assert read == [41, 250]  # the conflicts' lines only
    with psycopg.connect(dsn) as conn:
        got = conn.execute("SELECT line_no, reason FROM rejected_lines ORDER BY line_no").fetchall()
    assert [n for n, _ in got] == [342, 551]
    assert got[0][1].startswith(f"eventId id-42 was already applied with different content (first seen in "
                                f"{journal.resolve()} line 42)")


def test_retries_within_a_batch_of_new_opaque_ids_keep_it_on_the_copy(dsn, tmp_path, monkeypatch):
    """A client's retries within a batch (in one part or two) and an id reused there with other
    content are found by the merge: the copy of the new ids stands (the batch table is never
    used), each retry counts as a duplicate, the reuse is rejected naming the first line."""
    from evtool.identity import event_digest
    from evtool.store import Store

    def never(*args, **kwargs):
        raise AssertionError("the batch table was used")

    monkeypatch.setattr(Store, "claim_digest_rows", never)
    monkeypatch.setattr("evtool.processor.DECIDE_LINES", 2)
    journal = tmp_path / "j.jsonl"
    lines = [line(f"u{n % 5}", "add_revenue", n, f"id-{n}") for n in range(1, 301)]
    lines[9] = lines[4]  # a retry in the same part
    lines[280] = lines[20]  # and in another part
    lines[290] = line("u9", "add_revenue", 1, "id-31")  # a reuse, new user: nothing of u9 applied
    write(journal, *lines)
    report = process(dsn, [journal], workers=2, inline_bytes=0, piece_bytes=4_000)
    assert (report.applied, report.duplicates, report.rejected) == (297, 2, 1)
    assert len(report.users) == 5
    want: dict[str, int] = {}
    for n in range(1, 301):
        if n not in (10, 281, 291):
            want[f"u{n % 5}"] = want.get(f"u{n % 5}", 0) + n
    assert totals(dsn) == want
    with psycopg.connect(dsn) as conn:
        reason, line_no = conn.execute("SELECT reason, line_no FROM rejected_lines").fetchone()
    assert line_no == 291 and f"(first seen in {journal.resolve()} line 31)" in reason
    got = stored_digests(dsn)
    assert len(got) == 297 and got[event_digest("id-5")] == 5 and got[event_digest("id-21")] == 21


def test_a_line_not_applied_that_is_another_event_when_read_again_stops_the_batch(dsn, tmp_path, monkeypatch):
    """The lines not applied are read again to take their events back out of the sums: one
    that is no longer the event parsed (the journal overwritten in place under the run, here
    a retry's id changed, same user and amount) stops the batch with a message and nothing of
    it applied, never taken back as the duplicate it was; the next run applies the journal as
    it now is."""
    from evtool import processor
    from evtool.errors import JournalChanged

    journal = tmp_path / "j.jsonl"
    write(journal, *(line(f"u{n % 3}", "add_revenue", n, f"a-{n}") for n in range(1, 21)))
    assert process(dsn, [journal]).applied == 20
    before = totals(dsn)
    at = journal.stat().st_size
    write(journal, line("u2", "add_revenue", 5, "a-5"), line("u1", "add_revenue", 100, "b-1"))
    real = processor.read_lines

    def overwritten(f, start, end, wanted):
        with open(journal, "r+b") as w:  # the retry of a-5 becomes a new event, z-5
            w.seek(at + journal.read_bytes()[at:].index(b'"a-5"'))
            w.write(b'"z-5"')
        return real(f, start, end, wanted)

    monkeypatch.setattr(processor, "read_lines", overwritten)
    with pytest.raises(JournalChanged, match="was overwritten while a batch of it was being processed"):
        process(dsn, [journal])
    assert totals(dsn) == before
    monkeypatch.setattr(processor, "read_lines", real)
    report = process(dsn, [journal])
    assert (report.applied, report.duplicates) == (2, 0)
    assert totals(dsn) == {**before, "u2": before["u2"] + 5, "u1": before["u1"] + 100}


def stored_digests(dsn: str) -> dict[bytes, int]:
    with psycopg.connect(dsn) as conn:
        return {bytes(d): n for d, n in conn.execute("SELECT digest, line_no FROM applied_events")}


def test_the_tables_updated_in_place_leave_room_for_hot_updates(dsn, tmp_path):
    """Issue 11: every batch updates a user's minutes in place; with full pages each update adds
    an entry to both of revenue_by_minute's indexes, with room on the page it adds none (HOT)."""
    path = tmp_path / "server-events.jsonl"
    path.write_bytes(b"".join(b'{"userId":"u%d","name":"add_revenue","value":1}\n' % (i % 300)
                              for i in range(3000)))
    # many small batches: each one updates the 300 users' rows written by the first
    report = process(dsn, [path], batch_bytes=16 << 10, workers=0)
    assert report.applied == 3000 and report.files[0].batches > 5
    with psycopg.connect(dsn) as conn:
        opts = dict(conn.execute("SELECT relname, reloptions FROM pg_class WHERE relname = ANY(%s)",
                                 (["users_revenue", "revenue_by_minute"],)).fetchall())
    assert opts == {"users_revenue": ["fillfactor=70"], "revenue_by_minute": ["fillfactor=70"]}
    assert totals(dsn) == {f"u{i}": 10 for i in range(300)}


def minute_sums(dsn: str) -> dict[str, Decimal]:
    """Every user's revenue summed over the per-minute figures, both tables (store.MINUTES)."""
    from evtool.store import MINUTES

    with psycopg.connect(dsn) as conn:
        return dict(conn.execute(f"SELECT user_id, sum(added - subtracted) FROM {MINUTES} GROUP BY user_id"
                                 ).fetchall())


def minute_rows(dsn: str) -> tuple[int, int, int]:
    """(revenue_by_minute rows, its distinct (user, minute), pending rows)."""
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*), count(DISTINCT (user_id, minute)),"
                            " (SELECT count(*) FROM revenue_minutes_pending)"
                            " FROM revenue_by_minute").fetchone()


def test_big_batches_append_their_minutes_and_a_fold_moves_them(dsn, tmp_path, monkeypatch):
    """Issue 11: a batch with many per-minute rows appends them (no per-user probe); reports,
    the rolling window and `evtool db compact` (the fold) see the same figures throughout."""
    from evtool.store import Store

    path = tmp_path / "server-events.jsonl"
    stamp = b'"timestamp":"2026-11-2%dT10:0%d:00Z"}\n'
    path.write_bytes(b"".join(b'{"userId":"u%d","name":"add_revenue","value":1,' % (i % 300)
                              + stamp % (i // 300 % 2, i // 600 % 3) for i in range(3000)))
    want = {f"u{i}": 10 for i in range(300)}
    monkeypatch.setattr("evtool.store.PENDING_MINUTE_ROWS", 1)  # every batch is "big"
    report = process(dsn, [path], batch_bytes=16 << 10, workers=0)
    assert report.applied == 3000 and report.files[0].batches > 5
    folded, distinct, pending = minute_rows(dsn)
    assert folded == 0 and pending > 300 * 6  # more rows than (user, minute) pairs: not summed yet
    assert totals(dsn) == want and minute_sums(dsn) == want
    by_day = json.loads(evtool("report", "--by", "day", "--json", check=True).stdout)
    assert sum(Decimal(p["revenue"]) for p in by_day["periods"]) == 3000
    span = datetime(2026, 11, 20, tzinfo=UTC), datetime(2026, 11, 23, tzinfo=UTC)
    with Store.connect(dsn) as store:
        window = store.window(*span)
    # per minute: each of the 300 users once or twice (in two batches: two rows), counted once
    assert [(r[1], r[3]) for r in window[0]] == [(600, 300), (600, 300), (300, 300)] * 2
    assert window[1] == 300

    out = json.loads(evtool("db", "compact", "--json", check=True).stdout)
    assert out == {"rows_folded": pending, "rows_written": 300 * 6}
    assert minute_rows(dsn) == (300 * 6, 300 * 6, 0)
    assert totals(dsn) == want and minute_sums(dsn) == want
    assert json.loads(evtool("report", "--by", "day", "--json", check=True).stdout) == by_day
    with Store.connect(dsn) as store:
        assert store.window(*span) == window
    assert "folded 0 pending" in evtool("db", "compact", check=True).stdout

    # small batches upsert into the folded rows
    monkeypatch.setattr("evtool.store.PENDING_MINUTE_ROWS", 10**9)
    with path.open("ab") as f:
        f.write(b'{"userId":"u1","name":"add_revenue","value":5,"timestamp":"2026-11-20T10:00:30Z"}\n')
    process(dsn, [path], workers=0)
    assert minute_rows(dsn) == (300 * 6, 300 * 6, 0) and minute_sums(dsn)["u1"] == 15


def test_folds_racing_a_processor_and_each_other_change_no_figure(dsn, tmp_path, monkeypatch):
    """Two folds in a loop while a processor appends batch after batch: each folds only the
    rows its own DELETE took, so no row is counted twice or lost."""
    import threading

    from evtool.store import Store

    monkeypatch.setattr("evtool.store.PENDING_MINUTE_ROWS", 1)
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

    def fold_loop() -> None:
        try:
            with Store.connect(dsn) as store:
                while not stop.is_set():
                    folds.append(store.fold_minutes()[0])
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=fold_loop) for _ in range(2)]
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
    assert sum(folds) > 0, "no fold overlapped the batches: the test proves nothing"
    assert totals(dsn) == want and minute_sums(dsn) == want
    with Store.connect(dsn) as store:
        store.fold_minutes()
    assert minute_rows(dsn) == (50, 50, 0) and minute_sums(dsn) == want


@pytest.mark.parametrize("left_by_earlier_run", [True, False])
def test_an_idle_follower_folds_the_pending_minutes(dsn, tmp_path, monkeypatch, left_by_earlier_run):
    """`process --follow` folds what big batches appended once it finds nothing new, and what
    an earlier one-shot run left, so the table readers scan stays near a row per minute."""
    from evtool.follow import follow
    from evtool.processor import Processor
    from evtool.store import Store

    with Store.connect(dsn) as store:
        store.migrate()

    monkeypatch.setattr("evtool.store.PENDING_MINUTE_ROWS", 1)
    path = tmp_path / "server-events.jsonl"
    path.write_bytes(b"".join(b'{"userId":"u%d","name":"add_revenue","value":2}\n' % (i % 40)
                              for i in range(2000)))
    if left_by_earlier_run:
        process(dsn, [path], batch_bytes=4 << 10, workers=0)
        assert minute_rows(dsn)[2] > 40
    proc = Processor(dsn, batch_bytes=4 << 10, workers=0)
    polls = iter(range(10_000))

    def should_stop() -> bool:  # bounded by polls, not by time
        return next(polls) >= 10_000 or (minute_rows(dsn)[2] == 0 and minute_rows(dsn)[0] > 0)

    try:
        follow(proc, [path], should_stop, poll=0.01)
    finally:
        proc.close()
    assert minute_rows(dsn) == (40, 40, 0)
    assert totals(dsn) == minute_sums(dsn) == {f"u{i}": 100 for i in range(40)}


def test_debug_log_says_per_batch_whether_the_parse_or_the_database_took_the_time(dsn, tmp_path):
    """`--log-level debug`: one record per committed batch, with its range, its lines, the time
    spent waiting for the parse and the time its transaction took (what bounds a run)."""
    journal = tmp_path / "j.jsonl"
    subprocess.run([sys.executable, str(GEN_EVENTS), str(journal), "40000", "--users", "300"],
                   check=True, capture_output=True)
    out = evtool("--log-level", "debug", "--log-format", "json", "process", "--batch-mb", "1", "--json",
                 str(journal), env={"EVTOOL_DSN": dsn}, check=True)
    assert json.loads(out.stdout)["applied"] == 40000
    records = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    batches = [r for r in records if "commit_s" in r]
    assert len(batches) >= 2 and batches[0]["offset"] == 0  # the journal is over 2 MB
    assert sum(r["lines"] for r in batches) == 40000
    assert [r["offset"] for r in batches[1:]] == [r["end"] for r in batches[:-1]]  # in order, no gap
    assert batches[-1]["end"] == journal.stat().st_size
    assert all(r["level"] == "debug" and r["parse_wait_s"] >= 0 and r["commit_s"] >= 0 for r in batches)
    # and nothing at the default level
    quiet = evtool("--log-format", "json", "process", str(journal), env={"EVTOOL_DSN": dsn}, check=True)
    assert not any("commit_s" in line for line in quiet.stderr.splitlines())


def test_a_batch_takes_what_would_be_left_after_it_when_that_is_under_a_quarter_batch(tmp_path):
    """No runt last batch: it would cost a transaction, and with many users an upsert of most of
    them again. A quarter of a batch or more left is a batch of its own (batches of 80 lines here)."""
    line = b'{"userId":"u1","name":"add_revenue","value":1}\n'
    n = len(line)
    for lines, want in ((100, [100]), (101, [80, 101]), (250, [80, 160, 250])):
        path = tmp_path / f"j{lines}.jsonl"
        path.write_bytes(line * lines)
        ends = [0]
        with open(path, "rb") as f:
            for _ in range(10):  # (bounded: a bug here must fail, not hang)
                if ends[-1] == lines * n:
                    break
                ends.append(journal.batch_end(f, ends[-1], 80 * n))
        assert [end // n for end in ends[1:]] == want, lines


def test_evtool_pure_python_processes_the_same_without_the_c_loop(dsn, tmp_path):
    """EVTOOL_PURE_PYTHON=1 (what an install without a compiler runs): the Python loops alone,
    the same totals as the C loop gives in the test beside it (test_parser_fast pins the parts)."""
    journal_path = tmp_path / "j.jsonl"
    subprocess.run([sys.executable, str(GEN_EVENTS), str(journal_path), "3000", "--users", "40"],
                   check=True, capture_output=True)
    want = json.loads(Path(str(journal_path) + ".expected.json").read_text())
    env = {"EVTOOL_DSN": dsn, "EVTOOL_PURE_PYTHON": "1"}
    show = subprocess.run([sys.executable, "-c", "from evtool import parser; print(parser._fastlines)"],
                          env={**os.environ, **env}, capture_output=True, text=True, check=True)
    assert show.stdout.strip() == "None"
    out = evtool("process", "--json", str(journal_path), env=env, check=True)
    assert json.loads(out.stdout)["applied"] == 3000
    assert totals(dsn) == {user: Decimal(total) for user, total in want["per_user"].items()}
