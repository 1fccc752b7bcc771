"""`evtool process --follow`: keep applying journals as lines arrive, until told to stop.

Each journal is polled with `stat` (cheap, and works on every filesystem); when it grew, the
new complete lines are applied with the same one-transaction-per-batch as a plain run. A
journal that is renamed away (rotated) is held open and drained to its end before the new
file at its path is read, so no line written just before a rotation is left behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .processor import MAX_REJECT_SAMPLES, FileReport, Processor, ProcessReport

DEFAULT_POLL = 0.01  # seconds between checks of an idle journal


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
) -> ProcessReport:
    """Apply `paths` until should_stop() is true (checked between batches and polls).

    on_applied(file_report, events) is called after each round that applied something.
    """
    started = time.perf_counter()
    report = ProcessReport(users=processor._users)
    watched = [_Watched(p) for p in paths]
    try:
        while not should_stop():
            busy = False
            for w in watched:
                busy |= _round(processor, w, report, on_applied)
                if should_stop():
                    break
            if not busy:
                time.sleep(poll)
    finally:
        for w in watched:
            if w.file is not None:
                w.file.close()
        report.seconds = time.perf_counter() - started
        report.retries = processor.retries
    return report


def _round(processor: Processor, w: _Watched, report: ProcessReport,
           on_applied: Callable[[FileReport, int], None] | None) -> bool:
    """Apply what is new in one watched journal; True if anything was applied."""
    try:
        st = os.stat(w.path)
    except FileNotFoundError:
        st = None
    inode = (st.st_dev, st.st_ino) if st else None
    applied = 0
    if w.file is not None and inode != w.inode:
        applied += _apply(processor, w, report)  # rotated away: drain the old file first
        w.file.close()
        w.file, w.inode, w.seen_size = None, None, -1
    if st is None:
        return applied > 0
    if w.file is None:
        w.file = open(w.path, "rb")
        w.inode = inode
    if st.st_size != w.seen_size:
        applied += _apply(processor, w, report)
        w.seen_size = st.st_size
    if applied and on_applied and w.report is not None:
        on_applied(w.report, applied)
    return applied > 0


def _apply(processor: Processor, w: _Watched, report: ProcessReport) -> int:
    assert w.file is not None
    fr = FileReport(str(w.path))
    processor.process_open(w.file, str(w.path.resolve()), fr)
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
