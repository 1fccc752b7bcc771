"""`evtool events USER`: the audit trail explains a total line by line, from the journals."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

from click.testing import CliRunner

from evtool import audit
from evtool.cli import cli
from evtool.processor import process
from evtool.store import Store

from .conftest import Serve, event_line, evtool, generate, totals

SRC = "0123456789abcdef"


def events_json(user: str, *args: str, cwd: Path) -> dict:
    proc = evtool("events", user, "--json", *args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def applied_sum(doc: dict) -> Decimal:
    """The applied lines' amounts, added and subtracted, summed here (not trusting applied_sum)."""
    total = Decimal(0)
    for e in doc["events"]:
        if e["status"] == "applied":
            total += Decimal(e["amount"]) * (1 if e["name"] == "add_revenue" else -1)
    return total


def statuses(doc: dict) -> list[tuple]:
    """(journal file name, line, status, duplicate of (name, line) or None)."""
    out = []
    for e in doc["events"]:
        of = e["duplicate_of"]
        out.append((Path(e["journal"]).name, e["line"], e["status"],
                    (Path(of["journal"]).name, of["line"]) if of else None))
    return out


def test_events_explain_the_total_line_by_line(dsn, tmp_path):
    """Through send, serve and process: re-sent lines, reused sender and opaque ids, invalid lines,
    an id reused with other content, and lines appended after processing. For every user the
    applied lines sum to `evtool revenue USER`, and each line has the verdict the processor gave."""
    source = tmp_path / "sales.jsonl"
    source.write_bytes(b"\n".join([
        event_line("alice", "10", time="2026-11-20T10:00:00Z"),                   # 1
        event_line("bob", "7"),                                                    # 2
        event_line("alice", "2.50", "order-1", time="2026-11-20T11:00:00Z"),      # 3 opaque id
        event_line("alice", "2.5", "order-1", time="2026-11-20T11:00:09Z"),       # 4 the same event again
        event_line("alice", "3", name="subtract_revenue", time="2026-11-21T09:00:00Z"),  # 5
    ]) + b"\n")
    with Serve(tmp_path) as serve:
        evtool("send", str(source), "--url", serve.url, cwd=tmp_path, check=True)
        evtool("send", str(source), "--url", serve.url, "--from-start", cwd=tmp_path, check=True)  # re-sent
    served = tmp_path / "server-events.jsonl"
    sent = served.read_bytes().splitlines()
    assert len(sent) == 10
    # A client's own file, processed directly: a copy of a served line (its sender id again),
    # invalid lines, an id reused with other content, and a user id written with an escape.
    client = tmp_path / "client.jsonl"
    client.write_bytes(b"\n".join([
        event_line("carol", "4", "order-2"),                                       # 1
        sent[0],                                                                   # 2 alice's line 1 again
        event_line("alice", "-1"),                                                 # 3 invalid
        event_line("alice", "99", "order-1"),                                      # 4 order-1, other content
        b'{"userId": "al\\u0069ce", "name": "add_revenue", "value": 1}',          # 5 alice, escaped
        event_line("alice", "2.5", "order-1"),                                     # 6 order-1 once more
        b'{"userId": "alice", "name": "add_revenue", "value": ',                  # 7 not JSON
    ]) + b"\n")
    proc = evtool("process", str(served), str(client), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with served.open("ab") as f:  # appended after processing: pending
        f.write(event_line("alice", "5") + b"\n")
    with client.open("ab") as f:
        f.write(event_line("alice", "6", "order-3") + b"\n" + event_line("alice", "7"))  # last: unfinished

    for user in ("alice", "bob", "carol"):
        doc = events_json(user, cwd=tmp_path)
        revenue = evtool("revenue", user, cwd=tmp_path, check=True).stdout.strip()
        assert applied_sum(doc) == Decimal(revenue) == Decimal(doc["applied_sum"]), (user, doc)
        assert doc["revenue"] == revenue and doc["explains_total"] is True
    doc = events_json("alice", cwd=tmp_path)
    # served: alice's lines at 1, 3, 4, 5, then the re-sent 6, 8, 9, 10 (bob at 2 and 7), pending 11
    s, c = "server-events.jsonl", "client.jsonl"
    assert statuses(doc) == [
        (s, 1, "applied", None), (s, 3, "applied", None), (s, 4, "duplicate", (s, 3)),
        (s, 5, "applied", None),
        (s, 6, "duplicate", (s, 1)), (s, 8, "duplicate", (s, 3)), (s, 9, "duplicate", (s, 3)),
        (s, 10, "duplicate", (s, 5)), (s, 11, "pending", None),
        (c, 2, "duplicate", (s, 1)), (c, 3, "rejected", None), (c, 4, "rejected", None),
        (c, 5, "applied", None),
        (c, 6, "duplicate", (s, 3)), (c, 7, "rejected", None), (c, 8, "pending", None),
    ]
    assert Decimal(doc["revenue"]) == Decimal("10") + Decimal("2.5") - 3 + 1
    by_line = {(Path(e["journal"]).name, e["line"]): e for e in doc["events"]}
    assert by_line[(c, 3)]["reason"] == "value must be >= 0"
    assert by_line[(c, 4)]["reason"].startswith("eventId order-1 was already applied with different content")
    assert "malformed JSON" in by_line[(c, 7)]["reason"]
    assert by_line[(s, 3)]["amount"] == "2.5" and by_line[(s, 3)]["id"] == "order-1"
    assert by_line[(s, 3)]["time"] == "2026-11-20T11:00:00Z" and by_line[(s, 5)]["name"] == "subtract_revenue"
    assert by_line[(s, 1)]["id"].startswith(by_line[(s, 6)]["id"][:17])  # a sender id, the same
    assert doc["counts"] == {"applied": 4, "duplicate": 7, "rejected": 3, "pending": 2}

    # The text form: a line per journal line, then the sum against the stored total.
    text = evtool("events", "alice", cwd=tmp_path, check=True).stdout.splitlines()
    assert text[0].split() == ["JOURNAL:LINE", "EVENT", "TIME", "NAME", "AMOUNT", "ID", "STATUS"]
    assert text[3].startswith("server-events.jsonl:4 ")
    assert text[3].endswith("duplicate of server-events.jsonl:3")
    assert text[-1] == ("4 applied, 7 duplicate, 3 rejected, 2 pending; all applied lines sum to 10.5"
                        " = stored total 10.5")

    # Processing the rest turns the pending lines into applied ones, and the sum follows.
    evtool("process", str(served), str(client), cwd=tmp_path, check=True)
    doc = events_json("alice", cwd=tmp_path)
    assert doc["counts"]["pending"] == 0 and doc["revenue"] == "21.5" and applied_sum(doc) == Decimal("21.5")


def test_filters_usage_and_unknown_user(dsn, tmp_path):
    journal = tmp_path / "j.jsonl"
    journal.write_bytes(b"\n".join([
        event_line("u", "1", time="2026-11-20T10:00:00Z"),
        event_line("u", "2", "x-1", time="2026-11-21T10:00:00Z"),
        event_line("u", "2", "x-1", time="2026-11-21T10:00:00Z"),
        event_line("u", "4"),
        event_line("u10", "8"),  # contains "u" as bytes: parsed, not listed
    ]) + b"\n")
    evtool("process", str(journal), cwd=tmp_path, check=True)
    doc = events_json("u", str(journal), "--since", "2026-11-21", cwd=tmp_path)
    assert [(e["line"], e["status"]) for e in doc["events"]] == [(2, "applied"), (3, "duplicate")]
    assert doc["applied_sum"] == "7" and doc["explains_total"] is True  # the sum covers every line
    doc = events_json("u", str(journal), "--until", "2026-11-21T10:00:00Z", cwd=tmp_path)
    assert [e["line"] for e in doc["events"]] == [1]  # until is exclusive; a line without time: in no window
    doc = events_json("u", str(journal), "--status", "duplicate", cwd=tmp_path)
    assert [e["line"] for e in doc["events"]] == [3] and doc["counts"]["duplicate"] == 1
    bad = evtool("events", "u", "--status", "lost", cwd=tmp_path)
    assert bad.returncode == 2 and "lost" in bad.stderr
    bad = evtool("events", "u", "--since", "2026-11-22", "--until", "2026-11-21", cwd=tmp_path)
    assert bad.returncode == 2 and "--since must be before --until" in bad.stderr
    unknown = evtool("events", "nobody", str(journal), cwd=tmp_path)
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.strip() == ("Error: unknown user 'nobody': no events applied for it, and no line "
                                      "of it in the 1 journal(s) read")
    assert "EVENT time" in evtool("events", "--help").stdout
    gone = evtool("events", "u", str(tmp_path / "nothere.jsonl"), "--json", cwd=tmp_path)
    assert gone.returncode == 0 and json.loads(gone.stdout)["explains_total"] is False
    assert f"warning: journal {tmp_path / 'nothere.jsonl'} is not on disk" in gone.stderr


def test_default_journals_rotated_and_missing(dsn, tmp_path):
    """Without JOURNALS: every journal the database knows, found as `status` finds it (a rotated
    copy too); a journal gone from disk is named on stderr, and its applied lines are missing
    from the sum, which says so."""
    first = tmp_path / "server-events.jsonl"
    first.write_bytes(event_line("u", "1", "id-1") + b"\n" + event_line("u", "2") + b"\n")
    evtool("process", str(first), cwd=tmp_path, check=True)
    first.rename(tmp_path / "server-events.jsonl.1")  # rotated
    first.write_bytes(event_line("v", "3") + b"\n" + event_line("u", "1", "id-1") + b"\n"
                      + event_line("u", "4") + b"\n")
    evtool("process", str(first), cwd=tmp_path, check=True)
    other = tmp_path / "other.jsonl"
    other.write_bytes(event_line("u", "8", "id-2") + b"\n")
    evtool("process", str(other), cwd=tmp_path, check=True)
    with first.open("ab") as f:
        f.write(event_line("u", "16") + b"\n")
    doc = events_json("u", cwd=tmp_path)
    assert statuses(doc) == [
        ("server-events.jsonl.1", 1, "applied", None), ("server-events.jsonl.1", 2, "applied", None),
        ("server-events.jsonl", 2, "duplicate", ("server-events.jsonl.1", 1)),
        ("server-events.jsonl", 3, "applied", None), ("server-events.jsonl", 4, "pending", None),
        ("other.jsonl", 1, "applied", None),
    ]
    assert doc["revenue"] == "15" and applied_sum(doc) == 15
    # The first journal deleted: its lines are gone, the duplicate still names where id-1 was applied.
    (tmp_path / "server-events.jsonl.1").unlink()
    proc = evtool("events", "u", "--json", cwd=tmp_path)
    assert proc.returncode == 0
    doc = json.loads(proc.stdout)
    assert statuses(doc)[0] == ("server-events.jsonl", 2, "duplicate", ("server-events.jsonl", 1))
    # the path recorded when it was processed, and a note that it was not read
    assert doc["events"][0]["duplicate_of"]["journal"] == str(tmp_path / "server-events.jsonl")
    assert doc["events"][0]["note"] == "the applied line is in a journal not read"
    assert doc["explains_total"] is False and doc["applied_sum"] == "12"
    assert [j["state"] for j in doc["journals"]] == ["missing", "ok", "ok"]
    assert "is not on disk: its lines are not listed" in proc.stderr
    assert "the applied lines sum to 12, the stored total is 15" in proc.stderr


def test_reapplied_lines_are_applied(dsn, tmp_path):
    """A line rejected by `process --strict` and applied by `rejects --reapply` counts once; a later
    line with its id is a duplicate of it."""
    a = tmp_path / "a.jsonl"
    a.write_bytes(event_line("u", '"5"', "id-1") + b"\n" + event_line("u", '"3"') + b"\n"
                  + event_line("u", "1", f"{SRC}:1:00000000000000aa") + b"\n")
    run = CliRunner()
    assert run.invoke(cli, ["process", str(a), "--strict"]).exit_code == 0
    assert run.invoke(cli, ["rejects", "--reapply"]).exit_code == 0
    b = tmp_path / "b.jsonl"
    b.write_bytes(event_line("u", "5", "id-1") + b"\n"
                  + event_line("u", "1", f"{SRC}:1:00000000000000aa") + b"\n")
    assert run.invoke(cli, ["process", str(b)]).exit_code == 0
    result = run.invoke(cli, ["events", "u", str(a), str(b), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert statuses(doc) == [("a.jsonl", 1, "applied", None), ("a.jsonl", 2, "applied", None),
                             ("a.jsonl", 3, "applied", None), ("b.jsonl", 1, "duplicate", ("a.jsonl", 1)),
                             ("b.jsonl", 2, "duplicate", ("a.jsonl", 3))]
    assert "re-applied" in doc["events"][0]["note"] and doc["revenue"] == "9" and applied_sum(doc) == 9
    # Given in another order, or twice, the journals are read once each, in the order processed.
    again = json.loads(run.invoke(cli, ["events", "u", str(b), str(a), str(b), "--json"]).stdout)
    assert again == doc


def test_every_users_sum_equals_the_total(dsn, tmp_path):
    """A generated workload (ids, retries, invalid lines), processed in small batches: for every
    user, the applied lines sum to the stored total (the library, one scan per user)."""
    journal = tmp_path / "gen.jsonl"
    expected = generate(journal, 3000, "--users", "40", "--with-ids", "0.5", "--repeat-ids", "0.3",
                        "--invalid", "0.05", "--decimals", "0.5")
    process(dsn, [journal], batch_bytes=20_000)  # many batches: repeats across batches and within
    stored = totals(dsn)
    assert {u: Decimal(v) for u, v in expected["per_user"].items()} == stored
    with Store.connect(dsn) as store:
        for user, total in stored.items():
            t = audit.trail(store, user, [journal])
            assert Decimal(t.applied_sum) == total and t.explains_total, user
            assert t.counts["pending"] == 0
        assert sum(audit.trail(store, u, [journal]).counts["duplicate"] for u in stored) > 100
