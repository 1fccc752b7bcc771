"""The operator's commands: status (the dashboard), report, rejects; and `revenue --all`'s output."""

from __future__ import annotations

import sys
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import click

from .. import config
from .base import Failed, cli, console, dsn_option, strict_option

URL_OPTION = click.option("--url", envvar="EVTOOL_URL", show_envvar=True, default=config.URL,
                          show_default=True, help="The receiver whose GET /healthz is checked.")


# -- output helpers ---------------------------------------------------------------------------


def _default(obj: Any) -> Any:
    import orjson

    from ..events import format_value

    if isinstance(obj, Decimal):
        return orjson.Fragment(format_value(obj).encode())
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def json_text(obj: Any) -> str:
    """JSON with exact numbers: Decimals are written with exactly their digits."""
    import orjson

    return orjson.dumps(obj, default=_default).decode()


def _money(value: Decimal | int) -> str:
    from ..events import format_value

    return format_value(value)


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


# -- revenue --all ----------------------------------------------------------------------------


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
    import csv

    from ..reports import all_revenue

    out = sys.stdout
    writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writerow(["user_id", "revenue"])
    store = config.open_store(dsn)
    try:
        for user, total in all_revenue(store):
            if writer is not None:
                writer.writerow([user, _money(total)])
            elif fmt == "json":
                out.write(json_text({"userId": user, "revenue": total}) + "\n")
            else:
                out.write(f"{user}\t{_money(total)}\n")
    finally:
        store.close()
        out.flush()


# -- status -----------------------------------------------------------------------------------


def _ago(t: datetime | None, now: datetime) -> str:
    if t is None:
        return "never"
    secs = max(0, int((now - t).total_seconds()))
    span = f"{secs} s" if secs < 120 else f"{secs // 60} min" if secs < 7200 else f"{secs // 3600} h"
    return f"{t.astimezone():%Y-%m-%d %H:%M:%S} ({span} ago)"


def _short(path: str) -> str:
    """A path relative to the working directory when it is under it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def _wide():
    """The console for tables: on a pipe, wide enough that no cell wraps."""
    out = console()
    if not out.is_terminal:
        out.width = 200
    return out


def _n(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def render_status(s: dict[str, Any]):
    """The status snapshot as rich renderables (a table of journals between two lines)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    db = s["database"]
    where = f"{db['kind']} {db['dsn']}" if db["dsn"] else db["kind"]
    if db["reachable"]:
        db_line = Text.assemble("database  ", (f"{where}: reachable", "green"),
                                f" (PostgreSQL {db['version']})")
    else:
        db_line = Text.assemble("database  ", (f"{where}: unreachable", "red"), f" ({db['error']})")
    r = s["receiver"]
    if r["reachable"] and r["healthy"]:
        rx_line = Text.assemble("receiver  ", (f"{r['url']}: ok", "green"))
    elif r["reachable"]:
        rx_line = Text.assemble("receiver  ", (f"{r['url']}: unhealthy", "red"), f" ({r['error']})")
    else:
        rx_line = Text.assemble("receiver  ", (f"{r['url']}: not answering", "yellow"))
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for name, justify in (("journal", "left"), ("state", "left"), ("size", "right"),
                          ("processed", "right"), ("lag bytes", "right"), ("lag lines", "right"),
                          ("applied", "right"), ("dups", "right"), ("rejected", "right"),
                          ("last processed", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    style = {"ok": "green", "new": "yellow", "waiting": "yellow"}
    for j in s["journals"]:
        rejected = _n(j["rejected"])
        if j["rejects_pending"]:
            rejected += f" ({j['rejects_pending']:,} pending)"
        lag_style = "yellow" if j["lag_lines"] else ""
        table.add_row(_short(j["path"]), Text(j["state"], style.get(j["state"], "red")), _n(j["size"]),
                      _n(j["offset"]), Text(_n(j["lag_bytes"]), lag_style),
                      Text(_n(j["lag_lines"]), lag_style),
                      _n(j["applied"]), _n(j["duplicates"]), rejected, _ago(j["last_processed"], s["time"]))
    parts: list[Any] = [db_line, rx_line]
    if s["journals"]:
        parts += [Text(""), table]
    else:
        parts.append(Text("no journals: none known to the database, and no ./server-events.jsonl"))
    return Group(*parts)


@cli.command()
@click.argument("journals", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@dsn_option
@URL_OPTION
@click.option("--watch", is_flag=True, help="Refresh live on the terminal until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=2.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot as one JSON object.")
def status(journals: tuple[Path, ...], dsn: str | None, url: str, watch: bool, interval: float,
           as_json: bool) -> None:
    """The dashboard: journals, lag, counters, the database and the receiver.

    Shows every journal the database knows, plus JOURNALS (default ./server-events.jsonl when
    it exists): size, processed offset, lag (bytes and complete lines not yet applied),
    events applied, duplicates skipped, lines rejected, last processed time. Never starts the
    embedded server. Exit 1 when the database cannot be reached.
    """
    from ..reports import StatusProbe

    if watch and as_json:
        raise click.UsageError("--watch and --json are exclusive")
    paths = list(journals)
    if not paths and config.JOURNAL.exists():
        paths = [config.JOURNAL]
    probe = StatusProbe(dsn, paths, url)
    try:
        if watch:
            _watch(probe, interval)
            return
        snap = probe.snapshot()
    finally:
        probe.close()
    if as_json:
        click.echo(json_text(snap))
    else:
        _wide().print(render_status(snap))
    if not snap["database"]["reachable"]:
        raise Failed


def _watch(probe, interval: float) -> None:
    import time

    from rich.live import Live
    from rich.text import Text

    def frame():
        from rich.console import Group

        snap = probe.snapshot()
        head = Text(f"evtool status, every {interval:g} s ({snap['time'].astimezone():%H:%M:%S}); "
                    "Ctrl-C to stop", style="dim")
        return Group(head, render_status(snap))

    try:
        with Live(frame(), console=console(), auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        pass


# -- report -----------------------------------------------------------------------------------


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
    from ..reports import report as make_report

    if as_json and as_csv:
        raise click.UsageError("--csv and --json are exclusive")
    store = config.open_store(dsn)
    try:
        r = make_report(store, top=top, prefix=prefix, since=since, until=until)
    finally:
        store.close()
    if as_json:
        click.echo(json_text(r))
    elif as_csv:
        _report_csv(r)
    else:
        _report_text(r)


def _report_csv(r: dict[str, Any]) -> None:
    import csv

    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow(["section", "name", "count", "amount"])
    w.writerow(["total", "revenue", r["users"], _money(r["revenue"])])
    for name, e in r["events"].items():
        w.writerow(["events", name, e["count"], _money(e["amount"])])
    for section in ("top", "bottom"):
        for u in r[section]:
            w.writerow([section, u["userId"], "", _money(u["revenue"])])


def _report_text(r: dict[str, Any]) -> None:
    from rich import box
    from rich.table import Table

    out = console()
    scope = []
    if r["prefix"]:
        scope.append(f"users starting with {r['prefix']!r}")
    if r["since"] or r["until"]:
        since = f"{r['since'].astimezone():%Y-%m-%d %H:%M:%S}" if r["since"] else "the start"
        until = f"{r['until'].astimezone():%Y-%m-%d %H:%M:%S}" if r["until"] else "now"
        scope.append(f"applied from {since} until {until}")
    out.print(f"revenue {_money(r['revenue'])} over {r['users']:,} users"
              + (f" ({', '.join(scope)})" if scope else ""))
    for name, e in r["events"].items():
        out.print(f"{name:<17} {e['count']:>12,} events  {_money(e['amount'])}")
    for section, title in (("top", "top"), ("bottom", "bottom")):
        if not r[section]:
            continue
        table = Table(title=f"{title} {len(r[section])}", box=box.SIMPLE_HEAD, title_justify="left",
                      pad_edge=False, show_edge=False)
        table.add_column("user")
        table.add_column("revenue", justify="right")
        for u in r[section]:
            table.add_row(u["userId"], _money(u["revenue"]))
        out.print(table)


# -- rejects ----------------------------------------------------------------------------------


@cli.command()
@dsn_option
@click.option("--reason", help="Only lines whose reason contains this (case-insensitive).")
@click.option("--file", "file", type=click.Path(dir_okay=False, path_type=Path),
              help="Only lines of this journal.")
@click.option("--limit", type=click.IntRange(0), default=100, show_default=True,
              help="At most this many lines (0: all).")
@click.option("--all", "include_reapplied", is_flag=True, help="Include lines already re-applied.")
@click.option("--reapply", is_flag=True,
              help="Re-validate the (filtered) rejected lines and apply those now valid, exactly once.")
@strict_option
@click.option("--json", "as_json", is_flag=True, help="JSON Lines (one object per line); with --reapply "
              "one summary object.")
def rejects(dsn: str | None, reason: str | None, file: Path | None, limit: int, include_reapplied: bool,
            reapply: bool, strict: bool, as_json: bool) -> None:
    """List rejected lines (file, line, time, reason, the raw line), or --reapply them.

    --reapply checks each pending rejected line against the current rules (for instance after
    input normalization was widened): one now valid is applied once, under its eventId or, if
    it has none, its position, and marked as re-applied; one still invalid stays, with its
    reason updated. Each batch is one transaction that locks the journal like `process` does.
    """
    if reapply:
        _reapply(dsn, reason, file, strict, as_json)
        return
    from ..reports import rejects as list_rejects

    out = console()
    store = config.open_store(dsn)
    n = 0
    try:
        for r in list_rejects(store, reason=reason, path=file, limit=limit,
                              include_reapplied=include_reapplied):
            n += 1
            if as_json:
                click.echo(json_text(r))
                continue
            done = f"  [re-applied: {r['reapply_outcome']}]" if r["reapplied_at"] else ""
            out.print(f"{r['path']}:{r['line']}  {r['rejected_at'].astimezone():%Y-%m-%d %H:%M:%S}  "
                      f"{r['reason']}{done}", style="yellow", markup=False)
            out.print(f"    {r['raw']}", markup=False)
    finally:
        store.close()
    if not as_json:
        more = " (--limit reached)" if limit and n == limit else ""
        click.echo(f"{n} rejected line(s){more}", err=True)


def _reapply(dsn: str | None, reason: str | None, file: Path | None, strict: bool, as_json: bool) -> None:
    from ..rejects import reapply

    store = config.open_store(dsn)
    try:
        rep = reapply(store, reason=reason, path=file, strict=strict)
    finally:
        store.close()
    if as_json:
        click.echo(json_text({
            "applied": rep.applied, "duplicates": rep.duplicates, "still_invalid": rep.still_invalid,
            "reasons_updated": rep.reasons_updated, "users": len(rep.users),
            "lines": [{"path": p, "line": n, "outcome": o} for p, n, o in rep.lines],
        }))
        return
    out = console()
    for p, n, o in rep.lines:
        out.print(f"{p}:{n}: {'re-applied' if o == 'applied' else 'already applied (duplicate)'}",
                  markup=False)
    out.print(f"re-applied {rep.applied} lines, {rep.duplicates} were already applied, "
              f"{rep.still_invalid} still invalid ({rep.reasons_updated} with a new reason), "
              f"{len(rep.users)} users touched")
