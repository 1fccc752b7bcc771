"""`evtool db`: the embedded PostgreSQL."""

from __future__ import annotations

import click

from ..output import print_json
from .base import cli, dsn_option

# -- db --------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """The database: migrate or check its schema; the embedded PostgreSQL (under the state directory)."""


@db.command("migrate")
@dsn_option
@click.option("--check", is_flag=True,
              help="Change nothing: exit 1 (saying what is missing) when the schema is behind.")
def db_migrate(dsn: str | None, check: bool) -> None:
    """Bring the database's schema up to this evtool's (writers do it themselves; readers never do).

    Run it once as a role that may create tables; then a SELECT-only role can run `revenue`,
    `report`, `status` and `rejects`.
    """
    from .. import config
    from ..store import Store

    with Store.connect(config.resolve_dsn(dsn)) as store:
        if check:
            store.check_schema()  # SchemaBehind: one line, exit 1
            have, _ = store.schema_versions()
            click.echo(f"schema up to date (version {have})")
            return
        done = store.migrate()
        have, _ = store.schema_versions()
    click.echo(f"applied {', '.join(done)}; schema at version {have}" if done
               else f"schema up to date (version {have})")


@db.command("compact")
@dsn_option
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def db_compact(dsn: str | None, as_json: bool) -> None:
    """Fold the per-minute rows big batches appended into the per-minute figures (figures unchanged).

    `process --follow` does it itself when idle; after big one-shot runs, run it from cron.
    """
    from .. import config
    from ..store import Store

    with Store.connect(config.resolve_dsn(dsn)) as store:
        store.check_schema()
        folded, written = store.fold_minutes()
    if as_json:
        print_json({"rows_folded": folded, "rows_written": written})
        return
    click.echo(f"folded {folded} pending per-minute rows into {written} rows of revenue_by_minute")


@db.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def db_status(as_json: bool) -> None:
    """Is the embedded server running, where, and its DSN."""
    from .. import config, embedded

    pgdata = config.pgdata()
    info = embedded.running(pgdata)
    in_use = embedded.choose(start=False).kind == "embedded"
    status = {
        "running": info is not None,
        "pgdata": str(pgdata.resolve()),
        "pid": info.pid if info else None,
        "dsn": info.dsn if info else None,
        "in_use": in_use,
    }
    if as_json:
        print_json(status)
        return
    if info:
        click.echo(f"embedded PostgreSQL: running (pid {info.pid})")
        click.echo(f"data:  {status['pgdata']}")
        click.echo(f"dsn:   {info.dsn}")
    else:
        click.echo(f"embedded PostgreSQL: not running (data: {status['pgdata']}); "
                   "any command that needs it starts it")
    if not in_use:
        click.echo("note: a DSN is configured (EVTOOL_DSN, DATABASE_URL or PG*), so commands use it, "
                   "not the embedded server")


@db.command("url")
@dsn_option
def db_url(dsn: str | None) -> None:
    """Print the DSN commands use (starting the embedded server if needed): psql "$(evtool db url)"."""
    from .. import config

    click.echo(config.resolve_dsn(dsn))


@db.command("start")
def db_start() -> None:
    """Start the embedded server (commands also start it on first use)."""
    from .. import config, embedded

    click.echo(embedded.ensure_running(config.pgdata()))


@db.command("stop")
def db_stop() -> None:
    """Stop the embedded server."""
    from .. import config, embedded

    stopped = embedded.stop(config.pgdata())
    click.echo("stopped" if stopped else "not running")



