"""Scale-out on one machine (issue 12): two receivers, two `process --follow`, one database.

Real `evtool serve` subprocesses, each with its own journal and its own follower; one
`evtool send --url A --url B`; receiver A is killed -9 in the middle of the send and restarted on
the same port and journal. The send must finish on its own (failing over to B), every event the
sender recorded as acknowledged must be in a journal at the moment of the kill, and once the
followers catch up the totals are exact with each event applied once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from .conftest import Serve, evtool_cmd, exact, generate, journal_lines, totals

# Sender ids: <source>:<line> (or <source>:<line>:<chain>).
SENDER_ID = re.compile(rb'"eventId":"([0-9a-f]{16}):([0-9]+)(?::[0-9a-f]+)?"')
EVENTS = 60_000


def sent_lines(*journals: Path) -> list[int]:
    """The source line numbers of the sender ids in the complete lines of the journals."""
    found = []
    for journal in journals:
        data = journal.read_bytes() if journal.exists() else b""
        found += [int(m.group(2)) for m in SENDER_ID.finditer(data[: data.rfind(b"\n") + 1])]
    return found


def confirmed_lines(home: Path) -> int:
    """Lines the sender has recorded as answered 200 (its saved resume point)."""
    states = list((home / "send-state").glob("*.json"))
    return max((json.loads(p.read_text())["line"] for p in states), default=0)


def size(*paths: Path) -> int:
    return sum(p.stat().st_size for p in paths if p.exists())


def wait(what: str, done: Callable[[], bool], timeout: float) -> None:
    """Poll `done()` until true; fail with `what` after `timeout` (a guard against hanging)."""
    # a hang guard, not a speed check: `timeout` is minutes beyond any normal wait
    for _ in range(int(timeout / 0.01)):
        if done():
            return
        time.sleep(0.01)
    pytest.fail(f"still waiting for {what} after {timeout:g} s: something hangs")


def stop_follower(proc: subprocess.Popen, log: Path) -> dict:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, log.read_text()
    return json.loads(out)


def test_two_receivers_one_killed_mid_send_totals_exact(dsn, tmp_path):
    source = tmp_path / "events.jsonl"
    expected = generate(source, EVENTS, "--users", "500", "--decimals", "0.3", "--seed", "12")
    home = Path(os.environ["EVTOOL_HOME"])
    dirs = [tmp_path / "r1", tmp_path / "r2"]
    for d in dirs:
        d.mkdir()
    journals = [d / "server-events.jsonl" for d in dirs]
    receivers = [Serve(d) for d in dirs]
    followers: list[tuple[subprocess.Popen, Path]] = []
    sender = None
    try:
        for r in receivers:
            r.start()
        for d, journal in zip(dirs, journals, strict=True):
            log = d / "follow.log"
            with open(log, "ab") as err:
                followers.append((subprocess.Popen(evtool_cmd("process", "--follow", "--json", str(journal)),
                                                   cwd=d, stdout=subprocess.PIPE, stderr=err,
                                                   start_new_session=True), log))
        urls = [x for r in receivers for x in ("--url", r.url)]
        with open(tmp_path / "send.log", "ab") as err:
            sender = subprocess.Popen(evtool_cmd("send", str(source), *urls, "--batch", "100",
                                                 "--max-retries", "30", "--json"),
                                      cwd=tmp_path, stdout=subprocess.PIPE, stderr=err,
                                      start_new_session=True)

        # Kill receiver 1 once a fifth of the file is in the journals, while the send runs.
        wait("the first fifth, saved as acknowledged",
             lambda: size(*journals) >= source.stat().st_size // 5 and confirmed_lines(home) > 0, 300)
        assert sender.poll() is None, "the send finished before the kill: make the file larger"
        receivers[0].kill()
        acknowledged = confirmed_lines(home)
        missing = set(range(1, acknowledged + 1)) - set(sent_lines(*journals))
        assert acknowledged > 0 and not missing, f"{len(missing)} acknowledged events are in no journal"

        # The send goes on through receiver 2 while 1 is down; then 1 comes back.
        grown = size(journals[1]) + source.stat().st_size // 10
        wait("receiver 2 to take the load",
             lambda: size(journals[1]) >= grown or sender.poll() is not None, 300)
        receivers[0].start()
        out, _ = sender.communicate(timeout=600)
        assert sender.returncode == 0, (tmp_path / "send.log").read_text()
        report = json.loads(out)
        assert report["sent"] == EVENTS and report["failed"] == 0

        # Every event reached a journal (some twice: a bulk whose answer was lost is re-sent)...
        lines = [journal_lines(j) for j in journals]
        assert set(sent_lines(*journals)) == set(range(1, EVENTS + 1))
        assert all(lines), "both receivers got bulks"
        # ...and the two followers apply each once into the one database.
        want = exact(expected["per_user"])

        def caught_up() -> bool:
            try:
                return totals(dsn) == want
            except psycopg.errors.UndefinedTable:
                return False

        wait("the followers to apply every event", caught_up, 300)
        reports = [stop_follower(p, log) for p, log in followers]
        followers = []
        assert sum(r["applied"] for r in reports) == EVENTS
        assert sum(r["rejected"] for r in reports) == 0
        assert sum(r["duplicates"] for r in reports) == sum(map(len, lines)) - EVENTS
        assert totals(dsn) == want
    finally:
        if sender is not None and sender.poll() is None:
            sender.kill()
            sender.wait()
        for p, _ in followers:
            p.kill()
            p.wait()
        for r in receivers:
            if r.proc is not None and r.proc.poll() is None:
                r.stop()
