"""The sender's resume state: per source file, how far delivery got (design sections 3 and 8).

One small JSON file per source, `<state_dir>/send-state/<hash of the resolved path>.json`, so
sends of different files never overwrite each other's progress. Each holds the source id's
inputs (path, first-line digest, generation) and the resume point: the end of the last
*complete* line of the contiguous prefix the receiver confirmed (offset, line count, and the
digest of that last line, which lets a re-run tell an appended file from a replaced one).
Files are written atomically: temp file, fsync, rename, fsync of the directory.

`resume` decides where a send starts (the saved point, or a new source when the file was
replaced); `ConfirmedPrefix` moves the point as batches are confirmed, out of order.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import asdict, dataclass
from hashlib import blake2b
from pathlib import Path
from typing import BinaryIO

from .errors import ConfigError, SourceError
from .identity import source_id  # noqa: F401 - where sender finds it

BOM = b"\xef\xbb\xbf"


def digest(data: bytes) -> str:
    """Hex digest used for the first line and the tail line."""
    return blake2b(data, digest_size=16).hexdigest()


def read_first_line(f: BinaryIO) -> bytes:
    """The file's first line without its line ending (b"" for an empty file)."""
    f.seek(0)
    return f.readline().rstrip(b"\r\n")


@dataclass(slots=True)
class Position:
    """A resume point: everything before `offset` (`line` lines) was delivered.

    `tail` is the last complete line before `offset` (with its line ending) and `tail_offset`
    where it starts; only its digest is stored.
    """

    offset: int = 0
    line: int = 0
    tail_offset: int = 0
    tail: bytes = b""


@dataclass(slots=True)
class SendState:
    """What is remembered about one source file."""

    path: str
    source: str
    generation: int
    first_line_digest: str
    offset: int = 0
    line: int = 0
    tail_offset: int = 0
    tail_digest: str | None = None

    def set_position(self, pos: Position) -> None:
        self.offset, self.line, self.tail_offset = pos.offset, pos.line, pos.tail_offset
        self.tail_digest = digest(pos.tail) if pos.offset else None


class StateStore:
    """The state file of one source path, locked for the duration of a send."""

    def __init__(self, state_dir: Path, path: str) -> None:
        self.path = path
        folder = Path(state_dir) / "send-state"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the state directory {folder}: {exc.strerror}") from None
        name = blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()
        self.file = folder / f"{name}.json"
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Refuse a second concurrent send of the same file (it would fight over the state)."""
        fd = os.open(self.file.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SourceError(f"{self.path} is already being sent by another `evtool send`") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def load(self) -> SendState | None:
        try:
            data = json.loads(self.file.read_bytes())
            return SendState(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"cannot read the send state {self.file}: {exc}; delete it to send {self.path} from the start"
            ) from None

    def save(self, state: SendState) -> None:
        """Write the state atomically: a crash leaves the old or the new one, never a torn file."""
        tmp = self.file.with_suffix(f".tmp{os.getpid()}")
        data = json.dumps(asdict(state), indent=1).encode()
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.file)
            dfd = os.open(self.file.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise ConfigError(f"cannot write the send state {self.file}: {exc.strerror or exc}") from None


def _replaced(f: BinaryIO, size: int, first_line: bytes, saved: SendState) -> str | None:
    """Why the file now at the saved path is not the one that was sent from, or None.

    Shorter than the resume point, a different first line, or a different last line before
    the resume point all mean the path now holds another file (truncated, rewritten, rotated).
    """
    if size < saved.offset:
        return "shorter than what was sent"
    if digest(first_line) != saved.first_line_digest:
        # An empty file that later got content was never really sent from.
        if saved.offset == 0 and saved.first_line_digest == digest(b""):
            return None
        return "different content"
    if saved.offset and saved.tail_digest is not None:
        length = saved.offset - saved.tail_offset
        if length <= 0:
            return "different content"
        f.seek(saved.tail_offset)
        if digest(f.read(length)) != saved.tail_digest:
            return "different content"
    return None


@dataclass(slots=True)
class Resume:
    """Where a send starts, decided from the file and its saved state."""

    state: SendState  # what this run saves (its source id, and the start position until it moves)
    start: Position  # where reading starts
    new_source_reason: str | None = None  # why the file counts as a new source, if it does


def resume(f: BinaryIO, path: str, saved: SendState | None, *, from_start: bool = False) -> Resume:
    """Decide where sending `f` (the file now at the resolved `path`) starts.

    At the saved position when the file is the one sent from (possibly appended to); from the
    start, under a new generation (so new ids), when it was replaced; from the start with the
    same ids when `from_start` asks for a full re-send.
    """
    size = os.fstat(f.fileno()).st_size
    first_line = read_first_line(f)
    generation = 0
    reason = None
    if saved is not None:
        generation = saved.generation
        why = _replaced(f, size, first_line, saved)
        if why is not None:
            generation += 1
            reason = f"{path} was replaced since the last send ({why}); sending it as a new source"
    state = SendState(path, source_id(path, first_line, generation), generation, digest(first_line))
    start = Position()
    if saved is not None and reason is None and not from_start:
        # _replaced verified these bytes against the saved digest.
        f.seek(saved.tail_offset)
        tail = f.read(saved.offset - saved.tail_offset) if saved.offset else b""
        start = Position(saved.offset, saved.line, saved.tail_offset, tail)
        state.set_position(start)
    return Resume(state, start, reason)


class ConfirmedPrefix:
    """The resume point of one run: the end of the contiguous prefix of confirmed batches.

    Batches (numbered from 0 in file order) are confirmed out of order; the point moves over
    each delivered one once all before it are delivered, and stops for good at the first that
    was not: a gap this run will not fill, so a re-run starts there.
    """

    def __init__(self, start: Position) -> None:
        self.position = start
        self._next = 0
        self._waiting: dict[int, Position | None] = {}  # seq -> position if delivered, None if not
        self._blocked = False

    @property
    def blocked(self) -> bool:
        """True once a batch was not delivered: the point moves no more in this run."""
        return self._blocked

    def confirm(self, seq: int, pos: Position, delivered: bool) -> bool:
        """Record batch `seq` (ending at `pos`); return True when the resume point moved."""
        if self._blocked:
            return False
        self._waiting[seq] = pos if delivered else None
        moved = False
        while self._next in self._waiting:
            p = self._waiting.pop(self._next)
            if p is None:
                self._blocked = True
                self._waiting.clear()
                break
            self.position = p
            moved = True
            self._next += 1
        return moved
