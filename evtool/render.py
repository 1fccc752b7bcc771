"""Human output: progress bars and summaries with rich. JSON output is the CLI's own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn


@contextmanager
def progress_bar(console: Console, verb: str) -> Iterator[Callable[[str, int, int | None], None]]:
    """Yield update(name, done_bytes, total_bytes); draws only on a terminal."""
    if not console.is_terminal:
        yield lambda name, done, total: None
        return
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


def process_summary(console: Console, report) -> None:
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


def send_summary(console: Console, report) -> None:
    for line, reason in report.invalid_lines:
        console.print(f"line {line}: skipped: {reason}", style="yellow")
    console.print(
        f"sent {report.sent} events, skipped {report.skipped_invalid} invalid, "
        f"{report.already_sent} already sent, retried {report.retried}, failed {report.failed}, "
        f"{report.seconds:.2f} s, {report.events_per_second:,.0f} events/s"
    )
