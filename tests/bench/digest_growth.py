"""PostgreSQL's cost per opaque id as applied_events grows (issue 11's "10th million" target).

    python -m tests.bench.digest_growth DSN [MILLIONS] [ROUNDS] [BATCH]

DSN points at a server on this machine (its backend's CPU is read from /proc: run as root or as
the server's user). Creates two scratch databases (`digest_growth_empty`, `digest_growth_full`,
dropped first) with evtool's schema; the second gets MILLIONS (9) million random digests in
applied_events first (bulk: the primary key is built after the rows). Then, round after round,
claims a batch of BATCH (150,000) new random digests in each, twice: with `Store.claim_digest_rows`
(the batch table, join and sort: what `process` does when an id of the batch was seen before) and
with `Store.claim_new_digests` (the rows merged in digest order and copied straight in: the
common case since session 10), each on a copy of the database, and prints the backend's CPU and
the WAL written per id.
Session 6, 128 MB shared_buffers: ~3-4 us and ~0.2 KB per id empty, 6-9 us and up to 2.3 KB at
9M (full-page images of the index after each checkpoint). Session 10, batches of 1M:
claim_digest_rows 2.5 us empty, 4.5 at 9M; the sorted copy 1.2 and 3.0.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import psycopg
from psycopg.conninfo import make_conninfo

from evtool import parser
from evtool.store import DIGEST_ROW, Store

N = 150_000


def main() -> None:
    dsn = sys.argv[1]
    millions = int(sys.argv[2]) if len(sys.argv) > 2 else 9
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    n = int(sys.argv[4]) if len(sys.argv) > 4 else N

    def admin(sql: str) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql)

    templates = {}
    for name, fill in (("empty", 0), ("full", millions * 1_000_000)):
        db = templates[name] = f"digest_growth_{name}"
        admin(f"DROP DATABASE IF EXISTS {db}")
        admin(f"CREATE DATABASE {db}")
        with Store.connect(make_conninfo(dsn, dbname=db)) as store:
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
    tick = os.sysconf("SC_CLK_TCK")
    fingerprint = os.urandom(16)

    def backend_cpu(store: Store) -> float:
        pid = store.conn.info.backend_pid
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    def claim_rows(store: Store, rows: bytearray) -> None:
        assert store.claim_digest_rows([rows], n, fingerprint, 1, [(0, 0)]) is None

    def copy_rows(store: Store, rows: bytearray) -> None:
        parser._fastlines.sort_digest_rows(rows)  # as a part's finish does (needs the C module)
        part = SimpleNamespace(opaque_rows=rows, opaque_count=n)
        batch = SimpleNamespace(parts=[part], part_lines=[(0, 0)])
        merged = parser.claim_rows(batch, fingerprint, 1, bytearray())
        assert merged is not None and store.claim_new_digests(merged)

    for k in range(rounds):
        line = []
        for name, template in templates.items():
            for method, claim in (("claim_digest_rows", claim_rows), ("copy", copy_rows)):
                rows = bytearray(b"".join(DIGEST_ROW.pack(4, 16, os.urandom(16), 8, os.urandom(8), 8, 0, 8, i)
                                          for i in range(n)))
                admin("DROP DATABASE IF EXISTS digest_growth_run")
                admin(f"CREATE DATABASE digest_growth_run TEMPLATE {template} STRATEGY FILE_COPY")
                admin("CHECKPOINT")
                with Store.connect(make_conninfo(dsn, dbname="digest_growth_run")) as store:
                    wal0 = store.conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
                    t = backend_cpu(store)
                    with store.transaction():
                        claim(store, rows)
                    cpu = backend_cpu(store) - t
                    wal = store.conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)",
                                             (wal0,)).fetchone()[0]
                line.append(f"{name} {method} {cpu / n * 1e6:.2f} us, {int(wal) / n:.0f} B WAL per id")
        print(f"round {k}: " + "; ".join(line), flush=True)
    admin("DROP DATABASE IF EXISTS digest_growth_run")


if __name__ == "__main__":
    main()
