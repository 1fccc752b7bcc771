"""Scenario 2: `kill -9` of `evtool serve` while `evtool send` streams; restart on the same port.

Whatever the sender had confirmed when the receiver died must be in the journal; the sender's
retries (or a re-run) deliver the rest, and after `process` the totals are exact.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time
from pathlib import Path

import pytest

from ..conftest import evtool
from .helpers import Serve, db_totals, evtool_cmd, exact, generate, http, journal_lines, start

SENDER_ID = re.compile(rb'"eventId":"([0-9a-f]{16}):([0-9]+):[0-9a-f]{16}"')  # <source>:<line>:<chain>


def journal_ids(journal: Path) -> dict[str, set[int]]:
    """The sender ids in the complete lines of a journal: source -> line numbers."""
    data = journal.read_bytes()
    found: dict[str, set[int]] = {}
    for source, line in SENDER_ID.findall(data[: data.rfind(b"\n") + 1]):
        found.setdefault(source.decode(), set()).add(int(line))
    return found


def confirmed_lines(home: Path) -> int:
    """Lines the sender has recorded as answered 200 (its saved resume point)."""
    states = list((home / "send-state").glob("*.json"))
    return max((json.loads(p.read_text())["line"] for p in states), default=0)


def kill_receiver_during_send(dsn: str, tmp_path: Path, *, events: int, kills: int, batch: int,
                              seed: int) -> dict:
    source = tmp_path / "events.jsonl"
    expected = generate(source, events, "--users", "500", "--decimals", "0.3", "--seed", str(seed))
    home = Path(os.environ["EVTOOL_HOME"])
    journal = tmp_path / "server-events.jsonl"
    rng = random.Random(seed)
    serve = Serve(tmp_path).start()
    stats = {"events": events, "kills": 0, "send_runs": 1, "confirmed_checks": 0, "missing": 0}
    send_cmd = evtool_cmd("send", str(source), "--url", serve.url, "--batch", str(batch),
                          "--max-retries", "30", "--json")
    sender = start(send_cmd, tmp_path, tmp_path / "send.log")
    try:
        while stats["kills"] < kills:
            time.sleep(rng.uniform(0.05, 0.5))
            if sender.poll() is not None:  # finished before all kills: send the file again
                sender = start([*send_cmd, "--from-start"], tmp_path, tmp_path / "send.log")
                stats["send_runs"] += 1
                continue
            serve.kill()
            stats["kills"] += 1
            # Everything the sender recorded as delivered is in the journal.
            upto = confirmed_lines(home)
            have = set().union(*journal_ids(journal).values())
            missing = set(range(1, upto + 1)) - have
            stats["confirmed_checks"] += 1
            stats["missing"] += len(missing)
            assert not missing, f"{len(missing)} confirmed events are not in the journal"
            time.sleep(rng.uniform(0.0, 1.0))
            serve.start()
        rc = sender.wait(timeout=300)
        if rc != 0:  # the retries ran out: a re-run resumes and finishes
            rerun = subprocess.run(send_cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
            stats["send_runs"] += 1
            assert rerun.returncode == 0, rerun.stderr
        assert serve.proc is not None and serve.proc.poll() is None
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
        serve.stop()
    # every event is in the journal (some more than once, re-sent after a lost answer)
    lines = journal_lines(journal)
    [ids] = journal_ids(journal).values()
    assert ids == set(range(1, events + 1))
    stats["journal_lines"] = len(lines)
    result = evtool("process", "--json", cwd=tmp_path, check=True)
    report = json.loads(result.stdout)
    assert report["applied"] == events and report["rejected"] == 0
    assert report["duplicates"] == len(lines) - events
    assert db_totals(dsn) == exact(expected["per_user"])
    print(f"\nserve kill -9 during send: {stats}")
    return stats


def test_receiver_killed_during_send_loses_nothing(dsn, tmp_path):
    stats = kill_receiver_during_send(dsn, tmp_path, events=50_000, kills=4, batch=100, seed=21)
    assert stats["kills"] == 4 and stats["missing"] == 0


@pytest.mark.soak
def test_soak_receiver_killed_20_times_during_200k_send(dsn, tmp_path):
    stats = kill_receiver_during_send(dsn, tmp_path, events=200_000, kills=20, batch=500, seed=22)
    assert stats["kills"] == 20 and stats["missing"] == 0


def test_torn_write_left_by_a_crash_is_cut_off_at_restart(dsn, tmp_path):
    """A kill -9 inside write() can leave part of a line (the kernel stops between pages). That
    tail was never acknowledged; the next serve must not glue the next event onto it."""
    journal = tmp_path / "server-events.jsonl"
    whole = b'{"userId": "u1", "name": "add_revenue", "value": 1, "eventId": "a"}\n'
    journal.write_bytes(whole + b'{"userId": "u1", "name": "add_rev')
    with Serve(tmp_path) as serve:
        status, _, _ = http(f"{serve.url}/liveEvent", "POST",
                            b'{"userId": "u1", "name": "add_revenue", "value": 2, "eventId": "b"}',
                            {"Authorization": "secret", "Content-Type": "application/json"})
        assert status == 200
    assert journal_lines(journal)[0] == whole.rstrip(b"\n")
    assert len(journal_lines(journal)) == 2
    report = json.loads(evtool("process", "--json", cwd=tmp_path, check=True).stdout)
    assert (report["applied"], report["rejected"]) == (2, 0)
    assert db_totals(dsn) == {"u1": 3}
    assert "cut a partial last line (33 bytes)" in serve.log.read_text()
