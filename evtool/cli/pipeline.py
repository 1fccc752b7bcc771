"""The pipeline commands: serve, send, process, revenue."""

from __future__ import annotations

from pathlib import Path

import click

from .. import config
from ..errors import DeliveryFailed, EvtoolError
from ..render import console
from .base import Failed, cli, dsn_option, print_json, strict_option

# -- process ---------------------------------------------------------------------------


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
    from .. import config, processor
    from ..render import process_summary, progress_bar

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
        print_json(processor_report_dict(report))
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
    import signal

    from ..follow import follow
    from ..processor import Processor

    stop: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: stop.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    proc = Processor(url, batch_bytes=batch_bytes, retry_for=retry_for, on_retry=on_retry, strict=strict)
    err.print(f"following {', '.join(map(str, paths))}; Ctrl-C or SIGTERM to stop")

    def on_applied(file_report, n: int) -> None:
        err.print(f"{file_report.path}: +{n} lines, offset {file_report.offset}")

    try:
        return follow(proc, paths, lambda: bool(stop), poll=poll,
                      on_applied=on_applied if err.is_terminal else None)
    finally:
        proc.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def processor_report_dict(report) -> dict:
    return {
        "applied": report.applied,
        "duplicates": report.duplicates,
        "rejected": report.rejected,
        "users": len(report.users),
        "seconds": round(report.seconds, 3),
        "events_per_second": round(report.events_per_second, 1),
        "retries": report.retries,
        "files": [
            {"path": f.path, "applied": f.applied, "duplicates": f.duplicates, "rejected": f.rejected,
             "offset": f.offset, "size": f.size, "waiting": f.waiting,
             "rejects": [{"line": n, "reason": r} for n, r in f.reject_samples]}
            for f in report.files
        ],
    }


# -- revenue ---------------------------------------------------------------------------


@cli.command()
@click.argument("user", required=False)
@dsn_option
@click.option("--all", "every", is_flag=True, help="Every user's total, in user order, streamed.")
@click.option("--csv", "as_csv", is_flag=True, help="With --all: CSV with a user_id,revenue header.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"userId": ..., "revenue": ...} (with --all: one such object per line).')
def revenue(user: str | None, dsn: str | None, every: bool, as_csv: bool, as_json: bool) -> None:
    """Print USER's exact total revenue (exit 1 for an unknown user), or --all users' totals.

    --all prints `user<TAB>revenue` lines (or --csv, or --json: JSON Lines), streamed from a
    server-side cursor, so any number of users works in constant memory.
    """
    from .ops import revenue_all, usage_checks

    usage_checks(user, every, as_csv, as_json)
    if every:
        revenue_all(dsn, "csv" if as_csv else "json" if as_json else "text")
        return
    assert user is not None
    from .. import config
    from ..errors import UnknownUser
    from ..events import format_value

    with config.open_store(dsn) as store:
        total = store.revenue(user)
    if total is None:
        raise UnknownUser(f"unknown user {user!r}: no events applied for it")
    text = format_value(total)
    if as_json:
        click.echo(f'{{"userId": {_json_str(user)}, "revenue": {text}}}')
    else:
        click.echo(text)


def _json_str(s: str) -> str:
    import json

    return json.dumps(s)


# -- serve -----------------------------------------------------------------------------


@cli.command()
@click.option("--host", default=config.HOST, show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=config.PORT, show_default=True,
              help="Port to listen on (0 picks a free one).")
@click.option("--journal", type=click.Path(dir_okay=False, path_type=Path),
              default=config.JOURNAL, show_default=True, help="The file accepted events go to.")
@click.option("--token", envvar="EVTOOL_TOKEN", show_envvar=True,
              help="Token clients must send in Authorization. Default 'secret', allowed on loopback only.")
@click.option("--fsync", type=click.Choice(["on", "off"]), default="on", show_default=True,
              help="Acknowledge only after the data is on disk (off: faster, not durable).")
@click.option("--max-body-mb", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Largest request body accepted.")
@strict_option
@dsn_option
def serve(host: str, port: int, journal: Path, token: str | None, fsync: str, max_body_mb: int,
          strict: bool, dsn: str | None) -> None:
    """Receive events over HTTP and append them durably to the journal.

    POST /liveEvent takes one JSON object or a bulk (NDJSON or a JSON array);
    GET /userEvents/<userId> answers a user's total; GET /healthz needs no token;
    GET /metrics serves Prometheus metrics (token needed).
    """
    from .. import config
    from ..receiver import ServeSettings, run_server

    state: dict = {}

    def lookup(user_id: str):
        # One connection, opened on first use and reopened after a failure.
        store = state.get("store")
        if store is None:
            store = config.open_store(dsn)
            state["store"] = store
        try:
            return store.revenue(user_id)
        except EvtoolError:
            state.pop("store", None)
            store.close()
            raise

    settings = ServeSettings(host=host, port=port, journal=journal, token=token, fsync=fsync == "on",
                             max_body=max_body_mb << 20, revenue_lookup=lookup, strict=strict)
    run_server(settings, on_ready=lambda message: click.echo(message, err=True))


# -- send ------------------------------------------------------------------------------


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path), default=Path("events.jsonl"))
@click.option("--url", envvar="EVTOOL_URL", show_envvar=True, default=config.URL,
              show_default=True, help="The receiver's base URL.")
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
def send(file: Path, url: str, token: str, batch: int, connections: int, from_start: bool,
         max_retries: int, strict: bool, as_json: bool) -> None:
    """Send FILE (JSONL events) to the receiver; re-running resumes where it stopped."""
    from .. import config
    from ..render import progress_bar, send_summary
    from ..sender import SendSettings
    from ..sender import send as do_send

    settings = SendSettings(path=file, url=url.rstrip("/"), token=token, batch=batch,
                            connections=connections, from_start=from_start, max_retries=max_retries,
                            state_dir=config.home(), strict=strict)
    err = console(err=True)
    with progress_bar(err, "sending") as bar:
        report = do_send(settings, on_progress=lambda done, sent: bar(str(file), done, None),
                         on_total=lambda total: bar(str(file), 0, total))
    if report.new_source_reason:
        click.echo(f"Note: {report.new_source_reason}", err=True)
    if as_json:
        print_json({
            "source": report.source, "sent": report.sent, "skipped_invalid": report.skipped_invalid,
            "already_sent": report.already_sent, "retried": report.retried, "failed": report.failed,
            "seconds": round(report.seconds, 3), "events_per_second": round(report.events_per_second, 1),
            "invalid": [{"line": n, "reason": r} for n, r in report.invalid_lines],
            "new_source_reason": report.new_source_reason, "stopped": report.stopped,
            "errors": report.errors,
        })
    else:
        send_summary(console(), report)
    if report.failed:
        for error in report.errors:
            click.echo(f"  {error}", err=True)
        if report.stopped:
            click.echo(f"Stopped: {report.stopped}", err=True)
        raise DeliveryFailed(f"{report.failed} event(s) were not delivered; run the same command again "
                             "to retry them (ids make re-sending harmless)")


