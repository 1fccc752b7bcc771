"""Scenario 4: four `evtool process` at once over two journals that share users (and events).

Exact totals, no deadlock (a deadlock would show as a retried 40P01), no error output, and the
four runs together apply each distinct event exactly once.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .helpers import build_journal, db_totals, evtool_cmd, reset


def two_journals(tmp_path: Path, events: int) -> tuple[Path, Path, dict, int]:
    """Two journals over the same 50 users; the second also carries some of the first's events
    with ids (delivered to both receivers, e.g. a retry through a load balancer): they count once."""
    a = build_journal(tmp_path / "a.jsonl", events, seed=41, users=50)
    b = build_journal(tmp_path / "b.jsonl", events, seed=42, users=50)
    shared = [line for line in a.path.read_bytes().splitlines(keepends=True)[::20]
              if b'"eventId": "~' not in line and b'"eventId"' in line]
    with open(b.path, "ab") as f:
        f.writelines(shared)
    expected = dict(a.expected)
    for user, total in b.expected.items():
        expected[user] = expected.get(user, 0) + total
    return a.path, b.path, expected, a.events + b.events


def test_four_processors_on_two_journals_sharing_users(dsn, tmp_path):
    a, b, expected, events = two_journals(tmp_path, 60_000)
    for round_ in range(2):
        procs = [subprocess.Popen(evtool_cmd("process", "--batch-mb", "1", "--json", *paths), cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for paths in ([str(a), str(b)], [str(b), str(a)], [str(a)], [str(b)])]
        outs = [p.communicate(timeout=120) for p in procs]
        for p, (_, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err
            assert err == "", err  # no retry (deadlock, serialization), no warning, no error
        reports = [json.loads(out) for out, _ in outs]
        assert sum(r["applied"] for r in reports) == events
        assert sum(r["retries"] for r in reports) == 0
        assert db_totals(dsn) == expected
        print(f"\nround {round_}: applied per run {[r['applied'] for r in reports]}, "
              f"duplicates {[r['duplicates'] for r in reports]}")
        reset(dsn)
