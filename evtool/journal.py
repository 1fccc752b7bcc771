"""Reading journals (design section 4): fingerprints and batches of complete lines.

A journal is identified by the fingerprint of its first complete line, not by its path, so a
renamed or rotated file keeps its progress. Whether a file is still the one whose progress is
recorded is decided here too (`check_not_twin`, `check_unchanged`). Only complete lines are
read: a trailing line without its newline waits for the next run.
"""

from __future__ import annotations

import os
import re
from hashlib import blake2b
from pathlib import Path
from typing import Any, BinaryIO

import xxhash

from .errors import JournalChanged, JournalError

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
    """End of a batch from `start`: whole lines, about `max_bytes` (more if one line is longer).

    What would be left after it, when under a quarter of `max_bytes`, goes with it: a runt
    last batch costs a transaction of its own and, with many users, an upsert of most of them
    again (1M events over 100k users: 154 MB in batches of 128 + 26 MB upserted ~170k user
    rows where one batch upserts 100k)."""
    size_now = size(f)
    if start + max_bytes + max_bytes // 4 < size_now:
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


def range_digest() -> Any:
    """The hash that a parse of a byte range returns with it (see `check_range`): XXH3-128,
    ten times SHA-256's speed (0.06 against 0.67 CPU-s per GB here). The committing process
    hashes each batch once more, serially, before it commits, so this is on every batch's path.
    It tells the bytes parsed from bytes put in their place by accident (a copy, a rotation, a
    truncation), not from a forgery, which an operator who can write the journal does not need;
    the digest never leaves the run."""
    return xxhash.xxh3_128()


def check_range(f: BinaryIO, fp: bytes, parts: list[tuple[int, int, bytes]], path: str) -> None:
    """Raise JournalChanged unless the open file still holds exactly the bytes that were parsed.

    `parts` are (start, end, digest of the bytes parsed) of consecutive ranges. Run inside the
    batch's transaction just before it commits: the file must still begin with the line of
    fingerprint `fp`, and each range must read back the same bytes, ending with a newline. A
    file overwritten in place (same inode), truncated or grown a torn line under the parse
    fails here, at any offset, and nothing of the batch is applied.
    """
    if fingerprint(f) != fp:
        raise JournalChanged(f"{path} was overwritten while a batch of it was being processed (its "
                             "first line changed). Nothing of the batch was applied")
    for start, end, digest in parts:
        h = range_digest()
        f.seek(start)
        pos, last = start, b""
        while pos < end:
            block = f.read(min(SCAN_BYTES * 16, end - pos))
            if not block:
                raise JournalChanged(f"{path} was truncated while a batch of it was being processed "
                                     f"(it ends before byte {end}). Nothing of the batch was applied")
            h.update(block)
            pos += len(block)
            last = block[-1:]
        if h.digest() != digest or (end > start and last != b"\n"):
            raise JournalChanged(f"{path} changed between bytes {start} and {end} while a batch of "
                                 "it was being processed (overwritten in place). Nothing of the batch "
                                 "was applied")


def size(f: BinaryIO) -> int:
    return os.fstat(f.fileno()).st_size


# -- the journals of `serve --workers N` ------------------------------------------------------

_WORKER_TAG = re.compile(r"\.w([1-9][0-9]*)")


def worker_journal(base: Path, index: int) -> Path:
    """The journal of worker `index` of `serve --workers N` writing `base`: worker 0 writes
    `base` itself (so one worker is plain `serve`), worker i `<stem>.w<i><suffix>`
    (server-events.jsonl -> server-events.w1.jsonl). A logrotate copy of one
    (`server-events.w1.jsonl.1`) still starts with its own name, never with another's."""
    if index == 0:
        return base
    return base.with_name(f"{base.stem}.w{index}{base.suffix}")


def worker_journals(base: Path) -> list[Path]:
    """The worker journals beside `base` that exist (`<stem>.w<i><suffix>`, i >= 1), by index."""
    found: list[tuple[int, Path]] = []
    try:
        entries = list(base.parent.iterdir())
    except OSError:
        return []
    head, tail = base.stem, base.suffix
    for p in entries:
        name = p.name
        if not (name.startswith(head) and name.endswith(tail)) or len(name) <= len(head) + len(tail):
            continue
        m = _WORKER_TAG.fullmatch(name[len(head):len(name) - len(tail)])
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def with_workers(paths: list[Path]) -> list[Path]:
    """`paths`, each followed by its worker journals (see worker_journal), without repeats: what
    `process` and `status` read when given the journal `serve --workers N` was started with."""
    out: list[Path] = []
    seen: set[Path] = set()
    for path in paths:
        for p in [path, *worker_journals(path)]:
            key = Path(os.path.abspath(p))
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


# -- rotated files beside a journal -----------------------------------------------------------


def siblings(path: Path) -> list[Path]:
    """Files beside `path` whose name starts with its name: where logrotate puts its copies."""
    try:
        found = [p for p in path.parent.iterdir() if p.name.startswith(path.name) and p.name != path.name]
    except OSError:
        return []
    return sorted(found)


def find_rotated(path: Path, f: BinaryIO) -> Path | None:
    """The name beside `path` that the open file `f` now has (after a rename), if any."""
    st = os.fstat(f.fileno())
    for p in siblings(path):
        try:
            other = p.stat()
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return p
    return None


def find_copy(path: Path, fp: bytes) -> Path | None:
    """A file beside `path`, not `path` itself, that begins with the line of fingerprint `fp`."""
    for p in siblings(path):
        try:
            with open(p, "rb") as g:
                if fingerprint(g) != fp:
                    continue
        except OSError:
            continue
        try:
            same = os.path.samefile(p, path)
        except OSError:
            same = False  # nothing at `path` now
        if not same:
            return p
    return None


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
