"""Scenario 8: junk written straight into a journal (not through `serve`).

Each bad line is rejected once, with its reason, and recorded; everything else is applied; the
summary says how many were rejected and a warning goes to stderr; the exit status is 0 by
default and 1 with `--fail-on-reject` (the README's decision).
"""

from __future__ import annotations

import json
import subprocess
from decimal import Decimal

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evtool import events
from evtool.errors import InvalidEvent
from evtool.processor import process

from .helpers import Model, db_totals, evtool_cmd, reset

GOOD = [
    b'{"userId": "u1", "name": "add_revenue", "value": 100}',
    b'{"userId": "u2", "name": "subtract_revenue", "value": 0.25}',
    b'{"userId": "u1", "name": "add_revenue", "value": 1, "eventId": "e-1"}',
    b'{"userId": "u1", "name": "add_revenue", "value": 1, "eventId": "e-1"}',  # a retry: once
    b'{"userId": "u3", "name": "add_revenue", "value": 7, "eventId": "0123456789abcdef:5"}',
    b'{"userId": "u3", "name": "add_revenue", "value": 7, "eventId": "0123456789abcdef:5"}',  # once
    b'{"userId": "u\xc3\xa9", "name": "add_revenue", "value": 12.50, "extra": {"a": [1, 2]}}',
    b'{"user_id": "u4", "name": "add_revenue", "value": "3.5"}',  # normalized: alias, plain string
    # longer than --batch-mb 1
    b'{"userId": "u2", "name": "add_revenue", "value": 1, "pad": "' + b"p" * 3_000_000 + b'"}',
]
WANT = {"u1": Decimal(101), "u2": Decimal("0.75"), "u3": Decimal(7), "ué": Decimal("12.5"),
        "u4": Decimal("3.5")}

JUNK = [
    b'{"userId": "u1", "name": "add_revenue", "value": ',
    b'{"userId": "u1", "name": "add_revenue", "value": 5',
    b"not json at all",
    b'["an", "array"]', b'"a string"', b"42", b"null", b"true", b"{}",
    b'{"userId": 5, "name": "add_revenue", "value": 1}',
    b'{"userId": "", "name": "add_revenue", "value": 1}',
    b'{"userId": "' + b"x" * 257 + b'", "name": "add_revenue", "value": 1}',
    b'{"userId": "a\\u0000b", "name": "add_revenue", "value": 1}',
    b'{"userId": "a\x00b", "name": "add_revenue", "value": 1}',
    b"\x00\x00\x00",
    b'{"userId": "\xff\xfe", "name": "add_revenue", "value": 1}',
    b'{"userId": "\\ud800", "name": "add_revenue", "value": 1}',
    b'{"userId": "u1", "name": "refund", "value": 5}',
    b'{"userId": "u1", "name": "add_revenue", "value": -5}',
    b'{"userId": "u1", "name": "add_revenue", "value": true}',
    b'{"userId": "u1", "name": "add_revenue", "value": "abc"}',
    b'{"userId": "u1", "name": "add_revenue", "value": "-5"}',
    b'{"userId": "u1", "name": "add_revenue", "value": "1e3"}',
    b'{"userId": "u1", "name": "add_revenue", "value": null}',
    b'{"userId": "u1", "name": "add_revenue", "value": [1]}',
    b'{"userId": "u1", "name": "add_revenue", "value": 1e400}',
    b'{"userId": "u1", "name": "add_revenue", "value": 100000000000000000000}',
    b'{"userId": "u1", "name": "add_revenue", "value": 0.1234567890123456789}',
    b'{"userId": "u1", "name": "add_revenue", "value": NaN}',
    b'{"userId": "u1", "name": "add_revenue"}',
    b'{"userId": "u1", "value": 1}',
    b'{"name": "add_revenue", "value": 1}',
    b'{"userId": "u1", "name": "add_revenue", "value": 1, "eventId": "' + b"i" * 129 + b'"}',
    b'{"userId": "u1", "name": "add_revenue", "value": 1, "eventId": ""}',
    b'{"userId": "u1", "name": "add_revenue", "value": 1, "eventId": 7}',
    b'{"userId": "u1", "name": "add_revenue", "value": 1, "eventId": "a\\u0001b"}',
    b'{"userId": "u1", "user_id": "u2", "name": "add_revenue", "value": 1}',
    b'{"userId": "u1", "name": "add_revenue", "value": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"userId": "u1", "name": "add_revenue", "pad": "' + b"j" * 3_000_000,  # huge and unterminated
]
BLANK = [b"", b"   ", b"\r", b"\t"]


def interleave() -> bytes:
    lines = []
    for i in range(max(len(GOOD), len(JUNK))):
        lines += GOOD[i:i + 1] + JUNK[i:i + 1] + BLANK[i % len(BLANK):i % len(BLANK) + 1]
    return b"\n".join(lines) + b"\n"


def rejected_rows(dsn: str) -> list[tuple[int, bytes, str]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute('SELECT line_no, raw, reason FROM rejected_lines ORDER BY "offset"').fetchall()


def test_junk_lines_are_rejected_once_with_reasons_and_the_rest_applied(dsn, tmp_path):
    journal = tmp_path / "server-events.jsonl"
    journal.write_bytes(interleave())
    cmd = evtool_cmd("process", "--batch-mb", "1", str(journal))
    first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr  # rejects are not an error exit by default
    assert "Traceback" not in first.stderr
    assert f"rejected {len(JUNK)} lines" in first.stdout, first.stdout
    assert f"Warning: {len(JUNK)} line(s) rejected" in first.stderr
    assert db_totals(dsn) == WANT
    rows = rejected_rows(dsn)
    assert len(rows) == len(JUNK)
    by_line = {line_no: (raw, reason) for line_no, raw, reason in rows}
    all_lines = journal.read_bytes().split(b"\n")
    for line_no, (raw, reason) in by_line.items():
        assert bytes(raw) == all_lines[line_no - 1].rstrip(b"\r") and reason.strip()
    assert sorted(bytes(raw) for raw, _ in by_line.values()) == sorted(JUNK)
    # Re-runs reject nothing again, apply nothing again, and exit 0 even with --fail-on-reject.
    again = subprocess.run([*cmd, "--json", "--fail-on-reject"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert (report["applied"], report["rejected"], report["duplicates"]) == (0, 0, 0)
    assert len(rejected_rows(dsn)) == len(JUNK) and db_totals(dsn) == WANT


def test_fail_on_reject_exits_1_when_this_run_rejected_something(dsn, tmp_path):
    journal = tmp_path / "server-events.jsonl"
    journal.write_bytes(GOOD[0] + b"\n" + JUNK[0] + b"\n")
    result = subprocess.run([*evtool_cmd("process", "--json", "--fail-on-reject", str(journal))],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "1 line(s) rejected" in result.stderr
    report = json.loads(result.stdout)
    assert report["rejected"] == 1 and report["files"][0]["rejects"][0]["line"] == 2
    assert report["files"][0]["rejects"][0]["reason"].startswith("malformed JSON")
    assert db_totals(dsn) == {"u1": 100}  # the good line is applied all the same


# -- property: any bytes at all ------------------------------------------------------------------

line_kinds = st.one_of(
    st.sampled_from(GOOD[:-1]),
    st.sampled_from(JUNK[:-2]),
    st.sampled_from(BLANK),
    st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"")),
    st.tuples(st.sampled_from(GOOD[:-1]), st.integers(0, 60), st.binary(min_size=1, max_size=3)).map(
        lambda t: (t[0][:t[1]] + t[2] + t[0][t[1]:]).replace(b"\n", b"")),
)


def expected(lines: list[bytes]) -> tuple[Model, int]:
    """The model fed by the one shared validator, and the number of lines it refuses."""
    model, rejected = Model(), 0
    for raw in lines:
        raw = raw.removesuffix(b"\r")
        if not raw or raw.isspace():
            continue
        try:
            ev = events.parse_line(raw, allow_reserved=True)
        except InvalidEvent:
            rejected += 1
            continue
        model.feed(ev.user_id, ev.name, Decimal(ev.value), ev.event_id)
    return model, rejected + model.conflicts  # an id reused with other content is a reject


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(lines=st.lists(line_kinds, min_size=1, max_size=40))
def test_any_bytes_each_line_applied_or_rejected_once(dsn, tmp_path_factory, lines):
    journal = tmp_path_factory.mktemp("j") / "j.jsonl"
    journal.write_bytes(b"\n".join(lines) + b"\n")
    reset(dsn)
    model, rejected = expected(lines)
    report = process(dsn, [journal], batch_bytes=256)
    assert (report.applied, report.duplicates, report.rejected) == (model.applied, model.duplicates, rejected)
    assert db_totals(dsn) == {u: v for u, v in model.totals.items()}
    assert len(rejected_rows(dsn)) == rejected
    again = process(dsn, [journal])
    assert (again.applied, again.duplicates, again.rejected) == (0, 0, 0)
