"""One `process` run with its CPU split: the processor's (self + workers) and PostgreSQL's.

    python -m tests.bench.proc_cpu --server DSN --pgdata DIR JOURNAL [--evtool SRC_DIR]
        [--batch-mb MB] [--max-held-mb MB] [--table-flush-mb MB] [--retries N] [--retried-posts N]
        [--collate NAME]

Creates (or recreates) the database `evtool_proc_cpu` on the server DSN points at, applies
JOURNAL with `evtool.processor.process` (from SRC_DIR when given, to compare two checkouts on
the same journal, alternating), and prints events/s, wall seconds, the processor's CPU-s and
the server's CPU-s (the postmaster's reaped children plus the live ones: DIR is its data
directory, for postmaster.pid), then the totals. CPU-s hold on a shared machine where wall time
does not; run it on a server nothing else uses. --batch-mb and --max-held-mb set the batch size
and what a worker part may hold (`parser.MAX_HELD`): to measure what other batch sizes would cost
(a cap far above the default lets a part's memory grow with its users). --retries N applies a
copy of JOURNAL (in TMPDIR) with N lines each written again 1-49 lines later (seeded), as a
client's retries land: with opaque ids, the lines the database finds not applied.
--retried-posts N: N runs of 1,000 lines (what `send` POSTs at once) each written again right
after itself (seeded), as a POST retried after it landed. --collate C creates the database from
template0 with that LC_COLLATE (what the server's default collation costs the per-user writes).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True, help="a DSN of the server (any database on it)")
    ap.add_argument("--pgdata", required=True, type=Path)
    ap.add_argument("--evtool", help="import evtool from this source directory")
    ap.add_argument("--batch-mb", type=int, help="batch size (default: evtool's)")
    ap.add_argument("--max-held-mb", type=int, help="what a worker part may hold (default: evtool's)")
    ap.add_argument("--table-flush-mb", type=int, help="parser.TABLE_FLUSH (default: evtool's)")
    ap.add_argument("--retries", type=int, default=0, help="lines written twice (a copy of JOURNAL)")
    ap.add_argument("--retried-posts", type=int, default=0, help="runs of 1,000 lines written twice")
    ap.add_argument("--collate", help="create the database with this LC_COLLATE (from template0)")
    ap.add_argument("journal", type=Path)
    a = ap.parse_args()
    if a.retries or a.retried_posts:
        a.journal = _with_retries(a.journal, a.retries, a.retried_posts)
    if a.evtool:
        sys.path.insert(0, a.evtool)
    import psutil
    import psycopg
    from psycopg.conninfo import make_conninfo

    from evtool import parser, processor

    from .procs import _poll_tree_memory

    pm = psutil.Process(int((a.pgdata / "postmaster.pid").read_text().split()[0]))

    def server_cpu() -> float:
        t = pm.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for c in pm.children():
            try:
                ct = c.cpu_times()
            except psutil.Error:
                continue
            total += ct.user + ct.system
        return total

    def own_cpu() -> float:
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    with psycopg.connect(a.server, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS evtool_proc_cpu")
        conn.execute("CREATE DATABASE evtool_proc_cpu" + (
            f" TEMPLATE template0 LC_COLLATE '{a.collate}'" if a.collate else ""))
    dsn = make_conninfo(a.server, dbname="evtool_proc_cpu")
    if a.table_flush_mb:
        parser.TABLE_FLUSH = a.table_flush_mb << 20  # before the workers are forked
    stop, peak = threading.Event(), [0, 0, 0]  # this process and its workers: RSS and PSS sums; own peak
    threading.Thread(target=_poll_tree_memory, args=(os.getpid(), stop, peak), daemon=True).start()
    p0, m0, t0 = server_cpu(), own_cpu(), time.perf_counter()
    tuning = {"max_held": a.max_held_mb << 20} if a.max_held_mb else {}
    if a.batch_mb:
        tuning["batch_bytes"] = a.batch_mb << 20
    report = processor.process(dsn, [a.journal], **tuning)
    wall = time.perf_counter() - t0
    stop.set()
    p1, m1 = server_cpu(), own_cpu()
    with psycopg.connect(dsn) as conn:
        users, total = conn.execute("SELECT count(*), sum(revenue) FROM users_revenue").fetchone()
    print(f"{report.applied / wall:,.0f} events/s, {wall:.1f} s; evtool {m1 - m0:.1f} CPU-s, "
          f"PostgreSQL {p1 - p0:.1f} CPU-s; {report.files[0].batches} batches; children's peak RSS "
          f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss >> 10} MiB, tree peak PSS "
          f"{peak[1] >> 10} MiB (polled every 20 ms, costing some CPU); "
          f"{users} users, total {total}")
    if a.retries or a.retried_posts:
        a.journal.unlink()


def _with_retries(journal: Path, n: int, posts: int = 0) -> Path:
    """A copy of `journal` in TMPDIR with `n` lines each written again 1-49 lines later, and
    `posts` runs of 1,000 lines each written again right after itself."""
    import random
    import tempfile

    lines = journal.read_bytes().splitlines(keepends=True)
    rng = random.Random(3)
    for _ in range(n):
        i = rng.randrange(len(lines) - 100)
        lines.insert(i + rng.randrange(1, 50), lines[i])
    for end in sorted(rng.sample(range(1000, len(lines) - 1000, 1000), posts), reverse=True):
        lines[end:end] = lines[end - 1000:end]
    fd, name = tempfile.mkstemp(suffix=".jsonl", prefix="proc-cpu-retries-")
    with os.fdopen(fd, "wb") as f:
        f.write(b"".join(lines))
    return Path(name)


if __name__ == "__main__":
    main()
