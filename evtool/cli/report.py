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


@cli.command()
@dsn_option
@click.option("--top", type=click.IntRange(0, 10_000), default=10, show_default=True,
              help="How many users to list with the highest (and the lowest) revenue.")
@click.option("--prefix", help="Only users whose id starts with this.")
@click.option("--since", type=IsoTime(), help="Only what was applied at or after this time (ISO).")
@click.option("--until", type=IsoTime(), help="Only what was applied before this time (ISO).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--csv", "as_csv", is_flag=True, help="Print section,name,count,amount rows.")
def report(dsn: str | None, top: int, prefix: str | None, since: datetime | None, until: datetime | None,
           as_json: bool, as_csv: bool) -> None:
    """Revenue overall, users, events applied by name, top and bottom users.

    --since/--until filter by when the events were applied (the processor's commit time):
    then every figure is what the batches committed in that window contributed.
    """
    from ..output import print_json, report_csv, report_text
    from ..reports import report as make_report

    if as_json and as_csv:
        raise click.UsageError("--csv and --json are exclusive")
    store = config.open_store(dsn, migrate=False)
    try:
        r = make_report(store, top=top, prefix=prefix, since=since, until=until).to_dict()
    finally:
        store.close()
    if as_json:
        print_json(r)
    elif as_csv:
        report_csv(r)
    else:
        report_text(r)
