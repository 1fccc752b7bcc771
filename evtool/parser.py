"""Turning a chunk of journal lines into what one transaction needs (runs in worker processes).

Each valid event is sorted by its identity (see `identity`): position ("fresh"), sender
`<source>:<line>:<chain>`, or opaque id. Events are summed per user here, so the database sees
one row per user and one row per source per 1024 lines (see `identity`), not one row per event.
The parsed parts are small and cheap to pickle.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import struct
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Annotated, BinaryIO, Literal

import msgspec
import orjson

from . import events, eventtime, identity, journal, native, store
from .errors import InvalidEvent, JournalChanged
from .events import money_add
from .mapping import Mapping

# Sums per (user, minute of event time): [adds, added amount, subtracts, subtracted amount].
# The minute is eventtime.minute_key ("" for an event without a time); the totals are the sums
# over a user's minutes, so per-period figures commit with them (store.add_to_totals).
Key = tuple[str, str]
Sums = dict[Key, list]
PIECE_BYTES = 1024 * 1024  # what a worker reads at once: bounds its memory
# What a worker part may hold, in bytes (see `held`), of what grows with distinct users and
# opaque-id events rather than with the journal's bytes: a part (and with it the batch) ends at
# the piece where it passes this. The Python loops' sums are dicts, ~250 bytes a key plus its
# id's characters (an estimate); the C loop's are tables (~45 bytes a key, counted as they are),
# which a worker with a spill file writes out at TABLE_FLUSH instead (so they never cut a batch).
# An opaque id the C loop takes is a 58-byte DIGEST_ROW (ParsedPart.opaque_buf): ~550k a part.
# The processor sizes later batches to fit (Processor._learn), so a cut part is rare and wastes
# little parsing.
MAX_HELD = 32 << 20
# What a worker part's C tables may hold before their rows go to its spill file (ParsedPart.flush):
# with a spill file they do not count toward MAX_HELD, so many users never cut a batch short.
TABLE_FLUSH = 48 << 20
_KEY_BYTES = 250  # a dict key's entry, tuple, sums list and ints, beside its id's characters
_OPAQUE_BYTES = 400  # an opaque-id event's tuple, digests, key and value
_REJECT_BYTES = 200  # a rejected line's tuple and reason, beside the line's bytes
_MAX_INT = events.MAX_INT
_CELL_LINES, _ENTRY = identity.CELL_LINES, identity.ENTRY
# Later occurrences of a sender entry a part records (SourcePart.extra): as many as a batch may
# take back by finding them (identity.Claim.retried); more, and the batch goes line by line.
EXTRA_MAX = identity.TAKE_BACK_MAX
_SLOTS = [slot.to_bytes(2, "big") for slot in range(_CELL_LINES)]  # identity.entry's first bytes

# The plain-shape loop in C (evtool/_fastlines.c), built with the package where a compiler is;
# EVTOOL_PURE_PYTHON=1 turns it off (the tests compare the two). Same results either way.
_fastlines = native.loops


def _new_table() -> object | None:
    """A group's sums held in C (_fastlines.Table: ~45 bytes a (user, minute) key with its index
    and id, where a dict entry is ~800), which the C loop adds to; the lines it leaves go to the
    group's dict. None without the C module."""
    return None if _fastlines is None else _fastlines.Table()


ROW_CHUNK = 65_536  # a table's keys rendered at a time when rows go to a file (see render)


@dataclass
class Rows:
    """One summing group's COPY rows (store.copy_rows): here in `data`, or a span of the spill
    file of the worker that rendered them, so that neither process holds a large batch's rows
    whole (the committing process streams them to COPY, see `chunks`)."""

    data: bytes = b""
    count: int = 0  # rows
    spans: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) in the spill file
    fd: int = -1  # that file's descriptor in the committing process (set by Batch)

    @property
    def size(self) -> int:
        return len(self.data) + sum(n for _, n in self.spans)

    def chunks(self, size: int = 4 << 20) -> Iterator[bytes]:
        """The rows, a few MiB at a time."""
        if self.data:
            yield self.data
        for offset, length in self.spans:
            for at in range(offset, offset + length, size):
                yield _read(self.fd, at, min(size, offset + length - at))


def render(sums: Sums, table: object | None = None, f: BinaryIO | None = None,
           into: Rows | None = None) -> Rows:
    """The COPY rows of a group's `sums` and `table` (a _fastlines.Table), added to `into`; a
    key in both (or in two flushes of a table, see ParsedPart.flush) has two rows, which
    PostgreSQL sums like a user's rows from two parts. With a file `f` (the worker's spill file)
    they are written there, ROW_CHUNK keys at a time, not held."""
    out = Rows() if into is None else into
    chunks = _row_chunks(sums, table)
    if f is None:
        data = b"".join(chunks)
        out.data += data
        out.count += data.count(b"\n")
        return out
    offset, length = f.tell(), 0
    for chunk in chunks:
        out.count += chunk.count(b"\n")
        length += len(chunk)
        f.write(chunk)
    if length:
        out.spans.append((offset, length))
    return out


def _row_chunks(sums: Sums, table: object | None) -> Iterator[bytes]:
    if table is not None:
        for start in range(0, len(table), ROW_CHUNK):  # type: ignore[arg-type]
            yield table.rows(start, start + ROW_CHUNK)  # type: ignore[attr-defined]
        yield store.copy_rows(table.extra)  # type: ignore[attr-defined]
    yield store.copy_rows(sums)


@dataclass
class SourcePart:
    """The events of one sender source in a chunk: their (line, chain) entries by cell, and sums."""

    # cell -> packed entries (see identity.entry): 10 bytes per event, unsorted until close.
    cells: dict[int, bytes | bytearray] = field(default_factory=dict)
    sums: Sums = field(default_factory=dict)  # of the lines the Python loops summed
    table: object | None = field(default_factory=_new_table)  # of those the C loop summed
    repeats: bool = False  # an entry occurs twice in the chunk (a retry within the batch)
    # cell -> each later occurrence of an entry that repeats within one of the part's records
    # (packed entries, EXTRA_MAX at most: past that `extra_over`), so the committing process can
    # take a few retried lines back instead of deciding the whole source line by line
    extra: dict[int, bytes] = field(default_factory=dict)
    extra_over: bool = False
    # Cells whose entries all came in strictly increasing lines (a sender's run, see
    # _SenderCells), so they are sorted and each once as they are; any other cell is sorted.
    in_order: set[int] = field(default_factory=set)
    count: int = 0  # events
    # Cells written to the committing process's spill file (see `spill`): flat (cell, offset,
    # length) triples, a cell's entries sorted and each once within a record; a cell may have
    # several records (its lines came back after it was spilled). 24 bytes a record, not 10 an event.
    spilled: array[int] = field(default_factory=lambda: array("q"))
    # `sums` as COPY rows and the hash() of each of its users, rendered by the worker (see
    # ParsedPart.slim): what the committing process needs when the source's lines are all new.
    rows: Rows = field(default_factory=Rows)
    users: array[int] = field(default_factory=lambda: array("q"))

    def close(self, f: BinaryIO | None = None) -> None:
        """Sort each cell's entries; note repeats; render the rows (to `f`, see render)."""
        self.rows = render(self.sums, self.table, f, self.rows)
        self.users.extend(user_hashes(self.sums, self.table))
        for cell, packed in self.cells.items():
            self.cells[cell] = self._sorted(cell, packed)

    def _sorted(self, cell: int, packed: bytes | bytearray) -> bytes:
        """A cell's entries sorted, each once (counted; a repeat noted)."""
        if cell in self.in_order:
            self.in_order.discard(cell)
            self.count += len(packed) // _ENTRY
            return bytes(packed)
        got = identity.entries(bytes(packed))
        self.count += len(got)
        unique = sorted(set(got))
        if len(unique) != len(got):
            self.repeats = True
            later = _later_occurrences(got)
            size = sum(map(len, self.extra.values())) + len(later) * _ENTRY
            if self.extra_over or size > EXTRA_MAX * _ENTRY:
                self.extra, self.extra_over = {}, True
            else:
                self.extra[cell] = self.extra.get(cell, b"") + b"".join(later)
        return b"".join(unique)

    def spill(self, f: BinaryIO, keep: int | None = None) -> None:
        """Write every cell but `keep` (the one lines are still arriving in) to `f`, sorted, and
        forget it: the entries go to the committing process through a file, not through memory
        (a 128 MiB batch of sender ids holds ~9 MB of them)."""
        for cell in [c for c in self.cells if c != keep]:
            data = self._sorted(cell, self.cells.pop(cell))
            self.spilled.extend((cell, f.tell(), len(data)))
            f.write(data)


@dataclass
class ParsedPart:
    """Lines [offset, end) of a journal, parsed: sums by identity kind, and rejects.

    A part is not changed once made, so a transaction that failed can apply it again.
    """

    offset: int = 0
    end: int = 0
    fresh: Sums = field(default_factory=dict)
    fresh_table: object | None = field(default_factory=_new_table)  # see SourcePart.table
    sources: dict[str, SourcePart] = field(default_factory=dict)
    # digest, content digest, (user, minute), is_add, value, offset, index of the line
    opaque: list[tuple[bytes, bytes, Key, bool, events.Value, int, int]] = field(default_factory=list)
    rejects: list[tuple[int, int, bytes, str]] = field(default_factory=list)  # offset, index, raw, why
    lines: int = 0
    # The opaque events' batch_digests binary COPY rows (store.DIGEST_ROW), sorted by digest
    # where the C module is; the worker ships only these and their count, not the events.
    opaque_rows: bytes | bytearray = b""
    opaque_count: int = 0
    # The C loop's opaque-id events, in a worker (parse_range): their DIGEST_ROWs as the loop
    # writes them and their sums, with no object per event. None: they go to `opaque`, as the
    # Python loops' do (a part parsed in the committing process, or without the C module).
    opaque_table: object | None = None
    opaque_buf: bytearray | None = None
    opaque_sums: Sums = field(default_factory=dict)  # the opaque events' sums, as if all new
    opaque_repeats: bool = False  # an opaque id occurs twice in the part (a client's retry)
    # Each group's sums (`fresh`, `opaque_sums`; each source has its own, see SourcePart) as
    # COPY rows and the hash() of each of its users: rendered by the worker, so the committing
    # process only sends them (see `slim`).
    fresh_rows: Rows = field(default_factory=Rows)
    fresh_users: array[int] = field(default_factory=lambda: array("q"))
    opaque_sum_rows: Rows = field(default_factory=Rows)
    opaque_users: array[int] = field(default_factory=lambda: array("q"))
    strict: bool = False  # parsed without normalization (events.validate's strict)
    mapping: Mapping | None = None  # the declared mapping lines were read under (see mapping)
    spill_fd: int = -1  # in the committing process: the file its sources' `spilled` records are in
    cut: bool = False  # ended before the planned end: it held more than MAX_HELD
    held: int = 0  # what it held at the end (see `held`), for the processor to size batches
    fresh_count: int = 0  # events in `fresh`
    fresh_flushed: int = 0  # events of `fresh_table` flushed already (see flush)
    digest: bytes = b""  # of the bytes parsed: checked against the file before the commit

    def finish(self, f: BinaryIO | None = None) -> None:
        """Close the sources, count, and render each group's COPY rows (to `f`, a worker's
        spill file, when given: see render) and user hashes."""
        for part in self.sources.values():
            part.close(f)
        self.fresh_count = self.fresh_flushed + count(self.fresh, self.fresh_table)
        opaque = self.opaque_sums = {}
        # optimistic, as for sender ids: the sums if every opaque id is new
        rows = self.opaque_buf if self.opaque_buf is not None else bytearray()
        if self.opaque:
            pack, start = store.DIGEST_ROW.pack, self.offset
            for d, c, key, is_add, value, _, i in self.opaque:
                add(opaque, key, is_add, value)
                rows += pack(4, 16, d, 8, c, 8, start, 8, i)
        self.opaque_count = len(rows) // store.DIGEST_ROW.size
        if self.opaque_count:
            # in digest order where the C module is, for claim_rows to merge
            self.opaque_repeats = _repeats(rows) if _fastlines is None else _fastlines.sort_digest_rows(rows)
            self.opaque_rows = rows
        self.opaque_buf = None
        self.fresh_rows = render(self.fresh, self.fresh_table, f, self.fresh_rows)
        self.fresh_users.extend(user_hashes(self.fresh, self.fresh_table))
        self.opaque_sum_rows = render(opaque, self.opaque_table, f, self.opaque_sum_rows)
        self.opaque_users.extend(user_hashes(opaque, self.opaque_table))

    def flush(self, f: BinaryIO) -> None:
        """Write the C tables' rows to the worker's spill file `f` and start them afresh: a
        table's memory stays bounded (TABLE_FLUSH) however many users a part has, and the batch
        is not cut. A key seen again after a flush has a second row, which PostgreSQL sums: in a
        journal spanning few minutes most keys come back, so flushes are large (docs/scaling.md:
        24 MiB ones cost PostgreSQL 31 CPU-s instead of 19 on 10M events over 1M users)."""
        if self.fresh_table is not None and len(self.fresh_table):  # type: ignore[arg-type]
            render({}, self.fresh_table, f, self.fresh_rows)
            self.fresh_users.extend(user_hashes({}, self.fresh_table))
            self.fresh_flushed += self.fresh_table.count  # type: ignore[attr-defined]
            self.fresh_table = _new_table()
        if self.opaque_table is not None and len(self.opaque_table):  # type: ignore[arg-type]
            render({}, self.opaque_table, f, self.opaque_sum_rows)
            self.opaque_users.extend(user_hashes({}, self.opaque_table))
            self.opaque_table = _new_table()
        for part in self.sources.values():
            if part.table is not None and len(part.table):  # type: ignore[arg-type]
                render({}, part.table, f, part.rows)
                part.users.extend(user_hashes({}, part.table))
                part.table = _new_table()

    @property
    def users(self) -> set[int]:
        """hash() of each distinct user the part's sums hold (opaque ids as if all new)."""
        return {*self.fresh_users, *self.opaque_users, *(u for p in self.sources.values() for u in p.users)}

    def slim(self) -> None:
        """Drop the sums once rendered (finish): a worker's part crosses to the committing
        process as bytes and counts, never as a dict per user beside its rows. The committing
        process re-derives a group's sums from the journal when some of its lines were seen."""
        self.fresh, self.fresh_table = {}, None
        self.opaque_sums, self.opaque_table = {}, None
        for part in self.sources.values():
            part.sums, part.table = {}, None

    def shipped(self) -> ParsedPart:
        """What a worker sends back: the opaque events stay behind, their rows go. A batch with
        an id seen before, or repeated, has the database name the lines not applied, and reads
        only those again (processor.apply)."""
        self.opaque = []
        return self


@dataclass
class SourceLines:
    """One sender source across the parts of a batch: its cells' entries, packed and sorted,
    held here (parts parsed in this process) or in the parts' spill files (read when needed)."""

    cells: dict[int, bytes]
    repeats: bool
    parts: list[SourcePart]
    # cell -> its records in the parts' spill files: (fd, offset, length)
    spilled: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)
    # cell -> the later occurrences of entries repeated within a part's record or across the
    # parts' cells held here (SourcePart.extra); across spilled records, see `occurrences`
    extra: dict[int, list[bytes]] = field(default_factory=dict)
    extra_over: bool = False  # a part had more than EXTRA_MAX of them: not all are known

    def cell_ids(self) -> set[int]:
        return self.cells.keys() | self.spilled.keys()

    def records(self, cell: int) -> int:
        """In how many pieces the batch holds a cell's entries (more than one: they may repeat)."""
        return len(self.spilled.get(cell, ())) + (cell in self.cells)

    def entries(self, cell: int) -> tuple[bytes, bool]:
        """A cell's entries in the batch, sorted, each once; and whether one occurred twice."""
        packed, later = self.occurrences(cell)
        return packed, bool(later)

    def occurrences(self, cell: int) -> tuple[bytes, list[bytes]]:
        """A cell's entries in the batch, sorted, each once; and each later occurrence of one
        (complete unless `extra_over`)."""
        records = [_read(fd, offset, length) for fd, offset, length in self.spilled.get(cell, ())]
        if cell in self.cells:
            records.append(self.cells[cell])
        later = list(self.extra.get(cell, ()))
        if len(records) == 1:
            return records[0], later
        got = [e for r in records for e in identity.entries(r)]
        later.extend(_later_occurrences(got))
        return b"".join(sorted(set(got))), later


def _later_occurrences(entries: list[bytes]) -> list[bytes]:
    """The entries of `entries` that occurred before in it (one per later occurrence)."""
    seen: set[bytes] = set()
    later = []
    for e in entries:
        if e in seen:
            later.append(e)
        else:
            seen.add(e)
    return later


def _read(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:  # the spill file is this process's own, unlinked: never expected
        raise OSError(f"spill file: read {len(data)} of {length} bytes at {offset}")
    return data


class Batch:
    """What one transaction applies: lines [offset, end), parsed as consecutive parts.

    Large batches are parsed by several workers at once; their parts are not merged in Python
    (PostgreSQL sums the parts' COPY rows per user), only their small per-source facts.
    """

    def __init__(self, parts: list[ParsedPart]) -> None:
        for i, p in enumerate(parts):
            if p.cut:  # the batch ends where a part had to end: the later parts wait for the next
                parts = parts[:i + 1]
                break
        self.parts = parts
        for p in parts:  # rows a worker wrote to its spill file: read through this process's copy
            for r in (p.fresh_rows, p.opaque_sum_rows, *(s.rows for s in p.sources.values())):
                r.fd = p.spill_fd
        self.offset = parts[0].offset
        self.end = parts[-1].end
        self.lines = sum(p.lines for p in parts)
        self.rejects: list[tuple[int, int, bytes, str]] = []  # offset, index in batch, raw, why
        self.sources: dict[str, SourceLines] = {}
        base = 0
        for p in parts:
            self.rejects.extend((off, base + i, raw, why) for off, i, raw, why in p.rejects)
            base += p.lines
            for source, part in p.sources.items():
                have = self.sources.get(source)
                if have is None:
                    have = self.sources[source] = SourceLines({}, False, [])
                have.repeats = have.repeats or part.repeats
                have.extra_over = have.extra_over or part.extra_over
                for cell, later in part.extra.items():
                    have.extra.setdefault(cell, []).extend(identity.entries(later))
                _index_spilled(have, part, p.spill_fd)
                for cell, packed in part.cells.items():
                    before = have.cells.get(cell)
                    if before is None:
                        have.cells[cell] = packed
                        continue
                    got = identity.entries(before) + identity.entries(packed)
                    later = _later_occurrences(got)  # (each record holds an entry once)
                    if later:
                        have.repeats = True
                        have.extra.setdefault(cell, []).extend(later)
                    have.cells[cell] = b"".join(sorted(set(got)))
                have.parts.append(part)
        # the opaque ids: only their count and the parts' rows (see ParsedPart.shipped)
        self.opaque_count = sum(p.opaque_count for p in parts)
        self.part_lines: list[tuple[int, int]] = []  # (part offset, lines before it in the batch)
        base = 0
        for p in parts:
            self.part_lines.append((p.offset, base))
            base += p.lines
        self.strict = parts[0].strict
        self.mapping = parts[0].mapping

    @classmethod
    def empty(cls, offset: int) -> Batch:
        return cls([ParsedPart(offset, offset)])


def _index_spilled(lines: SourceLines, part: SourcePart, fd: int) -> None:
    if part.spilled and fd < 0:
        raise ValueError("a part with spilled cells but no spill file")
    s = part.spilled
    for i in range(0, len(s), 3):
        lines.spilled.setdefault(s[i], []).append((fd, s[i + 1], s[i + 2]))


def user_hashes(sums: Sums, table: object | None = None) -> array[int]:
    """hash() of each distinct user of `sums` (and of `table`, a _fastlines.Table: a user in
    both is there twice, which the counts that read these ignore): 8 bytes a user where the ids
    would be up to 256 characters. The workers are forked, so they hash as the committing
    process does."""
    out = array("q", {hash(k[0]) for k in sums})
    if table is not None:
        out.frombytes(table.users())  # type: ignore[attr-defined]
        out.extend({hash(k[0]) for k in table.extra})  # type: ignore[attr-defined]
    return out


def all_sums(sums: Sums, table: object | None = None) -> Sums:
    """`sums` and `table`'s sums as one dict (for the tests and messages: a copy)."""
    out = {k: list(s) for k, s in sums.items()}
    if table is not None:
        merge(out, table.to_dict(), take=True)  # type: ignore[attr-defined]
    return out


def count(sums: Sums, table: object | None = None) -> int:
    """Events summed in `sums` (and `table`)."""
    return sum(s[0] + s[2] for s in sums.values()) + (0 if table is None else table.count)  # type: ignore[attr-defined]


def add(sums: Sums, key: Key, is_add: bool, value: events.Value) -> None:
    """Count one event into `sums`, exactly (events.money_add, never the default context)."""
    s = sums.get(key)
    if s is None:
        sums[key] = [1, value, 0, 0] if is_add else [0, 0, 1, value]
    elif is_add:
        s[0] += 1
        s[1] = money_add(s[1], value)
    else:
        s[2] += 1
        s[3] = money_add(s[3], value)


def merge(into: Sums, other: Sums, *, take: bool = False) -> None:
    """Add `other` into `into`; with take=True, `other` is dropped after and its lists reused."""
    for user, s in other.items():
        t = into.get(user)
        if t is None:
            into[user] = s if take else list(s)
        else:
            t[0] += s[0]
            t[1] = money_add(t[1], s[1])
            t[2] += s[2]
            t[3] = money_add(t[3], s[3])


def _event(raw: bytes, strict: bool = False,
           mapping: Mapping | None = None) -> tuple[Key, bool, events.Value, str | None]:
    """((user, minute), is_add, value, eventId) of a valid line; raises InvalidEvent.

    The common shape (events.common_shape) is taken as it is; everything else goes through
    the shared validator, which accepts a superset of it. Under a mapping, the line is first
    read as the event it stands for (mapping.Mapping.view).
    """
    obj = events.parse_json(raw)
    if mapping is not None:
        obj = mapping.view(obj, raw, strict)
    if events.common_shape(obj, strict):
        eid = obj.get("eventId")  # type: ignore[union-attr]
        if eid is not None:
            events.check_event_id(eid, allow_reserved=True)
        key = (obj["userId"], eventtime.fast_minute(obj))  # type: ignore[index,arg-type]
        return key, obj["name"] == "add_revenue", obj["value"], eid  # type: ignore[index]
    ev = events.validate(obj, raw, allow_reserved=True, strict=strict)
    return (ev.user_id, eventtime.minute_key(ev.time)), ev.name == "add_revenue", ev.value, ev.event_id


def take_back(sums: Sums, key: Key, is_add: bool, value: events.Value) -> None:
    """Count an event out of `sums` (as `add` counts one in): rows of such sums, added to rows
    that counted the event, cancel it (PostgreSQL sums a key's rows)."""
    s = sums.setdefault(key, [0, 0, 0, 0])
    if is_add:
        s[0] -= 1
        s[1] = money_add(s[1], -value)
    else:
        s[2] -= 1
        s[3] = money_add(s[3], -value)


def take_back_lines(sums: Sums, raws: list[bytes], strict: bool = False,
                    mapping: Mapping | None = None) -> list[tuple[bytes, bytes]] | None:
    """Count the opaque-id events of lines `raws` out of `sums` (as take_back, line by line)
    and return each line's (event digest, content digest), for the caller to check that they
    are the events it parsed before. Parsed as one piece, by the same loops as a part (the C
    loop where it is built: no object per line). None, with `sums` unchanged, when a line is not
    a valid event with an opaque id (the file changed under the run)."""
    data = b"\n".join(raws) + b"\n"
    out = ParsedPart(0, len(data), strict=strict, mapping=mapping)
    if _fastlines is not None:
        out.opaque_table, out.opaque_buf = _new_table(), bytearray()
    parse(data, 0, out, close=False)
    if (out.rejects or out.sources or count(out.fresh, out.fresh_table) or out.lines != len(raws)
            or len(out.opaque) + len(out.opaque_buf or b"") // store.DIGEST_ROW.size != len(raws)):
        return None
    ids: list[tuple[bytes, bytes]] = [(b"", b"")] * len(raws)
    for _, _, d, _, c, _, _, _, i in store.DIGEST_ROW.iter_unpack(out.opaque_buf or b""):
        ids[i] = (d, c)
    for d, c, key, is_add, value, _, i in out.opaque:
        ids[i] = (d, c)
        take_back(sums, key, is_add, value)
    _count_out(sums, {}, out.opaque_table)
    return ids


def take_back_sender_lines(sums: Sums, raws: list[bytes], source: str, strict: bool = False,
                           mapping: Mapping | None = None) -> list[tuple[int, bytes]] | None:
    """Count the events of lines `raws`, each a sender line of `source`, out of `sums` (as
    take_back), parsed as one piece by the same loops as a part; return their (line number,
    chain), sorted, for the caller to check that they are the lines it chose. None, with `sums`
    unchanged, when a line is not a valid event of `source`."""
    if not raws:
        return []
    data = b"\n".join(raws) + b"\n"
    out = ParsedPart(0, len(data), strict=strict, mapping=mapping)
    parse(data, 0, out, close=False)
    part = out.sources.get(source)
    if (part is None or len(out.sources) != 1 or out.rejects or out.opaque
            or count(out.fresh, out.fresh_table) or out.lines != len(raws)):
        return None
    got = sorted((cell * _CELL_LINES + int.from_bytes(e[:2], "big") + 1, e[2:])
                 for cell, packed in part.cells.items() for e in identity.entries(bytes(packed)))
    if len(got) != len(raws):
        return None
    _count_out(sums, part.sums, part.table)
    return got


def _count_out(sums: Sums, other: Sums, table: object | None) -> None:
    """Count the sums of `other` and of a C `table` out of `sums`, as merge counts sums in."""
    if table is not None:
        other = {**other}
        merge(other, table.to_dict(), take=True)  # type: ignore[attr-defined]
    merge(sums, {key: [-a, -x, -s, -y] for key, (a, x, s, y) in other.items()}, take=True)


def event_id(raw: bytes, mapping: Mapping | None = None) -> str:
    """The eventId of a valid line (for a message)."""
    return str(_event(raw, False, mapping)[3])


def exit_with_parent(parent: int) -> None:
    """Pool initializer: the worker leaves as soon as the processor that forked it is gone.

    After a `kill -9` of the processor its workers would otherwise wait forever on the pool's
    queue: forked, they hold its pipe's write end themselves, so they never see it close.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def held(part: ParsedPart, tables: bool = True) -> int:
    """Bytes a part holds, what its memory grows with: the rejected lines, the C tables' own
    count (Table.held: it grows smoothly with the keys, so batches planned to fit do fit; the
    arrays reserve up to about a third more; not counted when `tables` is False: a worker with a
    spill file writes them there, see ParsedPart.flush), the C loop's opaque-id rows, the dicts'
    keys and opaque-id events estimated (a key's id length from a sample of the keys, so the
    check stays cheap)."""
    in_tables = tables_held(part) if tables else 0
    keys = len(part.fresh) + sum(len(p.sums) for p in part.sources.values())
    sample = [k[0] for k in itertools.islice(part.fresh, 256)]
    if not sample:
        for p in part.sources.values():
            sample = [k[0] for k in itertools.islice(p.sums, 256)]
            if sample:
                break
    mean = sum(map(len, sample)) / len(sample) if sample else 0
    rejects = len(part.rejects) * _REJECT_BYTES + sum(len(r[2]) for r in part.rejects)
    opaque = len(part.opaque) * _OPAQUE_BYTES + len(part.opaque_buf or b"")
    return int(in_tables + keys * (mean + _KEY_BYTES) + opaque + rejects)


CLAIM_CHUNK = 65536  # applied_events rows a chunk of claim_rows (~4.3 MB)
# A later occurrence of an opaque id in a batch (claim_rows, in C): its index in the batch, digest,
# content, and the first occurrence's content and index.
REPEAT = struct.Struct(">q16s8s8sq")


def claim_rows(batch: Batch, fingerprint: bytes, first_line: int,
               repeats: bytearray) -> Iterator[bytes] | None:
    """The batch's opaque ids as applied_events rows in COPY's binary format (without its
    header and trailer), in digest order, CLAIM_CHUNK rows a chunk: the parts' rows (sorted
    by each part's finish) merged, each with the journal's `fingerprint` and its line number
    (`first_line` + the lines before its part + its index). An id's first occurrence in the
    batch is written; each later one (a client's retry) goes to `repeats` as a REPEAT record
    (48 bytes, not a tuple each: a batch of retries stays small), in line order once the last
    chunk is taken. For store.claim_new_digests, which inserts them as they come. None without
    the C module (the parts are not sorted)."""
    if _fastlines is None:
        return None
    with_ids = [(p.opaque_rows, base) for p, (_, base) in zip(batch.parts, batch.part_lines, strict=True)
                if p.opaque_count]
    parts, bases = [r for r, _ in with_ids], [b for _, b in with_ids]
    total = sum(len(r) for r in parts) // store.DIGEST_ROW.size

    def chunks() -> Iterator[bytes]:
        at, last = [0] * len(parts), bytearray()
        while sum(at) < total:
            chunk = _fastlines.claim_rows(parts, bases, fingerprint, first_line, at, CLAIM_CHUNK,
                                          last, repeats)
            if chunk:
                yield chunk
        _fastlines.sort_repeats(repeats)

    return chunks()


def _repeats(rows: bytes | bytearray) -> bool:
    """Whether an opaque id's digest occurs twice among DIGEST_ROW rows (with the C module,
    _fastlines.sort_digest_rows says it)."""
    size, view = store.DIGEST_ROW.size, memoryview(rows)
    digests = {bytes(view[i + 6:i + 22]) for i in range(0, len(rows), size)}
    return len(digests) != len(rows) // size


def tables_held(part: ParsedPart) -> int:
    """Bytes the part's C tables hold (Table.held)."""
    tables = (part.fresh_table, part.opaque_table, *(p.table for p in part.sources.values()))
    return sum(t.held for t in tables if t is not None)  # type: ignore[attr-defined]


def parse_range(path: str, identity: tuple[int, int], start: int, end: int,
                    piece: int = PIECE_BYTES, strict: bool = False, opener: str | None = None,
                    max_held: int = MAX_HELD, mapping: Mapping | None = None,
                    spill: tuple[str, int, int] | None = None) -> ParsedPart:
    """Parse bytes [start, end) of a journal (both at line boundaries), `piece` bytes at a time.

    Runs in a worker process, which opens the file itself: `opener` (the caller's descriptor
    under /proc, so a journal renamed or deleted meanwhile is still the one read), else `path`;
    `identity` (st_dev, st_ino) makes sure it reads the same file the caller holds open. Ends
    early (`cut`, `end` moved back to the last line parsed) once the part holds more than
    `max_held` bytes (see `held`). `digest` covers exactly the bytes parsed, [start, end).
    `spill`: a file of the committing process (its descriptor under /proc, st_dev, st_ino) that
    the sender cells go to piece by piece (SourcePart.spill), so no process holds a part's entries.
    """
    out = ParsedPart(start, end, strict=strict, mapping=mapping)
    if _fastlines is not None:  # the C loop's opaque ids as rows: see ParsedPart.opaque_table
        out.opaque_table, out.opaque_buf = _new_table(), bytearray()
    h = journal.range_digest()
    # r+b, not wb: nothing is truncated before the file is known to be the one given
    with open(opener or path, "rb") as f, open(spill[0], "r+b") if spill else nullcontext() as sf:
        if sf is not None and spill is not None:
            sst = os.fstat(sf.fileno())
            if (sst.st_dev, sst.st_ino) != spill[1:]:  # never expected: the caller keeps it open
                raise OSError(f"{spill[0]} is not the spill file this part was given")
        st = os.fstat(f.fileno())
        if (st.st_dev, st.st_ino) != identity:
            raise JournalChanged(f"{path} was replaced while a batch of it was being processed. "
                                 "Nothing of the batch was applied")
        f.seek(start)
        pos, rest = start, b""
        while pos < end:
            block = f.read(min(piece, end - pos))
            if not block:  # the file shrank under the parse: never wait for bytes that are gone
                raise JournalChanged(f"{path} was truncated while a batch of it was being processed "
                                     f"(it ends before byte {end}). Nothing of the batch was applied")
            data = rest + block
            pos += len(block)
            cut = data.rfind(b"\n") + 1 if pos < end else len(data)
            chunk = data[:cut]
            h.update(chunk)  # exactly the bytes parsed, so a part cut early digests its own range
            parse(chunk, pos - len(data), out, close=False)
            rest = data[cut:]
            if sf is not None:
                for part in out.sources.values():
                    part.spill(sf, max(part.cells, default=None))
                if tables_held(out) > TABLE_FLUSH:
                    out.flush(sf)
            if pos - len(rest) < end and held(out, tables=sf is None) > max_held:
                out.end, out.cut = pos - len(rest), True
                break
        if sf is not None:
            for part in out.sources.values():
                part.spill(sf)
        out.held = held(out, tables=sf is None)
        out.finish(sf)  # the rows go to the spill file, where there is one
    out.digest = h.digest()
    out.slim()
    return out.shipped()


def parse(data: bytes, offset: int, out: ParsedPart | None = None, *, close: bool = True,
          strict: bool = False, mapping: Mapping | None = None) -> ParsedPart:
    """Parse complete lines `data` (starting at byte `offset` of the journal) into `out`.

    `strict` and `mapping` apply only to a new part; a given `out` keeps its own. Where the C
    loop is built, it sums the lines it takes and leaves the others to the Python loops
    (`_sum_native`). Else a piece whose every line has the plain shape (what `serve` and `send`
    write, see `_plain_lines`) is decoded and checked whole by msgspec, then summed
    (`_sum_plain`); any other piece line by line (`_sum_lines`), as is every piece under a
    mapping. All give the same part: a line no loop can finish takes `_line`.
    """
    out = ParsedPart(offset, offset + len(data), strict=strict, mapping=mapping) if out is None else out
    if out.mapping is not None:
        _sum_lines(data, offset, out)
    elif _fastlines is not None:
        _sum_native(data, offset, out)
    else:
        _sum_python(data, offset, out)
    if close:
        out.finish()
    return out


def _sum_python(data: bytes, offset: int, out: ParsedPart) -> None:
    """Sum the lines of `data` with the Python loops: whole by msgspec if it can, else line by line."""
    plain = _plain_lines(data)
    if plain is not None:
        _sum_plain(plain, data, offset, out)
    else:
        _sum_lines(data, offset, out)


if _fastlines is not None:
    _fastlines.configure(SourcePart, eventtime.STAMP_MINUTE, eventtime.stamp_minute,
                         identity.event_digest, identity.content_digest)
# Lines the C loop leaves to the Python loops in one piece before the rest of the piece goes to
# them whole (a journal of decimal values, say, which the C loop never takes).
_NATIVE_STOPS = 8


def _sum_native(data: bytes, offset: int, out: ParsedPart) -> None:
    """Sum the lines of `data` with the C loop; each line it does not take goes to the Python
    loop (_sum_lines, one line), whose rules decide; after _NATIVE_STOPS such lines, the rest of
    the piece goes to the Python loops whole. Each loop gives any line the same result (the
    tests pin them to the shared validator), so the part is the same as theirs."""
    pos, size, stops = 0, len(data), 0
    fresh, sources = out.fresh_table, out.sources
    opaque = (out.opaque,) if out.opaque_table is None else (out.opaque_table, out.opaque_buf, out.offset)
    while True:
        pos, out.lines = _fastlines.sum_lines(data, pos, offset, out.lines, fresh, sources, *opaque)
        if pos >= size:
            return
        end = data.find(b"\n", pos) + 1
        if stops == _NATIVE_STOPS or not end:  # (no newline: a range the file no longer ends in one)
            _sum_python(data[pos:], offset + pos, out)
            return
        stops += 1
        _sum_lines(data[pos:end], offset + pos, out)
        pos = end


class _Plain(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A line in the plain shape: these members only, of these types and bounds (the common
    shape's checks, events.common_shape, done by msgspec in C). An integer value stops at
    int64, far below events.MAX_INT (msgspec reads any integer, orjson turns those past uint64
    into floats); a larger one or any other member sends the piece line by line. Any other
    value is a Decimal of the number's very text (or of a string: see _sum_plain)."""

    userId: Annotated[str, msgspec.Meta(min_length=1, max_length=events.MAX_USER_ID)]
    name: Literal["add_revenue", "subtract_revenue"]
    value: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | Decimal
    eventId: str | msgspec.UnsetType = msgspec.UNSET
    timestamp: str | msgspec.UnsetType = msgspec.UNSET  # eventtime.STAMP_FIELD


_PLAIN_LINES = msgspec.json.Decoder(_Plain)


def _plain_lines(data: bytes) -> list[_Plain] | None:
    """Every line of `data` decoded as a _Plain, or None when one is not (or might not be).

    ASCII without escapes, so each decoded string is the line's own text: no surrogate or NUL
    (JSON has no raw control characters), nothing msgspec and orjson could read differently.
    msgspec reads NDJSON as a stream of values, so each line must end its object (`}` before
    the newline: in a flat object that closes it) and the count must match: one object a line.
    """
    if not data.isascii() or b"\\" in data or b"\r" in data:
        return None
    n = data.count(b"\n")
    if data.count(b"}\n") != n:
        return None
    try:
        plain = _PLAIN_LINES.decode_lines(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return plain if len(plain) == n else None


def _sum_plain(plain: list[_Plain], data: bytes, offset: int, out: ParsedPart) -> None:
    """Sum the lines of `data`, decoded as `plain` (see _plain_lines), into `out`."""
    fresh, opaque = out.fresh, out.opaque
    sender, sender_id = _SenderCells(out.sources).add, identity.SOURCE_ID.fullmatch
    stamp_minutes, stamp_minute = eventtime.STAMP_MINUTE, eventtime.stamp_minute
    max_eid, receiver, unset = events.MAX_EVENT_ID, events.RECEIVER_ID_PREFIX, msgspec.UNSET
    event_digest, content_digest = identity.event_digest, identity.content_digest
    base = out.lines
    starts: list[int] = []  # each line's offset in `data`, made when one is needed
    strings = _STRING_VALUE.search(data) is not None  # a string value somewhere (see _decimal)
    decimals = _DECIMALS
    for index, e in enumerate(plain, base):
        t = e.timestamp
        if t is unset:
            minute = ""
        else:
            minute = stamp_minutes.get(t)
            if minute is None:
                minute = stamp_minute(t)
        eid = e.eventId
        value = e.value
        if type(value) is not int:  # a decimal: checked as events.validate checks a number's text
            checked = None if strings else decimals.get(value)
            if checked is None:
                starts = starts or _starts(data)
                i = index - base
                checked = _decimal(value, data[starts[i]:starts[i + 1] - 1])
            value = checked
        if minute is None or value is None:
            sums = None
        elif eid is unset:
            sums = fresh
        elif (m := sender_id(eid)) is not None:
            sums = sender(m)
        elif 0 < len(eid) <= max_eid and eid.isprintable():  # events.check_event_id, inlined
            if eid[0] == receiver:
                sums = fresh  # a receiver id: identity.Kind.POSITION
            else:
                starts = starts or _starts(data)
                is_add = e.name == "add_revenue"
                opaque.append((event_digest(eid), content_digest(e.userId, is_add, value),
                               (e.userId, minute), is_add, value, offset + starts[index - base], index))
                continue
        else:
            sums = None
        if sums is None:
            starts = starts or _starts(data)
            i = index - base
            _line(out, data[starts[i]:starts[i + 1] - 1], offset + starts[i], index, sender)
            continue
        add(sums, (e.userId, minute), e.name == "add_revenue", value)
    out.lines = base + len(plain)


_STRING_VALUE = re.compile(rb'"value"\s*:\s*"')
# A Decimal -> its events.check_decimal, which depends on the number alone (not on how it is
# written: 7.80 and 7.8 give the same), so a price seen before costs one lookup. Bounded.
_DECIMALS: dict[Decimal, events.Value] = {}
_DECIMALS_KEPT = 16_384


def _decimal(value: Decimal, line: bytes) -> events.Value | None:
    """The exact value of a line whose value msgspec read as a Decimal, as events.validate
    gives it for a JSON number (events.check_decimal of its text); None when the validator must
    decide: a string value (msgspec reads "1.5" as a number too; the validator has its own rules
    for strings) or a value out of bounds (so that the reason is the validator's)."""
    if _STRING_VALUE.search(line):
        return None
    try:
        checked = events.check_decimal(value)
    except InvalidEvent:
        return None
    if len(_DECIMALS) >= _DECIMALS_KEPT:
        _DECIMALS.clear()
    _DECIMALS[value] = checked
    return checked


def _starts(data: bytes) -> list[int]:
    """The offset of each line of `data` (complete lines), and len(data) after the last."""
    return [0, *itertools.accumulate(len(line) + 1 for line in data.split(b"\n")[:-1])]


class _SenderCells:
    """Where a sender id's entry goes: the cell of its source's part (identity.entry). The
    lines of a source come in runs, so its part and cell are kept from one id to the next."""

    __slots__ = ("sources", "source", "n", "part", "cell")

    def __init__(self, sources: dict[str, SourcePart]) -> None:
        self.sources = sources
        self.source: str | None = None
        self.n = -1
        self.part = SourcePart()
        self.cell = bytearray()

    def add(self, m: re.Match[str]) -> Sums:
        """Note a sender id's entry (its match of identity.SOURCE_ID); return its source's sums."""
        source, number, chain = m.groups()
        n = int(number) - 1
        if source != self.source:
            part = self.sources.get(source)
            if part is None:
                part = self.sources[source] = SourcePart()
            self.part, self.source, self.n = part, source, -1
        if n // _CELL_LINES != self.n // _CELL_LINES:  # identity.cell_of
            cell = self.part.cells.get(n // _CELL_LINES)
            if cell is None:
                cell = self.part.cells[n // _CELL_LINES] = bytearray()
                self.part.in_order.add(n // _CELL_LINES)
            elif cell[-_ENTRY:2 - _ENTRY] >= _SLOTS[n % _CELL_LINES]:  # back to a cell, below its last line
                self.part.in_order.discard(n // _CELL_LINES)
            self.cell = cell
        elif n <= self.n:
            self.part.in_order.discard(n // _CELL_LINES)
        self.n = n
        cell = self.cell
        cell += _SLOTS[n % _CELL_LINES]
        cell += bytes.fromhex(chain) if chain else identity.ZERO_CHAIN
        return self.part.sums


def _line(out: ParsedPart, line: bytes, start: int, index: int,
          sender: Callable[[re.Match[str]], Sums]) -> None:
    """One line that the loops' common cases do not cover: the shared validator decides.
    `sender` is the loop's _SenderCells.add: one filer of entries, so its cells' order holds."""
    try:
        key, is_add, value, eid = _event(line, out.strict, out.mapping)
    except InvalidEvent as exc:
        out.rejects.append((start, index, line, exc.reason))
        return
    kind, m = identity.classify(eid)
    if kind is identity.Kind.POSITION:
        add(out.fresh, key, is_add, value)
    elif m is None:
        # the content is what the event means (user, name, value), not its time: a retry
        # that serve stamped with another receive time is the same event
        out.opaque.append((identity.event_digest(eid), identity.content_digest(key[0], is_add, value),
                           key, is_add, value, start, index))
    else:
        add(sender(m), key, is_add, value)


def _sum_lines(data: bytes, offset: int, out: ParsedPart) -> None:
    """Sum the lines of `data` into `out`, line by line.

    The loop inlines the common case (an integer value, and no id or a sender or opaque id)
    because it runs once per event; every other line takes `_line`, which ends in the shared
    validator. Under a mapping, each object is first turned into the common shape by the
    mapping's compiled accessor (None, for the slow path, when it needs the full view).
    """
    strict, mapping = out.strict, out.mapping
    mapped = None if mapping is None else mapping.accessor(strict)
    fresh, opaque = out.fresh, out.opaque
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    max_user = events.MAX_USER_ID
    deep_len, too_deep = events.DEEP_LEN, events.too_deep
    fast_minute = eventtime.fast_minute
    stamp_minutes, stamp_minute = eventtime.STAMP_MINUTE, eventtime.stamp_minute
    sender, sender_id = _SenderCells(out.sources).add, identity.SOURCE_ID.fullmatch
    max_eid, receiver = events.MAX_EVENT_ID, events.RECEIVER_ID_PREFIX
    event_digest, content_digest = identity.event_digest, identity.content_digest
    pos = offset
    base = out.lines
    index = base - 1
    lines = data.split(b"\n")
    lines.pop()  # what follows the last newline: nothing, as `data` is complete lines
    crlf = b"\r" in data  # (most journals have none: no per-line test then)
    for index, line in enumerate(lines, base):
        start = pos
        pos += len(line) + 1
        if crlf and line[-1:] == b"\r":
            line = line[:-1]
        try:
            obj = loads(line)
        except decode_error:
            if not line or line.isspace():
                continue
            obj = None  # _line below says what is wrong
        if len(line) > deep_len and obj is not None and too_deep(line):
            obj = None  # _line says it nests too deep
        if mapped is not None:
            obj = mapped(obj)  # the common shape, or None: _line applies the full mapping
        # events.common_shape, inlined (it runs once per event); validate accepts a superset.
        if type(obj) is dict:
            user = obj.get("userId")
            value = obj.get("value")
            name = obj.get("name")
            if (type(value) is int and 0 <= value < _MAX_INT and type(user) is str
                    and 0 < len(user) <= max_user and "\x00" not in user
                    and (name == "add_revenue" or name == "subtract_revenue")):
                eid = obj.get("eventId")
                t = obj.get("timestamp")
                if len(obj) == 3 + (eid is not None) + (t is not None):
                    # no key but those read: no user_id alias, no other time field, so the
                    # minute is the timestamp's alone (eventtime.fast_minute, inlined)
                    if t is None:
                        minute = ""
                    elif type(t) is str:
                        minute = stamp_minutes.get(t)
                        if minute is None:
                            minute = stamp_minute(t)
                    else:
                        minute = None
                elif strict or "user_id" not in obj:
                    minute = fast_minute(obj)
                else:
                    minute = None
                if minute is not None:
                    if eid is None:
                        sums = fresh
                    elif type(eid) is str and (m := sender_id(eid)) is not None:
                        sums = sender(m)
                    elif type(eid) is str and 0 < len(eid) <= max_eid and eid.isprintable():
                        if eid[0] == receiver:
                            sums = fresh  # a receiver id: identity.Kind.POSITION
                        else:  # an opaque id (events.check_event_id, inlined)
                            is_add = name == "add_revenue"
                            opaque.append((event_digest(eid), content_digest(user, is_add, value),
                                           (user, minute), is_add, value, start, index))
                            continue
                    else:
                        sums = None
                    if sums is not None:
                        add(sums, (user, minute), name == "add_revenue", value)
                        continue
        _line(out, line, start, index, sender)
    out.lines = index + 1


def source_events(data: bytes, source: str, strict: bool = False,
                  mapping: Mapping | None = None) -> Iterator[tuple[int, bytes, Key, bool, events.Value]]:
    """(line, chain, (user, minute), is_add, value) of every valid event of `source` in `data`, in order.

    The slow path, used when some of a source's lines may have been applied already: lines are
    taken one at a time, never a list of the batch's lines or events beside its bytes.
    """
    prefix = source.encode()
    for line in io.BytesIO(data):
        if prefix not in line:
            continue
        line = line.rstrip(b"\r\n")
        try:
            key, is_add, value, eid = _event(line, strict, mapping)
        except InvalidEvent:
            continue
        _, m = identity.classify(eid)
        if m is not None and m[1] == source:
            yield int(m[2]), identity.chain_of(m), key, is_add, value
