"""The sender's resume state: per source and destination, how far delivery got (design 3 and 8).

A source is named by its first line (see `identity.source_id`); the ids of its lines cover
the whole file's content up to each line (`identity.chain_next`), so where the file lives and
whether this state exists never change them. The state only saves re-reading what was sent:
one small JSON file per (source, receiver URL, receiver id), `<state_dir>/send-state/<hash>.json`,
holding the resume point -- the end of the last *complete* line of the contiguous prefix the
receiver confirmed (offset, line count, chain value there). Keyed by the destination too (its
URL, and the id `evtool serve` gives on /healthz: its host and journal), so a send to another
receiver, or to a fresh one on the same URL, starts from line 1. Files are written atomically:
temp file, fsync, rename, fsync of the directory.

`resume` decides where a send starts: the saved point once the file's prefix up to it hashes to
the saved chain (one sequential read, no network), else line 1; `ConfirmedPrefix` moves the
point as batches are confirmed, out of order.
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
from .identity import BOM, bare_line, chain_next, chain_start, source_id

__all__ = ["BOM", "ConfirmedPrefix", "Position", "Resume", "SendState", "StateStore", "first_line", "resume"]


def first_line(f: BinaryIO) -> bytes:
    """The file's first line as identity sees it (b"" for an empty file)."""
    f.seek(0)
    return bare_line(f.readline(), first=True)


@dataclass(slots=True)
class Position:
    """A resume point: everything before `offset` (`line` lines) was delivered; `chain` is the
    chain value through line `line` (identity.chain_start of the source at line 0)."""

    offset: int = 0
    line: int = 0
    chain: bytes = b""


@dataclass(slots=True)
class SendState:
    """What is remembered about one source sent to one receiver."""

    source: str
    url: str
    receiver: str = ""  # the receiver's own id (its host and journal), "" when it gave none
    path: str = ""  # the file last sent from (for people reading the state; not part of the key)
    offset: int = 0
    line: int = 0
    chain: str = ""  # hex

    def set_position(self, pos: Position) -> None:
        self.offset, self.line, self.chain = pos.offset, pos.line, pos.chain.hex()


class StateStore:
    """The state file of one (source, receiver URL), locked for the duration of a send."""

    def __init__(self, state_dir: Path, source: str, url: str, path: str = "", receiver: str = "") -> None:
        self.path = path
        self.source, self.url, self.receiver = source, url, receiver
        folder = Path(state_dir) / "send-state"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the state directory {folder}: {exc.strerror}") from None
        key = f"{source}\0{url}\0{receiver}".encode("utf-8", "surrogateescape")
        name = blake2b(key, digest_size=8).hexdigest()
        self.file = folder / f"{name}.json"
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Refuse a second concurrent send of the same source to the same receiver (they would
        fight over the state)."""
        fd = os.open(self.file.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SourceError(f"{self.path} (or a file with the same first line) is already being sent to "
                              f"{self.url} by another `evtool send`") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def load(self) -> SendState | None:
        try:
            data = json.loads(self.file.read_bytes())
            state = SendState(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"cannot read the send state {self.file}: {exc}; delete it to send {self.path} from the start"
            ) from None
        same = (state.source, state.url, state.receiver) == (self.source, self.url, self.receiver)
        return state if same else None

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


def _prefix(f: BinaryIO, source: str, offset: int) -> Position | None:
    """The position after the lines that end exactly at `offset`, re-hashed from the file; None
    when no line ends there (the file is shorter, or was rewritten)."""
    f.seek(0)
    chain, line, at = chain_start(source), 0, 0
    for raw in f:
        if at >= offset:
            break
        line += 1
        at += len(raw)
        chain = chain_next(chain, bare_line(raw, line == 1))
        if not raw.endswith(b"\n"):
            return None
    return Position(at, line, chain) if at == offset else None


@dataclass(slots=True)
class Resume:
    """Where a send starts, decided from the file and its saved state."""

    state: SendState  # what this run saves
    start: Position  # where reading starts
    new_source_reason: str | None = None  # why it starts from line 1 although state was saved


def resume(f: BinaryIO, path: str, url: str, saved: SendState | None, *,
           from_start: bool = False, receiver: str = "") -> Resume:
    """Decide where sending `f` (the file now at `path`) to `url` starts.

    At the saved position when the file's bytes up to it are the ones sent (the file may have
    grown since); from line 1 otherwise, or when `from_start` asks for it. The ids never
    depend on this choice: they come from the file's content.
    """
    source = source_id(first_line(f))
    state = SendState(source, url, receiver, path)
    start = Position(0, 0, chain_start(source))
    reason = None
    if saved is not None and saved.offset and not from_start:
        at = _prefix(f, source, saved.offset)
        if at is not None and at.line == saved.line and at.chain.hex() == saved.chain:
            start = at
        else:
            reason = (f"{path} differs from what was sent before within its first {saved.line} lines: "
                      "sending it from the start")
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
