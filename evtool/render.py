"""Human output: progress bars and summaries. JSON output is the CLI's own.

On a terminal they go through rich; piped, through `Plain`, so a script's run does not pay
for importing rich.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class Plain:
    """The part of rich's Console the pipeline commands use, for output that is not a terminal."""

    is_terminal = False

    def __init__(self, err: bool = False) -> None:
        self.file = sys.stderr if err else sys.stdout

    def print(self, *objects: Any, style: str | None = None, **_: Any) -> None:
        print(*objects, file=self.file, flush=True)


def console(err: bool = False) -> Any:
    """A rich Console on a terminal, else Plain."""
    if not (sys.stderr if err else sys.stdout).isatty():
        return Plain(err)
    from rich.console import Console

    return Console(stderr=err, highlight=False, soft_wrap=True)


@contextmanager
def progress_bar(console: Any, verb: str) -> Iterator[Callable[[str, int, int | None], None]]:
    """Yield update(name, done_bytes, total_bytes); draws only on a terminal."""
    if not console.is_terminal:
        yield lambda name, done, total: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    tasks: dict[str, int] = {}
    with Progress(TextColumn(f"{verb} {{task.description}}"), BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as progress:

        def update(name: str, done: int, total: int | None) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(name, total=total)
            if total is not None:
                progress.update(tasks[name], total=total)
            progress.update(tasks[name], completed=done)

        yield update


def process_summary(console: Any, report) -> None:
    for f in report.files:
        if f.waiting:
            console.print(f"{f.path}: nothing to apply ({f.waiting})")
        for line, reason in f.reject_samples:
            console.print(f"{f.path}:{line}: rejected: {reason}", style="yellow")
        if f.rejected > len(f.reject_samples):
            more = f.rejected - len(f.reject_samples)
            console.print(f"{f.path}: ... and {more} more rejected", style="yellow")
    console.print(
        f"applied {report.applied} events, skipped {report.duplicates} duplicates, "
        f"rejected {report.rejected} lines, {len(report.users)} users touched, "
        f"{report.seconds:.2f} s, {report.events_per_second:,.0f} events/s"
    )


def send_summary(console: Any, report) -> None:
    for line, reason in report.invalid_lines:
        console.print(f"line {line}: skipped: {reason}", style="yellow")
    console.print(
        f"sent {report.sent} events, skipped {report.skipped_invalid} invalid, "
        f"{report.already_sent} already sent, retried {report.retried}, failed {report.failed}, "
        f"{report.seconds:.2f} s, {report.events_per_second:,.0f} events/s"
    )
