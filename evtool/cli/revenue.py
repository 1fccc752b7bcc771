"""`evtool revenue`: one user's exact total, or every user's, streamed."""

from __future__ import annotations

import click

from .. import config
from .base import cli, dsn_option


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
    usage_checks(user, every, as_csv, as_json)
    if every:
        revenue_all(dsn, "csv" if as_csv else "json" if as_json else "text")
        return
    assert user is not None
    from ..errors import UnknownUser
    from ..output import json_text, money, user_revenue

    with config.open_store(dsn, migrate=False) as store:
        total = store.revenue(user)
    if total is None:
        raise UnknownUser(f"unknown user {user!r}: no events applied for it")
    click.echo(json_text(user_revenue(user, total), spaced=True) if as_json else money(total))


def usage_checks(user: str | None, every: bool, as_csv: bool, as_json: bool) -> None:
    if every and user is not None:
        raise click.UsageError("give USER or --all, not both")
    if not every and user is None:
        raise click.UsageError("missing USER (or --all for every user)")
    if as_csv and not every:
        raise click.UsageError("--csv goes with --all")
    if as_csv and as_json:
        raise click.UsageError("--csv and --json are exclusive")


def revenue_all(dsn: str | None, fmt: str) -> None:
    """Stream every user's total: text (user<TAB>revenue), csv, or JSON Lines."""
    import sys

    from ..output import csv_writer, json_text, money, user_revenue
    from ..reports import all_revenue

    out = sys.stdout
    writer = csv_writer(out) if fmt == "csv" else None
    if writer is not None:
        writer.writerow(["user_id", "revenue"])
    store = config.open_store(dsn, migrate=False)
    try:
        for user, total in all_revenue(store):
            if writer is not None:
                writer.writerow([user, money(total)])
            elif fmt == "json":
                out.write(json_text(user_revenue(user, total)) + "\n")
            else:
                out.write(f"{user}\t{money(total)}\n")
    finally:
        store.close()
        out.flush()
