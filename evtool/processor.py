"""`evtool process`: apply journals to per-user totals exactly once (design section 5).

Each batch is one PostgreSQL transaction that locks the journal's progress row, re-reads the
committed offset, loads the batch's digests, applies only new ones to the totals, records
rejects and advances the offset. A crash anywhere leaves either the whole batch or nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import events, journal
from .errors import EvtoolError, InvalidEvent, JournalError, SourceError
from .store import FileProgress, Store, retrying

DEFAULT_BATCH_BYTES = 8 * 1024 * 1024
MAX_REJECT_SAMPLES = 20


@dataclass
class FileReport:
    path: str
    applied: int = 0
    duplicates: int = 0
    rejected: int = 0
    bytes: int = 0
    batches: int = 0
    waiting: str | None = None  # why nothing could be read yet (empty file, partial first line)
    offset: int = 0
    size: int = 0
    reject_samples: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class ProcessReport:
    files: list[FileReport] = field(default_factory=list)
    users: set[str] = field(default_factory=set)
    seconds: float = 0.0
    retries: int = 0

    @property
    def applied(self) -> int:
        return sum(f.applied for f in self.files)

    @property
    def duplicates(self) -> int:
        return sum(f.duplicates for f in self.files)

    @property
    def rejected(self) -> int:
        return sum(f.rejected for f in self.files)

    @property
    def events_per_second(self) -> float:
        n = self.applied + self.duplicates
        return n / self.seconds if self.seconds > 0 else 0.0


ProgressFn = Callable[[int], None]


class Processor:
    """Applies journals through one database connection, reconnecting when it is lost."""

    def __init__(
        self,
        dsn: str,
        *,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        retry_for: float = 30.0,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self.dsn = dsn
        self.batch_bytes = batch_bytes
        self.retry_for = retry_for
        self.on_retry = on_retry
        self.store: Store | None = None
        self.retries = 0
        self._users: set[str] = set()  # users whose totals this run changed

    def _connected(self) -> Store:
        if self.store is None or self.store.conn.closed:
            self.store = Store.connect(self.dsn)
            self.store.migrate()
        return self.store

    def _with_retry(self, fn: Callable[[Store], object]) -> object:
        def attempt() -> object:
            store = self._connected()
            try:
                return fn(store)
            except EvtoolError:
                if store.conn.closed or store.conn.broken:
                    self.store = None
                raise

        def retried(message: str) -> None:
            self.retries += 1
            self.store = None
            if self.on_retry:
                self.on_retry(message)

        return retrying(attempt, self.retry_for, retried)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    # -- one journal -------------------------------------------------------------------

    def process_file(self, path: Path, on_progress: ProgressFn | None = None) -> FileReport:
        """Apply every complete line of `path` not applied yet."""
        report = FileReport(str(path))
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise SourceError(f"{path}: no such journal file") from None
        except OSError as exc:
            raise SourceError(f"{path}: cannot read: {exc.strerror}") from None
        with f:
            fp = journal.fingerprint(f)
            report.size = journal.size(f)
            if fp is None:
                report.waiting = "no complete line yet" if report.size else "empty"
                return report
            display = str(path.resolve())
            self._with_retry(lambda s: self._check_identity(s, fp, display))
            while True:
                done = self._with_retry(lambda s: self._batch(s, f, fp, display, report))
                if done:
                    break
                if on_progress:
                    on_progress(report.offset)
        return report

    def _check_identity(self, store: Store, fp: bytes, display: str) -> None:
        """Refuse a second file that begins with the same line as a journal we already know."""
        known = store.file_progress(fp)
        if known is None or known.path == display:
            return
        other = Path(known.path)
        try:
            with open(other, "rb") as g:
                same = journal.fingerprint(g) == fp
        except OSError:
            same = False  # the old path is gone or unreadable: this is the renamed journal
        if same and not os.path.samefile(other, display):
            raise JournalError(
                f"{display} begins with the same line as {known.path}, a journal already processed: "
                "they cannot be told apart. Process only one of them, or give each a distinct first line"
            )

    def _batch(self, store: Store, f, fp: bytes, display: str, report: FileReport) -> bool:
        """One transaction. Returns True when there is nothing more to read."""
        with store.transaction():
            p = store.lock_file(fp, display)
            self._check_file(f, p, display)
            chunk = journal.read_chunk(f, p.offset, self.batch_bytes)
            report.offset = p.offset
            if chunk is None:
                return True
            rows, rejects, users = self._parse(chunk, p, fp, display, report)
            result = store.apply_events(rows)
            store.record_rejects(rejects)
            p.path = display
            p.offset = chunk.end
            p.lines += chunk.data.count(b"\n")
            p.tail_digest = journal.tail_digest(f, chunk.end)
            p.applied += result.applied
            p.duplicates += result.duplicates
            p.rejected += len(rejects)
            store.advance(p)
        # Counted only once the transaction committed.
        report.applied += result.applied
        report.duplicates += result.duplicates
        report.rejected += len(rejects)
        report.bytes += len(chunk.data)
        report.batches += 1
        report.offset = chunk.end
        report.reject_samples.extend(
            (line_no, reason) for _, _, line_no, _, _, reason in rejects[: MAX_REJECT_SAMPLES]
        )
        del report.reject_samples[MAX_REJECT_SAMPLES:]
        self._users.update(users)
        return False

    def _check_file(self, f, p: FileProgress, display: str) -> None:
        size = journal.size(f)
        if size < p.offset:
            raise JournalError(
                f"{display} is shorter ({size} bytes) than its processed offset ({p.offset}): it was "
                "truncated or replaced. Nothing was applied from it. If it is a new file, move it to a new "
                "name and keep the old one; evtool never guesses which lines are new"
            )
        if p.tail_digest is not None and journal.tail_digest(f, p.offset) != p.tail_digest:
            raise JournalError(
                f"{display} differs from the journal processed under the same first line before offset "
                f"{p.offset}: it was replaced or rewritten. Nothing was applied from it"
            )

    @staticmethod
    def _parse(chunk: journal.Chunk, p: FileProgress, fp: bytes, display: str, report: FileReport):
        rows: list[tuple[int, bytes, str, object]] = []
        rejects: list[tuple[bytes, int, int, str, bytes, str]] = []
        users: set[str] = set()
        line_no = p.lines
        parse = events.parse_line
        for offset, raw in journal.iter_lines(chunk):
            line_no += 1
            if not raw.strip():
                continue
            try:
                ev = parse(raw, allow_reserved=True)
            except InvalidEvent as exc:
                rejects.append((fp, offset, line_no, display, raw, exc.reason))
                continue
            if ev.event_id is not None:
                digest = events.event_digest(ev.event_id)
            else:
                digest = events.position_digest(fp, offset)
            rows.append((line_no, digest, ev.user_id, ev.delta))
            users.add(ev.user_id)
        return rows, rejects, users

    def process(
        self, paths: list[Path], on_progress: Callable[[str, int, int], None] | None = None
    ) -> ProcessReport:
        """Apply every journal in `paths`; the report covers what this run committed."""
        started = time.perf_counter()
        report = ProcessReport(users=self._users)
        try:
            for path in paths:
                cb = None
                if on_progress:
                    size = path.stat().st_size if path.exists() else 0

                    def cb(done: int, _p: str = str(path), _s: int = size) -> None:
                        on_progress(_p, done, _s)

                report.files.append(self.process_file(path, cb))
        finally:
            report.seconds = time.perf_counter() - started
            report.retries = self.retries
        return report


def process(
    dsn: str,
    paths: list[Path],
    *,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    retry_for: float = 30.0,
    on_retry: Callable[[str], None] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> ProcessReport:
    """Apply the journals at `paths` exactly once; see Processor."""
    proc = Processor(dsn, batch_bytes=batch_bytes, retry_for=retry_for, on_retry=on_retry)
    try:
        return proc.process(paths, on_progress)
    finally:
        proc.close()
