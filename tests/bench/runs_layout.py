"""PostgreSQL's cost per opaque id if ids were kept as packed sorted runs (a design, not built).

    python -m tests.bench.runs_layout DSN [BATCHES] [BUCKETS]

Issue 11's UUID targets are out of reach with a row and a primary-key entry per id
(`tests.bench.digest_growth`: 1.2 CPU-s of PostgreSQL per million new ids on an empty table, 3.0
beside 9M, the index's pages written whole to the WAL after each checkpoint). This measures the
layout docs/scaling.md sketches instead: one row per (bucket of the digest's first bytes, batch)
holding the batch's digests of that bucket sorted and packed (16 bytes each), their contents (8)
and line numbers (8), stored uncompressed (random bytes do not compress). Per batch of 1M new
random ids it prints the backend's CPU and wall time to read every digest recorded so far (what
a merge of the batch against history needs: binary COPY out) and to write the batch's runs
(binary COPY in, one transaction), and the WAL written. DSN points at a server on this machine
(the backend's CPU is read from /proc: run as root or as the server's user); it creates (drops
first) the database `runs_layout`.

Session 11, BUCKETS 256: writing 1M ids 0.14 CPU-s (0.27 s) and 34 MB of WAL whatever the
history; reading 9M recorded digests (144 MB) 0.16 CPU-s (0.17 s).
"""

from __future__ import annotations

import os
import sys
import time

import psycopg
from psycopg.conninfo import make_conninfo

N = 1_000_000


def main() -> None:
    dsn = sys.argv[1]
    batches = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    buckets = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    tick = os.sysconf("SC_CLK_TCK")

    def backend_cpu(conn: psycopg.Connection) -> float:
        fields = open(f"/proc/{conn.info.backend_pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS runs_layout")
        admin.execute("CREATE DATABASE runs_layout")
    with psycopg.connect(make_conninfo(dsn, dbname="runs_layout"), autocommit=True) as conn:
        conn.execute("CREATE TABLE runs (bucket int2, batch int8, digests bytea, contents bytea,"
                     " lines bytea, PRIMARY KEY (bucket, batch))")
        conn.execute("ALTER TABLE runs ALTER digests SET STORAGE EXTERNAL,"
                     " ALTER contents SET STORAGE EXTERNAL, ALTER lines SET STORAGE EXTERNAL")
        for k in range(batches):
            per: list[list[bytes]] = [[] for _ in range(buckets)]
            for d in sorted(os.urandom(16) for _ in range(N)):
                per[int.from_bytes(d[:2], "big") * buckets >> 16].append(d)
            conn.execute("CHECKPOINT")  # as a batch after a checkpoint: the worst case for WAL
            lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            cpu, wall, got = backend_cpu(conn), time.perf_counter(), 0
            with conn.cursor().copy("COPY (SELECT bucket, digests FROM runs ORDER BY bucket, batch)"
                                    " TO STDOUT (FORMAT binary)") as copy:
                for block in copy:
                    got += len(block)
            read_cpu, read_wall = backend_cpu(conn) - cpu, time.perf_counter() - wall
            cpu, wall = backend_cpu(conn), time.perf_counter()
            statement = "COPY runs (bucket, batch, digests, contents, lines) FROM STDIN (FORMAT binary)"
            with conn.transaction(), conn.cursor().copy(statement) as copy:
                copy.set_types(["int2", "int8", "bytea", "bytea", "bytea"])
                for bucket, ds in enumerate(per):
                    n = len(ds)
                    copy.write_row((bucket, k, b"".join(ds), os.urandom(8 * n), os.urandom(8 * n)))
            write_cpu, write_wall = backend_cpu(conn) - cpu, time.perf_counter() - wall
            wal = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (lsn,)).fetchone()[0]
            print(f"batch {k}: read {got / 1e6:.0f} MB of recorded digests {read_cpu:.2f} CPU-s"
                  f" ({read_wall:.2f} s); write 1M ids {write_cpu:.2f} CPU-s ({write_wall:.2f} s),"
                  f" {int(wal) / 1e6:.0f} MB WAL", flush=True)
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS runs_layout")


if __name__ == "__main__":
    main()
