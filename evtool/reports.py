"""What the operator reads: journal status, revenue reports, every user's total, rejected lines.

Plain functions over a Store that return plain data (dataclasses with a `to_dict()`, dicts,
tuples, Decimals); evtool.output renders them for people (rich) or for scripts (JSON, CSV).
Nothing here writes: readers check the schema version (Store.check_schema), never migrate.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from . import journal
from .config import mask_dsn
from .errors import EvtoolError, SchemaBehind
from .store import Store, path_of_text, path_text

READ_BYTES = 1 << 20  # counting lag lines streams the file this much at a time


# -- status -----------------------------------------------------------------------------------


def count_lines(path: Path, start: int, end: int) -> int:
    """Newlines in bytes [start, end) of a file, read a block at a time (never the whole file)."""
    n = 0
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            block = f.read(min(READ_BYTES, left))
            if not block:
                break
            n += block.count(b"\n")
            left -= len(block)
    return n


def reject_filter(reason: str | None, path: Path | None, include_reapplied: bool = False
                  ) -> tuple[list[str], list[Any]]:
    """SQL conditions and parameters that select rejected lines by reason, file and state."""
    conds: list[str] = [] if include_reapplied else ["reapplied_at IS NULL"]
    params: list[Any] = []
    if reason:
        conds.append("strpos(lower(reason), lower(%s)) > 0")
        params.append(reason)
    if path is not None:
        fp, _ = peek(path)
        conds.append("(path = %s OR fingerprint = %s)")
        params += [path_text(str(path.resolve())), fp]
    return conds, params


def peek(path: Path) -> tuple[bytes | None, int | None]:
    """(fingerprint, size) of a journal on disk; (None, None) when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return journal.fingerprint(f), journal.size(f)
    except OSError:
        return None, None


def journal_status(store: Store | None, paths: list[Path]) -> list[dict[str, Any]]:
    """Per journal (the database's and `paths`): size, processed offset, lag, counters.

    `state` says how the file on disk relates to its progress row: `ok`; `new` (never
    processed); `waiting` (no complete first line yet); `missing` (the file at the recorded
    path is gone, e.g. rotated away); `replaced` (that path now holds another file; its row is
    listed on its own); `rotated` (the journal of that row was found beside its recorded path
    under a new name, e.g. `server-events.jsonl.1`: its lag is shown against that file);
    `truncated` (shorter than its processed offset); `unknown` (no
    database to compare with).
    """
    rows: list[tuple] = []
    mappings: dict[bytes, list[tuple]] = {}
    if store is not None:
        rows = store.journal_rows()
        mappings = store.journal_mappings()
    by_fp = {r[0]: r for r in rows}
    out: list[dict[str, Any]] = []
    shown: set[bytes] = set()

    def entry(display: str, path: Path, row: tuple | None, fp: bytes | None, size: int | None) -> dict:
        e: dict[str, Any] = {
            "path": display, "exists": size is not None, "size": size, "offset": None,
            "lag_bytes": None, "lag_lines": None, "applied": None, "duplicates": None,
            "rejected": None, "rejects_pending": None, "last_processed": None,
            "fingerprint": fp.hex() if fp else (row[0].hex() if row else None),
            "mapping": None, "mappings": [], "mapping_changed": False,
        }
        if row is not None:
            e.update(offset=row[2], applied=row[3], duplicates=row[4], rejected=row[5],
                     last_processed=row[6], rejects_pending=row[7])
            e.update(mapping_view(mappings.get(bytes(row[0]), [])))
        if size is None:
            e["state"] = "missing"
        elif row is not None and fp != row[0]:
            e["state"] = "replaced"
        elif store is None:
            e["state"] = "unknown"
        elif fp is None:
            e.update(state="waiting", offset=0, lag_bytes=size, lag_lines=0)
        else:
            offset = row[2] if row is not None else 0
            if size < offset:
                e["state"] = "truncated"
            else:
                e.update(state="ok" if row is not None else "new", offset=offset, lag_bytes=size - offset,
                         lag_lines=count_lines(path, offset, size))
        return e

    for path in paths:
        fp, size = peek(path)
        row = by_fp.get(fp) if fp is not None else None
        if row is not None:
            shown.add(row[0])
        out.append(entry(path_text(str(path)), path, row, fp, size))
    for row in rows:
        if row[0] in shown:
            continue
        path = Path(path_of_text(row[1]))
        fp, size = peek(path)
        moved = journal.find_copy(path, row[0]) if fp != row[0] else None
        if moved is not None:  # rotated away: its lag is that of the file under its new name
            e = entry(str(moved), moved, row, row[0], peek(moved)[1])
            if e["state"] == "ok":
                e["state"] = "rotated"
            out.append(e)
            continue
        out.append(entry(row[1], path, row, fp if size is not None else row[0], size))
    return out


def mapping_view(rows: list[tuple]) -> dict[str, Any]:
    """A journal's mappings for status: `mapping` (the one its last batch was read under, "" for
    the built-in shapes only, None before any batch), `mappings` (each with the bytes and lines
    it covered, oldest first) and `mapping_changed` (batches were read under more than one)."""
    ms = [{"mapping": m, "source": src or None, "first_offset": lo, "end_offset": hi, "lines": n,
           "batches": b, "last_at": at} for m, src, lo, hi, n, b, at in rows]
    return {"mapping": ms[-1]["mapping"] if ms else None, "mappings": ms, "mapping_changed": len(ms) > 1}


def totals(journals: list[dict[str, Any]]) -> dict[str, int]:
    """The processor's figures summed over the journals (unknown ones count as 0)."""
    keys = ("applied", "duplicates", "rejected", "rejects_pending", "lag_bytes", "lag_lines")
    return {k: sum(j[k] or 0 for j in journals) for k in keys}


def receiver_status(url: str, timeout: float = 1.0) -> dict[str, Any]:
    """Whether a receiver answers GET /healthz at `url` (no token needed)."""
    out: dict[str, Any] = {"url": url, "reachable": False, "healthy": False, "error": None}
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/healthz", timeout=timeout) as resp:
            out.update(reachable=True, healthy=resp.status == 200)
    except urllib.error.HTTPError as exc:
        out["reachable"] = True
        try:
            out["error"] = orjson.loads(exc.read()).get("error") or f"HTTP {exc.code}"
        except (orjson.JSONDecodeError, AttributeError, OSError):
            out["error"] = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        out["error"] = f"no answer: {reason}"
    return out


def server_version(store: Store) -> str:
    return store.server_version()


# -- report -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """What `evtool report` shows: revenue, users, events by name, top and bottom users."""

    since: datetime | None  # applied time
    until: datetime | None
    prefix: str | None
    revenue: Decimal | int
    users: int
    events: dict[str, dict[str, Any]]  # name -> {"count", "amount"}
    top: list[dict[str, Any]]  # {"userId", "revenue"}, highest first
    bottom: list[dict[str, Any]]  # lowest first
    event_since: datetime | None = None  # event time
    event_until: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def report(store: Store, *, top: int = 10, prefix: str | None = None, since: datetime | None = None,
           until: datetime | None = None, event_since: datetime | None = None,
           event_until: datetime | None = None) -> Report:
    """Overall revenue, users, events applied by name, top and bottom `top` users.

    Without a time window the totals and rankings come from users_revenue (every event ever
    applied) and the counts by name from revenue_log. With `since`/`until` everything comes
    from revenue_log: what batches committed in [since, until) contributed. With
    `event_since`/`event_until` it comes from revenue_by_minute: the events whose event time
    is in that window.
    """
    by_event = event_since is not None or event_until is not None
    adds, added, subs, subtracted, revenue, users, best, worst = store.revenue_report(
        top=top, prefix=prefix, since=event_since if by_event else since,
        until=event_until if by_event else until, event_time=by_event)
    return Report(
        since=since, until=until, prefix=prefix, revenue=revenue, users=users,
        events={
            "add_revenue": {"count": adds, "amount": added},
            "subtract_revenue": {"count": subs, "amount": subtracted},
        },
        top=[{"userId": u, "revenue": r} for u, r in best],
        bottom=[{"userId": u, "revenue": r} for u, r in worst],
        event_since=event_since, event_until=event_until,
    )


# -- per period and rolling window (event time) -------------------------------------------------

PERIODS = ("hour", "day", "week", "month")


@dataclass(frozen=True)
class Periods:
    """Revenue per UTC period of event time (`evtool report --by`).

    Each row: period (its start: "2026-11-23T09:00Z", "2026-11-23", week of Monday
    "2026-11-23", "2026-11"; None for events without a time), adds, added, subtracts,
    subtracted, revenue, users (distinct, within the period).
    """

    by: str
    since: datetime | None
    until: datetime | None
    prefix: str | None
    periods: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def revenue_by_period(store: Store, by: str = "day", *, prefix: str | None = None,
                      since: datetime | None = None, until: datetime | None = None) -> Periods:
    """Revenue per `by` period of event time, oldest first; `since`/`until` are event time.

    Read from revenue_by_minute, which the processor keeps in the totals' transaction: the
    periods of a user always sum to the user's total (without a time filter).
    """
    if by not in PERIODS:
        raise EvtoolError(f"unknown period {by!r}: use one of {', '.join(PERIODS)}")
    rows = store.revenue_by_period(by, prefix=prefix, since=since, until=until)
    return Periods(by=by, since=since, until=until, prefix=prefix, periods=[
        {"period": p, "adds": a, "added": ad, "subtracts": s, "subtracted": sd, "revenue": ad - sd,
         "users": u} for p, a, ad, s, sd, u in rows])


@dataclass(frozen=True)
class Window:
    """Activity over the last `minutes` minutes of event time, up to `until` (exclusive).

    `per_minute`: one row per minute that had events: minute, events, revenue, users.
    """

    minutes: int
    since: datetime
    until: datetime
    events: int
    revenue: Decimal | int
    users: int  # distinct users over the whole window
    per_minute: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rolling_window(store: Store, minutes: int = 15, now: datetime | None = None) -> Window:
    """Events, revenue and distinct users per minute of event time over the last `minutes`
    minutes (the current minute included), by the clock of this machine."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    until = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    since = until - timedelta(minutes=minutes)
    rows, users = store.window(since, until)
    per = [{"minute": m, "events": int(e), "revenue": r, "users": u} for m, e, r, u in rows]
    return Window(minutes=minutes, since=since, until=until, events=sum(p["events"] for p in per),
                  revenue=sum((p["revenue"] for p in per), Decimal(0)), users=users, per_minute=per)


# -- every user -------------------------------------------------------------------------------


def all_revenue(store: Store, prefix: str | None = None) -> Iterator[tuple[str, Decimal]]:
    """(user_id, revenue) of every user in user order, streamed (never all in memory)."""
    yield from store.all_revenue(prefix)


# -- rejected lines ---------------------------------------------------------------------------


def rejects(store: Store, *, reason: str | None = None, path: Path | None = None, limit: int = 0,
            include_reapplied: bool = False, newest_first: bool = False) -> Iterator[dict[str, Any]]:
    """Rejected lines, by file and line number (or the latest first); `limit` 0 means all."""
    conds, params = reject_filter(reason, path, include_reapplied)
    rows = store.rejected_lines(" AND ".join(conds), params, limit, newest_first)
    for path_, line_no, offset, why, at, raw, reapplied_at, outcome in rows:
        yield {"path": path_, "line": line_no, "offset": offset, "reason": why, "rejected_at": at,
               "raw": bytes(raw).decode("utf-8", "replace"), "reapplied_at": reapplied_at,
               "reapply_outcome": outcome}



# -- revenue per period of applied time ---------------------------------------------------------


def applied_periods(store: Store, by: str = "hour", last: int = 48) -> dict[str, Any]:
    """Revenue per UTC `by` period of applied time (the processor's commit time, revenue_log),
    the `last` periods that had any, oldest first: {"by", "time": "applied", "periods": [{"period",
    "adds", "added", "subtracts", "subtracted", "revenue", "users"}]}, the rows `report --by` gives
    on event time."""
    if by not in ("hour", "day", "week", "month"):
        raise EvtoolError(f"unknown period {by!r}: use one of hour, day, week, month")
    rows = store.revenue_by_applied_period(by, last)
    return {"by": by, "time": "applied", "periods": [
        {"period": p, "adds": a, "added": ad, "subtracts": s, "subtracted": sd, "revenue": ad - sd,
         "users": u} for p, a, ad, s, sd, u in rows]}


# -- the whole status -------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What `evtool status` shows at one moment."""

    time: datetime
    database: dict[str, Any]  # kind, dsn (masked), reachable, version, error
    receiver: dict[str, Any]  # url, reachable, healthy, error
    journals: list[dict[str, Any]]  # see journal_status
    totals: dict[str, int]
    # accepted_per_s (lines arriving in the journals) and applied_per_s, since the previous
    # snapshot of the same probe; None for the first one (a rate needs two samples)
    rates: dict[str, float] | None = None
    # the rolling window of event time (see rolling_window): events, revenue and distinct users
    # over the last WINDOW_MINUTES minutes; None when the database cannot be read
    window: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


WINDOW_MINUTES = 15  # the rolling window `status` shows


class StatusProbe:
    """Takes status snapshots, keeping one database connection across them (for --watch).

    It never starts the embedded server: a dashboard observes. A lost connection is reported
    in the snapshot and reopened on the next one.
    """

    def __init__(self, dsn: str | None, paths: list[Path], url: str, timeout: float = 1.0) -> None:
        self.dsn = dsn
        self.paths = paths
        self.url = url
        self.timeout = timeout
        self.store: Store | None = None
        self._previous: tuple[datetime, int, int] | None = None  # (time, lines accepted, applied)

    def _database(self) -> dict[str, Any]:
        from . import embedded

        choice = embedded.choose(self.dsn, start=False)
        db: dict[str, Any] = {"kind": choice.kind, "dsn": None,
                              "reachable": False, "version": None, "error": None, "schema": None}
        if choice.dsn is None:
            db["error"] = "the embedded server is not running (evtool db start starts it)"
            self.close()
            return db
        url = choice.dsn
        db["dsn"] = mask_dsn(url) if url else "(libpq PG* variables)"
        try:
            if self.store is None or self.store.conn.closed:
                self.close()
                self.store = Store.connect(url)
            db.update(reachable=True, version=server_version(self.store))
            self.store.check_schema()
        except SchemaBehind as exc:
            self.close()  # reachable, but without the tables the figures need
            db["schema"] = str(exc)
        except EvtoolError as exc:
            self.close()
            db["error"] = str(exc)
        return db

    def snapshot(self, receiver: dict[str, Any] | None = None) -> Snapshot:
        """The status now; `receiver` given (by the receiver itself) replaces asking its /healthz."""
        db = self._database()
        try:
            journals = journal_status(self.store, self.paths)
        except EvtoolError as exc:
            self.close()
            db.update(reachable=False, version=None, error=str(exc))
            journals = journal_status(None, self.paths)
        now = datetime.now(UTC)
        sums = totals(journals)
        # Every line in a journal was accepted by a receiver: applied, duplicate, rejected or lagging.
        sample = (now, sums["applied"] + sums["duplicates"] + sums["rejected"] + sums["lag_lines"],
                  sums["applied"])
        rates = None
        if self._previous is not None and db["reachable"] and (now - self._previous[0]).total_seconds() > 0:
            secs = (now - self._previous[0]).total_seconds()
            rates = {"accepted_per_s": max(0.0, (sample[1] - self._previous[1]) / secs),
                     "applied_per_s": max(0.0, (sample[2] - self._previous[2]) / secs)}
        self._previous = sample if db["reachable"] else None
        window = None
        if self.store is not None and db["reachable"]:
            try:
                w = rolling_window(self.store, WINDOW_MINUTES)
                window = {"minutes": w.minutes, "events": w.events, "revenue": w.revenue, "users": w.users}
            except EvtoolError:
                self.close()
        if receiver is None:
            receiver = receiver_status(self.url, self.timeout)
        return Snapshot(time=now, database=db, receiver=receiver, journals=journals, totals=sums,
                        rates=rates, window=window)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
