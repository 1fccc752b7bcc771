"""`evtool process --follow`: keep applying journals as lines arrive, until told to stop.

Each journal is polled with `stat` (cheap, and works on every filesystem); when it grew, the
new complete lines are applied with the same one-transaction-per-batch as a plain run. A
journal that is renamed away (rotated) is held open and drained to its end before the new
file at its path is read, so no line written just before a rotation is left behind.

Running as a service, the follower outlives database outages when asked (`keep_retrying`): a
round that fails with DatabaseUnavailable (the processor already retried for its `retry_for`)
is tried again with capped exponential backoff until the database is back; nothing committed
is lost, since each batch commits its offset.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import DatabaseUnavailable
from .processor import MAX_REJECT_SAMPLES, FileReport, Processor, ProcessReport

DEFAULT_POLL = 0.01  # seconds between checks of an idle journal
OUTAGE_BACKOFF = (1.0, 30.0)  # seconds between rounds while the database is away: first, cap

RoundFn = Callable[[FileReport, float], None]


@dataclass
class _Watched:
    path: Path
    file: BinaryIO | None = None
    inode: tuple[int, int] | None = None
    seen_size: int = -1  # size when last applied; equal means nothing new
    report: FileReport | None = None


def follow(
    processor: Processor,
    paths: list[Path],
    should_stop: Callable[[], bool],
    *,
    poll: float = DEFAULT_POLL,
    on_applied: Callable[[FileReport, int], None] | None = None,
    on_round: RoundFn | None = None,
    keep_retrying: bool = False,
    on_outage: Callable[[str | None], None] | None = None,
) -> ProcessReport:
    """Apply `paths` until should_stop() is true (checked between batches and polls).

    on_applied(file_report, events) is called after each round that applied something;
    on_round(this_round, seconds) after every round that reached the database (its counts,
    reject samples, offset and size are that round's). With `keep_retrying`, DatabaseUnavailable
    does not end the loop: on_outage(message) is called once when an outage starts and
    on_outage(None) once the database answers again.
    """
    started = time.perf_counter()
    report = ProcessReport(users=processor._users)
    watched = [_Watched(p) for p in paths]
    outage = False
    delay = OUTAGE_BACKOFF[0]
    try:
        while not should_stop():
            busy = False
            try:
                for w in watched:
                    busy |= _round(processor, w, report, on_applied, on_round)
                    if should_stop():
                        break
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
    finally:
        for w in watched:
            if w.file is not None:
                w.file.close()
        report.seconds = time.perf_counter() - started
        report.retries = processor.retries
    return report


def _sleep_unless(should_stop: Callable[[], bool], seconds: float) -> None:
    """Sleep `seconds`, waking every 0.1 s to notice a stop request."""
    end = time.monotonic() + seconds
    while not should_stop() and time.monotonic() < end:
        time.sleep(min(0.1, max(0.0, end - time.monotonic())))


def _round(processor: Processor, w: _Watched, report: ProcessReport,
           on_applied: Callable[[FileReport, int], None] | None, on_round: RoundFn | None = None) -> bool:
    """Apply what is new in one watched journal; True if anything was applied."""
    try:
        st = os.stat(w.path)
    except FileNotFoundError:
        st = None
    inode = (st.st_dev, st.st_ino) if st else None
    applied = 0
    if w.file is not None and inode != w.inode:
        applied += _apply(processor, w, report, on_round)  # rotated away: drain the old file first
        w.file.close()
        w.file, w.inode, w.seen_size = None, None, -1
    if st is None:
        return applied > 0
    if w.file is None:
        w.file = open(w.path, "rb")
        w.inode = inode
    if st.st_size != w.seen_size:
        applied += _apply(processor, w, report, on_round)
        w.seen_size = st.st_size
    if applied and on_applied and w.report is not None:
        on_applied(w.report, applied)
    return applied > 0


def _apply(processor: Processor, w: _Watched, report: ProcessReport, on_round: RoundFn | None = None) -> int:
    assert w.file is not None
    fr = FileReport(str(w.path))
    t0 = time.perf_counter()
    processor.process_open(w.file, str(w.path.resolve()), fr)
    if on_round is not None:
        on_round(fr, time.perf_counter() - t0)
    if w.report is None:
        w.report = FileReport(fr.path)
        report.files.append(w.report)
    total = w.report
    total.applied += fr.applied
    total.duplicates += fr.duplicates
    total.rejected += fr.rejected
    total.bytes += fr.bytes
    total.batches += fr.batches
    total.offset, total.size, total.waiting = fr.offset, fr.size, fr.waiting
    room = MAX_REJECT_SAMPLES - len(total.reject_samples)
    total.reject_samples.extend(fr.reject_samples[:room])
    return fr.applied + fr.duplicates + fr.rejected
