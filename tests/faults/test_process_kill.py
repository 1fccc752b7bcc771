"""Scenario 1: `kill -9` of `evtool process` at random moments; totals exact at every kill point.

After every kill the committed state must be exactly the reference model of the journal up to the
committed offset (so no batch is ever half applied), the killed command's forked workers must
leave with it (no orphans), and re-running always finishes with the exact totals.
"""

from __future__ import annotations

import random
import subprocess
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from .helpers import (
    backend_phase,
    build_journal,
    committed_state,
    diff,
    evtool_cmd,
    journal_events,
    kill_9,
    model_upto,
    reset,
    start,
)


def kill_loop(dsn: str, tmp_path: Path, *, events: int, kill_points: int, max_delay: float,
              seed: int) -> dict:
    """Kill `process` until `kill_points` kills landed while it worked; check after each one."""
    work = build_journal(tmp_path / "server-events.jsonl", events, seed=seed)
    lines = journal_events(work.path)
    size = work.path.stat().st_size
    rng = random.Random(seed)
    phases: Counter[str] = Counter()
    orphans: list[int] = []
    stats = {"kills": 0, "completions": 0, "checks": 0, "mismatches": 0}
    log = tmp_path / "process.log"
    cmd = evtool_cmd("process", "--batch-mb", "1", str(work.path))
    with psycopg.connect(dsn, autocommit=True) as watch:
        while stats["kills"] < kill_points:
            proc = start(cmd, tmp_path, log)
            try:
                rc = proc.wait(timeout=rng.uniform(0.25, max_delay))
            except subprocess.TimeoutExpired:
                phases[backend_phase(watch)] += 1
                orphans += kill_9(proc)
                stats["kills"] += 1
                rc = None
            assert rc in (None, 0), log.read_text()
            offset, applied, duplicates, got = committed_state(dsn, work.path)
            want = model_upto(lines, offset)
            stats["checks"] += 1
            bad = diff(got, want.totals)
            if bad or (applied, duplicates) != (want.applied, want.duplicates):
                stats["mismatches"] += 1
            assert not bad, f"at offset {offset}: {len(bad)} users differ, e.g. {list(bad.items())[:3]}"
            assert (applied, duplicates) == (want.applied, want.duplicates)
            if rc == 0:
                assert offset == size and got == work.expected
                stats["completions"] += 1
                reset(dsn)
        # and a last re-run finishes the journal exactly
        finish = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert finish.returncode == 0, finish.stderr
        offset, applied, _, got = committed_state(dsn, work.path)
        assert offset == size and got == work.expected and applied == work.events
        stats["completions"] += 1
    stats.update(events=work.events, lines=work.lines, kinds=work.kinds, phases=dict(phases),
                 orphans=len(orphans))
    print(f"\nprocess kill -9: {stats}")
    assert not orphans, f"{len(orphans)} forked workers outlived their killed `process` by 3 s: {orphans}"
    return stats


def test_process_killed_at_random_points_stays_exact(dsn, tmp_path):
    stats = kill_loop(dsn, tmp_path, events=200_000, kill_points=22, max_delay=1.8, seed=11)
    assert stats["kills"] >= 20 and stats["mismatches"] == 0
    assert len(stats["phases"]) >= 2  # kills landed both inside and outside transactions


@pytest.mark.soak
def test_soak_process_killed_100_times_over_1m_events(dsn, tmp_path):
    stats = kill_loop(dsn, tmp_path, events=1_000_000, kill_points=100, max_delay=8.0, seed=12)
    assert stats["kills"] >= 100 and stats["mismatches"] == 0
