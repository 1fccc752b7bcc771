"""The command line: parses options, calls one or two library functions, renders the result.

Only this module turns library exceptions into messages and exit codes (0 ok, 1 failed, 2 usage).
"""

from __future__ import annotations

import click

# Commands import their modules lazily so `evtool revenue` starts fast.


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", "-v", is_flag=True, help="Show tracebacks and details on errors.")
@click.version_option(package_name="evtool")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Revenue events from JSONL files into PostgreSQL, exactly once."""
    ctx.obj = {"verbose": verbose}


def main() -> None:
    cli()
