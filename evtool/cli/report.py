"""`evtool report`: revenue overall, by event name, top and bottom users."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click

from .. import config
from .base import cli, dsn_option


class IsoTime(click.ParamType):
    """An ISO 8601 date or date-time; without a UTC offset it is local time."""

    name = "ISO-TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            t = datetime.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is not an ISO date or date-time (e.g. 2026-11-21 or 2026-11-21T14:00Z)",
                      param, ctx)
        return t if t.tzinfo is not None else t.astimezone()


class EventTime(click.ParamType):
    """An event time, read by the rules events follow (evtool.eventtime): no offset means UTC."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        from ..errors import InvalidEvent
        from ..eventtime import parse

        if isinstance(value, datetime):
            return value
        try:
            return parse(value, "the time")
        except InvalidEvent as exc:
            self.fail(exc.reason, param, ctx)


@cli.command()
@dsn_option
@click.option("--top", type=click.IntRange(0, 10_000), default=10, show_default=True,
              help="How many users to list with the highest (and the lowest) revenue.")
@click.option("--prefix", help="Only users whose id starts with this.")
@click.option("--by", type=click.Choice(["hour", "day", "week", "month"]),
              help="Revenue per period of EVENT time (UTC; weeks start on Monday).")
@click.option("--since", type=EventTime(),
              help="Only events whose EVENT time is at or after this (ISO, YYYY/MM/DD or epoch;"
                   " no offset = UTC).")
@click.option("--until", type=EventTime(), help="Only events whose EVENT time is before this.")
@click.option("--applied-since", type=IsoTime(),
              help="Only what the processor APPLIED (committed) at or after this time"
                   " (ISO; no offset = local).")
@click.option("--applied-until", type=IsoTime(), help="Only what was APPLIED before this time.")
@click.option("--window", type=click.IntRange(1, 7 * 24 * 60), metavar="MINUTES",
              help="The rolling window instead: events, revenue and active users per minute of event "
                   "time over the last MINUTES minutes.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV rows.")
def report(dsn: str | None, top: int, prefix: str | None, by: str | None, since: datetime | None,
           until: datetime | None, applied_since: datetime | None, applied_until: datetime | None,
           window: int | None, as_json: bool, as_csv: bool) -> None:
    """Revenue overall, users, events applied by name, top and bottom users.

    Two clocks: --since/--until (and --by, --window) use EVENT time, the time each event
    carries (or the time `serve` received it); --applied-since/--applied-until use the
    processor's commit time. Late events land in the period of their event time.
    """
    from ..output import period_csv, period_text, print_json, report_csv, report_text, window_csv, window_text
    from ..reports import report as make_report
    from ..reports import revenue_by_period, rolling_window

    if as_json and as_csv:
        raise click.UsageError("--csv and --json are exclusive")
    if (since or until) and (applied_since or applied_until):
        raise click.UsageError("give event-time (--since/--until) or applied-time (--applied-*) filters,"
                               " not both")
    if window and (by or since or until or applied_since or applied_until):
        raise click.UsageError("--window reports the last minutes up to now: it takes no other time option")
    if by and (applied_since or applied_until):
        raise click.UsageError("--by is per period of event time: filter it with --since/--until")
    store = config.open_store(dsn, migrate=False)
    try:
        if window:
            w = rolling_window(store, window).to_dict()
            print_json(w) if as_json else window_csv(w) if as_csv else window_text(w)
            return
        if by:
            p = revenue_by_period(store, by, prefix=prefix, since=since, until=until).to_dict()
            print_json(p) if as_json else period_csv(p) if as_csv else period_text(p)
            return
        r = make_report(store, top=top, prefix=prefix, since=applied_since, until=applied_until,
                        event_since=since, event_until=until).to_dict()
    finally:
        store.close()
    if as_json:
        print_json(r)
    elif as_csv:
        report_csv(r)
    else:
        report_text(r)
