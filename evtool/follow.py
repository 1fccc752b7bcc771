"""`evtool process --follow`: keep applying journals as lines arrive, until told to stop.

Each journal is polled with `stat` (cheap, and works on every filesystem); when it grew, the
new complete lines are applied with the same one-transaction-per-batch as a plain run.

Rotation (README, Guarantees):
- renamed away (logrotate `create`), deleted or replaced: the file is kept open and drained
  until it is quiet -- no writer holds its lock (`evtool serve` holds one while it writes) and
  it has not grown for `QUIET` seconds -- not once: a writer may still append to it before it
  notices the rotation. Its progress is recorded under its new name when it has one beside
  the old.
- truncated or overwritten in place (logrotate `copytruncate`): a batch that was being parsed
  is not committed (the processor checks the bytes before the commit); the file then goes on
  from its start as a new journal (its new first line is a new fingerprint), and the copy
  beside it that begins with the old first line (`<name>.1`, `<name>-20261123`...) is drained
  from the old offset like a renamed journal. Lines written between logrotate's copy and its
  truncation are in neither file: that is copytruncate's own loss; prefer `create`.

Running as a service, the follower outlives database outages when asked (`keep_retrying`): a
round that fails with DatabaseUnavailable (the processor already retried for its `retry_for`)
is tried again with capped exponential backoff until the database is back; nothing committed
is lost, since each batch commits its offset.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from . import journal
from .errors import DatabaseUnavailable, JournalChanged
from .processor import MAX_REJECT_SAMPLES, FileReport, Interrupted, Processor, ProcessReport

DEFAULT_POLL = 0.01  # seconds between checks of an idle journal
QUIET = 1.0  # seconds a rotated journal must stay unchanged (and unlocked) before it is closed
STOP_GRACE = 10.0  # seconds after a stop signal before the command leaves, whatever it is doing
DISCOVER_EVERY = 1.0  # seconds between looks for new journals to follow (worker journals)
OUTAGE_BACKOFF = (1.0, 30.0)  # seconds between rounds while the database is away: first, cap


@dataclass
class _Retired:
    """A journal no longer at its path (or a copytruncate copy): drained until it is quiet."""

    file: BinaryIO
    path: Path  # what its progress is recorded under
    size: int = -1
    since: float = field(default_factory=time.monotonic)  # when its size last changed


@dataclass
class _Watched:
    path: Path
    file: BinaryIO | None = None
    inode: tuple[int, int] | None = None
    seen_size: int = -1  # size when last applied; equal means nothing new
    fp: bytes | None = None  # first-line fingerprint of the file when last applied
    retired: list[_Retired] = field(default_factory=list)


Notice = Callable[[str], None]
AppliedFn = Callable[[FileReport, int], None]
RoundFn = Callable[[FileReport, float], None]


@dataclass
class _Hooks:
    """What the caller hears: lines applied (a terminal's progress), each round that reached the
    database (logs and metrics), and rotations (a notice)."""

    on_applied: AppliedFn | None
    on_round: RoundFn | None
    notice: Notice


def follow(
    processor: Processor,
    paths: list[Path],
    should_stop: Callable[[], bool],
    *,
    poll: float = DEFAULT_POLL,
    on_applied: AppliedFn | None = None,
    on_notice: Notice | None = None,
    on_round: RoundFn | None = None,
    keep_retrying: bool = False,
    on_outage: Callable[[str | None], None] | None = None,
    discover: Callable[[], list[Path]] | None = None,
) -> ProcessReport:
    """Apply `paths` until should_stop() is true (checked between batches and polls).

    on_applied(file_report, events) is called after each round that applied something;
    on_notice(message) when a journal was rotated, truncated or overwritten; on_round(this_round,
    seconds) after every round that reached the database (its counts, reject samples, offset
    and size are that round's). With `keep_retrying`, DatabaseUnavailable does not end the loop:
    on_outage(message) is called once when an outage starts and on_outage(None) once the
    database answers again. discover(), called every DISCOVER_EVERY seconds, names journals to
    follow from then on too (the worker journals of a `serve --workers N` started later).
    """
    started = time.perf_counter()
    report = ProcessReport(users=processor._users)
    watched = [_Watched(p) for p in paths]
    files: dict[str, FileReport] = {}
    hooks = _Hooks(on_applied, on_round, on_notice or (lambda _m: None))
    outage = False
    delay = OUTAGE_BACKOFF[0]
    known = {os.path.abspath(p) for p in paths}
    next_look = time.monotonic() + DISCOVER_EVERY
    try:
        while not should_stop():
            busy = False
            if discover is not None and time.monotonic() >= next_look:
                next_look = time.monotonic() + DISCOVER_EVERY
                for p in discover():
                    if os.path.abspath(p) not in known:
                        known.add(os.path.abspath(p))
                        watched.append(_Watched(p))
            try:
                for w in watched:
                    busy |= _round(processor, w, report, files, hooks)
                    if should_stop():
                        break
                if not busy and processor.minutes_pending and not should_stop():
                    # idle: fold what big batches appended, so the table readers scan stays small
                    processor.fold_minutes()
            except DatabaseUnavailable as exc:
                if not keep_retrying:
                    raise
                if not outage and on_outage is not None:
                    on_outage(str(exc))
                outage = True
                _sleep_unless(should_stop, delay)
                delay = min(delay * 2, OUTAGE_BACKOFF[1])
                continue
            if outage:
                outage, delay = False, OUTAGE_BACKOFF[0]
                if on_outage is not None:
                    on_outage(None)
            if not busy:
                time.sleep(poll)
    except Interrupted:
        pass
    finally:
        for w in watched:
            for f in [w.file, *(r.file for r in w.retired)]:
                if f is not None:
                    f.close()
        report.seconds = time.perf_counter() - started
        report.retries = processor.retries
    return report


def _sleep_unless(should_stop: Callable[[], bool], seconds: float) -> None:
    """Sleep `seconds`, waking every 0.1 s to notice a stop request."""
    end = time.monotonic() + seconds
    while not should_stop() and time.monotonic() < end:
        time.sleep(min(0.1, max(0.0, end - time.monotonic())))


def run_until_signalled(processor: Processor, paths: list[Path], *, poll: float = DEFAULT_POLL,
                        on_applied: AppliedFn | None = None, on_notice: Notice | None = None,
                        on_round: RoundFn | None = None, keep_retrying: bool = False,
                        on_outage: Callable[[str | None], None] | None = None,
                        tick: Callable[[], None] | None = None,
                        discover: Callable[[], list[Path]] | None = None) -> ProcessReport:
    """`follow` until SIGINT or SIGTERM; the command always ends within STOP_GRACE seconds.

    tick() is called at every check for a stop (between batches and polls: a progress log).
    A signal lets a transaction in flight commit, but ends a wait on the parse workers at once
    (nothing is open then); a second signal ends a transaction too (it rolls back). Should
    anything still hold the command STOP_GRACE seconds after the first signal, it leaves with
    status 1: every batch is one transaction, so leaving anywhere loses nothing.
    """
    stop: list[int] = []
    watchdog: list[threading.Timer] = []

    def give_up() -> None:
        os.write(2, f"Error: did not stop within {STOP_GRACE:g} s of the signal; leaving now "
                    "(no batch is half-applied: each is one transaction)\n".encode())
        os._exit(1)

    def on_signal(signum: int, _frame: object) -> None:
        stop.append(signum)
        processor.waiting_for_parse[1] = True
        if not watchdog:
            timer = threading.Timer(STOP_GRACE, give_up)
            timer.daemon = True
            timer.start()
            watchdog.append(timer)
        if processor.waiting_for_parse[0] or len(stop) > 1:
            raise Interrupted

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        def should_stop() -> bool:
            if tick is not None:
                tick()
            return bool(stop)

        return follow(processor, paths, should_stop, poll=poll, on_applied=on_applied,
                      on_notice=on_notice, on_round=on_round, keep_retrying=keep_retrying,
                      on_outage=on_outage, discover=discover)
    except Interrupted:  # raised outside follow's loop (between two checks): an empty report
        return ProcessReport(users=processor._users)
    finally:
        # The watchdog stays armed: the caller still closes the processor (kills the workers).
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _round(processor: Processor, w: _Watched, report: ProcessReport, files: dict[str, FileReport],
           hooks: _Hooks) -> bool:
    """Apply what is new in one watched journal and its rotated files; True if anything was."""
    try:
        st = os.stat(w.path)
    except FileNotFoundError:
        st = None
    inode = (st.st_dev, st.st_ino) if st else None
    applied = 0
    if w.file is not None and inode != w.inode:
        # Renamed away, deleted or replaced: a writer may still append to it; drain it until quiet.
        moved = journal.find_rotated(w.path, w.file) or w.path
        hooks.notice(f"{w.path} was rotated{f' to {moved}' if moved != w.path else ''}: "
               "draining it until its writer has left it")
        w.retired.append(_Retired(w.file, moved))
        w.file, w.inode, w.seen_size, w.fp = None, None, -1, None
    for r in list(w.retired):
        applied += _drain(processor, w, r, report, files, hooks)
    if st is None:
        return applied > 0
    if w.file is None:
        w.file = open(w.path, "rb")
        w.inode = inode
    if st.st_size != w.seen_size:
        fp = journal.fingerprint(w.file)
        if w.fp is not None and fp != w.fp:
            _copytruncated(w, hooks.notice)
        w.fp = fp  # after a change: the new file's (None while empty); the copy drains on its own
        try:
            n = _apply(processor, w.file, w.path, report, files, hooks)
        except JournalChanged as exc:
            hooks.notice(f"{exc}; reading {w.path} again")
            w.seen_size = -1  # look again next round: it may now be a new journal
            return True
        applied += n
        w.seen_size = st.st_size
    return applied > 0


def _copytruncated(w: _Watched, notice: Notice) -> None:
    """The file at the path now begins with another line: truncated (copytruncate) or overwritten."""
    assert w.fp is not None
    copy = journal.find_copy(w.path, w.fp)
    if copy is None:
        notice(f"{w.path} was truncated or overwritten in place: it is followed from its start as a "
               "new journal; if a copy of the old file exists, apply it with `evtool process <copy>`")
        return
    notice(f"{w.path} was truncated in place (copytruncate): following it from its start as a new "
           f"journal, and draining its copy {copy} from where the old file was left")
    w.retired.append(_Retired(open(copy, "rb"), copy))


def _drain(processor: Processor, w: _Watched, r: _Retired, report: ProcessReport,
           files: dict[str, FileReport], hooks: _Hooks) -> int:
    """Apply what a rotated file gained; close it once quiet and no writer holds its lock."""
    unlocked = _unlocked(r.file)  # first: a writer that has left finished its last write before
    size = journal.size(r.file)
    now = time.monotonic()
    if size != r.size:
        r.size, r.since = size, now
        try:
            return _apply(processor, r.file, r.path, report, files, hooks)
        except JournalChanged:
            r.size = -1  # changed again under the batch: look next round
            return 0
    if unlocked and now - r.since >= QUIET:
        r.file.close()
        w.retired.remove(r)
    return 0


def _unlocked(f: BinaryIO) -> bool:
    """True when no process holds an exclusive lock on the file (`serve` holds one while it writes)."""
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False
    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return True


def _apply(processor: Processor, f: BinaryIO, path: Path, report: ProcessReport,
           files: dict[str, FileReport], hooks: _Hooks) -> int:
    fr = FileReport(str(path))
    t0 = time.perf_counter()
    try:
        processor.process_open(f, str(path.resolve()), fr)
    finally:
        n = _add(report, files, fr)
    if hooks.on_round is not None:
        hooks.on_round(fr, time.perf_counter() - t0)
    if n and hooks.on_applied:
        hooks.on_applied(files[fr.path], n)
    return n


def _add(report: ProcessReport, files: dict[str, FileReport], fr: FileReport) -> int:
    """Add one call's counts to the run's report of that file; return the lines it handled."""
    total = files.get(fr.path)
    if total is None:
        total = files[fr.path] = FileReport(fr.path)
        report.files.append(total)
    total.applied += fr.applied
    total.duplicates += fr.duplicates
    total.rejected += fr.rejected
    total.bytes += fr.bytes
    total.batches += fr.batches
    total.offset, total.size, total.waiting = fr.offset, fr.size, fr.waiting
    room = MAX_REJECT_SAMPLES - len(total.reject_samples)
    total.reject_samples.extend(fr.reject_samples[:room])
    return fr.applied + fr.duplicates + fr.rejected
