"""The command line: a thin click layer over the library modules."""

from __future__ import annotations

# Importing each command module registers its command on the group.
from . import db, events, process, rejects, report, revenue, send, serve, status  # noqa: F401
from .base import cli, finish

finish(cli)

__all__ = ["cli", "main"]


def main() -> None:
    cli(prog_name="evtool")
