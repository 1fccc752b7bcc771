"""The command line: a thin click layer over the library modules."""

from __future__ import annotations

from . import db, ops, pipeline  # noqa: F401  (they register their commands on the group)
from .base import cli

__all__ = ["cli", "main"]


def main() -> None:
    cli(prog_name="evtool")
