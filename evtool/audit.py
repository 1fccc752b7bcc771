"""The audit trail (`evtool events USER`): the journal lines behind a user's total, with the
verdict the processor gave each one.

The journal is the record: nothing is stored twice. The journals are scanned for the user's id
as bytes, as JSON writes it (`"u1"`, quotes included: a line without it cannot be the user's
event, unless it writes the id with escapes, so lines with a backslash are parsed too), and only
those lines are parsed, by the shared validator. Each line's status is decided as the processor
decided it (see `identity`), from what the database keeps:

- pending: at or beyond its journal's committed offset (or its journal was never processed);
- rejected: recorded in rejected_lines (with its reason), unless `rejects --reapply` applied it
  since (then applied, or a duplicate);
- applied or duplicate: a line without an id (or with a receiver id) is applied by its
  position. Lines sharing a sender id `<S>:<n>:<chain>` or an opaque id are one event: the first
  one processed is applied, the others are duplicates of it. "First" is the order the database
  first saw the journals (journal_files.first_seen), then line order, as the processor works;
  for an opaque id the database's own record (applied_events: journal and line) wins.

The sum of the applied lines equals `evtool revenue USER` when every journal that fed the user's
total is still on disk; `Trail.explains_total` says whether it does.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson

from . import events, identity, journal
from .errors import InvalidEvent, JournalError
from .events import Value, money_add
from .store import Store, path_of_text, path_text

if TYPE_CHECKING:
    from .mapping import Mapping

SCAN_BYTES = 8 * 1024 * 1024  # copied at once while counting lines
STATUSES = ("applied", "duplicate", "rejected", "pending")


@dataclass
class Source:
    """A journal to scan: where it is read, and how far the processor committed it."""

    shown: str  # the path as `status` and `rejects` show it
    path: Path | None  # None: not on disk
    fingerprint: bytes | None
    offset: int = 0  # committed offset (0: never processed, every line is pending)
    tail: bytes | None = None
    known: bool = False  # the database has its progress row
    state: str = "ok"  # ok, new (never processed), missing, changed (not the file processed)
    lines: int = 0  # lines read
    bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.shown, "state": self.state, "offset": self.offset if self.known else None,
                "lines": self.lines, "bytes": self.bytes,
                "fingerprint": self.fingerprint.hex() if self.fingerprint else None}


@dataclass
class Line:
    """One of the user's lines, and its status."""

    journal: str
    line: int
    offset: int
    time: datetime | None
    name: str | None
    amount: Value | None
    event_id: str | None
    status: str = ""
    duplicate_of: tuple[str, int] | None = None  # (journal, line) of the applied one
    reason: str | None = None  # why it was rejected
    note: str | None = None
    key: tuple[str, int, bytes] | bytes | None = None  # sender (source, n, chain) or opaque digest
    source: Source | None = None
    invalid: str | None = None  # the validator's reason, when it rejects the line

    def to_dict(self) -> dict[str, Any]:
        from .output import money

        return {
            "journal": self.journal, "line": self.line, "offset": self.offset,
            "time": time_text(self.time),
            "name": self.name, "amount": money(self.amount) if self.amount is not None else None,
            "id": self.event_id, "status": self.status,
            "duplicate_of": {"journal": self.duplicate_of[0], "line": self.duplicate_of[1]}
            if self.duplicate_of else None,
            "reason": self.reason, "note": self.note,
        }


@dataclass
class Trail:
    """A user's lines in the journals, oldest first (journal order, then line order)."""

    user: str
    revenue: Decimal | None  # the stored total; None for a user without one
    lines: list[Line]
    journals: list[Source]
    applied_sum: Value = 0  # over every applied line of the user, whatever the filters
    filtered: bool = False
    found: int = 0  # the user's lines, before the filters
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def explains_total(self) -> bool:
        """Whether the applied lines sum to the stored total."""
        return Decimal(self.applied_sum) == (self.revenue if self.revenue is not None else 0)

    def to_dict(self) -> dict[str, Any]:
        from .output import money

        return {
            "userId": self.user,
            "revenue": money(self.revenue) if self.revenue is not None else None,
            "applied_sum": money(self.applied_sum),
            "explains_total": self.explains_total,
            "counts": self.counts,
            "journals": [j.to_dict() for j in self.journals],
            "events": [x.to_dict() for x in self.lines],
        }


def time_text(t: datetime | None) -> str | None:
    """An event time as shown: ISO 8601 in UTC with `Z`, its fraction only when it has one."""
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z") if t is not None else None


# -- which journals ---------------------------------------------------------------------------


def _fingerprint(path: Path) -> tuple[bytes | None, bool]:
    """(fingerprint, exists) of a file."""
    try:
        with open(path, "rb") as f:
            return journal.fingerprint(f), True
    except OSError:
        return None, False


def sources(store: Store, paths: list[Path]) -> list[Source]:
    """The journals to scan, in the order the database first saw them (unknown ones last).

    `paths` given: those files. Else every journal the database knows, found where `status`
    finds it (its recorded path, or a rotated copy beside it), and ./server-events.jsonl; each
    given or default journal with the worker journals of `serve --workers N` beside it.
    """
    rows = store.journals_in_order()
    order = {r[0]: i for i, r in enumerate(rows)}
    by_fp = {r[0]: r for r in rows}
    out: list[Source] = []
    seen: set[bytes] = set()

    def add(path: Path | None, shown: str, fp: bytes | None, row: tuple | None, state: str) -> None:
        s = Source(shown, path, fp, state=state)
        if row is not None:
            s.offset, s.tail, s.known = row[2], row[4], True
            seen.add(row[0])
        out.append(s)

    if paths:
        read: set[Path] = set()
        for path in journal.with_workers(paths):  # as process and status read them
            fp, exists = _fingerprint(path)
            where = path.resolve()
            if (fp is not None and fp in seen) or where in read:
                continue  # the same journal twice
            read.add(where)
            row = by_fp.get(fp) if fp is not None else None
            add(path if exists else None, path_text(str(where)), fp, row,
                "ok" if row else "new" if exists else "missing")
    else:
        from .config import JOURNAL

        for row in rows:
            path = Path(path_of_text(row[1]))
            fp, exists = _fingerprint(path)
            if fp != row[0]:
                moved = journal.find_copy(path, row[0])
                if moved is None:
                    add(None, row[1], row[0], row, "missing")
                    continue
                path = moved
            add(path, path_text(str(path)), row[0], row, "ok")
        for path in journal.with_workers([JOURNAL]):  # and `serve --workers N`'s beside it
            fp, exists = _fingerprint(path)
            if exists and (fp is None or fp not in seen):
                add(path, path_text(str(path.resolve())), fp, None, "new")
    out.sort(key=lambda s: order.get(s.fingerprint, len(order)) if s.known else len(order))
    return out


# -- scanning ---------------------------------------------------------------------------------


def _newlines(m: mmap.mmap, start: int, end: int) -> int:
    """Newlines in bytes [start, end) of `m`, a bounded piece at a time."""
    n = 0
    while start < end:
        stop = min(end, start + SCAN_BYTES)
        n += m[start:stop].count(b"\n")
        start = stop
    return n


def scan(f: BinaryIO, needle: bytes, tally: list[int] | None = None) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, line) of every complete line of `f` that holds `needle`, or a
    backslash (an escape may hide the needle). Bytes are searched (mmap, no copy), never parsed:
    a line that is not the user's costs a memory scan. Lines appended meanwhile are not read.
    `tally` ends as [complete lines, their bytes]."""
    size = journal.size(f)
    if size == 0:
        if tally is not None:
            tally[:] = [0, 0]
        return
    with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as m:
        end = m.rfind(b"\n") + 1  # a last line without its newline is still being written
        line_no, counted = 1, 0
        hit = m.find(needle, 0, end)
        slash = m.find(b"\\", 0, end)
        while hit >= 0 or slash >= 0:
            at = hit if slash < 0 or 0 <= hit < slash else slash
            start = m.rfind(b"\n", 0, at) + 1
            stop = m.find(b"\n", at, end)
            line_no += _newlines(m, counted, start)
            counted = start
            raw = m[start:stop]
            yield line_no, start, raw[:-1] if raw[-1:] == b"\r" else raw
            if 0 <= hit <= stop:
                hit = m.find(needle, stop + 1, end)
            if 0 <= slash <= stop:
                slash = m.find(b"\\", stop + 1, end)
        if tally is not None:
            tally[:] = [line_no - 1 + _newlines(m, counted, end), end]


def read_line(raw: bytes, user: str, strict: bool = False,
              mapping: Mapping | None = None) -> events.Event | tuple[str, str | None] | None:
    """The event of a valid line of `user`, read as the processor reads it (under `mapping`,
    if the journal was processed with one); (reason, its name if it has one) for an invalid
    line that names `user`; None for anything else. A line that is not JSON, or that the
    mapping cannot read, counts as the user's when it holds the user id as a JSON string."""
    try:
        obj = events.parse_json(raw)
        if mapping is not None:
            obj = mapping.view(obj, raw, strict)
        ev = events.validate(obj, raw, allow_reserved=True, strict=strict)
    except InvalidEvent as exc:
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return (exc.reason, None) if orjson.dumps(user) in raw else None
        if mapping is not None:
            return (exc.reason, None) if orjson.dumps(user) in raw else None
        if isinstance(obj, dict) and user in (obj.get("userId"), obj.get("user_id")):
            name = obj.get("name")
            return exc.reason, name if isinstance(name, str) else None
        return None
    return ev if ev.user_id == user else None


def _key(event_id: str | None) -> tuple[str, int, bytes] | bytes | None:
    kind, m = identity.classify(event_id)
    if kind is identity.Kind.POSITION:
        return None
    if m is not None:
        return (m[1], int(m[2]), identity.chain_of(m))
    assert event_id is not None
    return identity.event_digest(event_id)


def _collect(user: str, srcs: list[Source], strict: bool, mapping: Mapping | None = None) -> list[Line]:
    """The user's lines in every journal on disk, in journal then line order."""
    # The id as JSON writes it, quotes included: "u1" is not found in "u10". Written with an
    # escape, it is found by the backslash.
    needle = orjson.dumps(user)
    found: list[Line] = []
    for s in srcs:
        if s.path is None:
            continue
        try:
            f = open(s.path, "rb")
        except OSError:
            s.state = "missing"
            continue
        with f:
            if s.known:
                try:  # the bytes the processor committed must still be there
                    journal.check_unchanged(f, s.offset, s.tail, s.shown)
                except JournalError:
                    s.state = "changed"
                    continue
            tally = [0, 0]
            for n, offset, raw in scan(f, needle, tally):
                ev = read_line(raw, user, strict, mapping)
                if ev is None:
                    continue
                if isinstance(ev, tuple):
                    found.append(Line(s.shown, n, offset, None, ev[1], None, None, invalid=ev[0], source=s))
                    continue
                found.append(Line(s.shown, n, offset, ev.time, ev.name, ev.value, ev.event_id,
                                  key=_key(ev.event_id), source=s))
            s.lines, s.bytes = tally
    return found


# -- statuses ---------------------------------------------------------------------------------


def _decide(store: Store, lines: list[Line], srcs: list[Source]) -> None:
    """Give every line its status, as the processor (and `rejects --reapply`) decided it."""
    shown_of = {s.fingerprint: s.shown for s in srcs if s.fingerprint}
    processed: dict[int, list[Line]] = {}  # id(source) -> its lines before the committed offset
    for x in lines:
        assert x.source is not None
        if x.source.known and x.offset < x.source.offset:
            processed.setdefault(id(x.source), []).append(x)
        else:
            x.status = "pending"
    rejects: dict[int, tuple[str, str | None]] = {}  # id(line) -> (reason, reapply outcome)
    for group in processed.values():
        s = group[0].source
        assert s is not None and s.fingerprint is not None
        found = store.rejects_at(s.fingerprint, [x.offset for x in group])
        rejects.update((id(x), found[x.offset]) for x in group if x.offset in found)

    groups: dict[tuple[str, int, bytes] | bytes, list[Line]] = {}  # lines sharing an id, in order
    reapplied: dict[tuple[str, int, bytes] | bytes, Line] = {}  # the id claimed by a re-applied line
    for x in (x for group in processed.values() for x in group):
        r = rejects.get(id(x))
        if r is None and x.invalid is not None:  # not recorded, yet invalid: the rules changed since
            x.status, x.reason = "rejected", x.invalid
            x.note = "invalid under this evtool's rules, but the database has no reject for it"
        elif r is not None and r[1] is None:
            x.status, x.reason = "rejected", r[0]
        elif r is not None:  # rejected, then applied by `rejects --reapply` (or found a duplicate)
            x.status = "applied" if r[1] == "applied" else "duplicate"
            x.note = f"rejected ({r[0]}), then re-applied by `evtool rejects --reapply`"
            if x.key is not None and x.status == "applied":
                reapplied[x.key] = x
            elif x.key is not None:  # a duplicate of the line that holds its id
                groups.setdefault(x.key, []).append(x)
        elif x.key is None:
            x.status = "applied"  # identified by its position: applied once, with its batch
        else:
            groups.setdefault(x.key, []).append(x)
    for key in reapplied:  # the other lines with its id were processed after it
        groups.setdefault(key, [])

    origins = store.event_origins([k for k in groups if isinstance(k, bytes)])
    for key, group in groups.items():
        winner: Line | None = reapplied.get(key)
        first: tuple[str, int] | None = (winner.journal, winner.line) if winner else None
        if winner is None and key in origins and origins[key][0] is not None:
            fp, n = origins[key]
            winner = next((x for x in group if x.source and x.source.fingerprint == fp and x.line == n), None)
            if winner is None:  # applied from a line not read (its journal is gone, or not given)
                first = (shown_of.get(fp) or f"journal {fp.hex()}", n)  # type: ignore[union-attr]
                for x in group:
                    x.note = x.note or "the applied line is in a journal not read"
        elif winner is None:
            winner = next((x for x in group if x.status == ""), None)
        if winner is not None:
            winner.status = "applied"
            first = (winner.journal, winner.line)
        for x in group:
            if x is not winner:
                x.status, x.duplicate_of = "duplicate", first


def trail(store: Store, user: str, paths: list[Path] | None = None, *, strict: bool = False,
          since: datetime | None = None, until: datetime | None = None,
          status: str | None = None, mapping: Mapping | None = None) -> Trail:
    """The user's lines in the journals (`paths`, else the database's; see `sources`) with the
    processor's verdict on each; [since, until) is event time (a line without a time is in no
    window), `status` one of STATUSES; `mapping` as given to `process`. The counts cover the
    lines kept; the applied sum covers all of the user's lines, so it compares with the stored
    total whatever the filters."""
    srcs = sources(store, list(paths or []))
    lines = _collect(user, srcs, strict, mapping)
    _decide(store, lines, srcs)
    total: Value = 0
    for x in lines:
        if x.status == "applied" and x.amount is not None:
            total = money_add(total, x.amount if x.name == "add_revenue" else -x.amount)
    kept = [x for x in lines if (status is None or x.status == status)
            and (since is None or (x.time is not None and x.time >= since))
            and (until is None or (x.time is not None and x.time < until))]
    counts = {k: sum(1 for x in kept if x.status == k) for k in STATUSES}
    return Trail(user, store.revenue(user), kept, srcs, total,
                 filtered=bool(status or since or until), found=len(lines), counts=counts)
