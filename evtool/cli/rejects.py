"""`evtool rejects`: list rejected lines, or re-apply those now valid."""

from __future__ import annotations

from pathlib import Path

import click

from .. import config
from ..mapping import Mapping
from .base import cli, dsn_option, mapping_option, strict_option


@cli.command()
@dsn_option
@click.option("--reason", help="Only lines whose reason contains this (case-insensitive).")
@click.option("--file", "file", type=click.Path(dir_okay=False, path_type=Path),
              help="Only lines of this journal.")
@click.option("--limit", type=click.IntRange(0), default=100, show_default=True,
              help="At most this many lines (0: all).")
@click.option("--all", "include_reapplied", is_flag=True, help="Include lines already re-applied.")
@click.option("--newest", is_flag=True, help="The most recently rejected first (default: by file and line).")
@click.option("--reapply", is_flag=True,
              help="Re-validate the (filtered) rejected lines and apply those now valid, exactly once.")
@strict_option
@mapping_option
@click.option("--json", "as_json", is_flag=True, help="JSON Lines (one object per line); with --reapply "
              "one summary object.")
def rejects(dsn: str | None, reason: str | None, file: Path | None, limit: int, include_reapplied: bool,
            newest: bool, reapply: bool, strict: bool, mapping: Mapping | None, as_json: bool) -> None:
    """List rejected lines (file, line, time, reason, the raw line), or --reapply them.

    --reapply checks each pending rejected line against the current rules (for instance after
    input normalization was widened): one now valid is applied once, under its eventId or, if
    it has none, its position, and marked as re-applied; one still invalid stays, with its
    reason updated. Each batch is one transaction that locks the journal like `process` does.
    With --mapping, the lines are read under that mapping (lines of a shape it declares).
    """
    if mapping is not None and not reapply:
        raise click.UsageError("--mapping goes with --reapply")
    if reapply:
        _reapply(dsn, reason, file, strict, as_json, mapping)
        return
    from ..output import console, json_text, reject_line
    from ..reports import rejects as list_rejects

    out = console()
    store = config.open_store(dsn, migrate=False)
    n = 0
    try:
        for r in list_rejects(store, reason=reason, path=file, limit=limit,
                              include_reapplied=include_reapplied, newest_first=newest):
            n += 1
            if as_json:
                click.echo(json_text(r))
            else:
                reject_line(out, r)
    finally:
        store.close()
    if not as_json:
        more = " (--limit reached)" if limit and n == limit else ""
        click.echo(f"{n} rejected line(s){more}", err=True)


def _reapply(dsn: str | None, reason: str | None, file: Path | None, strict: bool, as_json: bool,
             mapping: Mapping | None = None) -> None:
    from ..output import console, print_json, reapply_dict, reapply_summary
    from ..rejects import reapply

    store = config.open_store(dsn, migrate=True)
    try:
        rep = reapply(store, reason=reason, path=file, strict=strict, mapping=mapping)
    finally:
        store.close()
    if as_json:
        print_json(reapply_dict(rep))
    else:
        reapply_summary(console(), rep)
