"""Identity: how an event is remembered, so that it is applied exactly once (design section 3).

- no `eventId`, or an id the receiver made (`~...`): the line's position identifies it, and
  the committed offset already covers that, so it is always new ("fresh");
- a sender id `<16 hex>:<line>`: remembered per source as ranges of line numbers;
- any other id (opaque, the client's own): a digest row each.

Ranges are half-open `[lo, hi)` pairs of line numbers, kept sorted and merged.
"""

from __future__ import annotations

import re
from array import array
from bisect import bisect_right
from collections.abc import Iterable
from enum import Enum
from hashlib import blake2b
from typing import TYPE_CHECKING

from .events import RECEIVER_ID_PREFIX

if TYPE_CHECKING:
    from .store import Store

SOURCE_ID = re.compile(r"([0-9a-f]{16}):([1-9][0-9]{0,17})")
SOURCE_ID_LEN = 16  # hex digits of a source id, before the ':'
_INF = float("inf")

Ranges = list[tuple[int, int]]


class Kind(Enum):
    POSITION = "position"  # no id, or a receiver id: the line's place in its journal
    SENDER = "sender"  # `<source>:<line>`: a line of a sender's source
    OPAQUE = "opaque"  # the client's own id: its digest


def classify(event_id: str | None) -> tuple[Kind, re.Match[str] | None]:
    """The identity kind of an id; for a sender id also its match (source, line number)."""
    if event_id is None or event_id[0] == RECEIVER_ID_PREFIX:
        return Kind.POSITION, None
    m = SOURCE_ID.fullmatch(event_id)
    if m is None:
        return Kind.OPAQUE, None
    return Kind.SENDER, m


def source_id(path: str, first_line: bytes, generation: int) -> str:
    """The 16 hex digits that name a sender's source: its resolved path, first line and generation."""
    h = blake2b(digest_size=8, person=b"evtool-source")
    h.update(path.encode("utf-8", "surrogateescape"))
    h.update(b"\0")
    h.update(first_line)
    h.update(b"\0")
    h.update(str(generation).encode())
    return h.hexdigest()


def event_digest(event_id: str) -> bytes:
    """The 16-byte dedup key of an event that has an id."""
    return blake2b(event_id.encode(), digest_size=16).digest()


def position_digest(fingerprint: bytes, offset: int) -> bytes:
    """The dedup key of a line identified by its position (it cannot equal an id's digest:
    ids are printable text, this starts with a NUL byte)."""
    return blake2b(b"\x00" + fingerprint + offset.to_bytes(8, "big"), digest_size=16).digest()


# -- ranges of line numbers -----------------------------------------------------------------------


def to_ranges(lines: array | set[int] | list[int]) -> Ranges:
    """Sorted, merged half-open ranges [lo, hi) covering `lines`."""
    ranges: Ranges = []
    if not lines:
        return ranges
    ordered = sorted(lines)
    lo = prev = ordered[0]
    for n in ordered[1:]:
        if n > prev + 1:
            ranges.append((lo, prev + 1))
            lo = n
        prev = n
    ranges.append((lo, prev + 1))
    return ranges


def multirange_text(ranges: Ranges) -> str:
    """PostgreSQL's text of an int8multirange."""
    return "{" + ",".join(f"[{lo},{hi})" for lo, hi in ranges) + "}"


def union(a: Ranges, b: Ranges) -> Ranges:
    """Sorted, merged ranges covering both inputs."""
    out: Ranges = []
    for lo, hi in sorted(a + b):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(hi, out[-1][1]))
        else:
            out.append((lo, hi))
    return out


def overlaps(a: Ranges, b: Ranges) -> bool:
    """Whether two sorted lists of disjoint half-open ranges share a number."""
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i][1] <= b[j][0]:
            i += 1
        elif b[j][1] <= a[i][0]:
            j += 1
        else:
            return True
    return False


def contains(ranges: Ranges, n: int) -> bool:
    i = bisect_right(ranges, (n, _INF)) - 1
    return i >= 0 and ranges[i][0] <= n < ranges[i][1]


# -- claiming: what of a batch is new ---------------------------------------------------------------


class Claim:
    """The one step that decides what of a batch is new, inside the caller's transaction.

    Made, it locks the applied ranges of the batch's sender sources (in source order, so
    processors sharing sources wait instead of deadlocking). Then each sender line, or whole
    run of lines, and each digest is claimed: True means never applied, and it is now taken
    (a repeat later in the batch is a duplicate). `record()` adds the claimed lines to the
    sources' applied ranges; the caller commits them with the effects.
    """

    def __init__(self, store: Store, sources: Iterable[str],
                 windows: dict[str, tuple[int, int]] | None = None) -> None:
        self.store = store
        self.applied = store.lock_sources(sources, windows)
        self._whole: dict[str, Ranges] = {}  # sources claimed as whole ranges
        self._lines: dict[str, set[int]] = {}  # sources claimed line by line

    def ranges(self, source: str, ranges: Ranges, repeats: bool) -> bool:
        """Claim whole ranges of a source's lines at once: only if none was applied before and
        none repeats (the common case); otherwise nothing is claimed and the caller goes line
        by line."""
        if repeats or overlaps(self.applied.get(source, []), ranges):
            return False
        self._whole[source] = ranges
        return True

    def line(self, source: str, n: int) -> bool:
        """Claim line `n` of a sender source."""
        seen = self._lines.setdefault(source, set())
        if n in seen or contains(self.applied.get(source, []), n):
            return False
        seen.add(n)
        return True

    def digests(self, digests: list[bytes]) -> list[bool]:
        """Claim each digest, in order: True for the first occurrence of one never applied."""
        if not digests:
            return []
        new = self.store.claim_digests(digests)
        out = []
        for d in digests:
            out.append(d in new)
            new.discard(d)  # a repeat later in this batch is a duplicate
        return out

    def record(self) -> None:
        """Add every claimed line to its source's applied ranges."""
        added = {s: multirange_text(r) for s, r in self._whole.items()}
        added.update((s, multirange_text(to_ranges(lines))) for s, lines in self._lines.items() if lines)
        self.store.add_ranges(added)
