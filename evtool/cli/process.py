"""`evtool process`: apply journals to the totals, once or following them."""

from __future__ import annotations

from pathlib import Path

import click

from .. import config
from ..mapping import Mapping
from .base import Failed, cli, dsn_option, mapping_option, strict_option


@cli.command()
@click.argument("journals", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@dsn_option
@click.option("--batch-mb", type=click.IntRange(1, 4096), default=2048, show_default=True,
              help="Batch size in MiB of complete lines; each batch is one transaction. Larger "
                   "batches upsert each user less often; memory does not grow with it.")
@click.option("--retry-for", type=click.FloatRange(0), default=30.0, show_default=True,
              help="Seconds to keep retrying a lost database connection before giving up.")
@click.option("--fail-on-reject", is_flag=True, help="Exit 1 when any line was rejected in this run.")
@click.option("--follow", "-f", is_flag=True,
              help="Keep applying new lines as they arrive, until SIGINT or SIGTERM.")
@click.option("--poll", type=click.FloatRange(0.001, 60), default=0.01, show_default=True,
              help="With --follow: seconds between checks of an idle journal.")
@click.option("--exit-on-outage", is_flag=True,
              help="With --follow: exit 1 when the database stays away longer than --retry-for "
                   "(default: keep retrying with backoff, logging each outage once).")
@click.option("--progress-every", type=click.FloatRange(0.1), default=60.0, show_default=True,
              help="With --follow: seconds between progress log lines (applied, lag, rate).")
@click.option("--metrics", "metrics_addr", metavar="HOST:PORT",
              help="With --follow: serve Prometheus metrics at http://HOST:PORT/metrics.")
@click.option("--metrics-token", help="With --metrics: the token a scrape must send (Authorization).")
@strict_option
@mapping_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def process(journals: tuple[Path, ...], dsn: str | None, batch_mb: int, retry_for: float,
            fail_on_reject: bool, follow: bool, poll: float, exit_on_outage: bool, progress_every: float,
            metrics_addr: str | None, metrics_token: str | None, strict: bool, mapping: Mapping | None,
            as_json: bool) -> None:
    """Apply journal files (default ./server-events.jsonl) to the totals, exactly once.

    Safe to re-run and to run several at once: every batch commits its offset, its event
    digests, its totals and its rejects in one transaction.
    """
    from .. import processor
    from ..journal import with_workers
    from ..output import console, print_json, process_dict, process_summary, progress_bar

    # A journal `serve --workers N` wrote brings its worker journals along (server-events.w1.jsonl...).
    given = list(journals) or [config.JOURNAL]
    paths = with_workers(given)
    url = config.resolve_dsn(dsn)
    err = console(err=True)

    said: list[str] = []

    def on_retry(message: str) -> None:
        if said[-1:] != [message]:  # once per reason, not once per backoff step
            err.print(f"{message}; retrying for up to {retry_for:g} s", style="yellow")
        said[-1:] = [message]

    if metrics_addr and not follow:
        raise click.UsageError("--metrics goes with --follow")
    if follow:
        report = _follow(url, paths, batch_mb << 20, retry_for, poll, strict, mapping,
                         keep_retrying=not exit_on_outage, progress_every=progress_every,
                         metrics_addr=metrics_addr, metrics_token=metrics_token,
                         discover=lambda: with_workers(given))
    else:
        with progress_bar(err, "processing") as bar:
            report = processor.process(url, paths, batch_bytes=batch_mb << 20, retry_for=retry_for,
                                       on_retry=on_retry, on_progress=bar, strict=strict,
                                       mapping=mapping)
    if as_json:
        print_json(process_dict(report))
    else:
        process_summary(console(), report, samples=not follow)
    if report.rejected:
        said = (f"{report.rejected} line(s) rejected; they are kept with their reasons in the "
                "rejected_lines table (evtool rejects lists them)")
        if follow:  # a service: everything on stderr is a log record
            import logging

            logging.getLogger("evtool.process").warning(said)
        else:
            click.echo(f"Warning: {said}", err=True)
        if fail_on_reject:
            raise Failed


def _follow(url: str, paths: list[Path], batch_bytes: int, retry_for: float, poll: float,
            strict: bool, mapping, *, keep_retrying: bool, progress_every: float, metrics_addr: str | None,
            metrics_token: str | None, discover=None):
    """Run the follower until SIGINT/SIGTERM; the batch in flight finishes first.

    A service's loop: everything it says goes through logging (--log-format json for a log
    pipeline): a progress line every `progress_every` seconds, each reject as it is recorded,
    each database outage once (and its end), each rotation.
    """
    import logging
    import time

    from ..follow import run_until_signalled
    from ..metrics import MetricsServer, ProcessorMetrics
    from ..processor import Processor
    from ..reports import count_lines
    from ..store import path_text

    log = logging.getLogger("evtool.process")
    metrics = ProcessorMetrics()
    offsets: dict[str, int] = {}  # journal path -> committed offset, from the last round
    outage: list[float] = []  # when the current outage began

    def on_retry(message: str) -> None:
        metrics.database_up = 0
        if not outage:
            outage.append(time.monotonic())
            log.warning("%s; retrying%s", message, " until it is back" if keep_retrying
                        else f" for up to {retry_for:g} s", extra={"event": "outage"})

    def on_outage(message: str | None) -> None:
        if message is None:
            if not outage:
                return  # already said
            began = outage.pop()
            metrics.database_up = 1
            log.info("database back after %.0f s", time.monotonic() - began, extra={"event": "recovered"})
            return
        metrics.outages += 1
        metrics.database_up = 0
        on_retry(message)

    def on_round(fr, seconds: float) -> None:
        if fr.waiting is None:  # it reached the database
            on_outage(None)
        offsets[fr.path] = fr.offset
        metrics.round(fr.applied, fr.duplicates, fr.rejected, fr.batches, seconds)
        for line, reason in fr.reject_samples:
            log.warning("%s:%d: rejected: %s", fr.path, line, reason,
                        extra={"event": "reject", "path": fr.path, "line": line, "reason": reason})
        if fr.rejected > len(fr.reject_samples):
            log.warning("%s: %d more lines rejected (evtool rejects lists them)", fr.path,
                        fr.rejected - len(fr.reject_samples), extra={"event": "reject", "path": fr.path})

    def on_notice(message: str) -> None:
        log.warning("%s", message, extra={"event": "rotation"})

    def lag() -> dict[str, tuple[int, int]]:
        out = {}
        for p in paths:
            offset = offsets.get(str(p), 0)
            try:
                size = p.stat().st_size
                out[str(p)] = (max(0, size - offset), count_lines(p, offset, size) if size > offset else 0)
            except OSError:
                continue  # not there (yet, or rotated away)
        return out

    def render() -> str:
        metrics.lag = lag()
        return metrics.render()

    last = {"t": time.monotonic(), "applied": 0}

    def progress() -> None:
        now = time.monotonic()
        if now - last["t"] < progress_every:
            return
        rate = (metrics.applied - last["applied"]) / (now - last["t"])
        last.update(t=now, applied=metrics.applied)
        lags = lag()
        lag_lines = sum(n for _, n in lags.values())
        lag_bytes = sum(b for b, _ in lags.values())
        log.info("applied %d events (%.0f/s), %d duplicates, %d rejected; lag %d lines (%d bytes)",
                 metrics.applied, rate, metrics.duplicates, metrics.rejected, lag_lines, lag_bytes,
                 extra={"event": "progress", "applied": metrics.applied, "rate": round(rate, 1),
                        "duplicates": metrics.duplicates, "rejected": metrics.rejected,
                        "lag_lines": lag_lines, "lag_bytes": lag_bytes})

    server = None
    if metrics_addr:
        host, _, port = metrics_addr.rpartition(":")
        if not port.isdigit() or int(port) > 65535:
            raise click.UsageError(f"--metrics {metrics_addr!r}: give HOST:PORT (e.g. 127.0.0.1:9187)")
        server = MetricsServer(host.strip("[]") or "127.0.0.1", int(port), render, metrics_token).start()

    def found() -> list[Path]:
        """The journals to follow now; new ones (worker journals) count in the lag too."""
        now = discover()
        paths[:] = now + [p for p in paths if p not in now]
        return now

    proc = Processor(url, batch_bytes=batch_bytes, retry_for=retry_for, on_retry=on_retry, strict=strict,
                     mapping=mapping)
    log.info("following %s; Ctrl-C or SIGTERM to stop%s", ", ".join(path_text(str(p)) for p in paths),
             f"; metrics at {server.url}" if server else "")
    try:
        return run_until_signalled(proc, paths, poll=poll, on_notice=on_notice, on_round=on_round,
                                   keep_retrying=keep_retrying, on_outage=on_outage, tick=progress,
                                   discover=found if discover is not None else None)
    finally:
        proc.close()
        if server is not None:
            server.close()
