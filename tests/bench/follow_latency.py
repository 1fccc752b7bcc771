"""Append-to-applied latency of `evtool process --follow`: p50/p99 over N appends.

    python -m tests.bench.follow_latency [--events 200] [--gap 0.05] [--poll 0.01]

Starts its own embedded PostgreSQL in a temp dir, runs the follower as a subprocess, appends
one line at a time and times each until its total is visible in the database.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from evtool import embedded


def applied(conn: psycopg.Connection) -> int:
    try:
        row = conn.execute("SELECT events FROM users_revenue WHERE user_id = 'lat'").fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    return row[0] if row else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--gap", type=float, default=0.05, help="seconds between appends")
    ap.add_argument("--poll", type=float, default=0.01, help="the follower's --poll")
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="evtool-follow-"))
    dsn = embedded.ensure_running(base / "pg")
    journal = base / "server-events.jsonl"
    line = json.dumps({"userId": "lat", "name": "add_revenue", "value": 1}) + "\n"
    journal.write_text(json.dumps({"userId": "warm", "name": "add_revenue", "value": 1}) + "\n")
    follower = subprocess.Popen([sys.executable, "-m", "evtool", "process", "--follow", "--poll",
                                 str(a.poll), str(journal)], env={**os.environ, "EVTOOL_DSN": dsn},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latencies = []
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            time.sleep(1.0)
            for i in range(1, a.events + 1):
                with open(journal, "a") as f:
                    started = time.perf_counter()
                    f.write(line)
                while applied(conn) < i:
                    time.sleep(0.0005)
                latencies.append((time.perf_counter() - started) * 1000)
                time.sleep(a.gap)
    finally:
        follower.send_signal(signal.SIGTERM)
        follower.wait(timeout=30)
        embedded.stop(base / "pg")
        shutil.rmtree(base, ignore_errors=True)
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(len(latencies) * q))]  # noqa: E731
    print(f"follow --poll {a.poll}: {len(latencies)} appends, {a.gap * 1000:.0f} ms apart: "
          f"p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms, max {latencies[-1]:.1f} ms")


if __name__ == "__main__":
    main()
