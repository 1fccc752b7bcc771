"""Reading journals (design section 4): fingerprints and batches of complete lines.

A journal is identified by the fingerprint of its first complete line, not by its path, so a
renamed or rotated file keeps its progress. Whether a file is still the one whose progress is
recorded is decided here too (`check_not_twin`, `check_unchanged`). Only complete lines are
read: a trailing line without its newline waits for the next run.
"""

from __future__ import annotations

import os
from hashlib import blake2b
from typing import BinaryIO

from .errors import JournalError

FIRST_LINE_LIMIT = 1024 * 1024  # a first line longer than this is fingerprinted by its prefix
SCAN_BYTES = 64 * 1024  # read size when looking for a line end
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


def line_end(f: BinaryIO, pos: int, size: int) -> int | None:
    """End (just past the newline) of the line holding byte `pos`; None if it is incomplete."""
    f.seek(pos)
    while pos < size:
        block = f.read(min(SCAN_BYTES, size - pos))
        if not block:
            break
        i = block.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(block)
    return None


def last_line_end(f: BinaryIO, start: int, end: int) -> int:
    """End of the last complete line in [start, end); `start` if there is none."""
    pos = end
    while pos > start:
        lo = max(start, pos - SCAN_BYTES)
        f.seek(lo)
        i = f.read(pos - lo).rfind(b"\n")
        if i >= 0:
            return lo + i + 1
        pos = lo
    return start


def batch_end(f: BinaryIO, start: int, max_bytes: int) -> int:
    """End of a batch from `start`: whole lines, about `max_bytes` (more if one line is longer)."""
    size_now = size(f)
    if start + max_bytes < size_now:
        end = line_end(f, start + max_bytes - 1, size_now)
        if end is not None:
            return end
    return last_line_end(f, start, size_now)


def split(f: BinaryIO, start: int, end: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) cut into up to `parts` ranges of whole lines."""
    cuts = [start]
    for i in range(1, parts):
        at = line_end(f, start + (end - start) * i // parts - 1, end)
        if at is not None and cuts[-1] < at < end:
            cuts.append(at)
    cuts.append(end)
    return list(zip(cuts, cuts[1:], strict=False))


def size(f: BinaryIO) -> int:
    return os.fstat(f.fileno()).st_size


# -- is this still the same file? --------------------------------------------------------------


def check_not_twin(known_path: str, fp: bytes, path: str) -> None:
    """Refuse a second file that begins with the same line as a journal we already know.

    `known_path` is where the journal with fingerprint `fp` was last processed; `path` is the
    resolved path of the file at hand.
    """
    if known_path == path:
        return
    try:
        with open(known_path, "rb") as g:
            same = fingerprint(g) == fp
    except OSError:
        same = False  # the old path is gone or unreadable: this is the renamed journal
    if same and not os.path.samefile(known_path, path):
        raise JournalError(
            f"{path} begins with the same line as {known_path}, a journal already processed: "
            "they cannot be told apart. Process only one of them, or give each a distinct first line"
        )


def check_unchanged(f: BinaryIO, offset: int, tail: bytes | None, path: str) -> None:
    """Refuse a file shorter than its processed offset, or whose bytes before it changed."""
    now = size(f)
    if now < offset:
        raise JournalError(
            f"{path} is shorter ({now} bytes) than its processed offset ({offset}): it was "
            "truncated or replaced. Nothing was applied from it. Put the processed file back; a new file "
            "needs a first line of its own (evtool never guesses which lines are new)"
        )
    if tail is not None and tail_digest(f, offset) != tail:
        raise JournalError(
            f"{path} differs from the journal processed under the same first line before offset "
            f"{offset}: it was replaced or rewritten. Nothing was applied from it. Put the "
            "processed file back; a new file needs a first line of its own (evtool never guesses "
            "which lines are new)"
        )
