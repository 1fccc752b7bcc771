"""PostgreSQL: the one place that owns the connection, the SQL and psycopg's errors.

Callers never import psycopg: every psycopg error is translated here into DatabaseUnavailable
(the connection was lost or never made: safe to retry a whole transaction) or DatabaseError.
"""

from __future__ import annotations

import os
import random
import re
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from importlib import resources
from typing import Any, TypeVar

import psycopg

from .config import mask_secrets
from .errors import DatabaseError, DatabaseUnavailable, SchemaBehind
from .events import format_value

# Package data, so a wheel carries it: read through importlib.resources, never a path beside the checkout.
SQL_DIR = resources.files("evtool") / "sql"
T = TypeVar("T")
FETCH_ROWS = 5000  # rows per round trip of a server-side cursor
CELL_WRITE_BYTES = 1 << 20  # applied_lines entries written per statement (write_cells)
# One batch_digests row in COPY's binary format: 4 fields, digest (16 bytes), content digest
# (8), part offset, line index in the part (int8 each). Fixed width: packed in one call, ~2x
# cheaper for the workers than hex text, and nothing for the server to parse.
DIGEST_ROW = struct.Struct(">hi16si8siqiq")
SKIPPED = struct.Struct(">16s8sq")  # a line claim_digest_rows says was not applied: digest, content, index
_BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_BINARY_TRAILER = struct.pack(">h", -1)
TEMP_BUFFERS_MB = 64  # a session's buffers for the batch tables (see _ensure_temp)
MAX_WORK_MEM_MB = 256  # what one batch's statement may ask for each sort or hash (add_to_totals)
# A batch with at least this many per-minute rows appends them to revenue_minutes_pending
# instead of upserting them into revenue_by_minute (migration 013): many users, one probe each.
PENDING_MINUTE_ROWS = 50_000
# Adds an upserted (user, minute) row of revenue_by_minute (aliased r) to the one it meets.
_ADD_MINUTE = ("ON CONFLICT (user_id, minute) DO UPDATE"
               " SET adds = r.adds + excluded.adds, added = r.added + excluded.added,"
               " subtracts = r.subtracts + excluded.subtracts,"
               " subtracted = r.subtracted + excluded.subtracted")
# What readers of the per-minute figures read: both tables, in one statement, so one snapshot.
MINUTES = ("(SELECT user_id, minute, adds, added, subtracts, subtracted FROM revenue_by_minute"
           " UNION ALL SELECT user_id, minute, adds, added, subtracts, subtracted"
           " FROM revenue_minutes_pending) AS minutes")

# SQLSTATE classes worth retrying: connection exceptions, serialization failure, deadlock,
# admin shutdown / crash recovery, too many connections.
_RETRYABLE_STATES = {"40001", "40P01", "57P01", "57P02", "57P03", "53300"}


# What a server says when a connection to it is lost: a Citus coordinator relays a worker's
# (killed, restarted, failing over) with the internal-error code XX000 instead of class 08, or
# says its own "failure on connection marked as essential" when the worker died inside a
# transaction that had written through it (MarkRemoteTransactionFailed), or "could not commit
# transaction for shard N on at least one active node" when it died at COMMIT (the outcome is
# then the 2PC recovery's: the retry waits for the batch's rows, and finds the journal's offset
# moved if it committed, so nothing is applied twice).
_LOST = re.compile(r"server closed the connection unexpectedly|terminating connection due to"
                   r"|connection not open|could not connect|lost connection|connection to the remote node"
                   r"|failure on connection marked as essential|could not commit transaction")


def _relayed_connection_loss(exc: psycopg.Error, state: str, message: str) -> bool:
    """A lost connection to another node, relayed as an internal error: retrying the batch (one
    transaction, idempotent) is right; a real internal error fails again and ends the retries."""
    return state in ("", "XX000") and bool(_LOST.search(message))


class _Digests(bytes):
    """A bytea[] parameter already in PostgreSQL's binary array form (see digest_array)."""


class _DigestsDumper(psycopg.adapt.Dumper):
    oid = 1001  # bytea[]
    format = psycopg.pq.Format.BINARY

    def dump(self, obj: Any) -> bytes:
        return obj  # type: ignore[no-any-return]


psycopg.adapters.register_dumper(_Digests, _DigestsDumper)


def digest_array(digests: list[bytes]) -> _Digests:
    """16-byte digests as one bytea[] parameter, packed here in one join: psycopg's dumper of a
    list takes ~1 s a million items."""
    if any(len(d) != 16 for d in digests):  # (never expected: event digests are 16 bytes)
        raise ValueError("an event digest is not 16 bytes")
    # one dimension, no NULLs, element type bytea (17); then its length and lower bound
    head = struct.pack(">iiIii", 1, 0, 17, len(digests), 1)
    return _Digests(head + b"".join(b"\x00\x00\x00\x10" + d for d in digests))


def _unique_violation(exc: psycopg.Error) -> bool:
    """A unique key violated, here or on a Citus worker (which the coordinator relays as an
    internal error with PostgreSQL's message)."""
    state = getattr(exc, "sqlstate", None) or ""
    return state == "23505" or (state in ("", "XX000") and "duplicate key value violates unique" in str(exc))


def _translate(exc: psycopg.Error, dsn: str | None = None) -> Exception:
    """Our exception for a psycopg error. The one boundary where libpq's messages enter evtool:
    libpq quotes a malformed DSN back, so every form of its password is masked here."""
    state = getattr(exc, "sqlstate", None) or ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    message = mask_secrets(message, dsn)
    if (isinstance(exc, psycopg.OperationalError) or state.startswith("08") or state in _RETRYABLE_STATES
            or _relayed_connection_loss(exc, state, message)):
        return DatabaseUnavailable(f"database unavailable: {message}")
    return DatabaseError(f"database error: {message}")


@contextmanager
def translated() -> Iterator[None]:
    """Turn psycopg errors raised inside the block into our own."""
    try:
        yield
    except psycopg.Error as exc:
        raise _translate(exc) from exc


_PATH_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def path_text(path: str | bytes) -> str:
    """A journal path as the database keeps it (text must be UTF-8; a POSIX path is bytes):
    a backslash doubled, each byte that is not UTF-8 as \\xNN. Reversible (`path_of_text`), and
    unchanged for every UTF-8 path without a backslash; also what `status` and `rejects` show."""
    raw = os.fsencode(path)
    if b"\\" in raw:
        raw = raw.replace(b"\\", b"\\\\")
    return raw.decode("utf-8", "backslashreplace")


def path_of_text(text: str) -> str:
    """The path (a str that os.fsencode turns back into its bytes) of a `path_text`."""
    if "\\" not in text:
        return text
    raw = _PATH_ESCAPE.sub(lambda m: "\\" if m.group(1) == "\\" else chr(0xDC00 + int(m.group(1)[1:], 16)),
                           text)
    return os.fsdecode(raw.encode("utf-8", "surrogateescape"))


class Seen:
    """Event digests recorded before (Store.digests_seen): each one's first content, and where it
    was first seen. The "path line n" text is made only when asked (a conflict's reason): a
    file sent twice reads a million digests, and a string each was a second of its run."""

    def __init__(self, rows: dict[bytes, tuple[bytes | None, bytes | None, int | None]],
                 paths: dict[bytes, str]) -> None:
        self._rows = rows  # digest: (content, journal fingerprint, line number)
        self._paths = paths

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._rows

    def content(self, digest: bytes) -> bytes | None:
        """The content the id was first recorded with (None: not recorded, or recorded
        without one)."""
        row = self._rows.get(digest)
        return row[0] if row is not None else None

    def where(self, digest: bytes) -> str | None:
        """"path line n" where the id was first seen, when the database knows."""
        row = self._rows.get(digest)
        path = self._paths.get(row[1]) if row is not None and row[1] is not None else None
        return f"{path} line {row[2]}" if path else None


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
            try:
                return cls(psycopg.connect(dsn, autocommit=True, connect_timeout=5))
            except psycopg.Error as exc:
                # not chained: the original (shown by --verbose) quotes the password
                raise _translate(exc, dsn) from None
            except ValueError as exc:  # a DSN psycopg cannot even pass to libpq (a NUL byte)
                raise DatabaseError(f"database error: {mask_secrets(str(exc), dsn)}") from None

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
                for statement in sql_statements(f.read_text()):
                    # One statement per execute: Citus forwards a DDL statement's query text to
                    # the workers, and a text holding several commands is refused there.
                    self.conn.execute(statement)
                self.conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, f.name)
                )
                done.append(f.name)
        return done

    def set_statement_timeout(self, seconds: float) -> None:
        """Bound every later statement of this connection (lock waits included)."""
        with translated():
            self.conn.execute(f"SET statement_timeout = {max(1, int(seconds * 1000))}")

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

    # -- the audit trail (see audit) ------------------------------------------------------------

    def journals_in_order(self) -> list[tuple]:
        """Every journal's progress: (fingerprint, path, offset, lines, tail_digest), in the
        order the database first saw them (the order their events were first processed)."""
        with translated():
            return self.conn.execute(
                'SELECT fingerprint, path, "offset", lines, tail_digest FROM journal_files'
                " ORDER BY first_seen, fingerprint"
            ).fetchall()

    def rejects_at(self, fingerprint: bytes, offsets: list[int]) -> dict[int, tuple[str, str | None]]:
        """The rejected lines of one journal at these byte offsets: {offset: (reason, reapply outcome)}."""
        if not offsets:
            return {}
        with translated():
            rows = self.conn.execute(
                'SELECT "offset", reason, reapply_outcome FROM rejected_lines'
                ' WHERE fingerprint = %s AND "offset" = ANY(%s::int8[])',
                (fingerprint, offsets),
            ).fetchall()
        return {off: (reason, outcome) for off, reason, outcome in rows}

    def event_origins(self, digests: list[bytes]) -> dict[bytes, tuple[bytes | None, int | None]]:
        """Where each opaque event id was first applied: {digest: (journal fingerprint, line)};
        (None, None) for a row older than migration 006, which did not record it."""
        if not digests:
            return {}
        with translated():
            rows = self.conn.execute(
                "SELECT digest, journal, line_no FROM applied_events WHERE digest = ANY(%s::bytea[])",
                (digests,),
            ).fetchall()
        return {bytes(d): (bytes(j) if j is not None else None, n) for d, j, n in rows}

    def revenue_report(self, *, top: int, prefix: str | None, since: datetime | None,
                       until: datetime | None, event_time: bool = False) -> tuple:
        """(adds, added, subtracts, subtracted, revenue, users, best, worst); see reports.report.

        [since, until) is applied time (revenue_log), or event time with `event_time`
        (revenue_by_minute and the pending minutes, which have the same columns).
        """
        windowed = since is not None or until is not None
        table = MINUTES if event_time else "revenue_log"
        where, params = _filters(prefix, since, until, "minute" if event_time else "applied_at")
        if event_time and windowed:  # events without a time are in no event-time window
            where += " AND minute > '-infinity'"
        with translated():
            conn = self.conn
            adds, added, subs, subtracted = conn.execute(
                "SELECT coalesce(sum(adds), 0), coalesce(sum(added), 0), coalesce(sum(subtracts), 0),"
                f" coalesce(sum(subtracted), 0) FROM {table}{where}", params
            ).fetchone()
            if windowed:
                source = (f"(SELECT user_id, sum(added) - sum(subtracted) AS revenue FROM {table}{where}"
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

    def revenue_by_period(self, by: str, *, prefix: str | None, since: datetime | None,
                          until: datetime | None) -> list[tuple]:
        """(period start, adds, added, subtracts, subtracted, users) per UTC `by` period
        (hour, day, week or month) of event time, oldest first; [since, until) is event time.

        Events without a time come first, as period None (only when no time filter is given).
        """
        if by not in PERIOD_FORMATS:
            raise ValueError(by)
        where, params = _filters(prefix, since, until, "minute")
        if since is not None or until is not None:  # a time filter selects timed events only
            where += (" AND " if where else " WHERE ") + "minute > '-infinity'"
        with translated():
            return self.conn.execute(
                "SELECT CASE WHEN minute = '-infinity' THEN NULL"
                f" ELSE to_char(date_trunc('{by}', minute AT TIME ZONE 'UTC'),"
                f" '{PERIOD_FORMATS[by]}') END AS p,"
                " sum(adds), sum(added), sum(subtracts), sum(subtracted), count(DISTINCT user_id)"
                f" FROM {MINUTES}{where} GROUP BY 1 ORDER BY 1 NULLS FIRST", params
            ).fetchall()

    def window(self, since: datetime, until: datetime) -> tuple[list[tuple], int]:
        """Per minute of event time in [since, until): (minute, events, revenue, users), and
        the distinct users of the whole window."""
        with translated():
            rows = self.conn.execute(
                "SELECT to_char(minute AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI\"Z\"'),"
                " sum(adds + subtracts), sum(added) - sum(subtracted), count(DISTINCT user_id)"
                f" FROM {MINUTES} WHERE minute >= %s AND minute < %s GROUP BY minute ORDER BY minute",
                (since, until)).fetchall()
            users = self.conn.execute(
                f"SELECT count(DISTINCT user_id) FROM {MINUTES} WHERE minute >= %s AND minute < %s",
                (since, until)).fetchone()
        return rows, int(users[0]) if users else 0

    def all_revenue(self, prefix: str | None = None) -> Iterator[tuple[str, Decimal]]:
        """(user_id, revenue) of every user in user order, streamed."""
        where, params = _filters(prefix, None, None, None)
        yield from self._stream(f"SELECT user_id, revenue FROM users_revenue{where} ORDER BY user_id", params)

    def rejected_lines(self, where: str, params: list[Any], limit: int = 0,
                       newest_first: bool = False) -> Iterator[tuple]:
        """(path, line_no, offset, reason, rejected_at, raw, reapplied_at, reapply_outcome) of the
        rejected lines matching `where` (see reports.reject_filter), streamed; `limit` 0: all.
        By file and line, or the most recently rejected first."""
        order = "rejected_at DESC, path, line_no DESC" if newest_first else "path, line_no"
        query = ('SELECT path, line_no, "offset", reason, rejected_at, raw, reapplied_at, reapply_outcome'
                 f" FROM rejected_lines{' WHERE ' + where if where else ''} ORDER BY {order}")
        params = list(params)
        if limit:
            query += " LIMIT %s"
            params.append(limit)
        yield from self._stream(query, params)

    def revenue_by_applied_period(self, by: str, last: int) -> list[tuple]:
        """(period start, adds, added, subtracts, subtracted, users) of the `last` UTC `by` periods
        (hour, day, week or month) of applied time (revenue_log), oldest first."""
        if by not in PERIOD_FORMATS:
            raise ValueError(by)
        with translated():
            rows = self.conn.execute(
                "SELECT to_char(date_trunc(%s, applied_at AT TIME ZONE 'UTC'), %s) AS p,"
                " sum(adds), sum(added), sum(subtracts), sum(subtracted), count(DISTINCT user_id)"
                " FROM revenue_log GROUP BY 1 ORDER BY 1 DESC LIMIT %s",
                (by, PERIOD_FORMATS[by], last)).fetchall()
        return rows[::-1]

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
        try:
            with translated(), self.conn.transaction():
                yield
        except BaseException:
            # Batch tables first made in this transaction are gone with it: make them again
            # (IF NOT EXISTS) in the next one, instead of failing on every later batch.
            self._temp_ready = False
            raise

    def lock_progress(self, fingerprint: bytes, path: str) -> FileProgress:
        """Lock a journal's progress row for this transaction, creating it the first time."""
        self.conn.execute(
            "INSERT INTO journal_files (fingerprint, path) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (fingerprint, path_text(path)),
        )
        row = self.conn.execute(
            'SELECT path, "offset", lines, tail_digest, applied, duplicates, rejected'
            " FROM journal_files WHERE fingerprint = %s FOR UPDATE",
            (fingerprint,),
        ).fetchone()
        assert row is not None
        return FileProgress(fingerprint, path_of_text(row[0]), *row[1:])

    def file_progress(self, fingerprint: bytes) -> FileProgress | None:
        """A journal's committed progress, without locking."""
        with translated():
            row = self.conn.execute(
                'SELECT path, "offset", lines, tail_digest, applied, duplicates, rejected'
                " FROM journal_files WHERE fingerprint = %s",
                (fingerprint,),
            ).fetchone()
        return None if row is None else FileProgress(fingerprint, path_of_text(row[0]), *row[1:])

    def _ensure_temp(self) -> None:
        if not self._temp_ready:
            # The batch tables hold a batch's rows (~150k digests, ~11 MB): at the default 8 MB
            # of local buffers they go to disk and back. Settable only before the session's
            # first temporary table; memory is taken as rows arrive, not up front.
            self.conn.execute(f"SET temp_buffers = '{TEMP_BUFFERS_MB}MB'")
            self.conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS batch_digests (digest bytea, content bytea, journal bytea,"
                " line_no bigint, part bigint) ON COMMIT DELETE ROWS"
            )
            self.conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS batch_minute_sums (user_id text, minute text, adds int8,"
                " added numeric, subtracts int8, subtracted numeric) ON COMMIT DELETE ROWS"
            )
            self._temp_ready = True

    def lock_cells(self, cells: dict[str, list[int]]) -> dict[tuple[str, int], bytes]:
        """Lock the applied_lines rows of these sender cells and read them: {(source, cell): entries}.

        Source by source in source order, cells in order, each statement by equality on the
        source (the distribution column where the table is sharded), so processors sharing
        sources wait instead of deadlocking. Missing rows are created empty first: a row that
        another transaction is creating is waited for, then locked, never overwritten.
        """
        out: dict[tuple[str, int], bytes] = {}
        for source in sorted(cells):
            wanted = cells[source]
            if not wanted:
                continue
            self.conn.execute(
                "INSERT INTO applied_lines (source, cell) SELECT %s::text, c FROM unnest(%s::int8[]) AS c"
                " ORDER BY c ON CONFLICT DO NOTHING",
                (source, wanted),
            )
            rows = self.conn.execute(
                "SELECT cell, entries FROM applied_lines WHERE source = %s::text AND cell = ANY(%s::int8[])"
                " ORDER BY cell FOR UPDATE",
                (source, wanted),
            ).fetchall()
            out.update(((source, cell), bytes(entries)) for cell, entries in rows)
        return out

    def write_cells(self, cells: dict[tuple[str, int], bytes]) -> None:
        """Store the new entries of locked applied_lines rows."""
        by_source: dict[str, list[tuple[int, bytes]]] = {}
        for (source, cell), packed in cells.items():
            by_source.setdefault(source, []).append((cell, packed))
        for source in sorted(by_source):
            rows = sorted(by_source[source])
            # In statements of about CELL_WRITE_BYTES, the entries in binary: as one text
            # parameter a batch's entries (10 bytes an event) were escaped to four times their
            # size in Python, then copied again into libpq's buffer.
            at = 0
            while at < len(rows):
                size, end = 0, at
                while end < len(rows) and (end == at or size + len(rows[end][1]) <= CELL_WRITE_BYTES):
                    size += len(rows[end][1])
                    end += 1
                chunk = rows[at:end]
                at = end
                self.conn.execute(
                    "UPDATE applied_lines a SET entries = n.entries"
                    " FROM unnest(%s::int8[], %b::bytea[]) AS n(cell, entries)"
                    " WHERE a.source = %s::text AND a.cell = n.cell",
                    ([c for c, _ in chunk], [e for _, e in chunk], source),
                )

    def claim_digests(self, digests: list[bytes], contents: list[bytes],
                      origins: list[tuple[bytes, int, str]] | None = None) -> Seen:
        """Claim event digests: record the ones never recorded (with their content and origin),
        and return the others, with their first content and where they were first seen.

        Inserted in digest order, so processors sharing events wait instead of deadlocking.
        """
        self._ensure_temp()
        with self.conn.cursor() as cur:
            with cur.copy("COPY batch_digests (digest, content, journal, line_no) FROM STDIN") as copy:
                for i, (d, c) in enumerate(zip(digests, contents, strict=True)):
                    o = origins[i] if origins else None
                    copy.write_row((d, c or None, o[0] if o else None, o[1] if o else None))
            cur.execute(
                "INSERT INTO applied_events (digest, content, journal, line_no)"
                " SELECT DISTINCT ON (digest) digest, content, journal, line_no FROM batch_digests"
                " ORDER BY digest, line_no ON CONFLICT DO NOTHING RETURNING digest"
            )
            new = {row[0] for row in cur.fetchall()}
        return self.digests_seen([d for d in dict.fromkeys(digests) if d not in new])

    def claim_digest_rows(self, rows: Iterable[bytes | bytearray], events: int, fingerprint: bytes,
                          first_line: int, parts: list[tuple[int, int]],
                          hopeful: bool = True) -> bytearray | None:
        """Claim opaque event digests from binary COPY rows the workers rendered (DIGEST_ROW:
        digest, content, part offset, line index in the part; see parser.ParsedPart.finish; a
        buffer a part, `events` rows in all): record the ones never recorded, each at its first
        line in the batch: `first_line` + the lines before its part (`parts`: part offset ->
        lines before it in the batch) + its index.

        None when all `events` were recorded now (every id new, none repeated: the common
        case, decided by a count, with nothing sent back); else the lines not applied, as
        SKIPPED rows (digest, content, line index in the batch) in line order, packed by the
        server (32 bytes a line, not a tuple each): an id recorded before (by an
        earlier batch, or a concurrent processor once it commits), and every later occurrence
        of an id within the batch. Few, as a rule: the caller reads only those lines again
        (processor.apply). Inserted in digest order, as claim_digests. `hopeful` False skips
        the all-new attempt (an id is known to repeat).
        """
        self._ensure_temp()
        joined = ("FROM batch_digests b"
                  " JOIN unnest(%(starts)s::int8[], %(bases)s::int8[]) AS p(start, base) ON p.start = b.part")
        select = ("SELECT {} b.digest, b.content, %(journal)s::bytea, %(first)s::int8 + p.base + b.line_no "
                  + joined + " ORDER BY b.digest, p.base + b.line_no")
        params = {"journal": fingerprint, "first": first_line,
                  "starts": [s for s, _ in parts], "bases": [b for _, b in parts]}
        with self.conn.cursor() as cur:
            # The sort by digest in memory, not spilled at the default 4 MB: ~2 bytes a byte of
            # binary row (SET LOCAL: this transaction only).
            size = events * DIGEST_ROW.size
            cur.execute(f"SET LOCAL work_mem = '{min(MAX_WORK_MEM_MB, max(4, size * 5 >> 21))}MB'")
            with cur.copy("COPY batch_digests (digest, content, part, line_no) FROM STDIN (FORMAT binary)"
                          ) as copy:
                copy.write(_BINARY_HEADER)
                for part in rows:  # each part's rows as they are: never joined into one copy
                    copy.write(memoryview(part))  # (sliced by psycopg without copies)
                copy.write(_BINARY_TRAILER)
            # Optimistic: a plain insert costs about half an ON CONFLICT one. A digest recorded
            # before (or by a concurrent processor, once it commits), or twice in the batch,
            # fails it; then the savepoint undoes it and the careful insert says what is new.
            if hopeful:
                cur.execute("SAVEPOINT claim_digests")
                try:
                    cur.execute("INSERT INTO applied_events (digest, content, journal, line_no) "
                                + select.format(""), params)
                except psycopg.Error as exc:
                    if not _unique_violation(exc):
                        raise
                    cur.execute("ROLLBACK TO SAVEPOINT claim_digests")
                else:
                    cur.execute("RELEASE SAVEPOINT claim_digests")
                    return None
            # The lines whose id was not recorded at that very line: an anti-join with what the
            # insert returns, all in the server, packed there as SKIPPED rows 65,536 lines to a
            # value: nothing per line crosses but its 32 bytes. (The contents their ids were
            # first recorded with are read by chunk after, digests_seen: joined in here, they
            # cost the server more than the reads; and Citus plans those reads by shard.)
            skipped = bytearray()
            for v, in cur.stream(  # a value at a time: never the list and its join both whole
                "WITH recorded AS (INSERT INTO applied_events (digest, content, journal, line_no) "
                + select.format("DISTINCT ON (b.digest)")
                + " ON CONFLICT DO NOTHING RETURNING digest, line_no),"
                " skipped AS (SELECT b.digest, b.content, p.base + b.line_no AS i " + joined
                + " WHERE NOT EXISTS (SELECT 1 FROM recorded r WHERE r.digest = b.digest"
                "  AND r.line_no = %(first)s::int8 + p.base + b.line_no))"
                " SELECT string_agg(digest || content || int8send(i), ''::bytea ORDER BY i)"
                " FROM skipped GROUP BY i >> 16 ORDER BY i >> 16", params, binary=True):
                skipped += v
        if not skipped:  # a concurrent processor's claim rolled back meanwhile
            return None
        if len(skipped) % SKIPPED.size:  # never expected: digests are 16 bytes, contents 8
            raise DatabaseError("the database sent the lines not applied in an unexpected form")
        return skipped

    def claim_new_digests(self, rows: Iterable[bytes]) -> bool:
        """Record opaque event digests straight into applied_events: `rows` its rows in COPY's
        binary format, in digest order, none twice (parser.claim_rows). True when every one was
        new; False, with nothing recorded, when one was recorded before (or is being recorded
        by a concurrent processor, once it commits): then claim_digest_rows says which.

        Half the cost of claim_digest_rows' batch table, join and sort (1M new ids: 1.2 CPU-s of
        PostgreSQL against 2.5; beside 9M recorded: 3.0 against 4.5), for the common case. In
        digest order, as claim_digests, so processors sharing events wait instead of deadlocking.
        """
        with self.conn.cursor() as cur:
            cur.execute("SAVEPOINT claim_new_digests")
            try:
                with cur.copy("COPY applied_events (digest, content, journal, line_no) FROM STDIN"
                              " (FORMAT binary)") as copy:
                    copy.write(_BINARY_HEADER)
                    for chunk in rows:
                        copy.write(chunk)
                    copy.write(_BINARY_TRAILER)
            except psycopg.Error as exc:
                if not _unique_violation(exc):
                    raise
                cur.execute("ROLLBACK TO SAVEPOINT claim_new_digests")
                return False
            cur.execute("RELEASE SAVEPOINT claim_new_digests")
            return True

    def recorded_pairs(self, digests: list[bytes]) -> set[bytes]:
        """Of `digests`, those recorded with a content: each as its digest and that content,
        joined (24 bytes). A set, no object per row but its bytes: a file sent twice asks this
        of every line, and most of them match it whole (processor._all_applied_before)."""
        if not digests:
            return set()
        with self.conn.cursor() as cur:
            return {p for p, in cur.execute(
                "SELECT digest || content FROM applied_events"
                " WHERE digest = ANY(%b) AND content IS NOT NULL",
                (digest_array(digests),), binary=True,
            ).fetchall()}

    def digests_seen(self, old: list[bytes]) -> Seen:
        """The digests of `old` recorded before: their first content, and where first seen."""
        if not old:
            return Seen({}, {})
        with self.conn.cursor() as cur:
            # Two reads, not a join: applied_events is distributed by digest, journal_files by
            # fingerprint, and Citus refuses a join that is not on both distribution columns.
            # binary both ways: no hex text of a chunk's digests, nor of what comes back
            rows = {d: (c, j, n) for d, c, j, n in cur.execute(
                "SELECT digest, content, journal, line_no FROM applied_events WHERE digest = ANY(%b)",
                (digest_array(old),), binary=True,
            ).fetchall()}  # (iterating the cursor itself costs ~2 us a row)
            journals = {j for _, j, _ in rows.values()}
            journals.discard(None)
            paths = dict(cur.execute(
                "SELECT fingerprint, path FROM journal_files WHERE fingerprint = ANY(%s::bytea[])",
                (list(journals),),
            ).fetchall()) if journals else {}
        return Seen(rows, paths)

    def add_to_totals(self, rows: Iterable[bytes], count: int, size: int, net: bool = False) -> bool:
        """Add per-(user, minute) sums, as COPY rows (see copy_rows: `count` rows of `size`
        bytes, in any chunks), to the totals, the per-minute figures (event time) and the
        revenue log, in the caller's transaction. With `net`, some rows take events back out
        (parser.take_back: negative counts and amounts): the rows are summed per (user, minute)
        even where they would be appended, and a user or minute left with no event is skipped.

        A user may have several rows (one per minute, per part of a batch); they are summed
        here. Totals are upserted in user order, so concurrent processors never deadlock. The
        per-minute rows are upserted the same way, or, from PENDING_MINUTE_ROWS rows, appended
        to revenue_minutes_pending as they are (readers sum both, see MINUTES); the return
        value says they were appended. The minute "" (no event time) is kept as -infinity.
        """
        if not count:
            return False
        self._ensure_temp()
        pending = count >= PENDING_MINUTE_ROWS
        minute = ("CASE WHEN minute = '' THEN '-infinity'::timestamptz"
                  " ELSE (minute || ':00Z')::timestamptz END")
        some = "HAVING sum(adds) + sum(subtracts) > 0" if net else ""  # (every row has an event)
        if pending and net:
            minutes = f"""
                    INSERT INTO revenue_minutes_pending (user_id, minute, adds, added, subtracts, subtracted)
                    SELECT user_id, {minute}, sum(adds), sum(added), sum(subtracts), sum(subtracted)
                    FROM batch_minute_sums GROUP BY user_id, minute {some}"""
        elif pending:
            minutes = f"""
                    INSERT INTO revenue_minutes_pending (user_id, minute, adds, added, subtracts, subtracted)
                    SELECT user_id, {minute}, adds, added, subtracts, subtracted FROM batch_minute_sums"""
        else:
            minutes = f"""
                    INSERT INTO revenue_by_minute AS r (user_id, minute, adds, added, subtracts, subtracted)
                    SELECT user_id, {minute}, sum(adds), sum(added), sum(subtracts), sum(subtracted)
                    FROM batch_minute_sums GROUP BY user_id, minute {some} ORDER BY user_id, minute
                    {_ADD_MINUTE}"""
        with self.conn.cursor() as cur:
            # The batch's sorts and aggregates in memory, not spilled at the default 4 MB: about
            # four times the rows' text, within bounds (SET LOCAL: this transaction only).
            work_mem = min(MAX_WORK_MEM_MB, max(4, size * 4 >> 20))
            cur.execute(f"SET LOCAL work_mem = '{work_mem}MB'")
            with cur.copy("COPY batch_minute_sums FROM STDIN") as copy:
                for chunk in rows:
                    copy.write(chunk)
            cur.execute(
                f"""
                WITH s AS MATERIALIZED (
                    SELECT user_id, sum(adds) AS adds, sum(added) AS added,
                           sum(subtracts) AS subtracts, sum(subtracted) AS subtracted
                    FROM batch_minute_sums GROUP BY user_id {some}
                ), minutes AS ({minutes}
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
        return pending

    def users_without_events(self, users: list[str]) -> list[str]:
        """Of `users`, those the batch's rows (add_to_totals, this transaction) leave with no
        event: every one of theirs was taken back."""
        with self.conn.cursor() as cur:
            have = {u for (u,) in cur.execute(
                "SELECT user_id FROM batch_minute_sums WHERE user_id = ANY(%s)"
                " GROUP BY user_id HAVING sum(adds) + sum(subtracts) > 0", (users,))}
        return [u for u in users if u not in have]

    def fold_minutes(self) -> tuple[int, int]:
        """Move the pending per-minute rows into revenue_by_minute, summed per (user, minute),
        in one transaction; return (pending rows folded, revenue_by_minute rows written).

        No figure changes: readers sum both tables in one snapshot. Each pending row is folded
        once: a fold running at the same time waits for this one's rows, then finds them gone,
        and rows a processor appends meanwhile wait for the next fold. Upserts go in user
        order, like the processors', so neither deadlocks the other.
        """
        with self.transaction():
            self.conn.execute(f"SET LOCAL work_mem = '{MAX_WORK_MEM_MB}MB'")
            folded, written = self.conn.execute(
                f"""
                WITH gone AS (
                    DELETE FROM revenue_minutes_pending
                    RETURNING user_id, minute, adds, added, subtracts, subtracted
                ), m AS (
                    SELECT user_id, minute, sum(adds) AS adds, sum(added) AS added,
                           sum(subtracts) AS subtracts, sum(subtracted) AS subtracted
                    FROM gone GROUP BY user_id, minute
                ), written AS (
                    INSERT INTO revenue_by_minute AS r (user_id, minute, adds, added, subtracts, subtracted)
                    SELECT user_id, minute, adds, added, subtracts, subtracted FROM m ORDER BY user_id, minute
                    {_ADD_MINUTE}
                    RETURNING 1
                )
                SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM written)
                """
            ).fetchone()
        return folded, written

    def record_rejects(self, rows: Iterable[tuple[bytes, int, int, str, bytes, str]]) -> None:
        """Record (fingerprint, offset, line_no, path, raw, reason) rows, each once."""
        rows = [(fp, off, n, path_text(path), raw, why) for fp, off, n, path, raw, why in rows]
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

    def record_mapping(self, fingerprint: bytes, mapping: Any, start: int, end: int, lines: int) -> None:
        """Note, in the batch's transaction, the mapping (mapping.Mapping or None) its lines were
        read under: one row per journal and mapping, widened to cover [start, end)."""
        digest, source = ("", "") if mapping is None else (mapping.digest, mapping.source)
        self.conn.execute(
            "INSERT INTO journal_mappings (fingerprint, mapping, source, first_offset, end_offset, lines,"
            " batches, last_at) VALUES (%s, %s, %s, %s, %s, %s, 1, now())"
            " ON CONFLICT (fingerprint, mapping) DO UPDATE SET source = EXCLUDED.source,"
            " first_offset = least(journal_mappings.first_offset, EXCLUDED.first_offset),"
            " end_offset = greatest(journal_mappings.end_offset, EXCLUDED.end_offset),"
            " lines = journal_mappings.lines + EXCLUDED.lines, batches = journal_mappings.batches + 1,"
            " last_at = EXCLUDED.last_at",
            (fingerprint, digest, path_text(source), start, end, lines),
        )

    def journal_mappings(self) -> dict[bytes, list[tuple]]:
        """Per journal fingerprint, the mappings its batches were read under: (mapping digest,
        source file, first offset, end offset, lines, batches, last batch at), oldest first."""
        with translated():
            rows = self.conn.execute(
                "SELECT fingerprint, mapping, source, first_offset, end_offset, lines, batches, last_at"
                " FROM journal_mappings ORDER BY fingerprint, last_at, first_offset").fetchall()
        out: dict[bytes, list[tuple]] = {}
        for r in rows:
            out.setdefault(bytes(r[0]), []).append(tuple(r[1:]))
        return out

    def advance(self, p: FileProgress) -> None:
        """Store the new offset and counters of a locked journal row."""
        self.conn.execute(
            'UPDATE journal_files SET path = %s, "offset" = %s, lines = %s, tail_digest = %s,'
            " applied = %s, duplicates = %s, rejected = %s, updated_at = now()"
            " WHERE fingerprint = %s",
            (path_text(p.path), p.offset, p.lines, p.tail_digest, p.applied, p.duplicates, p.rejected,
             p.fingerprint),
        )



# to_char formats of a period's start (UTC), sorting as text in time order; a week starts on
# Monday (ISO 8601).
PERIOD_FORMATS = {"hour": 'YYYY-MM-DD"T"HH24":00Z"', "day": "YYYY-MM-DD", "week": "YYYY-MM-DD",
                  "month": "YYYY-MM"}
_STATEMENT_PARTS = re.compile(
    r"""--[^\n]*|/\*.*?\*/|'(?:[^']|'')*'|"(?:[^"]|"")*"|(\$\w*\$).*?\1|;|[^;'"$/-]+|.""",
    re.S,
)


def sql_statements(text: str) -> list[str]:
    """The statements of a migration file, split at the semicolons that end them (not those in
    strings, quoted names, dollar-quoted bodies or comments); comments stay with their statement."""
    out: list[str] = []
    current: list[str] = []
    for m in _STATEMENT_PARTS.finditer(text):
        if m[0] == ";":
            statement = "".join(current).strip()
            if _has_code(statement):
                out.append(statement)
            current = []
        else:
            current.append(m[0])
    statement = "".join(current).strip()
    if _has_code(statement):
        out.append(statement)
    return out


def _has_code(statement: str) -> bool:
    return bool(re.sub(r"--[^\n]*|/\*.*?\*/|\s+", "", statement, flags=re.S))


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


def copy_rows(sums: dict[tuple[str, str], list]) -> bytes:
    """COPY text rows `user_id, minute, adds, added, subtracts, subtracted` for sums per
    (user, minute of event time).

    Each sum is [adds, added amount, subtracts, subtracted amount] (see parser.Sums).
    """
    fmt = format_value
    rows = []
    for (user, minute), s in sums.items():
        if "\\" in user or "\t" in user or "\n" in user or "\r" in user:
            user = user.translate(_COPY_ESCAPES)
        rows.append(f"{user}\t{minute}\t{s[0]}\t{fmt(s[1])}\t{s[2]}\t{fmt(s[3])}\n")
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
