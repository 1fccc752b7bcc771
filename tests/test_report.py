"""`evtool report` and `evtool revenue --all` on a real database."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
from click.testing import CliRunner

from evtool.cli import cli
from evtool.processor import process


def ev(user: str, value, name: str = "add_revenue") -> str:
    return f'{{"userId": "{user}", "name": "{name}", "value": {value}}}\n'


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def load(dsn, tmp_path, text: str, name: str = "j.jsonl") -> None:
    path = tmp_path / name
    with open(path, "a") as f:
        f.write(text)
    process(dsn, [path])


SAMPLE = (ev("user1", 100) + ev("user1", "0.1") + ev("user2", "0.2") + ev("user2", 5, "subtract_revenue")
          + ev("vip1", 1000) + ev("vip2", 7) + ev("vip2", 7, "subtract_revenue"))


def test_report_json(dsn, tmp_path):
    load(dsn, tmp_path, SAMPLE)
    result = run("report", "--json", "--top", "2")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "since": None, "until": None, "prefix": None,
        "revenue": 1095.3, "users": 4,
        "events": {"add_revenue": {"count": 5, "amount": 1107.3},
                   "subtract_revenue": {"count": 2, "amount": 12}},
        "top": [{"userId": "vip1", "revenue": 1000}, {"userId": "user1", "revenue": 100.1}],
        "bottom": [{"userId": "user2", "revenue": -4.8}, {"userId": "vip2", "revenue": 0}],
        "event_since": None, "event_until": None,
    }
    assert '"revenue":1095.3,' in result.output  # exact text, not a float's


def test_report_prefix_and_csv(dsn, tmp_path):
    load(dsn, tmp_path, SAMPLE)
    result = run("report", "--csv", "--prefix", "vip", "--top", "1")
    assert result.exit_code == 0, result.output
    assert result.output == (
        "section,name,count,amount\n"
        "total,revenue,2,1000\n"
        "events,add_revenue,2,1007\n"
        "events,subtract_revenue,1,7\n"
        "top,vip1,,1000\n"
        "bottom,vip2,,0\n"
    )


def test_report_text(dsn, tmp_path):
    load(dsn, tmp_path, SAMPLE)
    result = run("report", "--top", "1")
    assert result.exit_code == 0, result.output
    lines = [line.rstrip() for line in result.output.splitlines()]
    assert lines[:3] == [
        "revenue 1095.3 over 4 users",
        "add_revenue                  5 events  1107.3",
        "subtract_revenue             2 events  12",
    ]
    assert "top 1" in lines and "bottom 1" in lines
    assert lines[lines.index("top 1") + 3].split() == ["vip1", "1000"]
    assert lines[lines.index("bottom 1") + 3].split() == ["user2", "-4.8"]


def test_time_window_uses_what_was_applied_in_it(dsn, tmp_path):
    load(dsn, tmp_path, ev("a", 1) + ev("b", 2))
    with psycopg.connect(dsn) as conn:
        between = conn.execute("SELECT clock_timestamp()").fetchone()[0]
    load(dsn, tmp_path, ev("a", 10) + ev("c", 3, "subtract_revenue"))
    later = json.loads(run("report", "--json", "--applied-since", between.isoformat()).output)
    assert (later["revenue"], later["users"]) == (7, 2)
    assert later["events"] == {"add_revenue": {"count": 1, "amount": 10},
                               "subtract_revenue": {"count": 1, "amount": 3}}
    assert later["top"][0] == {"userId": "a", "revenue": 10}
    assert later["since"] == between.isoformat()
    earlier = json.loads(run("report", "--json", "--applied-until", between.isoformat()).output)
    assert (earlier["revenue"], earlier["users"]) == (3, 2)
    everything = json.loads(run("report", "--json").output)
    assert (everything["revenue"], everything["users"]) == (10, 3)
    # a date alone is local midnight; tomorrow has nothing yet
    tomorrow = (datetime.now() + timedelta(days=1)).date().isoformat()
    empty = json.loads(run("report", "--json", "--applied-since", tomorrow).output)
    assert (empty["revenue"], empty["users"], empty["top"]) == (0, 0, [])
    bad = run("report", "--applied-since", "yesterday")
    assert bad.exit_code == 2 and "is not an ISO date" in bad.output


def test_empty_database(dsn):
    never = run("report", "--json")  # no evtool tables: a reader says what to run, creates nothing
    assert never.exit_code == 1 and "evtool db migrate" in never.output
    assert run("db", "migrate").exit_code == 0
    r = json.loads(run("report", "--json").output)
    assert r["revenue"] == 0 and r["users"] == 0 and r["top"] == [] and r["bottom"] == []
    assert run("report", "--json", "--csv").exit_code == 2


def test_revenue_all_formats(dsn, tmp_path):
    load(dsn, tmp_path, SAMPLE + ev('we\\"ird,user', "1.50"))
    text = run("revenue", "--all")
    assert text.exit_code == 0, text.output
    assert text.output == ('user1\t100.1\nuser2\t-4.8\nvip1\t1000\nvip2\t0\nwe"ird,user\t1.5\n')
    as_csv = run("revenue", "--all", "--csv").output
    assert list(csv.reader(io.StringIO(as_csv)))[-1] == ['we"ird,user', "1.5"]
    assert as_csv.startswith("user_id,revenue\nuser1,100.1\n")
    lines = run("revenue", "--all", "--json").output.splitlines()
    assert lines[1] == '{"userId":"user2","revenue":-4.8}'
    assert [json.loads(x)["userId"] for x in lines] == ["user1", "user2", "vip1", "vip2", 'we"ird,user']
    # one user still prints the same object as GET /userEvents/<userId>
    assert run("revenue", "user2", "--json").output == '{"userId": "user2", "revenue": -4.8}\n'


def test_revenue_all_streams_many_users(dsn, tmp_path):
    n = 12_345  # more than one server-side cursor fetch
    load(dsn, tmp_path, "".join(ev(f"u{i:06d}", i) for i in range(n)))
    out = run("revenue", "--all").output.splitlines()
    assert len(out) == n and out[0] == "u000000\t0" and out[-1] == f"u{n - 1:06d}\t{n - 1}"


def test_revenue_usage_errors(dsn):
    assert run("revenue").exit_code == 2
    assert run("revenue", "u1", "--all").exit_code == 2
    assert run("revenue", "u1", "--csv").exit_code == 2
    assert run("revenue", "--all", "--csv", "--json").exit_code == 2


def exact(text: str):
    return json.loads(text, parse_float=Decimal)


def tev(user: str, value, when: str, name: str = "add_revenue") -> str:
    return f'{{"userId": "{user}", "name": "{name}", "value": {value}, {when}}}\n'


def test_by_period_uses_event_time_and_late_events_land_in_their_own_period(dsn, tmp_path):
    load(dsn, tmp_path, tev("a", "0.1", '"ts": 1795425330')
         + tev("b", 2, '"time": "2026-11-23T23:30:00-01:00"')
         + tev("a", 5, '"createdAt": "2026/11/22"', "subtract_revenue") + ev("u", 1))
    # A late event for the 22nd, processed after the 24th's: it lands on the 22nd.
    load(dsn, tmp_path, tev("c", "0.2", '"timestamp": "2026-11-22T10:00:00Z"'))
    days = exact(run("report", "--by", "day", "--json").output)["periods"]
    assert [(d["period"], d["revenue"], d["users"]) for d in days] == [
        (None, 1, 1), ("2026-11-22", Decimal("-4.8"), 2), ("2026-11-23", Decimal("0.1"), 1),
        ("2026-11-24", 2, 1)]
    assert sum(d["revenue"] for d in days) == exact(run("report", "--json").output)["revenue"]
    hours = run("report", "--by", "hour", "--csv", "--since", "2026-11-23", "--until", "2026-11-24T01:00Z")
    assert hours.exit_code == 0, hours.output
    assert hours.output.splitlines() == [
        "period,adds,added,subtracts,subtracted,revenue,users",
        "2026-11-23T09:00Z,1,0.1,0,0,0.1,1",
        "2026-11-24T00:00Z,1,2,0,0,2,1"]
    weeks = json.loads(run("report", "--by", "week", "--json").output)["periods"]
    assert [w["period"] for w in weeks] == [None, "2026-11-16", "2026-11-23"]  # weeks start on Monday
    window = exact(run("report", "--json", "--since", "2026-11-23").output)
    assert (window["revenue"], window["users"]) == (Decimal("2.1"), 2)
    assert run("report", "--since", "2026-11-23", "--applied-since", "2026-11-23").exit_code == 2
    bad = run("report", "--since", "yesterday")
    assert bad.exit_code == 2 and "not a time" in bad.output


def test_rolling_window_counts_recent_event_time(dsn, tmp_path):
    now = datetime.now(UTC)
    recent = now - timedelta(minutes=2)
    load(dsn, tmp_path, tev("a", 3, f'"ts": {int(recent.timestamp())}')
         + tev("b", "1.5", f'"ts": {int(now.timestamp())}')
         + tev("a", 1, f'"ts": {int((now - timedelta(hours=2)).timestamp())}') + ev("u", 1))
    w = exact(run("report", "--window", "10", "--json").output)
    assert (w["events"], w["revenue"], w["users"]) == (2, Decimal("4.5"), 2)
    assert sorted(m["events"] for m in w["per_minute"]) == [1, 1] or now.minute == recent.minute
