"""`evtool rejects`: listing rejected lines, and re-applying them exactly once."""

from __future__ import annotations

import json
import threading
import time

import psycopg
from click.testing import CliRunner

from evtool.cli import cli
from evtool.processor import process
from evtool.rejects import reapply
from evtool.store import Store

from .conftest import totals

SRC = "0123456789abcdef"


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def line(user: str, value, event_id: str | None = None, **extra) -> str:
    obj = {"userId": user, "name": "add_revenue", "value": value, **extra}
    if event_id:
        obj["eventId"] = event_id
    return json.dumps(obj) + "\n"


def test_list_filters_and_json(dsn, tmp_path):
    journal = tmp_path / "j.jsonl"
    refund = b'{"userId": "a", "name": "refund", "value": 1}\n'
    journal.write_bytes(
        line("a", 1).encode()
        + refund
        + b'{"userId": "a", "name": "add_revenue", "value": -1}\n'
        + b'{"userId": "\xff", "name": "add_revenue", "value": 1\n'
    )
    other = tmp_path / "k.jsonl"
    other.write_text(line("b", 1) + '{"userId": "b", "name": "add_revenue", "value": -2}\n')
    process(dsn, [journal, other])
    result = run("rejects")
    assert result.exit_code == 0, result.output
    out = result.output.splitlines()
    assert out[0].startswith(f"{journal}:2  20") and out[0].endswith(
        "  name must be add_revenue or subtract_revenue")
    assert out[1] == '    {"userId": "a", "name": "refund", "value": 1}'
    assert out[4].startswith(f"{journal}:4  ") and "malformed JSON" in out[4]
    assert out[5] == '    {"userId": "\ufffd", "name": "add_revenue", "value": 1'  # decoded with replacement
    assert out[6].startswith(f"{other}:2  ")
    assert out[-1] == "4 rejected line(s)"
    rows = [json.loads(x) for x in run("rejects", "--json", "--reason", "VALUE MUST").output.splitlines()]
    assert [(r["path"], r["line"]) for r in rows] == [(str(journal), 3), (str(other), 2)]
    assert set(rows[0]) == {"path", "line", "offset", "reason", "rejected_at", "raw", "reapplied_at",
                            "reapply_outcome"}
    assert rows[0]["offset"] == len(line("a", 1)) + len(refund) and rows[0]["reason"] == "value must be >= 0"
    assert rows[0]["reapplied_at"] is None and rows[0]["rejected_at"].startswith("20")
    only_k = run("rejects", "--json", "--file", str(other)).output.splitlines()
    assert [json.loads(x)["line"] for x in only_k] == [2]
    limited = run("rejects", "--limit", "1")
    assert limited.output.splitlines()[-1] == "1 rejected line(s) (--limit reached)"


def journal_with_fixable_lines(tmp_path):
    """Lines that `process --strict` rejects and normalization accepts, under every identity kind."""
    journal = tmp_path / "j.jsonl"
    journal.write_text(
        line("a", 1)                                   # 1 valid
        + line("a", "10")                              # 2 no id: identity is its position
        + line("a", "10")                              # 3 an identical line: another sale
        + line("b", "2.5", "~r-1")                     # 4 receiver id: position too
        + line("c", 7, f"{SRC}:5")                     # 5 sender id, valid: applied now
        + line("c", "7", f"{SRC}:5")                   # 6 the same sender event again: a duplicate
        + line("c", "3", f"{SRC}:6")                   # 7 sender id, fixable
        + line("d", "4", "opaque-1")                   # 8 opaque id, fixable
        + line("d", "4", "opaque-1")                   # 9 ... sent twice: a duplicate
        + line("e", "1e3")                             # 10 still invalid, with a new reason
        + json.dumps({"user_id": "f", "name": "add_revenue", "value": 1}) + "\n"  # 11 alias
    )
    return journal


def test_reapply_applies_each_line_once(dsn, tmp_path):
    journal = journal_with_fixable_lines(tmp_path)
    first = run("process", str(journal), "--strict", "--json")
    assert json.loads(first.stdout)["rejected"] == 9
    assert totals(dsn) == {"a": 1, "c": 7}

    result = run("rejects", "--reapply", "--json")
    assert result.exit_code == 0, result.output
    rep = json.loads(result.output)
    assert {k: rep[k] for k in ("applied", "duplicates", "still_invalid", "reasons_updated", "users")} == {
        "applied": 6, "duplicates": 2, "still_invalid": 1, "reasons_updated": 1, "users": 5}
    assert [(x["line"], x["outcome"]) for x in rep["lines"]] == [
        (2, "applied"), (3, "applied"), (4, "applied"), (6, "duplicate"), (7, "applied"),
        (8, "applied"), (9, "duplicate"), (11, "applied")]
    want = {"a": 21, "b": 2.5, "c": 10, "d": 4, "f": 1}
    assert totals(dsn) == want

    # nothing is applied twice: not by a second reapply, nor by processing again
    again = json.loads(run("rejects", "--reapply", "--json").output)
    assert (again["applied"], again["duplicates"], again["still_invalid"]) == (0, 0, 1)
    process(dsn, [journal])
    assert totals(dsn) == want

    # the reject rows stay, marked; the still-invalid one has its new reason
    pending = [json.loads(x) for x in run("rejects", "--json").output.splitlines()]
    assert [(r["line"], r["reason"][:25]) for r in pending] == [(10, 'value "1e3" is not a plai')]
    everything = [json.loads(x) for x in run("rejects", "--json", "--all").output.splitlines()]
    assert len(everything) == 9 and everything[0]["reapply_outcome"] == "applied"
    # the journal's counters moved from rejected to applied / duplicates
    s = json.loads(run("status", str(journal), "--json", "--url", "http://127.0.0.1:9").output)
    j = s["journals"][0]
    assert (j["applied"], j["duplicates"], j["rejected"], j["rejects_pending"]) == (8, 2, 1, 1)
    # and the revenue log has them, so report by name agrees with the totals
    r = json.loads(run("report", "--json").output)
    assert r["events"]["add_revenue"] == {"count": 8, "amount": 38.5}


def test_reapply_filters_and_strict(dsn, tmp_path):
    journal = journal_with_fixable_lines(tmp_path)
    process(dsn, [journal], strict=True)
    rep = json.loads(run("rejects", "--reapply", "--reason", "only when not strict", "--strict",
                         "--json").output)
    assert (rep["applied"], rep["still_invalid"]) == (0, 9)
    assert totals(dsn) == {"a": 1, "c": 7}
    text = run("rejects", "--reapply", "--file", str(tmp_path / "elsewhere.jsonl"))
    assert text.output.strip() == ("re-applied 0 lines, 0 were already applied, 0 still invalid "
                                   "(0 with a new reason), 0 users touched")
    text = run("rejects", "--reapply", "--file", str(journal))
    assert text.output.splitlines()[0] == f"{journal}:2: re-applied"
    assert f"{journal}:6: already applied (duplicate)" in text.output


def test_reapply_waits_for_the_journal_lock(dsn, tmp_path):
    """A reapply serializes with `process` on the journal's progress row."""
    journal = journal_with_fixable_lines(tmp_path)
    process(dsn, [journal], strict=True)
    done = threading.Event()

    def worker():
        with Store.connect(dsn) as store:
            reapply(store)
        done.set()

    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT 1 FROM journal_files FOR UPDATE")  # what a processor's batch holds
        t = threading.Thread(target=worker)
        t.start()
        time.sleep(0.5)
        assert not done.is_set()
        conn.commit()
    t.join(10)
    assert done.is_set()
    assert totals(dsn)["a"] == 21
