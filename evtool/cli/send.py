"""`evtool send`: deliver a JSONL file to the receiver, resuming where it stopped."""

from __future__ import annotations

from pathlib import Path

import click

from .. import config
from ..errors import DeliveryFailed
from .base import cli, strict_option


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path), default=Path("events.jsonl"))
@click.option("--url", "urls", multiple=True, envvar="EVTOOL_URL", show_envvar=True, default=(config.URL,),
              show_default=True, help="The receiver's base URL; give it several times (or several URLs "
              "separated by spaces in the variable) to spread bulks over several receivers, with failover.")
@click.option("--token", envvar="EVTOOL_TOKEN", show_envvar=True, default=config.TOKEN, show_default=True,
              help="Sent as the Authorization header.")
@click.option("--batch", type=click.IntRange(1, 100_000), default=1000, show_default=True,
              help="Events per request; 1 sends one JSON object per request.")
@click.option("--connections", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Concurrent keep-alive connections.")
@click.option("--from-start", is_flag=True, help="Resend the whole file (ids make it harmless).")
@click.option("--max-retries", type=click.IntRange(0, 100), default=8, show_default=True,
              help="Retries per request for transient failures (connection errors, 408, 429, 5xx).")
@strict_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def send(file: Path, urls: tuple[str, ...], token: str, batch: int, connections: int, from_start: bool,
         max_retries: int, strict: bool, as_json: bool) -> None:
    """Send FILE (JSONL events) to the receiver; re-running resumes where it stopped."""
    from ..output import console, print_json, progress_bar, send_dict, send_summary
    from ..sender import SendSettings
    from ..sender import send as do_send

    settings = SendSettings(path=file, url=urls[0].rstrip("/"), urls=urls, token=token, batch=batch,
                            connections=connections, from_start=from_start, max_retries=max_retries,
                            state_dir=config.home(), strict=strict)
    err = console(err=True)
    with progress_bar(err, "sending") as bar:
        report = do_send(settings, on_progress=lambda done, sent: bar(str(file), done, None),
                         on_total=lambda total: bar(str(file), 0, total))
    if report.new_source_reason:
        click.echo(f"Note: {report.new_source_reason}", err=True)
    if as_json:
        print_json(send_dict(report))
    else:
        send_summary(console(), report)
    if report.failed:
        for error in report.errors:
            click.echo(f"  {error}", err=True)
        if report.stopped:
            click.echo(f"Stopped: {report.stopped}", err=True)
        raise DeliveryFailed(f"{report.failed} event(s) were not delivered; run the same command again "
                             "to retry them (ids make re-sending harmless)")
