"""`evtool process`: apply journals to per-user totals exactly once (design section 5).

Each batch is one PostgreSQL transaction: lock the journal's progress row, check the committed
offset, apply only events never applied before (by position, by sender ranges, or by digest;
see `identity`), record rejects, advance the offset, commit. A crash anywhere leaves the whole
batch or nothing. Parsing runs in worker processes, ahead of the database work, so the two
cores overlap; the transaction never trusts a parse that started from a stale offset, nor
one of bytes the file no longer holds (`journal.check_range`, just before the commit).
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import os
import re
import tempfile
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar

from . import identity, journal, parser
from .errors import EvtoolError, JournalChanged, JournalError, SourceError
from .mapping import Mapping
from .parser import Batch, ParsedPart
from .store import SKIPPED, Store, path_text, retrying

log = logging.getLogger(__name__)
T = TypeVar("T")
# One transaction. Its cost in PostgreSQL is one upsert per user it touched, so with many users
# fewer, larger batches cost much less (10M events of 1M users: 62 batches of 128 MiB, 104.6
# CPU-s of PostgreSQL; one batch, 18.6). A batch's memory does not grow with its bytes (the
# workers' tables go to their spill files, parser.TABLE_FLUSH; what cannot is capped,
# parser.MAX_HELD); what it costs is the work redone when a batch fails, and how long its
# totals wait to be seen.
DEFAULT_BATCH_BYTES = 2048 * 1024 * 1024
# A batch whose sender lines must be decided one by one (more applied before or repeated than
# a retry's, identity.TAKE_BACK_MAX: where a file sent twice starts over) holds its bytes in
# this process and decides ~100k lines a second in Python: a larger one is rolled back and the
# journal from there planned in batches of at most this size (SlowPathTooLarge), which double
# again after each batch that needs no line-by-line decision (a resent region is usually
# short). Small enough that such a batch usually holds fewer lines than TAKE_BACK_MAX (~14k
# lines of `send`'s), and so takes the retry's path after all: the 1M sender journal sent twice
# took 4.0-4.3 s with 32 MiB here, 2.4 s with 2 MiB (19 batches instead of 7). Opaque ids seen
# before do not: the database names the lines not applied, and only those are read (read_lines).
LINE_BY_LINE_BYTES = 2 * 1024 * 1024
READ_LINES_CHUNK = 4 << 20  # what read_lines reads at once
DECIDE_LINES = 32768  # lines not applied decided at a time (what apply holds for them: ~15 MiB)
INLINE_BYTES = 1024 * 1024  # smaller batches are parsed in-process: no pool to start
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


class DistinctUsers:
    """How many distinct users a run changed, from the hash() of each, in bounded memory.

    Exact up to EXACT_USERS (a set of hashes), then a HyperLogLog estimate (2**14 one-byte
    registers: about 0.8% standard error): a run over millions of users, or `process --follow`
    running for months, holds 16 KiB instead of ~64 bytes a user (64 MiB at 1M users).
    """

    EXACT_USERS = 100_000
    _BITS = 14

    def __init__(self) -> None:
        self._exact: set[int] | None = set()
        self._registers = bytearray(0)

    @property
    def exact(self) -> bool:
        return self._exact is not None

    def update(self, hashes: Iterable[int]) -> None:
        if self._exact is not None:
            # taken in slices: a batch's millions of hashes never make a set of their own
            # (1M users: ~60 MiB) before the count turns into the estimate
            it = iter(hashes)
            while len(self._exact) <= self.EXACT_USERS:
                piece = list(itertools.islice(it, self.EXACT_USERS))
                if not piece:
                    return
                self._exact.update(piece)
            exact, self._exact = self._exact, None
            self._registers = bytearray(1 << self._BITS)
            self.update(exact)
            hashes = it
        registers, shift = self._registers, 64 - self._BITS
        low = (1 << shift) - 1
        # a hash whose rank is at most every register's changes nothing: most of them, once
        # the registers have filled, told apart by one mask (its top `floor` low bits)
        floor = min(registers)
        beaten = low ^ (low >> floor)
        for h in hashes:
            x = h & 0xFFFF_FFFF_FFFF_FFFF
            if x & beaten:
                continue
            rank = shift + 1 - (x & low).bit_length()  # leading zeros of the low bits, plus one
            if rank > registers[x >> shift]:
                registers[x >> shift] = rank

    def __len__(self) -> int:
        if self._exact is not None:
            return len(self._exact)
        m = len(self._registers)
        estimate = 0.7213 / (1 + 1.079 / m) * m * m / sum(2.0 ** -r for r in self._registers)
        zeros = self._registers.count(0)
        if estimate <= 2.5 * m and zeros:
            estimate = m * math.log(m / zeros)
        return round(estimate)


@dataclass
class ProcessReport:
    files: list[FileReport] = field(default_factory=list)
    # users whose total changed: only counted (see DistinctUsers), and a run may touch
    # millions of users (their ids up to 256 characters each)
    users: DistinctUsers = field(default_factory=DistinctUsers)
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


@dataclass
class Outcome:
    """What one transaction did."""

    applied: int = 0
    duplicates: int = 0
    rejects: list[tuple[int, int, bytes, str]] = field(default_factory=list)  # offset, index, raw, why
    users: list[Iterable[int]] = field(default_factory=list)  # hash() of the users it added to
    pending_minutes: bool = False  # its per-minute rows went to revenue_minutes_pending


class ParsePool:
    """The parsing worker processes: started on first use, each parses a part of a batch."""

    def __init__(self, workers: int, piece_bytes: int, strict: bool,
                 max_held: int = parser.MAX_HELD, mapping: Mapping | None = None) -> None:
        self.workers = workers
        self.piece_bytes = piece_bytes
        self.strict = strict
        self.mapping = mapping
        self.max_held = max_held
        self.submitted_bytes = 0  # what the workers were asked to parse (a part cut short stops early)
        self._pool: ProcessPoolExecutor | None = None

    def submit(self, f: BinaryIO, path: str, start: int, end: int) -> _Planned:
        """Parse [start, end) of the open journal `f` (at `path`), its parts at the same time."""
        if self._pool is None:
            # fork: workers start at once and share the loaded modules. They never touch the
            # inherited database socket, and leave with os._exit, which sends nothing on it.
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"),
                                             initializer=parser.exit_with_parent, initargs=(os.getpid(),))
        st = os.fstat(f.fileno())
        file_id = (st.st_dev, st.st_ino)  # a worker checks it opened the same file
        # The workers open our descriptor, not the path: a journal rotated (renamed, deleted,
        # replaced) during the run is still the file parsed. Linux; elsewhere the path.
        opener = f"/proc/{os.getpid()}/fd/{f.fileno()}"
        if not os.path.exists(opener):
            opener = None
        self.submitted_bytes += end - start
        futures, spills = [], []
        ranges = journal.split(f, start, end, self.workers)
        for lo, hi in ranges:
            spill = None
            if opener is not None:
                # Unlinked (O_TMPFILE where the system has it): nothing is left behind, even
                # after a kill -9; the worker writes it through our descriptor under /proc.
                spills.append(tempfile.TemporaryFile(prefix="evtool-cells-"))
                sst = os.fstat(spills[-1].fileno())
                spill = (f"/proc/{os.getpid()}/fd/{spills[-1].fileno()}", sst.st_dev, sst.st_ino)
            future = self._pool.submit(parser.parse_range, path, file_id, lo, hi, self.piece_bytes,
                                       self.strict, opener, self.max_held, self.mapping, spill)
            futures.append(future)
        return _Planned(start, end, futures, spills, ranges)

    def close(self) -> None:
        """Stop the workers at once, whatever they are doing (busy, stuck or stopped).

        A worker only reads the journal, so killing it loses nothing; waiting for it could
        wait forever (a worker stopped by a debugger, or reading a file that never ends).
        """
        if self._pool is not None:
            procs = list((getattr(self._pool, "_processes", None) or {}).values())
            manager = getattr(self._pool, "_executor_manager_thread", None)
            self._pool.shutdown(wait=False, cancel_futures=True)
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
            for proc in procs:
                proc.join(timeout=5)
            # The pool's manager thread notices the dead workers and closes its wake-up pipe. Left
            # running, it races the interpreter's exit hook, which writes to that pipe: Python 3.11
            # then prints "OSError: Bad file descriptor" with a traceback after our own message.
            if manager is not None:
                manager.join(timeout=5)
            self._pool = None


class SlowPathTooLarge(Exception):
    """A batch larger than LINE_BY_LINE_BYTES needs lines decided one by one (see there): its
    transaction is rolled back, and the journal from there is planned in batches of that size,
    doubling again after each batch that needs no such decision."""


class Interrupted(BaseException):
    """A stop signal ended a wait on the parse workers (no transaction was open then).

    A BaseException, like KeyboardInterrupt, so that no retry loop takes it for a failure.
    """


@dataclass
class _Planned:
    """A batch: its byte range and its parsed parts, or the workers' futures of them."""

    start: int
    end: int
    parsed: list[Future | ParsedPart]
    spills: list[BinaryIO] = field(default_factory=list)  # the parts' spill files, in order
    ranges: list[tuple[int, int]] = field(default_factory=list)  # each part's planned range
    _batch: Batch | None = None
    _parts: list[ParsedPart] = field(default_factory=list)  # all of them, once parsed
    parsed_bytes: int = 0  # what the workers parsed for it (parts handed over parsed not counted)
    # planned shorter than its size, to end where a range to plan ends (the rest of a cut
    # part): what its parts hold says nothing about what a part of full size holds
    short: bool = False

    def batch(self, waiting: list[bool] | None = None) -> Batch:
        """The parsed batch (waiting for the workers); made once, so a retry reuses it.

        `waiting` is [waiting now, stop asked]: while this waits on the workers a stop signal
        may end the wait at once (no transaction is open), see `follow.run_until_signalled`.
        """
        if self._batch is None:
            if waiting is not None:
                waiting[0] = True
                if waiting[1]:
                    waiting[0] = False
                    raise Interrupted
            try:
                parts = [p.result() if isinstance(p, Future) else p for p in self.parsed]
                for part, spill in zip(parts, self.spills, strict=False):  # none for a part parsed here
                    part.spill_fd = spill.fileno()
                self._batch = Batch(parts)
                self._parts = parts
                self.parsed_bytes = sum(p.end - p.offset for p, f in zip(parts, self.parsed, strict=True)
                                        if isinstance(f, Future))
            except BrokenProcessPool:
                raise EvtoolError("a parsing worker process died (killed, or out of memory); "
                                  "nothing of the batch was applied: run the command again") from None
            finally:
                if waiting is not None:
                    waiting[0] = False
            self.parsed = []
        return self._batch

    def split_cut(self) -> list[_Planned | _Range]:
        """Once `batch()` ended early (a part was cut short, parser.held): this plan ends with
        that batch, and what follows it is returned in journal order: the rest of each cut
        part's range, to parse again, and the parts after it, parsed already, as plans of their
        own (their spill files moved to them), each ending with a part cut short. Nothing
        parsed is thrown away."""
        b = self._batch
        if b is None or b.end == self.end:
            return []
        k = len(b.parts)
        follow: list[_Planned | _Range] = []
        while True:
            follow.append(_Range(self._parts[k - 1].end, self.ranges[k - 1][1]))  # the cut part's rest
            if k == len(self._parts):
                break
            j = k
            while j < len(self._parts) and not self._parts[j].cut:
                j += 1
            j = min(j + 1, len(self._parts))  # up to and with the next part cut short, if any
            follow.append(_Planned(self.ranges[k][0], self._parts[j - 1].end, self._parts[k:j],
                                   self.spills[k:j], self.ranges[k:j]))
            if not self._parts[j - 1].cut:
                break
            k = j
        k = len(b.parts)
        self.spills = self.spills[:k]
        self.end, self.ranges, self._parts = b.end, self.ranges[:k], self._parts[:k]
        return follow

    def cancel(self) -> None:
        for i, p in enumerate(self.parsed):
            if isinstance(p, Future) and not p.cancel() and not p.done() and i < len(self.spills):
                # A worker may be about to open this spill file by its number: keep the number
                # taken until it is done (it checks the file's identity as well).
                spill = self.spills[i]
                self.spills[i] = None  # type: ignore[call-overload]
                p.add_done_callback(lambda _, s=spill: s.close())
        self.close()

    def close(self) -> None:
        """Close the spill files (a worker still writing one keeps its own descriptor)."""
        for spill in self.spills:
            if spill is not None:
                spill.close()
        self.spills = []


@dataclass
class _Range:
    """Bytes of the journal to plan as batches when their turn comes: the rest of a part that
    was cut short (see _Planned.split_cut)."""

    start: int
    end: int

    def cancel(self) -> None:
        pass

    def close(self) -> None:
        pass


ProgressFn = Callable[[int], None]
_DONE, _MOVED, _COMMITTED = "done", "moved", "committed"


class Processor:
    """Applies journals through one database connection, reconnecting when it is lost."""

    def __init__(
        self,
        dsn: str,
        *,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        retry_for: float = 30.0,
        on_retry: Callable[[str], None] | None = None,
        workers: int | None = None,
        inline_bytes: int = INLINE_BYTES,
        piece_bytes: int = parser.PIECE_BYTES,
        strict: bool = False,
        max_held: int = parser.MAX_HELD,
        mapping: Mapping | None = None,
    ) -> None:
        self.dsn = dsn
        self.strict = strict  # events.validate without normalization
        self.mapping = mapping  # the declared mapping lines are read under; recorded per batch
        self.batch_bytes = batch_bytes
        self.batch_limit = batch_bytes  # for the journal being applied: see SlowPathTooLarge
        self.line_by_line = False  # the last batch's sender lines were decided one by one
        self.inline_bytes = inline_bytes
        self.retry_for = retry_for
        self.on_retry = on_retry
        self.workers = min(2, os.cpu_count() or 1) if workers is None else workers
        self.store: Store | None = None
        self.pool = ParsePool(self.workers, piece_bytes, strict, max_held, mapping)
        self.retries = 0
        self._users = DistinctUsers()  # the users whose totals this run changed
        # [waiting on the workers only (no transaction open), a stop was asked]: see _Planned.batch
        self.waiting_for_parse = [False, False]
        # Journal bytes a worker part can take before it holds parser.MAX_HELD (parser.held), learnt from
        # the last part that was cut; None while no part was. Batches are planned to fit, so a
        # journal with many distinct users gets smaller batches instead of parses thrown away.
        self.part_bytes: int | None = None
        self.parsed_bytes = 0  # journal bytes parsed (by the workers or here): each byte once, ideally
        # Per-minute rows may wait in revenue_minutes_pending (store.MINUTES): appended by a big
        # batch of this run, or left by an earlier run. A follower folds them when it finds
        # nothing new to apply (fold_minutes), at once after it starts, then after big batches.
        self.minutes_pending = True

    # -- plumbing ----------------------------------------------------------------------

    def _connected(self) -> Store:
        if self.store is None or self.store.conn.closed:
            self.store = Store.connect(self.dsn)
            self.store.migrate()
        return self.store

    def _with_retry(self, fn: Callable[[Store], object]) -> object:
        """Run fn(store); a lost connection is retried on a new one for `retry_for` seconds."""

        def retried(message: str) -> None:
            self.retries += 1
            if self.store is not None:
                self.store.close()
            self.store = None
            if self.on_retry:
                self.on_retry(message)

        return retrying(lambda: fn(self._connected()), self.retry_for, retried)

    def _plan(self, f: BinaryIO, path: str, start: int, limit: int | None = None) -> _Planned | None:
        """The next batch from `start` (ending by `limit`, a line end, when given), handed to the
        workers (or parsed here when small)."""
        size = self.batch_limit
        if self.part_bytes is not None:
            size = min(size, self.part_bytes * max(1, self.workers))
        end = journal.batch_end(f, start, size)
        short = limit is not None and limit < end
        if short:
            end = limit
        if end <= start:
            return None
        if self.workers <= 0 or end - start < self.inline_bytes:
            f.seek(start)
            data = f.read(end - start)
            part = parser.parse(data, start, strict=self.strict, mapping=self.mapping)
            h = journal.range_digest()
            h.update(data)
            part.digest = h.digest()
            self.parsed_bytes += end - start
            return _Planned(start, end, [part], short=short)
        planned = self.pool.submit(f, path, start, end)
        planned.short = short
        return planned

    def close(self) -> None:
        self.pool.close()
        if self.store is not None:
            self.store.close()

    # -- one journal -------------------------------------------------------------------

    def process_file(self, path: Path, on_progress: ProgressFn | None = None) -> FileReport:
        """Apply every complete line of `path` not applied yet."""
        report = FileReport(path_text(str(path)))  # shown as the database shows it (bytes escaped)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise SourceError(f"{path}: no such journal file") from None
        except OSError as exc:
            raise SourceError(f"{path}: cannot read: {exc.strerror}") from None
        with f:
            self.process_open(f, str(path.resolve()), report, on_progress)
        return report

    def process_open(self, f: BinaryIO, resolved: str, report: FileReport,
                     on_progress: ProgressFn | None = None) -> None:
        """Apply the complete lines of an open journal not applied yet.

        `resolved` is its resolved path: what the progress row and rejects record.
        """
        fp = journal.fingerprint(f)
        report.size = journal.size(f)
        if fp is None:
            report.waiting = "no complete line yet" if report.size else "empty"
            return
        report.waiting = None
        start = self._with_retry(lambda s: self._start(s, fp, resolved))
        self._run(f, fp, resolved, start, report, on_progress)

    def _run(self, f: BinaryIO, fp: bytes, resolved: str, offset: int, report: FileReport,
             on_progress: ProgressFn | None) -> None:
        """Commit batch after batch; the workers parse the next batches during each commit."""
        planned: deque[_Planned | _Range] = deque()
        self.batch_limit = self.batch_bytes

        def plan(depth: int) -> None:
            """Hand the first `depth` batches to the workers: new ones after the last planned,
            or from a range that waits its turn (the rest of a cut part)."""
            i = 0
            while i < depth:
                if i == len(planned):
                    nxt = self._plan(f, resolved, planned[-1].end if planned else offset)
                    if nxt is None:
                        return
                    planned.append(nxt)
                elif isinstance(planned[i], _Range):
                    rest = planned[i]
                    nxt = self._plan(f, resolved, rest.start, rest.end)
                    if nxt is None:  # never expected: the range held whole lines when it was parsed
                        raise JournalChanged(f"{resolved} was truncated while it was being processed. "
                                             "Nothing of the batch was applied")
                    planned[i] = nxt
                    if nxt.end < rest.end:
                        planned.insert(i + 1, _Range(nxt.end, rest.end))
                i += 1

        # The batch to commit, and the next one, parsed while this one commits. Until a batch of
        # the run has been parsed, only that one: its parts fill the workers anyway, and what they
        # held sizes the batches after it, so that the rest of a part cut short is parsed next,
        # not after a batch planned blind.
        depth = 1 if self.part_bytes is None else 2
        while True:
            plan(depth)
            waited = time.perf_counter()
            if planned:
                head = planned[0]
                assert isinstance(head, _Planned)  # plan() planned it
                current = head.batch(self.waiting_for_parse)
                self.parsed_bytes += head.parsed_bytes
                if not head.short:
                    self._learn(current)
                follow = head.split_cut()
                if follow:  # cut short: the rest of its range is planned now, parsed during the commit
                    planned.popleft()
                    planned.extendleft(reversed([head, *follow]))
                depth = 2
                plan(depth)
            else:
                current = Batch.empty(offset)
            started = time.perf_counter()
            try:
                status = self._with_retry(
                    lambda s, b=current: self._transaction(s, f, fp, resolved, b, report)
                )
            except SlowPathTooLarge:
                # Rolled back. The batch's range in smaller batches, which grow back after each
                # batch of new lines (below): a resent region is usually short.
                log.info("%s: bytes %d-%d hold ids seen before or repeated; applying the journal "
                         "from there in batches of at most %d MiB, larger again after batches of new "
                         "lines", resolved, current.offset, current.end, LINE_BY_LINE_BYTES >> 20)
                for p in planned:
                    p.cancel()
                planned.clear()
                self.batch_limit = min(self.batch_limit, LINE_BY_LINE_BYTES)
                self.part_bytes = None
                depth = 1
                continue
            if status == _COMMITTED:
                if not self.line_by_line and self.batch_limit < self.batch_bytes:
                    self.batch_limit = min(self.batch_bytes, self.batch_limit * 2)  # past a resent region
                # What bounds a run, batch by batch: the parse (a wait here) or the database.
                wait, commit = started - waited, time.perf_counter() - started
                log.debug("%s: bytes %d-%d, %d lines: waited %.3f s for the parse, committed in %.3f s",
                          resolved, current.offset, current.end, current.lines, wait, commit,
                          extra={"journal": resolved, "offset": current.offset, "end": current.end,
                                 "lines": current.lines, "parse_wait_s": round(wait, 4),
                                 "commit_s": round(commit, 4)})
            if status == _DONE:
                return
            if status == _MOVED:  # another processor committed meanwhile: go on from there
                for p in planned:
                    p.cancel()
                planned.clear()
                offset = report.offset
                continue
            planned.popleft().close()
            offset = current.end
            if on_progress:
                on_progress(offset)

    def _learn(self, b: Batch) -> None:
        """Size later batches by what the parts of this one held (see part_bytes): parts of
        about 3/4 of the cap, by the journal bytes per byte held; back to --batch-mb when they
        hold little."""
        cap = self.pool.max_held
        dense = [p for p in b.parts if p.held * 2 > cap and p.end > p.offset]
        if not dense:
            if self.part_bytes is not None:
                self.part_bytes *= 2
                if self.part_bytes * max(1, self.workers) >= self.batch_limit:
                    self.part_bytes = None
            return
        per_held = min((p.end - p.offset) / p.held for p in dense)
        self.part_bytes = max(64 << 10, int(per_held * cap * 3 // 4))

    def _start(self, store: Store, fp: bytes, resolved: str) -> int:
        """The journal's committed offset, once it is known not to be a second file (see below)."""
        known = store.file_progress(fp)
        if known is not None:
            journal.check_not_twin(known.path, fp, resolved)
        return known.offset if known else 0

    def _transaction(self, store: Store, f: BinaryIO, fp: bytes, resolved: str, b: Batch,
                     report: FileReport) -> str:
        """One batch, one transaction. Counts go into `report` only once it committed."""
        self.line_by_line = False  # whether the batch needed sender lines decided one by one
        with store.transaction():
            p = store.lock_progress(fp, resolved)
            try:
                journal.check_unchanged(f, p.offset, p.tail_digest, resolved)
            except JournalChanged:
                raise
            except JournalError as exc:
                # Begins with another line than when this run read it: it changed under the run
                # (copytruncate between the two reads), which a follower handles; the same first
                # line over different bytes is the operator's to sort out.
                if journal.fingerprint(f) != fp:
                    raise JournalChanged(f"{resolved} was truncated or overwritten while it was being "
                                         "processed. Nothing of the batch was applied") from exc
                raise
            report.offset = p.offset
            if p.offset != b.offset:
                return _MOVED
            if b.end == b.offset:
                return _DONE

            def reread() -> bytes:
                # The slow paths hold the batch's bytes and what they decide line by line in
                # this process: a large batch is rolled back and planned again smaller (once:
                # batch_end may go a quarter past the size it is given).
                if b.end - b.offset > LINE_BY_LINE_BYTES and self.batch_limit > LINE_BY_LINE_BYTES:
                    raise SlowPathTooLarge
                self.line_by_line = True
                f.seek(b.offset)
                return f.read(b.end - b.offset)

            first_line = p.lines + 1
            outcome = apply(store, b, reread, lambda wanted: read_lines(f, b.offset, b.end, wanted),
                            fp, resolved, first_line,
                            find=lambda pattern: find_lines(f, b.offset, b.end, pattern))
            rejects = b.rejects + outcome.rejects
            store.record_rejects(
                (fp, offset, first_line + index, resolved, raw, reason)
                for offset, index, raw, reason in rejects
            )
            p.path = resolved
            # Last, so nothing after it reads the file: the bytes applied are the file's bytes.
            journal.check_range(f, fp, [(x.offset, x.end, x.digest) for x in b.parts], resolved)
            p.offset = b.end
            p.lines += b.lines
            p.tail_digest = journal.tail_digest(f, b.end)
            p.applied += outcome.applied
            p.duplicates += outcome.duplicates
            p.rejected += len(rejects)
            store.advance(p)
            # which mapping this batch was read under: a re-run under another one shows in status
            store.record_mapping(fp, b.mapping, b.offset, b.end, b.lines)
        report.applied += outcome.applied
        report.duplicates += outcome.duplicates
        report.rejected += len(rejects)
        report.bytes += b.end - b.offset
        report.batches += 1
        report.offset = b.end
        room = MAX_REJECT_SAMPLES - len(report.reject_samples)
        report.reject_samples.extend((first_line + index, why) for _, index, _, why in rejects[:room])
        for hashes in outcome.users:
            self._users.update(hashes)
        self.minutes_pending |= outcome.pending_minutes
        return _COMMITTED

    def fold_minutes(self) -> tuple[int, int]:
        """Fold the pending per-minute rows into revenue_by_minute (store.fold_minutes), with
        the same retries as a batch; returns (rows folded, rows written)."""
        done = self._with_retry(lambda s: s.fold_minutes())
        self.minutes_pending = False
        return done  # type: ignore[return-value]

    # -- many journals -----------------------------------------------------------------

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


def _blocks(f: BinaryIO, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """Bytes [start, end) of `f` (which ends at a line's end) as (offset in the file, complete
    lines), a few MiB at a time: a large batch is never held whole. Read at their offsets
    (os.pread), never from a buffer the file object kept: the bytes as the file holds them now,
    for the caller to check against the parse. Ends early if the file shrank (the caller finds
    lines missing)."""
    fd = f.fileno()
    pos, rest = start, b""
    while pos < end:
        block = os.pread(fd, min(READ_LINES_CHUNK, end - pos), pos)
        if not block:
            return
        pos += len(block)
        data = rest + block
        cut = data.rfind(b"\n") + 1
        rest = data[cut:]
        yield pos - len(data), data[:cut]


def read_lines(f: BinaryIO, start: int, end: int, wanted: Iterable[int]) -> Iterator[tuple[int, int, bytes]]:
    """The lines of index `wanted` (increasing, taken as they are needed) among the lines of
    bytes [start, end) of `f`, as (index, offset in the file, the line without its end), in one
    pass (_blocks)."""
    todo = iter(wanted)
    w = next(todo, None)
    index = 0
    for offset, data in _blocks(f, start, end) if w is not None else ():
        lines = data.count(b"\n")
        at, at_index = 0, index
        while w is not None and w < index + lines:
            while at_index < w:
                at = data.index(b"\n", at) + 1
                at_index += 1
            yield w, offset + at, data[at:data.index(b"\n", at)].rstrip(b"\r")
            w = next(todo, None)
        if w is None:
            return
        index += lines


def find_lines(f: BinaryIO, start: int, end: int, pattern: re.Pattern[bytes]) -> Iterator[tuple[int, bytes]]:
    """The lines of bytes [start, end) of `f` in which `pattern` matches, each once, as (offset
    in the file, the line without its end), in one pass (_blocks). A match must not span lines."""
    for base, data in _blocks(f, start, end):
        last = -1
        for m in pattern.finditer(data):
            at = data.rfind(b"\n", 0, m.start()) + 1
            if at != last:
                last = at
                yield base + at, data[at:data.index(b"\n", m.end())].rstrip(b"\r")


def _trie(words: list[bytes]) -> bytes:
    """A regex that matches any of `words` (none empty), as a trie: a position costs what it
    shares with them, not a try of each word."""
    root: dict = {}
    for w in words:
        node = root
        for ch in w:
            node = node.setdefault(ch, {})
        node[None] = {}

    def emit(node: dict) -> bytes:
        alts = [re.escape(bytes([ch])) + emit(child) for ch, child in sorted(
            (k, v) for k, v in node.items() if k is not None)]
        if not alts:
            return b""
        body = alts[0] if len(alts) == 1 else b"(?:" + b"|".join(alts) + b")"
        if None in node:  # a word ends here, and others go on
            return (b"(?:" + body + b")" if len(alts) == 1 else body) + b"?"
        return body
    return emit(root)


def _retried_lines(find: Callable[[re.Pattern[bytes]], Iterator[tuple[int, bytes]]], source: str,
                   retried: dict[tuple[int, bytes], tuple[int, int]]) -> tuple[list, list] | None:
    """The lines of a source's retry (identity.Claim.retried: entry -> (times it occurs, how
    many count)), found by their id's text: (the lines to take back, the lines that count), each
    a list of (line, entry) in file order; the first occurrence of an entry never applied counts.
    None when an entry is not found as often as the parts counted it (an id written with an
    escape, say): the caller then decides line by line. The caller checks the lines by parsing
    them (an id's text may also stand in another field)."""
    numbers = sorted({b"%d:" % n for n, _ in retried})
    pattern = re.compile(re.escape(f"{source}:".encode()) + b"(" + _trie(numbers) + b")([0-9a-f]{16})")
    # re keeps its last 512 patterns; one of 16,384 line numbers holds ~1 MB: a follower that
    # met many retries over months would keep hundreds of MB of them
    re.purge()
    found: dict[tuple[int, bytes], list[bytes]] = {}
    for _, raw in find(pattern):
        m = pattern.search(raw)
        e = (int(m[1][:-1]), bytes.fromhex(m[2].decode())) if m is not None else None
        if e in retried:
            found.setdefault(e, []).append(raw)
    back: list[tuple[bytes, tuple[int, bytes]]] = []
    kept: list[tuple[bytes, tuple[int, bytes]]] = []
    for e, (times, keep) in retried.items():
        at = found.get(e, [])
        if len(at) != times:
            return None
        kept.extend((raw, e) for raw in at[:keep])
        back.extend((raw, e) for raw in at[keep:])
    return back, kept


def _retry_taken_back(find: Callable[[re.Pattern[bytes]], Iterator[tuple[int, bytes]]],
                      claim: identity.Claim, source: str, lines: parser.SourceLines,
                      b: Batch) -> tuple[parser.Sums, int] | None:
    """The sums of a source's lines not applied in the batch, and how many they are, when they
    are a retry's few (identity.Claim.retried, found by _retried_lines). Each line taken back,
    and each that counts, must be a valid event with the entry its text named, parsed as one
    piece by the part loops (so its sums leave the very keys they went to). None: decide the
    source line by line."""
    retried = claim.retried(source, lines)
    found = _retried_lines(find, source, retried) if retried is not None else None
    if found is None:
        return None
    sums: parser.Sums = {}
    for into, got in ((sums, found[0]), ({}, found[1])):
        named = parser.take_back_sender_lines(into, [raw for raw, _ in got], source, b.strict, b.mapping)
        if named != sorted(e for _, e in got):
            return None
    return sums, len(found[0])


def _take_back_checked(sums: parser.Sums, got: list[tuple[int, int, bytes]],
                       wanted: list[tuple[bytes, bytes, int]], b: Batch, path: str) -> None:
    """Count the opaque-id lines `got` (read_lines: index, offset, raw) out of `sums`, each of
    which must be the very event parsed: the line `wanted` names (digest, content, index), then
    its digests; else the journal was overwritten under the run (JournalChanged)."""
    ids = parser.take_back_lines(sums, [raw for _, _, raw in got], b.strict, b.mapping) \
        if [g[0] for g in got] == [i for _, _, i in wanted] else None
    if ids is None or ids != [(d, c) for d, c, _ in wanted]:
        raise JournalChanged(f"{path} was overwritten while a batch of it was being "
                             "processed. Nothing of the batch was applied")


def _all_applied_before(store: Store, b: Batch, packed: bytes,
                        lines_at: Callable[[Iterable[int]], Iterator[tuple[int, int, bytes]]],
                        path: str) -> list[tuple[int, int, bytes, str]] | None:
    """For a batch none of whose opaque ids is new (`packed`, the database's SKIPPED rows, names
    every line: a file sent twice), the lines whose id was first recorded with other content, as
    rejects (offset, index in batch, raw, reason); every other line is a duplicate, and the
    caller drops the workers' sums whole: no line is read again but those. None when more than
    DECIDE_LINES conflict (what this would hold for them): the caller decides line by line, in
    chunks. The lines not read are checked with the rest of the batch by the commit's range check."""
    conflicts: list[tuple[bytes, bytes, int, str | None]] = []
    for chunk in _in_chunks(SKIPPED.iter_unpack(packed), DECIDE_LINES):
        digests = list(dict.fromkeys(d for d, _, _ in chunk))
        # usually every line is its id's first content again: then no line of the chunk is
        # looked at one by one (a line conflicts only where its digest and content, joined,
        # are not a pair the database holds)
        if {d + c for d, c, _ in chunk} <= store.recorded_pairs(digests):
            continue
        seen = store.digests_seen(digests)
        for d, c, i in chunk:
            was = seen.content(d)
            if was and c and was != c:  # the id names another event: recorded, never dropped
                conflicts.append((d, c, i, seen.where(d)))
        if len(conflicts) > DECIDE_LINES:
            return None
    if not conflicts:
        return []
    got = list(lines_at(i for _, _, i, _ in conflicts))
    _take_back_checked({}, got, [(d, c, i) for d, c, i, _ in conflicts], b, path)
    return [(offset, index, raw, identity.conflict_reason(parser.event_id(raw, b.mapping), where))
            for (_, _, _, where), (index, offset, raw) in zip(conflicts, got, strict=True)]


def _in_chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """`items` in lists of `size`, the last shorter."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def apply(store: Store, b: Batch, reread: Callable[[], bytes],
          lines_at: Callable[[Iterable[int]], Iterator[tuple[int, int, bytes]]],
          fingerprint: bytes = b"", path: str = "", first_line: int = 1,
          find: Callable[[re.Pattern[bytes]], Iterator[tuple[int, bytes]]] | None = None) -> Outcome:
    """Apply a parsed batch inside the caller's transaction; only never-applied events count.

    `b` is only read, so a failed transaction can apply it again. `reread` returns the
    batch's bytes, needed only when many sender lines may have been applied before (it raises
    SlowPathTooLarge for a batch too large for that); `find` the lines in which a pattern
    matches (find_lines), for the few sender lines of a retry; `lines_at` some of its lines by index
    (read_lines), for the lines whose opaque id was seen before or repeats. `fingerprint`,
    `path` and `first_line` (the batch's first line number) say where opaque ids were first
    seen, for the reason of a later conflict. An opaque id seen again with other content is
    returned in `rejects` (offset, index in batch, raw, reason).
    """
    out = Outcome(applied=sum(p.fresh_count for p in b.parts))
    # The parts' COPY rows, group by group (PostgreSQL sums a user's rows): the workers'
    # rendering wherever the lines are all new, sums made here only for what was re-decided.
    rows: list[parser.Rows] = [p.fresh_rows for p in b.parts]
    users: list[Iterable[int]] = [p.fresh_users for p in b.parts]
    claim = identity.Claim(store, {s: lines.cell_ids() for s, lines in b.sources.items()})
    data: bytes | None = None
    back: parser.Sums = {}  # the events of lines not applied, subtracted from the workers' sums
    for source, lines in b.sources.items():
        if not lines.repeats and claim.cells(source, lines):
            rows.extend(part.rows for part in lines.parts)  # the common case: all new
            users.extend(part.users for part in lines.parts)
            out.applied += sum(part.count for part in lines.parts)
            continue
        if claim.applied_before(source, lines):  # a file sent twice: its sums are dropped whole
            out.duplicates += sum(part.count for part in lines.parts)
            continue
        taken = _retry_taken_back(find, claim, source, lines, b) if find is not None else None
        if taken is not None:  # a retry: the workers' sums stand, less the few lines not applied
            sums, count = taken
            parser.merge(back, sums, take=True)
            claim.cells(source, lines, retried=True)
            rows.extend(part.rows for part in lines.parts)
            users.extend(part.users for part in lines.parts)
            out.applied += sum(part.count for part in lines.parts) - count
            out.duplicates += count
            continue
        # Some lines were applied before, or repeat within the batch: decide line by line.
        data = reread() if data is None else data
        sums: parser.Sums = {}
        for line, chain, key, is_add, value in parser.source_events(data, source, b.strict, b.mapping):
            if claim.line(source, line, chain):
                parser.add(sums, key, is_add, value)
                out.applied += 1
            else:
                out.duplicates += 1
        rows.append(parser.render(sums))
        users.append(parser.user_hashes(sums))

    if b.opaque_count:
        # The common case: every id is new. The parts' rows, merged in digest order, are copied
        # straight in, each id at its first line; its later lines in the batch (a client's
        # retry) are compared with that one here. An id recorded before fails the copy: the
        # database then records the others and names every line not applied. Either way the
        # workers' sums stand, less the events of those lines, usually few: only they are read
        # again.
        repeats = bytearray()
        merged = parser.claim_rows(b, fingerprint, first_line, repeats)
        # the lines not applied, by line: (digest, content, index in the batch, and the first
        # occurrence's content and index where the merge knows them), read twice (lines, decisions)
        skipped: Callable[[], Iterator[tuple[bytes, bytes, int, bytes | None, int]]]
        packed = b""
        if merged is not None and store.claim_new_digests(merged):
            skipped = lambda: ((d, c, i, was, at)  # noqa: E731
                               for i, d, c, was, at in parser.REPEAT.iter_unpack(repeats))
        else:
            repeats.clear()  # (a failed copy's: the database names every line not applied now)
            # (without the C module, an all-new attempt unless an id repeats within a part)
            hopeful = merged is None and not any(p.opaque_repeats for p in b.parts)
            packed = store.claim_digest_rows([p.opaque_rows for p in b.parts], b.opaque_count, fingerprint,
                                             first_line, b.part_lines, hopeful) or b""
            skipped = lambda: ((d, c, i, None, -1) for d, c, i in SKIPPED.iter_unpack(packed))  # noqa: E731
        applied_before = _all_applied_before(store, b, packed, lines_at, path) \
            if len(packed) == b.opaque_count * SKIPPED.size else None
        if applied_before is not None:  # a file sent twice: the workers' sums are dropped whole
            out.duplicates += b.opaque_count - len(applied_before)
            out.rejects.extend(applied_before)
        else:
            rows.extend(p.opaque_sum_rows for p in b.parts)  # the workers' rendering, as if all new
            users.extend(p.opaque_users for p in b.parts)
            out.applied += b.opaque_count
        if (repeats or packed) and applied_before is None:
            lines = lines_at(r[2] for r in skipped())  # the batch read once
            for chunk in _in_chunks(skipped(), DECIDE_LINES):  # what is held for them here
                got = list(itertools.islice(lines, len(chunk)))
                _take_back_checked(back, got, [(d, c, i) for d, c, i, _, _ in chunk], b, path)
                # the first content and where it was seen, where the database did not say them
                # (the merge says both for a repeat within the batch)
                seen = store.digests_seen(list(dict.fromkeys(d for d, _, _, was, _ in chunk if was is None)))
                conflicts = []
                for entry, line in zip(chunk, got, strict=True):
                    d, c, _, was, _ = entry
                    was = seen.content(d) if was is None else was
                    if was and c and was != c:  # the id names another event: recorded, never dropped
                        conflicts.append((entry, line))
                for (d, _, index, _, at), (_, offset, raw) in conflicts:
                    where = f"{path} line {first_line + at}" if at >= 0 else seen.where(d)
                    out.rejects.append((offset, index, raw,
                                        identity.conflict_reason(parser.event_id(raw, b.mapping), where)))
                out.duplicates += len(chunk) - len(conflicts)
                out.applied -= len(chunk)
    taken_back = {key[0] for key in back}
    if back:
        rows.append(parser.render(back))

    # streamed to COPY a few MiB at a time: no process holds a large batch's rows whole
    out.pending_minutes = store.add_to_totals((c for r in rows for c in r.chunks()),
                                              sum(r.count for r in rows), sum(r.size for r in rows),
                                              net=bool(taken_back))
    if taken_back:  # a user all of whose events in the batch were taken back was not touched
        gone = {hash(u) for u in store.users_without_events(sorted(taken_back))}
        if gone:
            users = [array("q", (h for h in hashes if h not in gone)) for hashes in users]
    out.users = users
    claim.record()
    return out


def process(
    dsn: str,
    paths: list[Path],
    *,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    retry_for: float = 30.0,
    on_retry: Callable[[str], None] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    **tuning: int,
) -> ProcessReport:
    """Apply the journals at `paths` exactly once; see Processor (and it for `tuning`)."""
    proc = Processor(dsn, batch_bytes=batch_bytes, retry_for=retry_for, on_retry=on_retry, **tuning)
    try:
        return proc.process(paths, on_progress)
    finally:
        proc.close()
