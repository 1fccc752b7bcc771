"""Reading journals (design section 4): fingerprints and batches of complete lines.

A journal is identified by the fingerprint of its first complete line, not by its path, so a
renamed or rotated file keeps its progress. Only complete lines are read: a trailing line
without its newline waits for the next run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from hashlib import blake2b
from typing import BinaryIO

FIRST_LINE_LIMIT = 1024 * 1024  # a first line longer than this is fingerprinted by its prefix
TAIL_BYTES = 64  # bytes before the committed offset kept as a check that the file is the same


def fingerprint(f: BinaryIO) -> bytes | None:
    """16-byte fingerprint of the file's first complete line; None until it has one."""
    f.seek(0)
    first = f.readline(FIRST_LINE_LIMIT)
    if not first.endswith(b"\n") and len(first) < FIRST_LINE_LIMIT:
        return None
    return blake2b(first.rstrip(b"\r\n"), digest_size=16, person=b"evtool-journal").digest()


def tail_digest(f: BinaryIO, offset: int) -> bytes | None:
    """Digest of the bytes just before `offset`: compared on the next run to catch a replaced file."""
    if offset <= 0:
        return None
    start = max(0, offset - TAIL_BYTES)
    f.seek(start)
    return blake2b(f.read(offset - start), digest_size=16).digest()


@dataclass
class Chunk:
    """Complete lines read from a journal: `data` starts at byte `offset` and ends with a newline."""

    offset: int
    data: bytes

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


def read_chunk(f: BinaryIO, offset: int, max_bytes: int) -> Chunk | None:
    """Up to `max_bytes` of complete lines from `offset` (more if a single line is longer)."""
    f.seek(offset)
    data = f.read(max_bytes)
    cut = data.rfind(b"\n")
    while cut < 0:
        if len(data) < max_bytes:
            return None  # only a partial line so far
        more = f.read(max_bytes)
        if not more:
            return None
        data += more
        cut = data.rfind(b"\n")
        max_bytes *= 2
    return Chunk(offset, data[: cut + 1])


def iter_lines(chunk: Chunk) -> Iterator[tuple[int, bytes]]:
    """(offset, line without its ending) for each line in the chunk, blank lines included."""
    pos = chunk.offset
    for line in chunk.data.split(b"\n")[:-1]:
        yield pos, line[:-1] if line.endswith(b"\r") else line
        pos += len(line) + 1


def size(f: BinaryIO) -> int:
    return os.fstat(f.fileno()).st_size
