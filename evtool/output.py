"""All output, for people and for scripts: consoles, progress, summaries, tables, JSON, CSV.

Human text goes through rich on a terminal and through `Plain` when piped, so a script's run
does not pay for importing rich; only the tables of `status` and `report` need rich on a pipe
(`table_console`). JSON is written one way (`json_text`): orjson, with every Decimal written
with exactly its digits. Commands and the receiver call these; nothing else formats output.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

import click


class Plain:
    """The part of rich's Console the pipeline commands use, for output that is not a terminal."""

    is_terminal = False

    def __init__(self, err: bool = False) -> None:
        self.file = sys.stderr if err else sys.stdout

    def print(self, *objects: Any, style: str | None = None, **_: Any) -> None:
        print(*objects, file=self.file, flush=True)


def console(err: bool = False) -> Any:
    """A rich Console on a terminal, else Plain."""
    if not (sys.stderr if err else sys.stdout).isatty():
        return Plain(err)
    from rich.console import Console

    return Console(stderr=err, highlight=False, soft_wrap=True)


def table_console() -> Any:
    """The console for rich tables: on a pipe, $COLUMNS wide, else wide enough that no cell wraps."""
    import os

    from rich.console import Console

    out = Console(highlight=False, soft_wrap=True)
    if not out.is_terminal and not os.environ.get("COLUMNS"):
        out.width = 200
    return out


# -- machine output ---------------------------------------------------------------------------


def _exact(obj: Any) -> Any:
    from .events import value_fragment

    if isinstance(obj, Decimal):
        return value_fragment(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def json_text(obj: Any, *, spaced: bool = False) -> str:
    """JSON with exact numbers: Decimals are written with exactly their digits. The one writer.

    Compact, except `spaced`: a flat object as `{"k": v, "k2": v2}`, the layout `revenue USER
    --json` has always printed (scripts may match it as text).
    """
    import orjson

    if spaced and isinstance(obj, dict):
        return "{" + ", ".join(f"{json_text(k)}: {json_text(v)}" for k, v in obj.items()) + "}"
    return orjson.dumps(obj, default=_exact).decode()


def print_json(obj: Any) -> None:
    click.echo(json_text(obj))


def money(value: Decimal | int) -> str:
    """A total as exact text (no exponent, no float rounding)."""
    from .events import format_value

    return format_value(value)


def user_revenue(user: str, total: Decimal | int) -> dict[str, Any]:
    """One user's total as `revenue --json` prints it and GET /userEvents/<userId> answers it."""
    return {"userId": user, "revenue": total}


def csv_writer(out: TextIO | None = None) -> Any:
    """CSV rows with \\n line ends, to `out` (default: the current stdout, looked up at call time)."""
    import csv

    return csv.writer(out or sys.stdout, lineterminator="\n")


# -- progress and summaries -------------------------------------------------------------------


@contextmanager
def progress_bar(console: Any, verb: str) -> Iterator[Callable[[str, int, int | None], None]]:
    """Yield update(name, done_bytes, total_bytes); draws only on a terminal."""
    if not console.is_terminal:
        yield lambda name, done, total: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    tasks: dict[str, int] = {}
    with Progress(TextColumn(f"{verb} {{task.description}}"), BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as progress:

        def update(name: str, done: int, total: int | None) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(name, total=total)
            if total is not None:
                progress.update(tasks[name], total=total)
            progress.update(tasks[name], completed=done)

        yield update


def process_summary(console: Any, report, *, samples: bool = True) -> None:
    """The end of `process`; `samples` False when each reject was logged as it was recorded."""
    for f in report.files if samples else ():
        if f.waiting:
            console.print(f"{f.path}: nothing to apply ({f.waiting})")
        for line, reason in f.reject_samples:
            console.print(f"{f.path}:{line}: rejected: {reason}", style="yellow")
        if f.rejected > len(f.reject_samples):
            more = f.rejected - len(f.reject_samples)
            console.print(f"{f.path}: ... and {more} more rejected", style="yellow")
    users = f"{'' if report.users.exact else 'about '}{len(report.users)}"
    console.print(
        f"applied {report.applied} events, skipped {report.duplicates} duplicates, "
        f"rejected {report.rejected} lines, {users} users touched, "
        f"{report.seconds:.2f} s, {report.events_per_second:,.0f} events/s"
    )


def send_summary(console: Any, report) -> None:
    for line, reason in report.invalid_lines:
        console.print(f"line {line}: skipped: {reason}", style="yellow")
    console.print(
        f"sent {report.sent} events, skipped {report.skipped_invalid} invalid, "
        f"{report.already_sent} already sent, retried {report.retried}, failed {report.failed}, "
        f"{report.seconds:.2f} s, {report.events_per_second:,.0f} events/s"
    )


def process_dict(report) -> dict[str, Any]:
    """`process --json`."""
    return {
        "applied": report.applied,
        "duplicates": report.duplicates,
        "rejected": report.rejected,
        "users": len(report.users),
        "users_exact": report.users.exact,  # False: an estimate (over 100,000 users), ~1% off
        "seconds": round(report.seconds, 3),
        "events_per_second": round(report.events_per_second, 1),
        "retries": report.retries,
        "files": [
            {"path": f.path, "applied": f.applied, "duplicates": f.duplicates, "rejected": f.rejected,
             "offset": f.offset, "size": f.size, "waiting": f.waiting,
             "rejects": [{"line": n, "reason": r} for n, r in f.reject_samples]}
            for f in report.files
        ],
    }


def send_dict(report) -> dict[str, Any]:
    """`send --json`."""
    return {
        "source": report.source, "sent": report.sent, "skipped_invalid": report.skipped_invalid,
        "already_sent": report.already_sent, "retried": report.retried, "failed": report.failed,
        "seconds": round(report.seconds, 3), "events_per_second": round(report.events_per_second, 1),
        "invalid": [{"line": n, "reason": r} for n, r in report.invalid_lines],
        "new_source_reason": report.new_source_reason, "stopped": report.stopped,
        "errors": report.errors,
    }


def reapply_dict(rep) -> dict[str, Any]:
    """`rejects --reapply --json`."""
    return {
        "applied": rep.applied, "duplicates": rep.duplicates, "still_invalid": rep.still_invalid,
        "reasons_updated": rep.reasons_updated, "users": len(rep.users),
        "lines": [{"path": p, "line": n, "outcome": o} for p, n, o in rep.lines],
    }


# -- status, report, rejects --------------------------------------------------------------


def _short(path: str) -> str:
    """A path relative to the working directory when it is under it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def _n(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _since(t: datetime | None, now: datetime) -> str:
    """`12:03:04 (5 s ago)`: short enough never to wrap at 80 columns."""
    if t is None:
        return "never"
    secs = max(0, int((now - t).total_seconds()))
    span = f"{secs} s" if secs < 120 else f"{secs // 60} min" if secs < 7200 else f"{secs // 3600} h"
    day = "%H:%M:%S" if secs < 86400 else "%Y-%m-%d %H:%M"
    return f"{t.astimezone():{day}} ({span} ago)"


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}/s"


def status_view(s: dict[str, Any]):
    """The status snapshot as rich renderables: a few labelled lines, then a block per journal.

    Lines, not a wide table: every figure is whole at 80 columns (a table squeezed to that
    width cut numbers to `624,…` and wrapped times); only a long path wraps, on its own line.
    """
    from rich.console import Group
    from rich.text import Text

    db = s["database"]
    where = f"{db['kind']} {db['dsn']}" if db["dsn"] else db["kind"]
    if db["reachable"] and db.get("schema"):
        db_line = Text.assemble("database  ", (f"{where}: reachable", "green"),
                                f" (PostgreSQL {db['version']}); ", (db["schema"], "red"))
    elif db["reachable"]:
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
    t = s["totals"]
    parts: list[Any] = [db_line, rx_line]
    rates = s.get("rates")
    if rates is not None:
        parts.append(Text(f"rates     accepted {_rate(rates['accepted_per_s'])}  "
                          f"applied {_rate(rates['applied_per_s'])}"))
    parts.append(Text(f"totals    applied {_n(t['applied'])}  dups {_n(t['duplicates'])}  "
                      f"rejected {_n(t['rejected'])}  lag {_n(t['lag_lines'])} lines"))
    w = s.get("window")
    if w is not None:
        parts.append(Text(f"last {w['minutes']} min  {_n(w['events'])} events  revenue {w['revenue']}  "
                          f"{_n(w['users'])} users (event time)"))
    if not s["journals"]:
        parts.append(Text("no journals: none known to the database, and no ./server-events.jsonl"))
    style = {"ok": "green", "rotated": "yellow", "new": "yellow", "waiting": "yellow"}
    for j in s["journals"]:
        rejected = _n(j["rejected"])
        if j["rejects_pending"]:
            rejected += f" ({j['rejects_pending']:,} pending)"
        lag_style = "yellow" if j["lag_lines"] else ""
        parts.append(Text(""))
        parts.append(Text.assemble((_short(j["path"]), "bold"), "  ",
                                   (j["state"], style.get(j["state"], "red"))))
        parts.append(Text(f"  applied {_n(j['applied'])}  dups {_n(j['duplicates'])}  rejected {rejected}"))
        parts.append(Text.assemble("  lag ", (f"{_n(j['lag_lines'])} lines, {_bytes(j['lag_bytes'])}",
                                              lag_style),
                                   f"  processed {_bytes(j['offset'])} of {_bytes(j['size'])}"))
        parts.append(Text(f"  last processed {_since(j['last_processed'], s['time'])}"))
        parts.extend(_mapping_lines(j))
    return Group(*parts)


def _mapping_name(m: dict[str, Any]) -> str:
    if not m["mapping"]:
        return "none (built-in shapes)"
    return m["mapping"] + (f" ({_short(m['source'])})" if m["source"] else "")


def _mapping_lines(j: dict[str, Any]) -> list[Any]:
    """The mapping a journal was read under; when it changed between runs, each with its lines."""
    from rich.text import Text

    ms = j.get("mappings") or []
    if not ms:
        return []
    if len(ms) == 1:
        return [Text(f"  mapping {_mapping_name(ms[0])}")]
    out = [Text("  mapping changed between runs: its batches were read under", style="yellow")]
    out += [Text(f"    {_mapping_name(m)}: {_n(m['lines'])} lines in {_n(m['batches'])} batch(es), "
                 f"bytes {m['first_offset']:,}-{m['end_offset']:,}") for m in ms]
    return out


def report_csv(r: dict[str, Any]) -> None:
    w = csv_writer()
    w.writerow(["section", "name", "count", "amount"])
    w.writerow(["total", "revenue", r["users"], money(r["revenue"])])
    for name, e in r["events"].items():
        w.writerow(["events", name, e["count"], money(e["amount"])])
    for section in ("top", "bottom"):
        for u in r[section]:
            w.writerow([section, u["userId"], "", money(u["revenue"])])


def report_text(r: dict[str, Any]) -> None:
    from rich import box
    from rich.table import Table

    out = table_console()
    scope = []
    if r["prefix"]:
        scope.append(f"users starting with {r['prefix']!r}")
    if r["since"] or r["until"]:
        since = f"{r['since'].astimezone():%Y-%m-%d %H:%M:%S}" if r["since"] else "the start"
        until = f"{r['until'].astimezone():%Y-%m-%d %H:%M:%S}" if r["until"] else "now"
        scope.append(f"applied from {since} until {until}")
    if r.get("event_since") or r.get("event_until"):
        since = f"{r['event_since']:%Y-%m-%d %H:%M:%SZ}" if r["event_since"] else "the start"
        until = f"{r['event_until']:%Y-%m-%d %H:%M:%SZ}" if r["event_until"] else "the end"
        scope.append(f"event time from {since} until {until}")
    out.print(f"revenue {money(r['revenue'])} over {r['users']:,} users"
              + (f" ({', '.join(scope)})" if scope else ""))
    for name, e in r["events"].items():
        out.print(f"{name:<17} {e['count']:>12,} events  {money(e['amount'])}")
    for section, title in (("top", "top"), ("bottom", "bottom")):
        if not r[section]:
            continue
        table = Table(title=f"{title} {len(r[section])}", box=box.SIMPLE_HEAD, title_justify="left",
                      pad_edge=False, show_edge=False)
        table.add_column("user")
        table.add_column("revenue", justify="right")
        for u in r[section]:
            table.add_row(u["userId"], money(u["revenue"]))
        out.print(table)


PERIOD_COLUMNS = ("period", "adds", "added", "subtracts", "subtracted", "revenue", "users")


def period_csv(p: dict[str, Any]) -> None:
    """`report --by --csv`: one row per period, money exact; an empty period is events without a time."""
    w = csv_writer()
    w.writerow(PERIOD_COLUMNS)
    for row in p["periods"]:
        w.writerow([row["period"] or "", row["adds"], money(row["added"]), row["subtracts"],
                    money(row["subtracted"]), money(row["revenue"]), row["users"]])


def period_text(p: dict[str, Any]) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title=f"revenue per {p['by']} of event time (UTC)", box=box.SIMPLE_HEAD,
                  title_justify="left", pad_edge=False, show_edge=False)
    for c in PERIOD_COLUMNS:
        table.add_column(c, justify="left" if c == "period" else "right")
    for row in p["periods"]:
        table.add_row(row["period"] or "(no time)", f"{row['adds']:,}", money(row["added"]),
                      f"{row['subtracts']:,}", money(row["subtracted"]), money(row["revenue"]),
                      f"{row['users']:,}")
    table_console().print(table)


def window_csv(w: dict[str, Any]) -> None:
    out = csv_writer()
    out.writerow(["minute", "events", "revenue", "users"])
    for m in w["per_minute"]:
        out.writerow([m["minute"], m["events"], money(m["revenue"]), m["users"]])


def window_text(w: dict[str, Any]) -> None:
    out = table_console()
    out.print(f"last {w['minutes']} min of event time (until {w['until']:%H:%MZ}): {w['events']:,} events, "
              f"revenue {money(w['revenue'])}, {w['users']:,} active users")
    for m in w["per_minute"]:
        out.print(f"  {m['minute']}  {m['events']:>8,} events  {money(m['revenue']):>14}"
                  f"  {m['users']:>6,} users")


def reject_line(out: Any, r: dict[str, Any]) -> None:
    """One rejected line: where, when, why, and the raw line."""
    done = f"  [re-applied: {r['reapply_outcome']}]" if r["reapplied_at"] else ""
    out.print(f"{r['path']}:{r['line']}  {r['rejected_at'].astimezone():%Y-%m-%d %H:%M:%S}  "
              f"{r['reason']}{done}", style="yellow", markup=False)
    out.print(f"    {r['raw']}", markup=False)


def reapply_summary(out: Any, rep) -> None:
    for p, n, o in rep.lines:
        out.print(f"{p}:{n}: {'re-applied' if o == 'applied' else 'already applied (duplicate)'}",
                  markup=False)
    out.print(f"re-applied {rep.applied} lines, {rep.duplicates} were already applied, "
              f"{rep.still_invalid} still invalid ({rep.reasons_updated} with a new reason), "
              f"{len(rep.users)} users touched")


def events_text(t) -> None:
    """`evtool events USER`: one line per journal line, then what they add up to."""
    out = console()
    rows = []
    for x in t.lines:
        d = x.to_dict()
        status = x.status
        if x.duplicate_of:
            status += f" of {_short(x.duplicate_of[0])}:{x.duplicate_of[1]}"
        if x.reason:
            status += f": {x.reason}"
        if x.note and x.status != "rejected":
            status += f" ({x.note})"
        rows.append((f"{_short(x.journal)}:{x.line}", d["time"] or "-", x.name or "-", d["amount"] or "-",
                     x.event_id or "-", status))
    head = ("JOURNAL:LINE", "EVENT TIME", "NAME", "AMOUNT", "ID", "STATUS")
    w = [max([len(head[i])] + [len(r[i]) for r in rows]) for i in range(5)]
    for r in [head, *rows]:
        out.print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]:>{w[3]}}  {r[4]:<{w[4]}}  {r[5]}",
                  markup=False)
    c = t.counts
    total = money(t.revenue) if t.revenue is not None else "none"
    listed = " listed" if t.filtered else ""
    same = "=" if t.explains_total else "!="
    out.print(f"{c['applied']} applied, {c['duplicate']} duplicate, {c['rejected']} rejected, "
              f"{c['pending']} pending{listed}; all applied lines sum to {money(t.applied_sum)} "
              f"{same} stored total {total}", markup=False)
