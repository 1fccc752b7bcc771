"""`evtool process --follow`: applies lines as they arrive, survives rotation, stops cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import psycopg


def total(dsn: str, user: str) -> Decimal | None:
    with psycopg.connect(dsn) as conn:
        try:
            row = conn.execute("SELECT revenue FROM users_revenue WHERE user_id = %s", (user,)).fetchone()
        except psycopg.errors.UndefinedTable:  # the follower has not created the schema yet
            return None
    return None if row is None else row[0]


def wait_for(dsn: str, user: str, want: Decimal, timeout: float = 120) -> float:
    """Seconds until `user`'s total is `want`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if total(dsn, user) == want:
            return time.monotonic() - started
        time.sleep(0.005)
    raise AssertionError(f"{user} never reached {want}; it is {total(dsn, user)}")


def append(path: Path, user: str, value: int, partial: bool = False) -> None:
    text = json.dumps({"userId": user, "name": "add_revenue", "value": value})
    with open(path, "a") as f:
        f.write(text if partial else text + "\n")


def start_follower(tmp_path: Path, *journals: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "evtool", "process", "--follow", "--json",
                             *map(str, journals)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> dict:
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    return json.loads(out)


def test_follow_applies_new_lines_and_stops_on_sigterm(dsn, tmp_path):
    journal = tmp_path / "server-events.jsonl"
    append(journal, "first", 1)
    proc = start_follower(tmp_path, journal)
    try:
        wait_for(dsn, "first", Decimal(1))
        for n in range(1, 6):
            append(journal, "u", n)
            wait_for(dsn, "u", Decimal(n * (n + 1) // 2))
        append(journal, "u", 100, partial=True)  # not applied until its newline arrives
        time.sleep(0.3)
        assert total(dsn, "u") == 15
        with open(journal, "a") as f:
            f.write("\n")
        wait_for(dsn, "u", Decimal(115))
    except BaseException:
        proc.kill()
        raise
    summary = stop(proc)
    assert summary["applied"] == 7


def test_follow_waits_for_a_missing_journal_and_drains_a_rotated_one(dsn, tmp_path):
    journal = tmp_path / "server-events.jsonl"
    proc = start_follower(tmp_path, journal)
    try:
        time.sleep(0.2)
        append(journal, "r", 1)
        wait_for(dsn, "r", Decimal(1))
        rotated = tmp_path / "server-events.1.jsonl"
        journal.rename(rotated)
        append(rotated, "r", 10)  # written by the old writer just after the rename
        append(journal, "r", 100)  # the new journal
        wait_for(dsn, "r", Decimal(111))
    except BaseException:
        proc.kill()
        raise
    summary = stop(proc, signal.SIGINT)
    assert summary["applied"] == 3
