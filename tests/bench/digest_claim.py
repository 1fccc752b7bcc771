"""PostgreSQL CPU per opaque id (issue 11's UUID target): evtool's claim against a lower bound.

    python -m tests.bench.digest_claim DSN [ROUNDS]

DSN points at a server on this machine (its backend's CPU is read from /proc: run as root or
as the server's user). Creates the database `digest_exp` (dropped first) and alternates
batches of 200,000 random digests:

- `Store.claim_digest_rows`: rows copied to the batch table, sorted, inserted into
  applied_events in one statement, inside a savepoint (what `process` does with opaque ids);
- the same kind of rows pre-sorted, in binary, copied straight into applied_events: what a
  claim could cost if the workers rendered the final rows.

Prints the backend's CPU per id for each, round after round, so the table's growth shows too.
"""

from __future__ import annotations

import os
import struct
import sys

import psycopg
from psycopg.conninfo import make_conninfo

from evtool.store import DIGEST_ROW, Store

N = 200_000
_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_ROW = struct.Struct(">hi16si8si16siq")  # 4 fields: digest, content, journal, line_no


def main() -> None:
    dsn = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS digest_exp")
        admin.execute("CREATE DATABASE digest_exp")
    store = Store.connect(make_conninfo(dsn, dbname="digest_exp"))
    store.migrate()
    pid = store.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    tick = os.sysconf("SC_CLK_TCK")
    fingerprint = os.urandom(16)
    first_line = 0

    def backend_cpu() -> float:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    def batch() -> list[tuple[bytes, bytes, int]]:
        nonlocal first_line
        first_line += N
        return [(os.urandom(16), os.urandom(8), i) for i in range(N)]

    def claim(ds: list[tuple[bytes, bytes, int]]) -> float:
        rows = b"".join(DIGEST_ROW.pack(4, 16, d, 8, c, 8, 0, 8, i) for d, c, i in ds)
        t = backend_cpu()
        with store.transaction():
            assert store.claim_digest_rows([rows], N, fingerprint, first_line, [(0, 0)]) is None
        return backend_cpu() - t

    def copy_in(ds: list[tuple[bytes, bytes, int]]) -> float:
        ds.sort()
        rows = b"".join(_ROW.pack(4, 16, d, 8, c, 16, fingerprint, 8, first_line + i) for d, c, i in ds)
        t = backend_cpu()
        with store.transaction(), store.conn.cursor() as cur:
            sql = "COPY applied_events (digest, content, journal, line_no) FROM STDIN (FORMAT binary)"
            with cur.copy(sql) as copy:
                copy.write(_HEADER + rows + struct.pack(">h", -1))
        return backend_cpu() - t

    for k in range(rounds):
        a = claim(batch())
        b = copy_in(batch())
        print(f"round {k}: claim_digest_rows {a / N * 1e6:.2f} us/id, "
              f"binary COPY straight in {b / N * 1e6:.2f} us/id")
    store.close()


if __name__ == "__main__":
    main()
