"""Identity: how an event is remembered, so that it is applied exactly once (design section 3).

- no `eventId`, or an id the receiver made (`~...`): the line's position identifies it, and
  the committed offset already covers that, so it is always new ("fresh");
- a sender id `<S>:<n>:<c>`: line `n` of a source file whose first line hashes to `S`, and `c`
  the chain digest of the file's first `n` lines. Two lines are the same event exactly when
  their files agree byte for byte up to them; the processor remembers (n, c) per source, in
  cells of CELL_LINES line numbers (one row each), so a batch touches only its own cells;
- any other id (opaque, the client's own): a digest row each, with the digest of its content
  so that an id reused for another event is caught instead of dropped.

Old sender ids `<S>:<n>` (written by evtool 0.1) are read as chain ZERO_CHAIN.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from decimal import Decimal
from enum import Enum
from hashlib import blake2b
from typing import TYPE_CHECKING

from .events import RECEIVER_ID_PREFIX, Value, format_value

if TYPE_CHECKING:
    from .parser import SourceLines
    from .store import Store

SOURCE_ID = re.compile(r"([0-9a-f]{16}):([1-9][0-9]{0,17})(?::([0-9a-f]{16}))?")
SOURCE_ID_LEN = 16  # hex digits of a source id, before the ':'
CHAIN_LEN = 16  # hex digits of a chain value, after the second ':'
CELL_LINES = 1024  # line numbers per applied_lines row
ENTRY = 10  # bytes of one remembered line in a cell: slot (2, big endian) + chain (8)
ZERO_CHAIN = bytes(8)  # the chain of an old `<S>:<n>` id
BOM = b"\xef\xbb\xbf"
# Sender lines of a source a batch may take back by finding them in the journal (a retried POST:
# lines applied before, or repeated in the batch) instead of deciding every line of the source
# one by one (Claim.retried).
TAKE_BACK_MAX = 16384
# `evtool serve` names itself (host and journal) in this header on /healthz, so a sender keeps
# its resume state per receiver, not only per URL.
RECEIVER_HEADER = "Evtool-Receiver"

Cell = tuple[str, int]  # (source, cell number)


class Kind(Enum):
    POSITION = "position"  # no id, or a receiver id: the line's place in its journal
    SENDER = "sender"  # `<source>:<line>[:<chain>]`: a line of a sender's source
    OPAQUE = "opaque"  # the client's own id: its digest


def classify(event_id: str | None) -> tuple[Kind, re.Match[str] | None]:
    """The identity kind of an id; for a sender id also its match (source, line, chain or None)."""
    if event_id is None or event_id[0] == RECEIVER_ID_PREFIX:
        return Kind.POSITION, None
    m = SOURCE_ID.fullmatch(event_id)
    if m is None:
        return Kind.OPAQUE, None
    return Kind.SENDER, m


# -- the sender's side: source ids and chains ------------------------------------------------------


def bare_line(raw: bytes, first: bool = False) -> bytes:
    """A line as identity sees it: without its line ending (and without a BOM on line 1)."""
    if raw[-1:] == b"\n":
        raw = raw[:-1]
        if raw[-1:] == b"\r":
            raw = raw[:-1]
    if first and raw.startswith(BOM):
        raw = raw[3:]
    return raw


def source_id(first_line: bytes) -> str:
    """The 16 hex digits that name a source: a digest of its first line (bare, see bare_line)."""
    return blake2b(first_line, digest_size=8, person=b"evtool-src2").hexdigest()


def chain_start(source: str) -> bytes:
    """The chain value before line 1."""
    return bytes.fromhex(source)


# Copied per line: cheaper than parsing blake2b's keywords each time (the sender inlines it).
CHAIN_SEED = blake2b(digest_size=8)


def chain_next(chain: bytes, line: bytes) -> bytes:
    """The chain value through `line` (bare), given the value before it:
    blake2b(chain + line, digest_size=8)."""
    h = CHAIN_SEED.copy()
    h.update(chain + line)
    return h.digest()


def sender_id(source: str, n: int, chain: bytes) -> str:
    return f"{source}:{n}:{chain.hex()}"


# -- the processor's side --------------------------------------------------------------------------


def cell_of(n: int) -> int:
    return (n - 1) // CELL_LINES


def entry(n: int, chain: bytes) -> bytes:
    """The packed entry of line `n` within its cell: slot (big endian, so entries sort by line)
    then chain."""
    return ((n - 1) % CELL_LINES).to_bytes(2, "big") + chain


def entries(packed: bytes) -> list[bytes]:
    """The entries of a cell's packed value."""
    return [packed[i:i + ENTRY] for i in range(0, len(packed), ENTRY)]


def within(packed: bytes, have: bytes) -> bool:
    """Whether every entry of `packed` is one of `have`'s (both sorted, each entry once). A
    cell sent again is mostly a run of the stored entries, found as bytes; else by sets."""
    at = have.find(packed) if len(packed) <= len(have) else -1
    while at >= 0:
        if at % ENTRY == 0:
            return True
        at = have.find(packed, at + 1)
    return set(entries(packed)) <= set(entries(have))


def chain_of(m: re.Match[str]) -> bytes:
    """The chain value of a sender id's match (ZERO_CHAIN for an old `<S>:<n>` id)."""
    return bytes.fromhex(m[3]) if m[3] else ZERO_CHAIN


# The digests' hashers, set up once: a copy and an update cost half of making one per event.
_EVENT_HASH = blake2b(digest_size=16)
_CONTENT_HASH = blake2b(digest_size=8, person=b"evtool-content")


def event_digest(event_id: str) -> bytes:
    """The 16-byte dedup key of an event that has an id."""
    h = _EVENT_HASH.copy()
    h.update(event_id.encode())
    return h.digest()


def content_digest(user: str, is_add: bool, value: Value) -> bytes:
    """8 bytes that tell two events with the same id apart: what they mean (user, name, exact
    value), not how they were written (key order, spacing, `1.50` vs `1.5`, other fields)."""
    if type(value) is int:
        text = b"%d" % value  # format_value's text of an int
    else:
        text = format_value(value if isinstance(value, int) else Decimal(value)).encode()
    h = _CONTENT_HASH.copy()
    h.update(b"%s\0%c\0%s" % (user.encode("utf-8", "surrogatepass"), 43 if is_add else 45, text))
    return h.digest()


def position_digest(fingerprint: bytes, offset: int) -> bytes:
    """The dedup key of a line identified by its position (it cannot equal an id's digest:
    ids are printable text, this starts with a NUL byte)."""
    return blake2b(b"\x00" + fingerprint + offset.to_bytes(8, "big"), digest_size=16).digest()


def conflict_reason(event_id: str, where: str | None) -> str:
    first = f" (first seen in {where})" if where else ""
    return (f"eventId {event_id} was already applied with different content{first}; "
            "an id names one event: give this one its own id")


# -- claiming: what of a batch is new ---------------------------------------------------------------


class _CellLines:
    """The entries of one cell claimed line by line (stored, then claimed): a chain per slot in
    one buffer, not an object per line (a resent batch holds every line's), and the rare other
    chains of a slot (another event given the same line number) in a dict."""

    __slots__ = ("chains", "taken", "more")

    def __init__(self, packed: bytes) -> None:
        self.chains = bytearray(CELL_LINES * 8)
        self.taken = bytearray(CELL_LINES)
        self.more: dict[int, set[bytes]] = {}
        for i in range(0, len(packed), ENTRY):
            self.add(int.from_bytes(packed[i:i + 2], "big"), packed[i + 2:i + ENTRY])

    def add(self, slot: int, chain: bytes) -> bool:
        """Take (slot, chain); False when it was taken already."""
        if not self.taken[slot]:
            self.taken[slot] = 1
            self.chains[slot * 8:slot * 8 + 8] = chain
            return True
        if self.chains[slot * 8:slot * 8 + 8] == chain:
            return False
        others = self.more.setdefault(slot, set())
        if chain in others:
            return False
        others.add(chain)
        return True

    def packed(self) -> bytes:
        """The entries, sorted (by slot, then chain), as a cell stores them."""
        out = []
        for slot in range(CELL_LINES):
            if self.taken[slot]:
                prefix = slot.to_bytes(2, "big")
                chains = {bytes(self.chains[slot * 8:slot * 8 + 8]), *self.more.get(slot, ())}
                out.extend(prefix + c for c in sorted(chains))
        return b"".join(out)


class Claim:
    """The one step that decides what of a batch is new, inside the caller's transaction.

    Made, it locks the applied_lines rows of the cells the batch touches (source by source in
    source order, cells in order, so processors sharing sources wait instead of deadlocking).
    Then each sender cell (whole), or line, and each digest is claimed: True means never
    applied, and it is now taken (a repeat later in the batch is a duplicate). Cells claimed
    whole are written as they are claimed, cells claimed line by line by `record()`; the caller
    commits them with the effects. The work is
    bounded by the cells of the batch, never by the history of a source.
    """

    def __init__(self, store: Store, cells: dict[str, Iterable[int]]) -> None:
        self.store = store
        self.stored: dict[Cell, bytes] = store.lock_cells({s: sorted(set(c)) for s, c in cells.items()})
        self._sets: dict[Cell, _CellLines] = {}  # cells claimed line by line: stored + claimed
        self._whole: set[Cell] = set()  # cells claimed whole, and already written
        self.conflicts: dict[bytes, str | None] = {}  # digest -> where it was first seen

    def cells(self, source: str, lines: SourceLines, *, retried: bool = False) -> bool:
        """Claim every cell of a source in the batch at once: only if none of their lines was
        applied before (the common case) and none repeats; else nothing is claimed and the
        caller goes line by line. Claimed cells are written at once, in statements of about
        store.CELL_WRITE_BYTES, each cell's entries read from where the batch keeps them
        (parser.SourceLines): what this holds is a statement's worth, not the batch's entries.
        `retried`: claim them whatever they hold, the caller taking back the lines `retried()`
        named."""
        from .store import CELL_WRITE_BYTES

        ids = sorted(lines.cell_ids())
        # first decide, reading only the cells that could hold a repeat
        for cell in ids if not retried else ():
            key = (source, cell)
            if key in self._sets or key in self._whole:
                return False
            have = self.stored.get(key, b"")
            if have or lines.records(cell) > 1:
                packed, repeats = lines.entries(cell)
                if repeats or (have and not set(entries(have)).isdisjoint(entries(packed))):
                    return False
        chunk: dict[Cell, bytes] = {}
        size = 0
        for cell in ids:
            key = (source, cell)
            packed, _ = lines.entries(cell)
            have = self.stored.get(key, b"")
            if have:
                packed = b"".join(sorted(set(entries(have)).union(entries(packed))))
            chunk[key] = packed
            size += len(packed)
            self._whole.add(key)
            if size >= CELL_WRITE_BYTES:
                self.store.write_cells(chunk)
                chunk, size = {}, 0
        if chunk:
            self.store.write_cells(chunk)
        return True

    def applied_before(self, source: str, lines: SourceLines) -> bool:
        """Whether every line of a source in the batch was applied before (each line's entry is
        in its cell's stored entries: a file sent twice, a resend of lines already processed).
        Then every line is a duplicate, repeats within the batch too, and nothing is claimed:
        the caller drops the source's sums whole, never reading its lines again. Reads the
        cells' entries one at a time, as `cells`."""
        for cell in sorted(lines.cell_ids()):
            key = (source, cell)
            have = self.stored.get(key, b"")
            if not have or key in self._sets or key in self._whole:
                return False
            packed, _ = lines.entries(cell)
            if not within(packed, have):
                return False
        return True

    def retried(self, source: str, lines: SourceLines) -> dict[tuple[int, bytes], tuple[int, int]] | None:
        """The lines of a source in the batch that are not applied, when they are few (a POST
        retried after it landed: lines applied before, or written twice in the batch): for each
        such entry (line number, chain), how many times it occurs in the batch and how many of
        those count (the first of a line never applied; none of one applied before). The caller
        takes back the others and claims the cells with `cells(..., retried=True)`. None when
        they are more than TAKE_BACK_MAX or the parts could not name them all: go line by line."""
        if lines.extra_over:
            return None
        out: dict[tuple[int, bytes], tuple[int, int]] = {}
        occurrences = taken = 0
        for cell in sorted(lines.cell_ids()):
            key = (source, cell)
            if key in self._sets or key in self._whole:
                return None
            packed, later = lines.occurrences(cell)
            have = self.stored.get(key, b"")
            occurrences += len(packed) // ENTRY + len(later)
            counts = Counter(later)
            if not have:
                applied: set[bytes] = set()
            elif within(packed, have):
                applied = set(entries(packed))
            else:
                applied = set(entries(have)).intersection(entries(packed))
            for e in applied | counts.keys():
                keep = 0 if e in applied else 1
                out[(cell * CELL_LINES + int.from_bytes(e[:2], "big") + 1, e[2:])] = (counts[e] + 1, keep)
                taken += counts[e] + 1 - keep
            if taken > TAKE_BACK_MAX:
                return None
        if occurrences != sum(part.count for part in lines.parts):
            return None  # (never expected: each part counts every occurrence)
        return out

    def line(self, source: str, n: int, chain: bytes) -> bool:
        """Claim line `n` (with its chain) of a sender source."""
        key = (source, cell_of(n))
        seen = self._sets.get(key)
        if seen is None:
            seen = self._sets[key] = _CellLines(self.stored.get(key, b""))
        return seen.add((n - 1) % CELL_LINES, chain)

    def digests(self, digests: list[bytes], contents: list[bytes] | None = None,
                origins: list[tuple[bytes, int, str]] | None = None) -> list[bool | None]:
        """Claim each digest, in order: True for the first occurrence of one never applied,
        False for a repeat of the same content, None for the same id with different content
        (`conflicts` then says where the first one was seen). `origins` are the lines'
        (journal fingerprint, line number, path), remembered for that message."""
        if not digests:
            return []
        if contents is None:
            contents = [b""] * len(digests)
        known = self.store.claim_digests(digests, contents, origins)
        out: list[bool | None] = []
        first: dict[bytes, tuple[bytes, int]] = {}  # claimed in this batch: content, index
        for i, (d, c) in enumerate(zip(digests, contents, strict=True)):
            if d in first or d in known:
                if d in first:
                    was, at = first[d]
                    where = f"{origins[at][2]} line {origins[at][1]}" if origins else None
                else:
                    was, where = known.content(d), known.where(d)
                if was and c and was != c:
                    self.conflicts[d] = where
                    out.append(None)
                else:
                    out.append(False)
                continue
            first[d] = (c, i)
            out.append(True)
        return out

    def record(self) -> None:
        """Write back the cells claimed line by line (cells claimed whole are written already)."""
        changed = {key: s.packed() for key, s in self._sets.items()}
        self.store.write_cells({k: v for k, v in changed.items() if v != self.stored.get(k, b"")})
