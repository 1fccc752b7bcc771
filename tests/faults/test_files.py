"""Scenario 6: what happens to the files. Each case carries on exactly, or stops with one line
that names the file and says what to do (exit 1, no traceback), having applied nothing wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
from decimal import Decimal
from pathlib import Path

from ..conftest import evtool
from .helpers import Serve, db_totals, evtool_cmd, generate, journal_lines


def file_totals(*paths: Path) -> dict[str, Decimal]:
    """Per-user totals of files of valid events, every line counted (no ids to deduplicate)."""
    out: dict[str, Decimal] = {}
    for path in paths:
        for raw in path.read_bytes().splitlines():
            obj = json.loads(raw, parse_float=Decimal)
            delta = Decimal(obj["value"]) * (1 if obj["name"] == "add_revenue" else -1)
            out[obj["userId"]] = out.get(obj["userId"], Decimal(0)) + delta
    return out


def process(*paths: Path, cwd: Path) -> subprocess.CompletedProcess:
    return evtool("process", "--json", *map(str, paths), cwd=cwd)


def applied(result: subprocess.CompletedProcess) -> list[int]:
    assert result.returncode == 0, result.stderr
    return [f["applied"] for f in json.loads(result.stdout)["files"]]


def refused(result: subprocess.CompletedProcess, path: Path, *words: str) -> str:
    """Exit 1 with one `Error:` line naming `path` (and `words`); returns that line."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert str(path.resolve()) in lines[0], lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_journal_truncated_below_its_offset_is_refused(dsn, tmp_path):
    journal = tmp_path / "j.jsonl"
    generate(journal, 2000, "--users", "50", "--seed", "60")
    want = file_totals(journal)
    assert applied(process(journal, cwd=tmp_path)) == [2000]
    data = journal.read_bytes()
    journal.write_bytes(data[: len(data) // 2])  # same first line, shorter
    line = refused(process(journal, cwd=tmp_path), journal, "shorter", "truncated")
    assert "Nothing was applied" in line and "Put the processed file back" in line
    assert db_totals(dsn) == want
    # Grown back past the offset with other lines: still refused, never guessed.
    generate(tmp_path / "other.jsonl", 2000, "--users", "50", "--seed", "61")
    with open(journal, "ab") as f:
        f.write((tmp_path / "other.jsonl").read_bytes())
    refused(process(journal, cwd=tmp_path), journal, "replaced or rewritten", "Put the processed file back")
    assert db_totals(dsn) == want
    # Doing what the message says: the processed file back, then appended to, carries on.
    journal.write_bytes(data + b'{"userId": "late", "name": "add_revenue", "value": 7}\n')
    assert applied(process(journal, cwd=tmp_path)) == [1]
    assert db_totals(dsn) == {**want, "late": 7}


def test_journal_replaced_by_another_file_at_the_same_path(dsn, tmp_path):
    journal = tmp_path / "j.jsonl"
    generate(journal, 1500, "--users", "50", "--seed", "62")
    first = file_totals(journal)
    assert applied(process(journal, cwd=tmp_path)) == [1500]
    # Another journal (its own first line) moved over it: a new journal, applied whole.
    other = tmp_path / "incoming.jsonl"
    generate(other, 1000, "--users", "50", "--seed", "63")
    second = file_totals(other)
    os.replace(other, journal)
    assert applied(process(journal, cwd=tmp_path)) == [1000]
    want = {u: first.get(u, 0) + second.get(u, 0) for u in first | second}
    assert db_totals(dsn) == want
    # A rewrite that keeps the first line but changes what was processed: refused.
    lines = journal.read_bytes().splitlines(keepends=True)
    rewritten = lines[:1] + lines[1:][::-1] + lines[1:3]
    tmp = tmp_path / "rewrite.jsonl"
    tmp.write_bytes(b"".join(rewritten))
    os.replace(tmp, journal)
    refused(process(journal, cwd=tmp_path), journal, "replaced or rewritten")
    assert db_totals(dsn) == want


def test_rotated_journal_with_a_new_one_beside_it(dsn, tmp_path):
    parts = []
    for i, n in enumerate((3000, 2000, 2500)):
        parts.append(tmp_path / f"part{i}.jsonl")
        generate(parts[-1], n, "--users", "80", "--decimals", "0.3", "--seed", str(64 + i))
    journal = tmp_path / "server-events.jsonl"
    with Serve(tmp_path) as serve:
        evtool("send", str(parts[0]), "--url", serve.url, cwd=tmp_path, check=True)
        assert applied(process(journal, cwd=tmp_path)) == [3000]
        evtool("send", str(parts[1]), "--url", serve.url, cwd=tmp_path, check=True)
    rotated = tmp_path / "server-events.1.jsonl"
    journal.rename(rotated)  # the receiver is stopped, the journal rotated, a new one started
    with Serve(tmp_path) as serve:
        evtool("send", str(parts[2]), "--url", serve.url, cwd=tmp_path, check=True)
    # The new journal first, then the rotated one: it carries on from its offset, under its new name.
    assert applied(process(journal, cwd=tmp_path)) == [2500]
    result = process(rotated, journal, cwd=tmp_path)
    assert applied(result) == [2000, 0]
    assert json.loads(result.stdout)["duplicates"] == 0
    assert db_totals(dsn) == file_totals(*parts)
    assert applied(process(rotated, journal, cwd=tmp_path)) == [0, 0]


def test_trailing_partial_line_is_applied_once_completed(dsn, tmp_path):
    journal = tmp_path / "j.jsonl"
    lines = [b'{"userId": "u\xc3\xa9", "name": "add_revenue", "value": 1.5}\r\n',
             b'{"userId": "u\xc3\xa9", "name": "add_revenue", "value": 2, "eventId": "x-1"}\n',
             b'{"userId": "v", "name": "subtract_revenue", "value": 0.25}\n']
    data = b"".join(lines)
    # cut inside the first line, between its \r and \n, inside a UTF-8 character, then further on
    steps = [5, len(lines[0]) - 1, len(lines[0]) + 14, len(lines[0]) + len(lines[1]) + 3, len(data)]
    assert data[steps[2] - 1:steps[2] + 1] == "é".encode()
    done = 0
    counts = []
    for cut in steps:
        with open(journal, "ab") as f:
            f.write(data[done:cut])
        done = cut
        result = process(journal, cwd=tmp_path)
        counts.append(applied(result)[0])
        assert json.loads(result.stdout)["rejected"] == 0
    assert counts == [0, 0, 1, 1, 1]
    assert db_totals(dsn) == {"ué": Decimal("3.5"), "v": Decimal("-0.25")}


def test_two_foreign_files_beginning_with_the_same_line(dsn, tmp_path):
    header = b'{"userId": "u1", "name": "add_revenue", "value": 1}\n'
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(header + b'{"userId": "u1", "name": "add_revenue", "value": 10}\n')
    b.write_bytes(header + b'{"userId": "u2", "name": "add_revenue", "value": 20}\n')
    assert applied(process(a, cwd=tmp_path)) == [2]
    line = refused(process(b, cwd=tmp_path), b, "same line", str(a.resolve()))
    assert "Process only one of them" in line
    refused(process(a, b, cwd=tmp_path), b)
    assert db_totals(dsn) == {"u1": 11}
    # Renamed, `a` keeps its progress; `b` is still told apart from it.
    c = tmp_path / "c.jsonl"
    a.rename(c)
    with open(c, "ab") as f:
        f.write(b'{"userId": "u1", "name": "add_revenue", "value": 100}\n')
    assert applied(process(c, cwd=tmp_path)) == [1]
    refused(process(b, cwd=tmp_path), b, str(c.resolve()))
    assert db_totals(dsn) == {"u1": 111}


def test_send_source_replaced_at_the_same_path_counts_by_content(dsn, tmp_path):
    """Files replaced at one path: the same bytes up to a line are the same event, whatever the
    path or the sender's state; a line that differs (or follows one that does) is new."""
    source = tmp_path / "events.jsonl"
    versions = [tmp_path / f"v{i}.jsonl" for i in range(4)]
    generate(versions[0], 2000, "--users", "60", "--seed", "70")
    generate(versions[1], 3000, "--users", "60", "--seed", "71")
    # v2: the same first line as v1, different lines after it; v3: v1's first 10 lines only
    generate(tmp_path / "rest.jsonl", 3500, "--users", "60", "--seed", "72")
    v1_lines = versions[1].read_bytes().splitlines(keepends=True)
    versions[2].write_bytes(v1_lines[0] + (tmp_path / "rest.jsonl").read_bytes())
    versions[3].write_bytes(b"".join(v1_lines[:10]))
    notes = []
    with Serve(tmp_path) as serve:
        send = evtool_cmd("send", str(source), "--url", serve.url, "--json")
        for i, version in enumerate(versions):
            tmp = tmp_path / "incoming"
            tmp.write_bytes(version.read_bytes())
            os.replace(tmp, source)
            result = subprocess.run(send, cwd=tmp_path, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr
            report = json.loads(result.stdout)
            assert report["sent"] == len(version.read_bytes().splitlines()), report
            if i >= 2:  # the first line sent before (v1's): the state says where it diverged
                assert str(source.resolve()) in report["new_source_reason"]
                assert f"Note: {report['new_source_reason']}" in result.stderr
                notes.append(report["new_source_reason"])
            else:  # a first line never sent: a new source, nothing to say
                assert report["new_source_reason"] is None
            # re-running the same version sends nothing more
            again = json.loads(subprocess.run(send, cwd=tmp_path, capture_output=True, text=True,
                                              timeout=120).stdout)
            assert again["sent"] == 0 and again["new_source_reason"] is None
    assert all("differs from what was sent before" in n for n in notes)
    result = process(tmp_path / "server-events.jsonl", cwd=tmp_path)
    # v2's first line and all of v3 are v1's lines at the same positions: duplicates
    assert applied(result) == [2000 + 3000 + 3500]
    rest = tmp_path / "v2-rest.jsonl"
    rest.write_bytes(b"".join(versions[2].read_bytes().splitlines(keepends=True)[1:]))
    assert db_totals(dsn) == file_totals(versions[0], versions[1], rest)
    assert len(journal_lines(tmp_path / "server-events.jsonl")) == 2000 + 3000 + 3501 + 10
