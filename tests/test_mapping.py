"""Inputs of any shape (issue 13 item 2): a declared mapping used by send, serve and process.

Real PostgreSQL (the `dsn` fixture), and real serve/send/process subprocesses where the
behaviour is theirs.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from evtool import mapping, parser
from evtool.errors import InvalidEvent

from .conftest import Serve, evtool, journal_lines, totals

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
MAPPING = """
[fields]
user  = ["client_id", "customer.id"]
name  = ["type", "event"]
value = ["amount", "payload.amount"]
time  = ["at", "payload.when"]
id    = "txn_id"

[names]
add_revenue      = ["purchase", "order"]
subtract_revenue = "refund"
"""
# samples/mixed.jsonl under samples/mixed.toml (the README shows the same figures)
PER_DAY = {"2026-11-20": Decimal("100"), "2026-11-21": Decimal("260.49"),
           "2026-11-22": Decimal("29.5"), "2026-11-23": Decimal("19.25")}
PER_USER = {"alice": Decimal("90"), "bob": Decimal("49.99"), "carol": Decimal("250"),
            "dave": Decimal("19.25")}


def per_day(cwd: Path) -> dict[str, Decimal]:
    out = evtool("report", "--by", "day", "--json", cwd=cwd, check=True).stdout
    return {p["period"]: Decimal(str(p["revenue"])) for p in json.loads(out, parse_float=Decimal)["periods"]}


def test_mixed_shapes_through_send_serve_process_give_the_per_day_totals(dsn, tmp_path):
    """The sample's shapes and time formats, under its mapping: serve and send with --mapping,
    process with EVTOOL_MAPPING; the journal keeps the client's text."""
    source = SAMPLES / "mixed.jsonl"
    toml = SAMPLES / "mixed.toml"
    with Serve(tmp_path, "--mapping", str(toml)) as serve:
        sent = evtool("send", str(source), "--url", serve.url, "--mapping", str(toml), "--json",
                      cwd=tmp_path)
        assert sent.returncode == 0, sent.stderr
        report = json.loads(sent.stdout)
        assert report["sent"] == 9 and report["skipped_invalid"] == 2
        assert {"line": 10, "reason": "ambiguous user: client_id and userId are both given and differ"
                } in report["invalid"]
    stored = journal_lines(tmp_path / "server-events.jsonl")
    client = source.read_bytes().splitlines()[:9]
    assert len(stored) == 9
    for mine, kept in zip(client, stored, strict=True):  # the client's text, an eventId added at most
        assert kept == mine or (kept.startswith(mine[:-1] + b',"eventId":"') and b"txn_id" not in mine)
    done = evtool("process", "--json", cwd=tmp_path, env={"EVTOOL_MAPPING": str(toml)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["applied"] == 8  # t-1002 came twice: once
    assert totals(dsn) == PER_USER
    assert per_day(tmp_path) == PER_DAY
    # the audit trail reads the journal under the same mapping: each total, line by line
    for user, total in PER_USER.items():
        out = evtool("events", user, "--json", "--mapping", str(toml), cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        trail = json.loads(out.stdout, parse_float=Decimal)
        assert Decimal(str(trail["applied_sum"])) == total and trail["explains_total"] is True, trail


def test_without_the_mapping_the_same_journal_is_rejected_not_guessed(dsn, tmp_path):
    """The mapping is what makes the client shapes events: without it they are rejects."""
    journal = tmp_path / "server-events.jsonl"
    journal.write_bytes(b'{"client_id":"bob","type":"purchase","amount":5,"at":"2026/11/22"}\n')
    done = evtool("process", "--json", str(journal), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rejected"] == 1
    (tmp_path / "m.toml").write_text(MAPPING)
    with journal.open("ab") as f:
        f.write(b'{"client_id":"bob","type":"purchase","amount":5,"at":"2026/11/22"}\n')
    done = evtool("process", "--json", "--mapping", "m.toml", str(journal), cwd=tmp_path)
    assert json.loads(done.stdout)["applied"] == 1
    assert totals(dsn) == {"bob": 5}


@pytest.mark.parametrize(("line", "reason"), [
    (b'{"client_id":"a","userId":"b","type":"purchase","amount":1}',
     "ambiguous user: client_id and userId are both given and differ"),
    (b'{"client_id":"a","customer":{"id":"b"},"type":"purchase","amount":1}',
     "ambiguous user: client_id and customer.id are both given and differ"),
    (b'{"client_id":"a","type":"purchase","amount":1,"payload":{"amount":2}}',
     "ambiguous value: amount and payload.amount are both given and differ"),
    (b'{"client_id":"a","type":"purchase","name":"subtract_revenue","amount":1}',
     "ambiguous name: type and name are both given and differ"),
    (b'{"client_id":"a","type":"purchase","amount":1,"at":"2026/11/22","ts":1795328100}',
     "ambiguous time: at and ts are both given and differ"),
    (b'{"client_id":"a","type":"purchase","amount":1,"txn_id":"x","eventId":"y"}',
     "ambiguous id: txn_id and eventId are both given and differ"),
    (b'{"client_id":"a","type":"gift","amount":1}', 'name "gift" (from type) is not add_revenue'),
    (b'{"client_id":"a","type":"purchase","amount":1,"at":"soon"}', 'at "soon" is not a time'),
    (b'{"type":"purchase","amount":1}', "no user field: the event has none of client_id, customer.id"),
])
def test_ambiguous_or_unmapped_lines_are_rejected_with_the_reason(dsn, tmp_path, line, reason):
    """Two candidate fields with different values are a reject naming both, never a guess; the
    processor records the reason (and agreeing candidates are fine)."""
    (tmp_path / "m.toml").write_text(MAPPING)
    journal = tmp_path / "j.jsonl"
    agree = b'{"client_id":"ok","userId":"ok","type":"order","name":"add_revenue","amount":3,"value":3}'
    journal.write_bytes(line + b"\n" + agree + b"\n")
    done = evtool("process", "--json", "--mapping", "m.toml", str(journal), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["rejected"] == 1 and summary["applied"] == 1
    rejects = evtool("rejects", "--json", cwd=tmp_path, check=True).stdout
    assert reason in json.loads(rejects.splitlines()[0])["reason"]
    assert totals(dsn) == {"ok": 3}


def test_serve_refuses_an_ambiguous_event_with_the_reason(dsn, tmp_path):
    (tmp_path / "m.toml").write_text(MAPPING)
    from .conftest import http

    with Serve(tmp_path, "--mapping", "m.toml") as serve:
        status, body, _ = http(f"{serve.url}/liveEvent", "POST",
                               b'{"client_id":"a","customer":{"id":"b"},"type":"order","amount":1}',
                               {"Authorization": "secret", "Content-Type": "application/json"})
        assert status == 422
        assert "ambiguous user: client_id and customer.id" in json.dumps(body)
        status, body, _ = http(f"{serve.url}/liveEvent", "POST",
                               b'{"customer":{"id":"b"},"type":"order","payload":{"amount":0.10}}',
                               {"Authorization": "secret", "Content-Type": "application/json"})
        assert status in (200, 201, 202), body
    line, = journal_lines(tmp_path / "server-events.jsonl")
    assert line.startswith(b'{"customer":{"id":"b"},"type":"order","payload":{"amount":0.10}')  # as sent


@pytest.mark.parametrize(("text", "says"), [
    ("[fields\nuser = 1", "is not valid TOML"),
    ("[fields]\nusr = \"client_id\"\n",
     "unknown field 'usr' in [fields] (known: user, name, value, time, id)"),
    ("[fields]\nuser = 3\n", "fields.user must be a field path or a list of them"),
    ("[fields]\nuser = \"a..b\"\n", "'a..b' is not a field path"),
    ("[names]\nadd_revenue = \"buy\"\nsubtract_revenue = \"buy\"\n",
     "'buy' is given for both add_revenue and subtract_revenue"),
    ("[names]\nadd = \"buy\"\n", "unknown name 'add' in [names]"),
    ("# nothing\n", "maps nothing"),
    ("title = \"x\"\n", "unknown table or key 'title'"),
])
@pytest.mark.parametrize("command", ["process", "send", "serve"])
def test_a_bad_mapping_file_is_one_clear_line_and_exit_1(tmp_path, text, says, command):
    (tmp_path / "bad.toml").write_text(text)
    (tmp_path / "events.jsonl").write_text("")
    args = {"process": ["process", "events.jsonl"], "send": ["send", "events.jsonl"],
            "serve": ["serve", "--port", "0"]}[command]
    result = evtool(*args, "--mapping", "bad.toml", cwd=tmp_path, timeout=30,
                    env={"EVTOOL_HOME": str(tmp_path / "home"), "EVTOOL_DSN": "postgresql://nobody@127.0.0.1:1/x"})
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: mapping bad.toml"), result.stderr
    assert says in lines[0]
    assert "Traceback" not in result.stderr


def test_a_missing_mapping_file_from_the_environment_says_which(tmp_path):
    result = evtool("process", "x.jsonl", cwd=tmp_path, timeout=30,
                    env={"EVTOOL_MAPPING": str(tmp_path / "nope.toml"), "EVTOOL_HOME": str(tmp_path)})
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: mapping file {tmp_path / 'nope.toml'} does not exist"


def test_status_shows_a_change_of_mapping_between_runs(dsn, tmp_path):
    """Batches record the mapping they were read under; a later run under another shows."""
    journal = tmp_path / "server-events.jsonl"
    (tmp_path / "m.toml").write_text(MAPPING)
    journal.write_bytes(b'{"client_id":"a","type":"order","amount":2}\n')
    evtool("process", "--mapping", "m.toml", cwd=tmp_path, check=True)
    evtool("db", "migrate", cwd=tmp_path, check=True)
    one = json.loads(evtool("status", "--json", cwd=tmp_path, check=True).stdout)["journals"][0]
    digest = mapping.load(tmp_path / "m.toml").digest
    assert one["mapping"] == digest and not one["mapping_changed"]
    journal.write_bytes(journal.read_bytes() + b'{"userId":"a","name":"add_revenue","value":1}\n')
    evtool("process", cwd=tmp_path, check=True)  # a re-run without the mapping
    two = json.loads(evtool("status", "--json", cwd=tmp_path, check=True).stdout)["journals"][0]
    assert two["mapping_changed"] and two["mapping"] == ""
    assert [(m["mapping"], m["lines"]) for m in two["mappings"]] == [(digest, 1), ("", 1)]
    text = evtool("status", cwd=tmp_path, check=True).stdout
    assert "mapping changed between runs" in text
    assert f"{digest} (m.toml): 1 lines" in text and "none (built-in shapes): 1 lines" in text
    assert totals(dsn) == {"a": 3}


def test_the_compiled_accessor_agrees_with_the_full_view():
    """The parse loop's accessor gives the full view's event, or None (then the view decides)."""
    m = mapping.parse(MAPPING, "m.toml")
    lines = (SAMPLES / "mixed.jsonl").read_bytes().splitlines() + [
        b'{"client_id":"a","type":"order","amount":2}',
        b'{"client_id":"a","type":"order","amount":2,"txn_id":null}',
        b'{"userId":"a","name":"add_revenue","value":2,"timestamp":"2026-11-23T09:00:00.123Z"}',
        b'{"client_id":"a","user_id":"a","type":"order","amount":2,"at":1795328100}',
        b'{"client_id":"a","type":"order","amount":2,"at":"2026-11-22T06:15:00+02:00"}',
        b'{"client_id":"a","type":"order","amount":2,"at":"bad"}', b'[1]', b'{"client_id":"a"}',
    ]
    fast = m.accessor(False)
    taken = 0
    for line in lines:
        obj = orjson.loads(line)
        got = fast(obj)
        try:
            want = m.view(orjson.loads(line), line)
        except InvalidEvent:
            assert got is None or got.get("name") not in mapping.NAMES or "userId" not in got, line
            continue
        if got is not None:
            taken += 1
            assert got == want, line
    assert taken >= 6  # the simple renames take the fast path


def test_parse_with_a_mapping_sums_like_the_validator(tmp_path):
    """parser.parse under the mapping: per (user, minute) sums of the sample, rejects with reasons."""
    m = mapping.load(SAMPLES / "mixed.toml")
    part = parser.parse((SAMPLES / "mixed.jsonl").read_bytes(), 0, mapping=m)
    assert part.fresh[("bob", "2026-11-21T01:30")] == [1, Decimal("19.99"), 0, 0]  # -02:00 is the next day
    assert part.fresh[("carol", "2026-11-21T08:00")] == [1, Decimal("250.5"), 0, 0]  # epoch seconds
    assert part.fresh[("alice", "2026-11-21T18:30")] == [0, 0, 1, 10]  # epoch milliseconds
    assert part.fresh[("dave", "2026-11-23T10:00")] == [2, Decimal("19.25"), 0, 0]
    assert [o[2] for o in part.opaque] == [("carol", "2026-11-22T00:00"), ("bob", "2026-11-22T06:15"),
                                           ("bob", "2026-11-22T06:15")]  # YYYY/MM/DD; the txn_id twice
    assert [r[1] for r in part.rejects] == [9, 10]


def test_the_epoch_shortcut_reads_times_as_eventtime_does():
    """mapping's integer-epoch shortcut gives eventtime.parse's instant, to the microsecond."""
    import random

    from evtool import eventtime

    rng = random.Random(13)
    values = [0, 1, 10**11 - 1, 10**11, 1795248000123, 253402300799, 253402300799000]
    values += [rng.randrange(0, 253402300799001) for _ in range(2000)]
    values += [rng.randrange(0, 10**11) for _ in range(2000)]
    for v in values:
        assert mapping._parse_time(v, "at") == eventtime.parse(v, "at"), v
    with pytest.raises(InvalidEvent, match="after the year 9999"):
        mapping._parse_time(253402300799001, "at")


def test_rejects_of_an_undeclared_shape_are_reapplied_under_a_mapping(dsn, tmp_path):
    """Processed before the mapping existed, the client's lines are rejects; `rejects --reapply
    --mapping` applies them once, and a second reapply changes nothing."""
    journal = tmp_path / "server-events.jsonl"
    journal.write_bytes(b'{"client_id":"bob","type":"order","amount":2.5,"at":"2026/11/22","txn_id":"t1"}\n'
                        b'{"client_id":"bob","type":"refund","amount":1,"at":1795328100}\n')
    done = json.loads(evtool("process", "--json", cwd=tmp_path, check=True).stdout)
    assert done["rejected"] == 2
    (tmp_path / "m.toml").write_text(MAPPING)
    usage = evtool("rejects", "--mapping", "m.toml", cwd=tmp_path)
    assert usage.returncode == 2 and "--mapping goes with --reapply" in usage.stderr
    again = json.loads(evtool("rejects", "--reapply", "--mapping", "m.toml", "--json", cwd=tmp_path,
                              check=True).stdout)
    assert again["applied"] == 2
    assert totals(dsn) == {"bob": Decimal("1.5")}
    evtool("rejects", "--reapply", "--mapping", "m.toml", cwd=tmp_path, check=True)
    assert totals(dsn) == {"bob": Decimal("1.5")}
    assert per_day(tmp_path) == {"2026-11-22": Decimal("1.5")}


def test_a_mapped_journal_sent_twice_counts_its_client_ids_once(dsn, tmp_path):
    """Client ids read through the mapping (txn_id), the file sent twice: the copy's lines are
    decided against what was recorded and taken back under the same mapping (the Python loop
    reads them: parser.take_back_lines), a retry within the file counting once either way."""
    sample = (SAMPLES / "mixed.jsonl").read_bytes().splitlines(keepends=True)
    lines = [raw for raw in sample if b"txn_id" in raw]
    assert len(lines) == 3  # carol's refund, bob's order and its retry
    journal = tmp_path / "j.jsonl"
    journal.write_bytes(b"".join(lines))
    args = ("process", "--mapping", str(SAMPLES / "mixed.toml"), "--json", str(journal))
    first = json.loads(evtool(*args, cwd=tmp_path, check=True).stdout)
    assert (first["applied"], first["duplicates"]) == (2, 1)
    want = {"carol": Decimal("-0.5"), "bob": Decimal("30")}
    assert totals(dsn) == want
    with open(journal, "ab") as f:
        f.write(b"".join(lines))
    again = json.loads(evtool(*args, cwd=tmp_path, check=True).stdout)
    assert (again["applied"], again["duplicates"], again["rejected"]) == (0, 3, 0)
    assert totals(dsn) == want
