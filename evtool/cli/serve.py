"""`evtool serve`: the HTTP receiver that appends events to the journal."""

from __future__ import annotations

from pathlib import Path

import click

from .. import config
from ..errors import ConfigError, EvtoolError
from .base import cli, dsn_option, mapping_option, strict_option


@cli.command()
@click.option("--host", default=config.HOST, show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=config.PORT, show_default=True,
              help="Port to listen on (0 picks a free one).")
@click.option("--journal", type=click.Path(dir_okay=False, path_type=Path),
              default=config.JOURNAL, show_default=True, help="The file accepted events go to.")
@click.option("--token", envvar="EVTOOL_TOKEN", show_envvar=True,
              help="Token clients must send in Authorization. Default 'secret', allowed on loopback only.")
@click.option("--read-token",
              help="A second token that opens GET routes only (the web page at /): it cannot add events.")
@click.option("--fsync", type=click.Choice(["on", "off"]), default="on", show_default=True,
              help="Acknowledge only after the data is on disk (off: faster, not durable).")
@click.option("--max-body-mb", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Largest request body accepted.")
@click.option("--metrics-token", help="A second token that may only GET /metrics (for the scraper).")
@click.option("--access-log", is_flag=True, help="Log one line per request (logger aiohttp.access).")
@click.option("--workers", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Receiver processes sharing the port (SO_REUSEPORT), each with its own journal: "
                   "worker 0 writes JOURNAL, worker i JOURNAL's name with .w<i> before its suffix "
                   "(server-events.w1.jsonl). `process` and `status` given JOURNAL read them all.")
@strict_option
@mapping_option
@dsn_option
def serve(host: str, port: int, journal: Path, token: str | None, read_token: str | None, fsync: str,
          max_body_mb: int, metrics_token: str | None, access_log: bool, workers: int, strict: bool,
          mapping,
          dsn: str | None) -> None:
    """Receive events over HTTP and append them durably to the journal.

    POST /liveEvent takes one JSON object or a bulk (NDJSON or a JSON array);
    GET /userEvents/<userId> answers a user's total; GET /metrics serves Prometheus metrics
    (the token or --metrics-token); GET /livez, /readyz and /healthz need no token;
    GET / is a live web page (totals, top users, revenue per period, pipeline health) that
    asks for a token.
    """
    import logging

    from ..receiver import ServeSettings, StoreRevenue, check_settings, run_server
    from ..reports import StatusProbe
    from ..workers import journals

    if metrics_token is not None and (not metrics_token or metrics_token == token):
        raise ConfigError("--metrics-token must be non-empty and differ from --token")
    # The receiver is a service beside the processor: it brings a fresh database up to date, as before.
    lookup = StoreRevenue(lambda: config.open_store(dsn, migrate=True))
    settings = ServeSettings(host=host, port=port, journal=journal, token=token, fsync=fsync == "on",
                             max_body=max_body_mb << 20, revenue_lookup=lookup, strict=strict,
                             mapping=mapping,
                             read_token=read_token, metrics_token=metrics_token, access_log=access_log,
                             status_probe=StatusProbe(dsn, journals(journal, workers), url=""))
    if workers == 1:
        run_server(settings, on_ready=logging.getLogger("evtool.serve").info)
        return
    from ..workers import supervise

    check_settings(settings)  # a setting that cannot start is said once, before any fork
    supervise(settings, workers, _worker_main)


def _worker_main(index: int, settings, on_ready) -> int:
    """One worker of `serve --workers N` (in its own process): serve, and say why it could not."""
    from ..receiver import run_server
    from .base import _one_line

    try:
        run_server(settings, on_ready=on_ready)
    except (EvtoolError, OSError) as exc:
        click.echo(f"Error: worker {index}: {_one_line(exc)}", err=True)
        return 1
    return 0
