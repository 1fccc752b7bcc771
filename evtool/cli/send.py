"""`evtool send`: deliver a JSONL file to the receiver, resuming where it stopped."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from .. import config
from ..errors import ConfigError, DeliveryFailed
from .base import Failed, cli, mapping_option, strict_option, url_option


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
                default=Path("events.jsonl"))
@url_option("The receiver's base URL (http:// or https://); give it several times (or several URLs "
            "separated by spaces in the variable) to spread bulks over several receivers, with failover.",
            multiple=True)
@click.option("--token", envvar="EVTOOL_TOKEN", show_envvar=True, default=config.TOKEN, show_default=True,
              help="Sent as the Authorization header.")
@click.option("--batch", type=click.IntRange(1, 100_000), default=1000, show_default=True,
              help="Events per request; 1 sends one JSON object per request.")
@click.option("--connections", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Concurrent keep-alive connections.")
@click.option("--from-start", is_flag=True, help="Resend the whole file (ids make it harmless).")
@click.option("--max-retries", type=click.IntRange(0, 100), default=8, show_default=True,
              help="Retries per request for transient failures (connection errors, 408, 429, 5xx).")
@click.option("--fail-on-invalid", is_flag=True, help="Exit 1 when any line was skipped as invalid.")
@strict_option
@mapping_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def send(file: Path, urls: tuple[str, ...], token: str, batch: int, connections: int, from_start: bool,
         max_retries: int, fail_on_invalid: bool, strict: bool, mapping, as_json: bool) -> None:
    """Send FILE (JSONL events; - for standard input) to the receiver; re-running resumes.

    Standard input is first kept whole in the state directory (stdin.jsonl), then sent like a
    file: sending the same input again sends nothing new, and events without an eventId get
    the same generated ids, so nothing is counted twice.
    """
    if str(file) == "-":
        with _stdin_spooled() as spool:
            _send(spool, str(file), urls, token, batch, connections, from_start, max_retries,
                  fail_on_invalid, strict, as_json, mapping)
    else:
        _send(file, str(file), urls, token, batch, connections, from_start, max_retries,
              fail_on_invalid, strict, as_json, mapping)


@contextmanager
def _stdin_spooled() -> Iterator[Path]:
    """Standard input copied to <state dir>/stdin.jsonl, one `send -` at a time (a lock file)."""
    import fcntl
    import shutil
    import sys

    home = config.home()
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "stdin.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError("another `evtool send -` is running with this state directory") from None
        spool = home / "stdin.jsonl"
        with open(spool, "wb") as out:
            shutil.copyfileobj(sys.stdin.buffer, out, 1 << 20)
        yield spool


def _send(file: Path, name: str, urls: tuple[str, ...], token: str, batch: int, connections: int,
          from_start: bool, max_retries: int, fail_on_invalid: bool, strict: bool, as_json: bool,
          mapping=None) -> None:
    from ..output import console, print_json, progress_bar, send_dict, send_summary
    from ..sender import SendSettings
    from ..sender import send as do_send

    settings = SendSettings(path=file, url=urls[0].rstrip("/"), urls=urls, token=token, batch=batch,
                            connections=connections, from_start=from_start, max_retries=max_retries,
                            state_dir=config.home(), strict=strict,
                            mapping=mapping)
    err = console(err=True)
    with progress_bar(err, "sending") as bar:
        report = do_send(settings, on_progress=lambda done, sent: bar(name, done, None),
                         on_total=lambda total: bar(name, 0, total))
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
        if report.retryable == report.failed:
            raise DeliveryFailed(f"{report.failed} event(s) were not delivered; run the same command "
                                 "again to retry them (ids make re-sending harmless)")
        # Refused (401, 404, 422, ...): the same request gets the same answer until something changes.
        raise DeliveryFailed(f"{report.failed} event(s) were not delivered: the receiver refused them "
                             "(see above); fix what it says (token, URL or the lines) before sending again")
    if report.skipped_invalid:
        click.echo(f"Warning: {report.skipped_invalid} invalid line(s) skipped (listed above)", err=True)
        if fail_on_invalid:
            raise Failed
