"""`evtool status`: the dashboard (journals, lag, counters, database, receiver)."""

from __future__ import annotations

from pathlib import Path

import click

from .. import config
from .base import Failed, cli, dsn_option, url_option


@cli.command()
@click.argument("journals", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@dsn_option
@url_option("The receiver whose GET /healthz is checked.")
@click.option("--watch", is_flag=True, help="Refresh live on the terminal until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=2.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot as one JSON object.")
def status(journals: tuple[Path, ...], dsn: str | None, url: str, watch: bool, interval: float,
           as_json: bool) -> None:
    """The dashboard: journals, lag, counters, the database and the receiver.

    Shows every journal the database knows, plus JOURNALS (default ./server-events.jsonl when
    it exists): size, processed offset, lag (bytes and complete lines not yet applied),
    events applied, duplicates skipped, lines rejected, last processed time. Never starts the
    embedded server and never writes. Exit 1 when the database cannot be reached or its schema
    is behind (`evtool db migrate`).
    """
    from ..output import print_json, status_view, table_console
    from ..reports import StatusProbe

    if watch and as_json:
        raise click.UsageError("--watch and --json are exclusive")
    from ..journal import with_workers

    paths = list(journals)
    if not paths and config.JOURNAL.exists():
        paths = [config.JOURNAL]
    paths = with_workers(paths)  # and the worker journals of `serve --workers N` beside each
    probe = StatusProbe(dsn, paths, url)
    try:
        if watch:
            _watch(probe, interval)
            return
        snap = probe.snapshot()
    finally:
        probe.close()
    if as_json:
        print_json(snap.to_dict())
    else:
        table_console().print(status_view(snap.to_dict()))
    if not snap.database["reachable"] or snap.database["schema"]:
        raise Failed


def _watch(probe, interval: float) -> None:
    import time

    from rich.live import Live
    from rich.text import Text

    from ..output import status_view, table_console

    def frame():
        from rich.console import Group

        snap = probe.snapshot()
        head = Text(f"evtool status, every {interval:g} s ({snap.time.astimezone():%H:%M:%S}); "
                    "Ctrl-C to stop", style="dim")
        return Group(head, status_view(snap.to_dict()))

    try:
        with Live(frame(), console=table_console(), auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        pass
