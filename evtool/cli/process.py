"""`evtool process`: apply journals to the totals, once or following them."""

from __future__ import annotations

from pathlib import Path

import click

from .. import config
from .base import Failed, cli, dsn_option, strict_option


@cli.command()
@click.argument("journals", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@dsn_option
@click.option("--batch-mb", type=click.IntRange(1, 4096), default=128, show_default=True,
              help="Batch size in MiB of complete lines; each batch is one transaction. "
                   "Memory does not grow with it (lines are read 1 MiB at a time).")
@click.option("--retry-for", type=click.FloatRange(0), default=30.0, show_default=True,
              help="Seconds to keep retrying a lost database connection before giving up.")
@click.option("--fail-on-reject", is_flag=True, help="Exit 1 when any line was rejected in this run.")
@click.option("--follow", "-f", is_flag=True,
              help="Keep applying new lines as they arrive, until SIGINT or SIGTERM.")
@click.option("--poll", type=click.FloatRange(0.001, 60), default=0.01, show_default=True,
              help="With --follow: seconds between checks of an idle journal.")
@strict_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def process(journals: tuple[Path, ...], dsn: str | None, batch_mb: int, retry_for: float,
            fail_on_reject: bool, follow: bool, poll: float, strict: bool, as_json: bool) -> None:
    """Apply journal files (default ./server-events.jsonl) to the totals, exactly once.

    Safe to re-run and to run several at once: every batch commits its offset, its event
    digests, its totals and its rejects in one transaction.
    """
    from .. import processor
    from ..output import console, print_json, process_dict, process_summary, progress_bar

    paths = list(journals) or [config.JOURNAL]
    url = config.resolve_dsn(dsn)
    err = console(err=True)

    said: list[str] = []

    def on_retry(message: str) -> None:
        if said[-1:] != [message]:  # once per reason, not once per backoff step
            err.print(f"{message}; retrying for up to {retry_for:g} s", style="yellow")
        said[-1:] = [message]

    if follow:
        report = _follow(url, paths, batch_mb << 20, retry_for, poll, on_retry, err, strict)
    else:
        with progress_bar(err, "processing") as bar:
            report = processor.process(url, paths, batch_bytes=batch_mb << 20, retry_for=retry_for,
                                       on_retry=on_retry, on_progress=bar, strict=strict)
    if as_json:
        print_json(process_dict(report))
    else:
        process_summary(console(), report)
    if report.rejected:
        click.echo(f"Warning: {report.rejected} line(s) rejected; they are kept with their reasons "
                   "in the rejected_lines table", err=True)
        if fail_on_reject:
            raise Failed


def _follow(url: str, paths: list[Path], batch_bytes: int, retry_for: float, poll: float,
            on_retry, err, strict: bool = False):
    """Run the follower until SIGINT/SIGTERM; the batch in flight finishes first."""
    from ..follow import run_until_signalled
    from ..processor import Processor
    from ..store import path_text

    proc = Processor(url, batch_bytes=batch_bytes, retry_for=retry_for, on_retry=on_retry, strict=strict)
    err.print(f"following {', '.join(path_text(str(p)) for p in paths)}; Ctrl-C or SIGTERM to stop")

    def on_applied(file_report, n: int) -> None:
        err.print(f"{file_report.path}: +{n} lines, offset {file_report.offset}")

    def on_notice(message: str) -> None:
        err.print(message, style="yellow", markup=False, highlight=False)

    try:
        return run_until_signalled(proc, paths, poll=poll, on_notice=on_notice,
                                   on_applied=on_applied if err.is_terminal else None)
    finally:
        proc.close()
