"""The root command group and what every command shares: the error boundary and common options.

Only the CLI turns library exceptions into messages and exit codes (0 ok, 1 failed, 2 usage).
Heavy modules (rich, aiohttp, psycopg) are imported inside the commands that need them, so
`evtool revenue` starts fast.
"""

from __future__ import annotations

import errno
from typing import Any

import click

from ..config import URL as DEFAULT_URL
from ..errors import ConfigError, EvtoolError
from ..log import FORMATS, LEVELS

DSN_HELP = "PostgreSQL DSN. Default: EVTOOL_DSN, DATABASE_URL, PG* variables, else the embedded server."


class Failed(Exception):
    """Exit 1 without a further message: the command has already said what went wrong."""


def _one_line(exc: BaseException) -> str:
    """The message for an error: ours are one line already; an OSError says its cause and file."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    else:
        text = str(exc)
    return text.splitlines()[0] if text.strip() else type(exc).__name__


class EvtoolGroup(click.Group):
    """The one place errors become a line on stderr and an exit code.

    Library errors and OSError (a busy port, an unreadable file) exit 1 with one line (the
    traceback too with --verbose); `Failed` exits 1 silently; Ctrl-C exits 130; click's usage
    errors keep their own handling (exit 2). A closed pipe goes to click, which exits quietly.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Failed:
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
        except (EvtoolError, OSError) as exc:
            if isinstance(exc, BrokenPipeError) or getattr(exc, "errno", None) == errno.EPIPE:
                raise  # click.main handles it: no message for `evtool ... | head`
            if ctx.params.get("verbose"):
                import traceback

                traceback.print_exception(exc)
            click.echo(f"Error: {_one_line(exc)}", err=True)
            ctx.exit(1)


class ReceiverURL(click.ParamType):
    """The receiver's base URL: http:// or https://, a host, a port in range; no trailing slash.

    A bad one is a setting that cannot work (often from EVTOOL_URL), so it is one line and
    exit 1 through the error boundary, never a traceback from deep in the HTTP client.
    """

    name = "URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from urllib.parse import urlsplit

        try:
            u = urlsplit(str(value))
            u.port  # noqa: B018 - raises ValueError for a port out of range or not a number
        except ValueError as exc:
            raise ConfigError(f"--url {value!r} is not a valid URL: {exc}") from None
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConfigError(f"--url {value!r} is not an http:// URL with a host "
                              f"(for example {DEFAULT_URL})")
        return str(value).rstrip("/")


def url_option(text: str, multiple: bool = False):
    return click.option("--url", "urls" if multiple else "url", envvar="EVTOOL_URL", show_envvar=True,
                        default=(DEFAULT_URL,) if multiple else DEFAULT_URL, multiple=multiple,
                        show_default=True, type=ReceiverURL(), help=text)


def dsn_option(fn):
    return click.option("--dsn", envvar="EVTOOL_DSN", show_envvar=True, help=DSN_HELP)(fn)


def strict_option(fn):
    return click.option(
        "--strict", is_flag=True,
        help="No input normalization: user_id is not read as userId, string values are invalid.",
    )(fn)


def _load_mapping(_ctx: click.Context, _param: click.Parameter, value: str | None):
    """--mapping FILE, read at once: a bad file is one line and exit 1 (the error boundary)."""
    if not value:
        return None
    from ..mapping import load

    return load(value)


def mapping_option(fn):
    return click.option(
        "--mapping", metavar="FILE", envvar="EVTOOL_MAPPING", callback=_load_mapping,
        help="A TOML file declaring how your events' own shape maps to userId, name, value, time "
             "and eventId (README: Inputs of any shape). Give the same file to send, serve and process.",
    )(fn)


def _verbose_here(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """`-v` given after the subcommand: the same as before it (the error boundary reads the root's)."""
    if value:
        ctx.find_root().params["verbose"] = True
        if isinstance(ctx.find_root().obj, dict):
            ctx.find_root().obj["verbose"] = True


def finish(group: click.Group) -> None:
    """Once every command is registered: each option shows its environment variable in --help
    (EVTOOL_<COMMAND>_<OPTION> unless it names its own), and each command accepts -v too."""

    def walk(cmd: click.Command, prefix: str) -> None:
        names = {n for p in cmd.params for n in getattr(p, "opts", [])}
        if cmd is not group and "--verbose" not in names:
            cmd.params.append(click.Option(["--verbose", "-v"], is_flag=True, expose_value=False,
                                           callback=_verbose_here, allow_from_autoenv=False,
                                           help="Show tracebacks and details on errors."))
        for p in cmd.params:
            if isinstance(p, click.Option) and p.allow_from_autoenv:
                if p.envvar is None:  # named after the option (--json), not its variable (as_json)
                    longest = max((o for o in p.opts if o.startswith("--")), key=len)
                    p.envvar = f"{prefix}_{longest[2:].replace('-', '_').upper()}"
                p.show_envvar = True
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{prefix}_{name.replace('-', '_').upper()}")

    walk(group, "EVTOOL")


@click.group(cls=EvtoolGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                "auto_envvar_prefix": "EVTOOL"})
@click.option("--verbose", "-v", is_flag=True, help="Show tracebacks and details on errors.")
@click.option("--log-level", type=click.Choice(LEVELS, case_sensitive=False), default="info",
              show_default=True, help="Least severe log records written to stderr.")
@click.option("--log-format", type=click.Choice(FORMATS), default="text", show_default=True,
              help="text: `<UTC time> <LEVEL> <message>` lines; json: one JSON object per line.")
@click.version_option(package_name="evtool", allow_from_autoenv=False)
@click.pass_context
def cli(ctx: click.Context, verbose: bool, log_level: str, log_format: str) -> None:
    """Revenue events from JSONL files into PostgreSQL, exactly once.

    \b
    events.jsonl --send--> POST /liveEvent --serve--> server-events.jsonl
    server-events.jsonl --process--> PostgreSQL users_revenue --revenue USER--> total
    """
    from .. import log

    log.setup(log_level, log_format)
    ctx.obj = {"verbose": verbose}


