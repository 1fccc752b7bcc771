"""PostgreSQL: the one place that owns the connection, the SQL and psycopg's errors.

Callers never import psycopg: every psycopg error is translated here into DatabaseUnavailable
(the connection was lost or never made: safe to retry a whole transaction) or DatabaseError.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from importlib import resources
from typing import Any, TypeVar

import psycopg

from .errors import DatabaseError, DatabaseUnavailable, SchemaBehind
from .events import format_value

# Package data, so a wheel carries it: read through importlib.resources, never a path beside the checkout.
SQL_DIR = resources.files("evtool") / "sql"
T = TypeVar("T")
FETCH_ROWS = 5000  # rows per round trip of a server-side cursor

# SQLSTATE classes worth retrying: connection exceptions, serialization failure, deadlock,
# admin shutdown / crash recovery, too many connections.
_RETRYABLE_STATES = {"40001", "40P01", "57P01", "57P02", "57P03", "53300"}


def _translate(exc: psycopg.Error) -> Exception:
    state = getattr(exc, "sqlstate", None) or ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, psycopg.OperationalError) or state.startswith("08") or state in _RETRYABLE_STATES:
        return DatabaseUnavailable(f"database unavailable: {message}")
    return DatabaseError(f"database error: {message}")


@contextmanager
def translated() -> Iterator[None]:
    """Turn psycopg errors raised inside the block into our own."""
    try:
        yield
    except psycopg.Error as exc:
        raise _translate(exc) from exc


@dataclass
class FileProgress:
    """A journal's committed progress, as locked for one batch."""

    fingerprint: bytes
    path: str
    offset: int
    lines: int
    tail_digest: bytes | None
    applied: int
    duplicates: int
    rejected: int


class Store:
    """A connection to the evtool database."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self._temp_ready = False

    @classmethod
    def connect(cls, dsn: str, *, retry_for: float = 0.0) -> Store:
        """Connect, retrying with backoff for up to `retry_for` seconds while the server is down."""

        def attempt() -> Store:
            with translated():
                return cls(psycopg.connect(dsn, autocommit=True, connect_timeout=5))

        return retrying(attempt, retry_for)

    def close(self) -> None:
        try:
            self.conn.close()
        except psycopg.Error:
            pass

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema ------------------------------------------------------------------------

    def schema_versions(self) -> tuple[int, int]:
        """(the version the database is at, 0 for none; the version this evtool needs). Reads only."""
        want = _version(migration_files()[-1])
        with translated():
            row = self.conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
            if not (row and row[0]):
                return 0, want
            row = self.conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
        return (row[0] if row else 0), want

    def check_schema(self) -> None:
        """Raise SchemaBehind, saying what to run, when the database lacks migrations this evtool needs.

        What readers call instead of migrate: a SELECT-only role can read, and reading never writes.
        """
        have, want = self.schema_versions()
        if have >= want:
            return
        if have == 0:
            raise SchemaBehind("the database has no evtool tables yet: run `evtool db migrate` "
                               "(or `evtool process`, which creates them)")
        raise SchemaBehind(f"the database schema is at version {have}, this evtool needs {want}: "
                           "run `evtool db migrate` as a role that may create tables")

    def migrate(self) -> list[str]:
        """Apply the numbered files in evtool/sql/ that are not applied yet; return their names."""
        files = migration_files()
        have, want = self.schema_versions()
        if have >= want:
            return []  # up to date: take no lock, create nothing (a role without CREATE gets here)
        done: list[str] = []
        with translated(), self.conn.transaction():
            # One migrator at a time, even when several commands start together.
            self.conn.execute("SELECT pg_advisory_xact_lock(7262531)")
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version int PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            have = {r[0] for r in self.conn.execute("SELECT version FROM schema_migrations")}
            for f in files:
                version = _version(f)
                if version in have:
                    continue
                self.conn.execute(f.read_text())
                self.conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, f.name)
                )
                done.append(f.name)
        return done

    # -- queries -----------------------------------------------------------------------

    def revenue(self, user_id: str) -> Decimal | None:
        """One user's exact total, or None for an unknown user."""
        with translated():
            row = self.conn.execute(
                "SELECT revenue FROM users_revenue WHERE user_id = %s", (user_id,)
            ).fetchone()
        return None if row is None else row[0]

    # -- what the operator reads (see reports) ---------------------------------------------------

    def server_version(self) -> str:
        with translated():
            row = self.conn.execute("SHOW server_version").fetchone()
        return str(row[0]).split()[0] if row else "?"

    def journal_rows(self) -> list[tuple]:
        """Every journal's progress row: (fingerprint, path, offset, applied, duplicates,
        rejected, updated_at, pending rejects), by path."""
        with translated():
            return self.conn.execute(
                'SELECT j.fingerprint, j.path, j."offset", j.applied, j.duplicates, j.rejected, j.updated_at,'
                " (SELECT count(*) FROM rejected_lines r"
                "  WHERE r.fingerprint = j.fingerprint AND r.reapplied_at IS NULL) AS pending"
                " FROM journal_files j ORDER BY j.path, j.first_seen"
            ).fetchall()

    def revenue_report(self, *, top: int, prefix: str | None, since: datetime | None,
                       until: datetime | None) -> tuple:
        """(adds, added, subtracts, subtracted, revenue, users, best, worst); see reports.report."""
        windowed = since is not None or until is not None
        where, params = _filters(prefix, since, until, "applied_at")
        with translated():
            conn = self.conn
            adds, added, subs, subtracted = conn.execute(
                "SELECT coalesce(sum(adds), 0), coalesce(sum(added), 0), coalesce(sum(subtracts), 0),"
                f" coalesce(sum(subtracted), 0) FROM revenue_log{where}", params
            ).fetchone()
            if windowed:
                source = (f"(SELECT user_id, sum(added) - sum(subtracted) AS revenue FROM revenue_log{where}"
                          " GROUP BY user_id) AS w")
                source_params = params
            else:
                uwhere, source_params = _filters(prefix, None, None, None)
                source = f"(SELECT user_id, revenue FROM users_revenue{uwhere}) AS w"
            revenue, users = conn.execute(
                f"SELECT coalesce(sum(revenue), 0), count(*) FROM {source}", source_params
            ).fetchone()
            best = worst = []
            if top:
                best = conn.execute(f"SELECT user_id, revenue FROM {source} ORDER BY revenue DESC, user_id"
                                    " LIMIT %s", [*source_params, top]).fetchall()
                worst = conn.execute(f"SELECT user_id, revenue FROM {source} ORDER BY revenue, user_id"
                                     " LIMIT %s", [*source_params, top]).fetchall()
        return adds, added, subs, subtracted, revenue, users, best, worst

    def all_revenue(self, prefix: str | None = None) -> Iterator[tuple[str, Decimal]]:
        """(user_id, revenue) of every user in user order, streamed."""
        where, params = _filters(prefix, None, None, None)
        yield from self._stream(f"SELECT user_id, revenue FROM users_revenue{where} ORDER BY user_id", params)

    def rejected_lines(self, where: str, params: list[Any], limit: int = 0) -> Iterator[tuple]:
        """(path, line_no, offset, reason, rejected_at, raw, reapplied_at, reapply_outcome) of the
        rejected lines matching `where` (see reports.reject_filter), streamed; `limit` 0: all."""
        query = ('SELECT path, line_no, "offset", reason, rejected_at, raw, reapplied_at, reapply_outcome'
                 f" FROM rejected_lines{' WHERE ' + where if where else ''} ORDER BY path, line_no")
        params = list(params)
        if limit:
            query += " LIMIT %s"
            params.append(limit)
        yield from self._stream(query, params)

    def _stream(self, query: str, params: list[Any]) -> Iterator[tuple]:
        """Rows of `query` from a server-side cursor, FETCH_ROWS per round trip."""
        with translated(), self.conn.transaction():
            with self.conn.cursor(name="evtool_stream") as cur:
                cur.itersize = FETCH_ROWS
                cur.execute(query, params)
                yield from cur

    # -- the processor's transaction (design section 5) ---------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with translated(), self.conn.transaction():
            yield

    def lock_progress(self, fingerprint: bytes, path: str) -> FileProgress:
        """Lock a journal's progress row for this transaction, creating it the first time."""
        self.conn.execute(
            "INSERT INTO journal_files (fingerprint, path) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (fingerprint, path),
        )
        row = self.conn.execute(
            'SELECT path, "offset", lines, tail_digest, applied, duplicates, rejected'
            " FROM journal_files WHERE fingerprint = %s FOR UPDATE",
            (fingerprint,),
        ).fetchone()
        assert row is not None
        return FileProgress(fingerprint, *row)

    def file_progress(self, fingerprint: bytes) -> FileProgress | None:
        """A journal's committed progress, without locking."""
        with translated():
            row = self.conn.execute(
                'SELECT path, "offset", lines, tail_digest, applied, duplicates, rejected'
                " FROM journal_files WHERE fingerprint = %s",
                (fingerprint,),
            ).fetchone()
        return None if row is None else FileProgress(fingerprint, *row)

    def _ensure_temp(self) -> None:
        if not self._temp_ready:
            self.conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS batch_digests (digest bytea) ON COMMIT DELETE ROWS"
            )
            self.conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS batch_sums (user_id text, adds int8, added numeric,"
                " subtracts int8, subtracted numeric) ON COMMIT DELETE ROWS"
            )
            self._temp_ready = True

    def lock_sources(self, sources: Iterable[str], windows: dict[str, tuple[int, int]] | None = None
                     ) -> dict[str, list[tuple[int, int]]]:
        """Lock the applied-range rows of these sender sources (in source order) and read them.

        With `windows`, only the applied lines within each source's [low, high) are read: a
        source whose ids have many gaps (lines that carried ids of their own) has many ranges.
        """
        names = sorted(sources)
        if not names:
            return {}
        windows = windows or {}
        bounds = [windows.get(n, (None, None)) for n in names]
        with self.conn.cursor() as cur:
            # One row per statement, by equality on the key, in source order: Citus refuses a
            # lock that spans shards, and the order keeps concurrent processors free of
            # deadlocks. executemany pipelines the statements: one round trip for each kind.
            cur.executemany("INSERT INTO applied_ranges (source) VALUES (%s) ON CONFLICT DO NOTHING",
                            [(n,) for n in names])
            cur.executemany(
                "SELECT lines * int8multirange(int8range(%s, %s)) FROM applied_ranges"
                " WHERE source = %s FOR UPDATE",
                [(low, high, n) for n, (low, high) in zip(names, bounds, strict=True)],
                returning=True,
            )
            found: list[list[tuple[int, int]]] = []
            while True:
                row = cur.fetchone()
                assert row is not None
                found.append([(r.lower, r.upper) for r in row[0]])
                if not cur.nextset():
                    break
        return dict(zip(names, found, strict=True))

    def add_ranges(self, ranges: dict[str, str]) -> None:
        """Add line ranges (multirange text) to the sources' applied ranges."""
        if not ranges:
            return
        names = sorted(ranges)
        self.conn.execute(
            # The parameter is cast, not the column: text to multirange is STABLE, and Citus
            # refuses a STABLE function applied to a column in an UPDATE.
            "UPDATE applied_ranges a SET lines = a.lines + n.lines, updated_at = now()"
            " FROM unnest(%s::text[], %s::int8multirange[]) AS n(source, lines) WHERE a.source = n.source",
            (names, [ranges[n] for n in names]),
        )

    def claim_digests(self, digests: Iterable[bytes]) -> set[bytes]:
        """Claim event digests: record them, and return those never recorded before (each once).

        Inserted in digest order, so processors sharing events wait instead of deadlocking.
        """
        self._ensure_temp()
        with self.conn.cursor() as cur:
            with cur.copy("COPY batch_digests (digest) FROM STDIN") as copy:
                for d in digests:
                    copy.write_row((d,))
            cur.execute(
                "INSERT INTO applied_events (digest)"
                " SELECT DISTINCT digest FROM batch_digests ORDER BY digest"
                " ON CONFLICT DO NOTHING RETURNING digest"
            )
            return {row[0] for row in cur.fetchall()}

    def add_to_totals(self, rows: bytes) -> None:
        """Add per-user sums, as COPY rows (see copy_rows), to the totals and the revenue log.

        A user may have several rows (one per part of a batch); they are summed here. Totals
        are upserted in user order, so concurrent processors never deadlock.
        """
        if not rows:
            return
        self._ensure_temp()
        with self.conn.cursor() as cur:
            with cur.copy("COPY batch_sums FROM STDIN") as copy:
                copy.write(rows)
            cur.execute(
                """
                WITH s AS MATERIALIZED (
                    SELECT user_id, sum(adds) AS adds, sum(added) AS added,
                           sum(subtracts) AS subtracts, sum(subtracted) AS subtracted
                    FROM batch_sums GROUP BY user_id
                ), totals AS (
                    -- now() in the inserted row, not in DO UPDATE SET: Citus refuses a
                    -- non-IMMUTABLE function there.
                    INSERT INTO users_revenue AS u (user_id, revenue, events, updated_at)
                    SELECT user_id, added - subtracted, adds + subtracts, now() FROM s ORDER BY user_id
                    ON CONFLICT (user_id) DO UPDATE
                    SET revenue = u.revenue + excluded.revenue, events = u.events + excluded.events,
                        updated_at = excluded.updated_at
                )
                INSERT INTO revenue_log (user_id, adds, added, subtracts, subtracted)
                SELECT user_id, adds, added, subtracts, subtracted FROM s
                """
            )

    def record_rejects(self, rows: Iterable[tuple[bytes, int, int, str, bytes, str]]) -> None:
        """Record (fingerprint, offset, line_no, path, raw, reason) rows, each once."""
        rows = list(rows)
        if not rows:
            return
        with self.conn.cursor() as cur:
            cur.executemany(
                'INSERT INTO rejected_lines (fingerprint, "offset", line_no, path, raw, reason)'
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                rows,
            )

    # -- rejects --reapply (see rejects) -------------------------------------------------------

    def rejected_fingerprints(self, where: str, params: list[Any]) -> list[bytes]:
        """The journals that have rejected lines matching `where` (see reports.reject_filter)."""
        with translated():
            rows = self.conn.execute(
                f"SELECT DISTINCT fingerprint FROM rejected_lines WHERE {where} ORDER BY fingerprint", params)
            return [r[0] for r in rows]

    def lock_rejects(self, fp: bytes, after: int, where: str, params: list[Any], limit: int) -> list[tuple]:
        """Lock a journal's progress row, then read up to `limit` of its rejected lines matching
        `where` after offset `after`: (offset, line_no, path, raw, reason), in offset order.

        The lock serializes with `process` (and other reappliers) on this journal; reading
        after it sees what a concurrent reapply committed meanwhile.
        """
        with translated():
            self.conn.execute("SELECT 1 FROM journal_files WHERE fingerprint = %s FOR UPDATE", (fp,))
            return self.conn.execute(
                f'SELECT "offset", line_no, path, raw, reason FROM rejected_lines'
                f' WHERE fingerprint = %s AND "offset" > %s AND {where} ORDER BY "offset" LIMIT %s',
                [fp, after, *params, limit],
            ).fetchall()

    def mark_reapplied(self, fp: bytes, outcomes: list[tuple[str, bytes, int]],
                       new_reasons: list[tuple[str, bytes, int]]) -> None:
        """Mark reapplied lines (outcome, fingerprint, offset), update reasons (reason,
        fingerprint, offset), and move the journal's counters from rejected to applied/duplicates."""
        with translated():
            with self.conn.cursor() as cur:
                if outcomes:
                    cur.executemany(
                        "UPDATE rejected_lines SET reapplied_at = now(), reapply_outcome = %s"
                        ' WHERE fingerprint = %s AND "offset" = %s', outcomes)
                if new_reasons:
                    cur.executemany(
                        'UPDATE rejected_lines SET reason = %s WHERE fingerprint = %s AND "offset" = %s',
                        new_reasons)
            applied = sum(1 for o, _, _ in outcomes if o == "applied")
            if outcomes:
                self.conn.execute(
                    "UPDATE journal_files SET applied = applied + %s, duplicates = duplicates + %s,"
                    " rejected = rejected - %s WHERE fingerprint = %s",
                    (applied, len(outcomes) - applied, len(outcomes), fp),
                )

    def advance(self, p: FileProgress) -> None:
        """Store the new offset and counters of a locked journal row."""
        self.conn.execute(
            'UPDATE journal_files SET path = %s, "offset" = %s, lines = %s, tail_digest = %s,'
            " applied = %s, duplicates = %s, rejected = %s, updated_at = now()"
            " WHERE fingerprint = %s",
            (p.path, p.offset, p.lines, p.tail_digest, p.applied, p.duplicates, p.rejected, p.fingerprint),
        )



_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def migration_files() -> list[Any]:
    """The numbered migrations (package data: importlib.resources Traversables), in order."""
    found = SQL_DIR.iterdir() if SQL_DIR.is_dir() else ()
    files = sorted((f for f in found if f.name[:1].isdigit() and f.name.endswith(".sql")),
                   key=lambda f: f.name)
    if not files:
        raise DatabaseError(f"no migrations found in {SQL_DIR}")
    return files


def _version(f: Any) -> int:
    return int(f.name.split("_", 1)[0])


def _filters(prefix: str | None, since: datetime | None, until: datetime | None,
             time_column: str | None) -> tuple[str, list[Any]]:
    conds: list[str] = []
    params: list[Any] = []
    if prefix:
        conds.append("starts_with(user_id, %s)")
        params.append(prefix)
    if time_column and since is not None:
        conds.append(f"{time_column} >= %s")
        params.append(since)
    if time_column and until is not None:
        conds.append(f"{time_column} < %s")
        params.append(until)
    return (" WHERE " + " AND ".join(conds) if conds else ""), params


def copy_rows(sums: dict[str, list]) -> bytes:
    """COPY text rows `user_id, adds, added, subtracts, subtracted` for per-user sums.

    Each sum is [adds, added amount, subtracts, subtracted amount] (see parser.Sums).
    """
    fmt = format_value
    rows = []
    for user, s in sums.items():
        if "\\" in user or "\t" in user or "\n" in user or "\r" in user:
            user = user.translate(_COPY_ESCAPES)
        rows.append(f"{user}\t{s[0]}\t{fmt(s[1])}\t{s[2]}\t{fmt(s[3])}\n")
    return "".join(rows).encode()


def retrying(fn: Callable[[], T], retry_for: float, on_retry: Callable[[str], None] | None = None) -> T:
    """Call fn, retrying DatabaseUnavailable with jittered exponential backoff for `retry_for` s."""
    deadline = time.monotonic() + retry_for
    delay = 0.1
    while True:
        try:
            return fn()
        except DatabaseUnavailable as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            if on_retry:
                on_retry(str(exc))
            time.sleep(min(left, random.uniform(delay / 2, delay)))
            delay = min(delay * 2, 5.0)
