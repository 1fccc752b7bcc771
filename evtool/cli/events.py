"""`evtool events`: the journal lines behind a user's total (the audit trail, see evtool.audit)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click

from .. import config
from ..mapping import Mapping
from .base import cli, dsn_option, mapping_option, strict_option
from .report import EventTime

STATUSES = ("applied", "duplicate", "rejected", "pending")


@cli.command()
@click.argument("user")
@click.argument("journals", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@dsn_option
@click.option("--since", type=EventTime(),
              help="Only events whose EVENT time is at or after this (ISO, YYYY/MM/DD or epoch;"
                   " no offset = UTC). Lines without a time are left out.")
@click.option("--until", type=EventTime(), help="Only events whose EVENT time is before this.")
@click.option("--status", "only", type=click.Choice(STATUSES),
              help="Only lines of this status.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: the total, the sum of the applied lines, the journals "
                   "read and every line (amounts as exact decimal strings).")
@strict_option
@mapping_option
def events(user: str, journals: tuple[Path, ...], dsn: str | None, since: datetime | None,
           until: datetime | None, only: str | None, as_json: bool, strict: bool,
           mapping: Mapping | None) -> None:
    """List the journal lines behind USER's total, oldest first, with each line's status.

    Status: applied (counted in the total); duplicate (of the journal line that was applied
    for the same id); rejected (with the reason the processor recorded); pending (not
    processed yet: at or past its journal's processed offset). The applied amounts sum to
    `evtool revenue USER` when every journal that fed it is still on disk; a line on stderr
    says when they do not.

    Reads JOURNALS, default every journal the database knows (where `status` finds it, rotated
    copies too) and ./server-events.jsonl. The journals are the record: they are scanned for
    USER's id, nothing is stored twice. Never writes. Exit 1 for a user with no total and no
    lines.
    """
    from ..audit import trail
    from ..errors import UnknownUser
    from ..output import events_text, print_json

    if since is not None and until is not None and since >= until:
        raise click.UsageError("--since must be before --until")
    with config.open_store(dsn, migrate=False) as store:
        t = trail(store, user, list(journals), strict=strict, since=since, until=until, status=only,
                  mapping=mapping)
    if t.revenue is None and not t.found:
        raise UnknownUser(f"unknown user {user!r}: no events applied for it, and no line of it in "
                          f"the {len(t.journals)} journal(s) read")
    for j in t.journals:
        if j.state in ("missing", "changed"):
            why = "is not on disk" if j.state == "missing" else "no longer holds the lines processed"
            click.echo(f"warning: journal {j.shown} {why}: its lines are not listed", err=True)
    if not t.explains_total:
        from ..output import money

        total = money(t.revenue) if t.revenue is not None else "none"
        click.echo(f"warning: the applied lines sum to {money(t.applied_sum)}, the stored total is "
                   f"{total}: some journal that fed it was not read", err=True)
    if as_json:
        print_json(t.to_dict())
    else:
        events_text(t)
