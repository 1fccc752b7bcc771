"""A parsing worker of `evtool process` dies (OOM killer, kill -9): one clear error, nothing partial."""

from __future__ import annotations

import time

import psutil

from .helpers import build_journal, committed_state, db_totals, evtool_cmd, start


def test_a_killed_parse_worker_fails_the_run_cleanly_and_a_rerun_is_exact(dsn, tmp_path):
    work = build_journal(tmp_path / "j.jsonl", 300_000, seed=41)
    log = tmp_path / "process.log"
    proc = start(evtool_cmd("process", "--batch-mb", "4", str(work.path)), tmp_path, log)
    killed = None
    deadline = time.monotonic() + 30
    while proc.poll() is None and killed is None and time.monotonic() < deadline:
        workers = [c for c in psutil.Process(proc.pid).children() if c.is_running()]
        if len(workers) == 2:  # the pool is up; kill one while it parses
            time.sleep(0.05)
            workers[0].kill()
            killed = workers[0].pid
        time.sleep(0.005)
    assert killed is not None, "the processor never started its workers"
    assert proc.wait(timeout=60) == 1
    err = log.read_text()
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("Error: a parsing worker process died")
    offset = committed_state(dsn, work.path)[0]
    assert offset < work.path.stat().st_size  # it stopped part way
    rerun = start(evtool_cmd("process", str(work.path)), tmp_path, tmp_path / "rerun.log")
    assert rerun.wait(timeout=120) == 0
    assert db_totals(dsn) == work.expected
