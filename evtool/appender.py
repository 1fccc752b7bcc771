"""The journal's single writer: exclusive lock, one write per group, group commit (design section 4).

`JournalAppender.append` is called by each request with that request's complete lines. Requests
that arrive while a write+fsync is in flight are queued; one background task writes everything
queued with one `pwrite` loop at the end of the file and one `fdatasync`, in a worker thread so
the event loop keeps accepting, then answers every waiter.

What a reader (`process --follow`) may see (README, Guarantees):
- The group's space is reserved first (`posix_fallocate`), so a full disk (ENOSPC) or a file
  size limit (EFBIG) fails the group before a byte of it exists: a refused request is never
  readable, not even for an instant. Reserved space reads as zero bytes, which hold no newline,
  so no reader takes it for lines; the group is then written over it. A failed group is cut
  back off the file with `ftruncate`.
- Before each group the journal's path is checked: when it no longer names the open file
  (renamed by logrotate `create`, deleted, replaced), the appender opens a new file at the path
  and writes the group there. SIGHUP makes it reopen at once (see receiver).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .errors import JournalLocked, JournalWriteError


class JournalAppender:
    """Appends complete lines to one journal file, holding an exclusive lock on it."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._fd = -1
        self._lock = threading.Lock()  # the descriptor is swapped by a reopen, in another thread
        self._reopen_asked = False
        self.reopened = 0  # times a rotated or deleted journal was replaced by a new file
        self._reserve = True  # posix_fallocate works here (off on filesystems without it)
        self.dropped_tail = self._open()
        self._queue: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self._last_error: str | None = None
        # Called (from the writer thread) with the seconds each successful group's write+fsync took.
        self.on_group_written: Callable[[float], None] | None = None

    def _open(self) -> int:
        """Open and lock the file at the path (closing the one held before); return the torn tail cut.

        Not O_APPEND: writes go with pwrite into space reserved first (see the module's doc).
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise JournalWriteError(f"cannot open journal {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise JournalLocked(
                    f"journal {self.path} is locked: another `evtool serve` writes it"
                ) from None
            raise JournalWriteError(f"cannot lock journal {self.path}: {exc.strerror or exc}") from None
        old, self._fd = self._fd, fd
        self._size = os.fstat(fd).st_size
        try:
            cut = self._drop_torn_tail()
        except OSError as exc:
            os.close(fd)
            self._fd = old
            raise JournalWriteError(f"cannot repair journal {self.path}: {exc.strerror or exc}") from None
        if old >= 0:
            os.close(old)  # releases its lock: a follower draining it knows no more is coming
        return cut

    def _follow_path(self) -> None:
        """Reopen when the path no longer names the open file (rotated, deleted, replaced)."""
        try:
            st = os.stat(self.path)
            moved = (st.st_dev, st.st_ino) != _inode(os.fstat(self._fd))
        except FileNotFoundError:
            moved = True
        if moved or self._reopen_asked:
            self._reopen_asked = False
            self._open()
            self.reopened += 1

    async def reopen(self) -> None:
        """Open the file at the path now (SIGHUP, as log daemons do), between two groups."""
        self._reopen_asked = True
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._locked_follow_path)
        except (JournalWriteError, JournalLocked) as exc:
            self._last_error = str(exc)  # /healthz says it; the next group tries again

    def _locked_follow_path(self) -> None:
        with self._lock:
            if not self._closed:
                self._follow_path()

    def _drop_torn_tail(self) -> int:
        """Cut a partial last line off the journal; return how many bytes were cut.

        Only a write cut short by a crash (a kill -9 can stop write() between pages) leaves one,
        and it was never acknowledged. Appending after it would glue the next request's first
        line onto it, losing an acknowledged event. The processor never reads a partial line.
        """
        end = self._size
        while end > 0:
            start = max(0, end - 65536)
            i = os.pread(self._fd, end - start, start).rfind(b"\n")
            if i >= 0:
                end = start + i + 1
                break
            end = start
        cut = self._size - end
        if cut:
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
            self._size = end
        return cut

    @property
    def size(self) -> int:
        """Current journal size in bytes (what has been written successfully)."""
        return self._size

    @property
    def healthy(self) -> bool:
        """False after a failed write, until a later write succeeds."""
        return self._last_error is None

    @property
    def last_error(self) -> str | None:
        """The message of the last failed write, or None when the last write succeeded."""
        return self._last_error

    async def append(self, data: bytes) -> None:
        """Write `data` (complete lines) and return once it is durable (written, with fsync off).

        Raises JournalWriteError when the write or fsync failed; then none of `data` is in the file.
        """
        if data:
            # A cancelled waiter does not stop the write: the group is written for the others anyway.
            await self.submit(data)

    def submit(self, data: bytes) -> asyncio.Future[None]:
        """`append` without its coroutine (the receiver's hot path awaits the future itself):
        queue `data` for the next group; the future is done once it is durable."""
        if self._closed:
            raise JournalWriteError(f"journal {self.path} is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._queue.append((data, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        return fut

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            group, self._queue = self._queue, []
            buf = group[0][0] if len(group) == 1 else b"".join(data for data, _ in group)
            try:
                await loop.run_in_executor(None, self._write_group, buf)
            except Exception as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                self._last_error = f"journal write failed: {reason}"
                for _, fut in group:
                    if not fut.done():
                        fut.set_exception(JournalWriteError(self._last_error))
            else:
                self._last_error = None
                for _, fut in group:
                    if not fut.done():
                        fut.set_result(None)

    def _write_group(self, buf: bytes) -> None:
        with self._lock:
            self._follow_path()
            self._write_at_end(buf)

    def _write_at_end(self, buf: bytes) -> None:
        """Runs in a worker thread: reserve, write all of `buf`, fsync; on failure cut the file back."""
        fd = self._fd
        start = os.fstat(fd).st_size
        began = time.perf_counter()
        try:
            if self._reserve:
                try:
                    os.posix_fallocate(fd, start, len(buf))  # ENOSPC / EFBIG here, nothing visible yet
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
                    self._reserve = False  # a filesystem without it: write as before
            view = memoryview(buf)
            done = 0
            while done < len(buf):
                n = os.pwrite(fd, view[done:], start + done)
                if n <= 0:  # pragma: no cover - regular files do not do this
                    raise OSError(errno.EIO, "write made no progress")
                done += n
            if self.fsync:
                os.fdatasync(fd)
        except OSError:
            try:
                os.ftruncate(fd, start)
                if self.fsync:
                    os.fdatasync(fd)
            except OSError:
                pass  # the original error is the one to report
            raise
        self._size = start + len(buf)
        if self.on_group_written is not None:
            self.on_group_written(time.perf_counter() - began)

    async def close(self) -> None:
        """Finish and fsync what is in flight, release the lock and close the file."""
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        try:
            if not self.fsync:
                try:
                    os.fdatasync(self._fd)
                except OSError:
                    pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            with self._lock:
                os.close(self._fd)


def _inode(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino
