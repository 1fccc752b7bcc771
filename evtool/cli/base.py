"""The root command group and what every command shares: error handling, DSN option, output.

Only the CLI turns library exceptions into messages and exit codes (0 ok, 1 failed, 2 usage).
Heavy modules (rich, aiohttp, psycopg) are imported inside the commands that need them, so
`evtool revenue` starts fast.
"""

from __future__ import annotations

import functools

import click

from ..errors import EvtoolError

DSN_HELP = "PostgreSQL DSN. Default: EVTOOL_DSN, DATABASE_URL, PG* variables, else the embedded server."


def fail(ctx: click.Context, exc: BaseException) -> None:
    if ctx.find_root().obj.get("verbose"):
        import traceback

        traceback.print_exception(exc)
    click.echo(f"Error: {exc}", err=True)
    ctx.exit(1)


def handle_errors(fn):
    """Turn our exceptions into one line on stderr and exit 1 (a traceback with --verbose)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        try:
            return fn(*args, **kwargs)
        except EvtoolError as exc:
            fail(ctx, exc)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)

    return wrapper


def dsn_option(fn):
    return click.option("--dsn", envvar="EVTOOL_DSN", show_envvar=True, help=DSN_HELP)(fn)


def strict_option(fn):
    return click.option(
        "--strict", is_flag=True,
        help="No input normalization: user_id is not read as userId, string values are invalid.",
    )(fn)


def console(err: bool = False):
    from rich.console import Console

    return Console(stderr=err, highlight=False, soft_wrap=True)


def print_json(obj: object) -> None:
    import orjson

    click.echo(orjson.dumps(obj).decode())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", "-v", is_flag=True, help="Show tracebacks and details on errors.")
@click.version_option(package_name="evtool")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Revenue events from JSONL files into PostgreSQL, exactly once.

    \b
    events.jsonl --send--> POST /liveEvent --serve--> server-events.jsonl
    server-events.jsonl --process--> PostgreSQL users_revenue --revenue USER--> total
    """
    ctx.obj = {"verbose": verbose}


