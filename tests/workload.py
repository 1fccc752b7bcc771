"""A representative run of every command that talks to the database, for the SQL rules test
(which records the statements it runs) and the live Citus test (which compares its answers with
plain PostgreSQL's).

It exercises every path of the processor's transaction: sender ids from several sources (the
all-new path and the line-by-line path, with repeats), client ids, receiver ids, no ids, rejected
lines; then `status`, `report` (plain and windowed), `revenue` (one, --all), `rejects` (listing,
filters) and `rejects --reapply`, and processing again (everything a duplicate), `db compact`, then `events`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from unittest import mock

from click.testing import CliRunner

from evtool.cli import cli

SOURCES = ("0123456789abcdef", "1111111111111111", "fedcba9876543210")


def ev(user: str, value: Any, event_id: str | None = None, name: str = "add_revenue") -> str:
    obj: dict[str, Any] = {"userId": user, "name": name, "value": value}
    if event_id:
        obj["eventId"] = event_id
    return json.dumps(obj) + "\n"


def journals(tmp: Path) -> tuple[Path, Path]:
    """Two journals: the first is processed --strict (some lines fixable later by reapply)."""
    a, b = tmp / "a.jsonl", tmp / "b.jsonl"
    lines = []
    for i in range(1, 41):
        src = SOURCES[i % 3]
        lines.append(ev(f"u{i % 7}", i, f"{src}:{i}"))
    lines += [
        ev("o", 5, "opaque-1"), ev("o", 5, "opaque-1"),            # a client id, sent twice
        ev("r", 2, "~r-1"), ev("n", 1),                            # receiver id, no id
        ev("s", 3, name="subtract_revenue"),
        ev("f", "7", f"{SOURCES[0]}:100"), ev("g", "4", "opaque-2"),  # fixable: strings under --strict
        ev("h", "2.5"),                                             # fixable, identified by position
        '{"userId": "x", "name": "refund", "value": 1}\n',          # never valid
        "not json\n",
    ]
    a.write_text("".join(lines))
    # Overlaps a's sender lines (duplicates, decided line by line) and adds new ones.
    more = [ev(f"u{i % 7}", i, f"{SOURCES[i % 3]}:{i}") for i in range(30, 61)]
    more += [ev("u1", 1, f"{SOURCES[1]}:55"), ev("o", 5, "opaque-1"), ev("p", 9, "opaque-3")]
    b.write_text("".join(more))
    return a, b


def cli_run(dsn: str, *args: str) -> str:
    result = CliRunner().invoke(cli, ["-v", *args], env={"EVTOOL_DSN": dsn})
    assert result.exit_code == 0, f"evtool {' '.join(args)}: {result.output}"
    return result.stdout


def run(dsn: str, tmp: Path) -> dict[str, Any]:
    """Run the workload; return what users see (JSON outputs, without times)."""
    a, b = journals(tmp)
    out: dict[str, Any] = {}
    out["process_a"] = json.loads(cli_run(dsn, "process", str(a), "--strict", "--json"))
    # b's batch appends its per-minute rows, as a big batch does (readers sum both tables)
    with mock.patch("evtool.store.PENDING_MINUTE_ROWS", 1):
        out["process_b"] = json.loads(cli_run(dsn, "process", str(b), "--json"))
    status = json.loads(cli_run(dsn, "status", str(a), str(b), "--json", "--url", "http://127.0.0.1:9"))
    out["status"] = [{k: j[k] for k in ("path", "state", "offset", "applied", "duplicates", "rejected",
                                        "rejects_pending")} for j in status["journals"]]
    out["report"] = json.loads(cli_run(dsn, "report", "--json", "--top", "3"))
    out["report_window"] = json.loads(cli_run(dsn, "report", "--json", "--since", "2000-01-01",
                                              "--until", "2999-01-01", "--prefix", "u"))
    out["revenue_u1"] = cli_run(dsn, "revenue", "u1", "--json")
    out["revenue_all"] = cli_run(dsn, "revenue", "--all", "--json")
    out["rejects"] = [_untimed(json.loads(x)) for x in cli_run(dsn, "rejects", "--json").splitlines()]
    cli_run(dsn, "rejects", "--json", "--all", "--limit", "2", "--reason", "value", "--file", str(a))
    reapply = json.loads(cli_run(dsn, "rejects", "--reapply", "--json"))
    out["reapply"] = {k: reapply[k] for k in ("applied", "duplicates", "still_invalid", "users")}
    out["process_again"] = json.loads(cli_run(dsn, "process", str(a), str(b), "--json"))
    out["after"] = json.loads(cli_run(dsn, "report", "--json", "--top", "0"))
    # Fold the per-minute rows b's batch appended; the figures by event time stay the same.
    by_day = json.loads(cli_run(dsn, "report", "--json", "--by", "day"))
    out["compact"] = json.loads(cli_run(dsn, "db", "compact", "--json"))
    assert out["compact"]["rows_folded"] > 0
    assert json.loads(cli_run(dsn, "report", "--json", "--by", "day")) == by_day
    # The audit trail: ids repeated across journals, re-applied lines, rejects.
    for user in ("o", "u1", "f", "h", "x"):
        out[f"events_{user}"] = json.loads(cli_run(dsn, "events", user, str(a), str(b), "--json"))
    # A file of client ids all applied before, one with other content: the copy is dropped
    # whole and only that line is read again, to be rejected naming where the id was first seen.
    c = tmp / "c.jsonl"
    c.write_text(ev("o", 5, "opaque-1") + ev("p", 9, "opaque-3") + ev("p", 8, "opaque-3"))
    out["process_c"] = json.loads(cli_run(dsn, "process", str(c), "--json"))
    assert [out["process_c"][k] for k in ("applied", "duplicates", "rejected")] == [0, 2, 1]
    rejects_c = cli_run(dsn, "rejects", "--json", "--file", str(c)).splitlines()
    out["rejects_c"] = [_untimed(json.loads(x)) for x in rejects_c]
    assert len(out["rejects_c"]) == 1 and "first seen in" in out["rejects_c"][0]["reason"]
    for key in ("process_a", "process_b", "process_again", "process_c"):
        out[key] = {k: out[key][k] for k in ("applied", "duplicates", "rejected")}
    for key in ("report", "report_window", "after"):
        out[key] = {k: v for k, v in out[key].items() if k not in ("since", "until")}
    # Paths differ from run to run; the rest must not.
    return json.loads(json.dumps(out).replace(str(tmp), "TMP"))


def _untimed(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("rejected_at", "reapplied_at")}
