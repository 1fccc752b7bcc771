"""Shared machinery of the fault-injection suite: workloads, real processes, kills and checks.

Everything here drives the real thing: `evtool` subprocesses, files on disk, HTTP on loopback
and the session's PostgreSQL (see tests/conftest.py for the `dsn` fixture).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from decimal import Decimal
from hashlib import blake2b
from pathlib import Path

import psycopg

from evtool import identity
from evtool.store import Store

# Shared with the other tests; the fault tests import them from here.
from ..conftest import Serve, evtool_cmd, exact, free_port, generate, http, journal_lines, start  # noqa: F401
from ..conftest import totals as db_totals  # noqa: F401

# -- workloads ---------------------------------------------------------------------------------


@dataclass
class Workload:
    """A journal as `evtool serve` (and foreign writers) would leave it, with its exact totals."""

    path: Path
    expected: dict[str, Decimal]
    lines: int  # lines in the journal, retries included
    events: int  # distinct valid events (what the totals are made of)
    kinds: dict[str, int] = field(default_factory=dict)


def sender_source(seed: int) -> str:
    """The `<16 hex>` source of the sender ids in build_journal(seed=seed)."""
    return blake2b(str(seed).encode(), digest_size=8).hexdigest()


def build_journal(path: Path, n: int, *, seed: int = 1, users: int = 2000) -> Workload:
    """A journal of `n` generated events with every kind of identity, and retried deliveries.

    gen_events gives opaque client ids with retries (`--with-ids`, `--repeat-ids`) and id-less
    lines; of the id-less ones about half get sender ids `<16hex>:<line>` (as `evtool send`
    makes them), a tenth receiver ids `~...`, the rest stay without an id (a foreign writer).
    Now and then the last few hundred sender-id lines are written again, as the receiver does
    when a sender re-sends a bulk whose answer it never got. None of that changes the totals.
    """
    source = path.with_name(path.name + ".source")
    doc = generate(source, n, "--seed", str(seed), "--users", str(users), "--decimals", "0.2",
                   "--with-ids", "0.3", "--repeat-ids", "0.2")
    rng = random.Random(seed)
    sender = sender_source(seed).encode()
    kinds = {"sender": 0, "opaque": 0, "receiver": 0, "none": 0, "resent": 0}
    recent: list[bytes] = []
    out: list[bytes] = []
    with open(source, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            body = raw.rstrip(b"\n")
            if b'"eventId"' in body:
                kinds["opaque"] += 1
            else:
                r = rng.random()
                if r < 0.5:
                    body = body[:-1] + b', "eventId": "%s:%d"}' % (sender, lineno)
                    recent.append(body)
                    kinds["sender"] += 1
                elif r < 0.6:
                    body = body[:-1] + b', "eventId": "~%x-%d"}' % (seed, lineno)
                    kinds["receiver"] += 1
                else:
                    kinds["none"] += 1
            out.append(body + b"\n")
            if lineno % 2000 == 0 and recent and rng.random() < 0.3:
                again = recent[-rng.randint(1, 300):]
                out.extend(b + b"\n" for b in again)
                kinds["resent"] += len(again)
                recent.clear()
    path.write_bytes(b"".join(out))
    source.unlink()
    Path(f"{source}.expected.json").unlink()
    return Workload(path, exact(doc["per_user"]), len(out), doc["events"], kinds)


# -- processes ---------------------------------------------------------------------------------


def session_members(sid: int) -> list[int]:
    """Live (not zombie) processes whose session id is `sid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append(int(entry))
    return found


def kill_9(proc: subprocess.Popen, *, linger: float = 3.0) -> list[int]:
    """`kill -9` the command itself (not its children), as a user would; reap it.

    Returns the children (forked workers) still alive `linger` seconds later: orphans. They are
    then killed, so a finding never leaks into later tests.
    """
    try:
        proc.send_signal(signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.monotonic() + linger
    left = session_members(proc.pid)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = session_members(proc.pid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


# -- the reference model -----------------------------------------------------------------------


class Model:
    """What the totals must be: a small, slow and obviously right version of the semantics.

    An event with an `eventId` (other than a receiver-made `~` id) counts the first time its id
    is seen; any other valid line counts once per position, so two identical lines count twice.
    An opaque id (not a sender id) seen again with other content (user, name, value) is a
    conflict: recorded as rejected, never counted (README Guarantees).
    """

    def __init__(self) -> None:
        self.totals: dict[str, Decimal] = {}
        self.seen: dict[str, tuple[str, str, Decimal]] = {}
        self.applied = 0
        self.duplicates = 0
        self.conflicts = 0

    def feed(self, user: str, name: str, value: Decimal, event_id: str | None) -> None:
        if event_id is not None and not event_id.startswith("~"):
            content = (user, name, value)
            first = self.seen.get(event_id)
            if first is not None:
                opaque = identity.classify(event_id)[0] is identity.Kind.OPAQUE
                if opaque and first != content:
                    self.conflicts += 1
                else:
                    self.duplicates += 1
                return
            self.seen[event_id] = content
        self.applied += 1
        delta = value if name == "add_revenue" else -value
        self.totals[user] = self.totals.get(user, Decimal(0)) + delta


def journal_events(path: Path) -> list[tuple[int, str, str, Decimal, str | None]]:
    """(end offset, user, name, value, eventId) of every line of a journal of valid events."""
    out = []
    pos = 0
    with open(path, "rb") as f:
        for raw in f:
            pos += len(raw)
            obj = json.loads(raw, parse_float=Decimal)
            out.append((pos, obj["userId"], obj["name"], Decimal(obj["value"]), obj.get("eventId")))
    return out


def model_upto(lines: list[tuple], offset: int) -> Model:
    """The model fed with every line that ends at or before `offset`."""
    m = Model()
    for end, user, name, value, event_id in lines:
        if end > offset:
            break
        m.feed(user, name, value, event_id)
    return m


def committed_state(dsn: str, path: Path) -> tuple[int, int, int, dict[str, Decimal]]:
    """(offset, applied, duplicates, totals) of one journal, read in one snapshot.

    One REPEATABLE READ transaction: a killed client's last COMMIT may still be landing on the
    server, and the offset and the totals must come from the same side of it.
    """
    with psycopg.connect(dsn) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.transaction():
            if conn.execute("SELECT to_regclass('journal_files')").fetchone()[0] is None:
                return 0, 0, 0, {}  # no command has run yet
            row = conn.execute('SELECT "offset", applied, duplicates FROM journal_files WHERE path = %s',
                               (str(path.resolve()),)).fetchone()
            got = dict(conn.execute("SELECT user_id, revenue FROM users_revenue").fetchall())
    offset, applied, duplicates = row if row else (0, 0, 0)
    return offset, applied, duplicates, got


def diff(got: dict[str, Decimal], want: dict[str, Decimal]) -> dict[str, tuple]:
    return {u: (got.get(u), want.get(u)) for u in set(got) | set(want) if got.get(u) != want.get(u)}


def reset(dsn: str) -> None:
    """Forget everything the processor did (the schema stays, created if need be)."""
    with Store.connect(dsn) as store:
        store.migrate()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE users_revenue, applied_events, applied_lines, rejected_lines,"
                     " journal_mappings, journal_files")


def backend_phase(conn: psycopg.Connection) -> str:
    """What the other client backend of this database is doing right now (the processor's)."""
    rows = conn.execute(
        "SELECT state, query FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid() AND backend_type = 'client backend'").fetchall()
    if not rows:
        return "not connected (starting)"
    state, query = rows[0]
    query = " ".join((query or "").split())
    if state == "idle":
        return "between transactions (parsing)"
    if state and state.startswith("idle in transaction"):
        return "in transaction, client side"
    for prefix, phase in (("COPY batch_sums", "COPY totals"), ("COPY batch_digests", "COPY digests"),
                          ("INSERT INTO users_revenue", "upsert totals"),
                          ("WITH s AS MATERIALIZED", "upsert totals"),
                          ("INSERT INTO applied_events", "insert digests"),
                          ("UPDATE applied_lines", "update lines"),
                          ("INSERT INTO applied_lines", "lock lines"),
                          ("SELECT cell, entries FROM applied_lines", "lock lines"),
                          ("CREATE TEMP TABLE", "temp tables"),
                          ("INSERT INTO rejected_lines", "record rejects"),
                          ("UPDATE journal_files", "advance offset"), ("COMMIT", "commit")):
        if query.startswith(prefix):
            return phase
    return f"other: {query[:40]}"
