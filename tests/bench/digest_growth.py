"""PostgreSQL's cost per opaque id as applied_events grows (issue 11's "10th million" target).

    python -m tests.bench.digest_growth DSN [MILLIONS] [ROUNDS]

DSN points at a server on this machine (its backend's CPU is read from /proc: run as root or as
the server's user). Creates two scratch databases (`digest_growth_empty`, `digest_growth_full`,
dropped first) with evtool's schema; the second gets MILLIONS (9) million random digests in
applied_events first (bulk: the primary key is built after the rows). Then, round after round,
claims a batch of 150,000 new random digests in each with `Store.claim_digest_rows` (what
`process` does with opaque ids) and prints the backend's CPU and the WAL written per id.
Session 6, 128 MB shared_buffers: ~3-4 us and ~0.2 KB per id empty, 6-9 us and up to 2.3 KB at
9M (full-page images of the index after each checkpoint).
"""

from __future__ import annotations

import os
import sys

import psycopg
from psycopg.conninfo import make_conninfo

from evtool.store import DIGEST_ROW, Store

N = 150_000


def main() -> None:
    dsn = sys.argv[1]
    millions = int(sys.argv[2]) if len(sys.argv) > 2 else 9
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    stores = {}
    for name, fill in (("empty", 0), ("full", millions * 1_000_000)):
        db = f"digest_growth_{name}"
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {db}")
            admin.execute(f"CREATE DATABASE {db}")
        store = Store.connect(make_conninfo(dsn, dbname=db))
        store.migrate()
        if fill:
            print(f"filling applied_events with {fill:,} digests ...", flush=True)
            store.conn.execute("ALTER TABLE applied_events DROP CONSTRAINT applied_events_pkey")
            store.conn.execute("SET maintenance_work_mem = '1GB'")
            store.conn.execute(
                "INSERT INTO applied_events (digest, content, journal, line_no)"
                " SELECT decode(md5(i::text), 'hex'), decode(substr(md5(i::text || 'c'), 1, 16), 'hex'),"
                " decode(md5('journal'), 'hex'), i FROM generate_series(1, %s) AS i", (fill,))
            store.conn.execute("ALTER TABLE applied_events ADD PRIMARY KEY (digest)")
            store.conn.execute("VACUUM ANALYZE applied_events")
            store.conn.execute("CHECKPOINT")
        stores[name] = store
    tick = os.sysconf("SC_CLK_TCK")
    fingerprint = os.urandom(16)

    def backend_cpu(store: Store) -> float:
        pid = store.conn.info.backend_pid
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    for k in range(rounds):
        line = []
        for name, store in stores.items():
            rows = b"".join(DIGEST_ROW.pack(4, 16, os.urandom(16), 8, os.urandom(8), 8, 0, 8, i)
                            for i in range(N))
            wal0 = store.conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            t = backend_cpu(store)
            with store.transaction():
                assert store.claim_digest_rows(rows, N, fingerprint, 1 + k * N, [(0, 0)]) is None
            cpu = backend_cpu(store) - t
            wal = store.conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)",
                                     (wal0,)).fetchone()[0]
            line.append(f"{name} {cpu / N * 1e6:.2f} us, {int(wal) / N:.0f} B WAL per id")
        print(f"round {k}: " + "; ".join(line), flush=True)
    for store in stores.values():
        store.close()


if __name__ == "__main__":
    main()
