"""The live web page `evtool serve` serves (issue 13): `GET /`, its script and style, and its JSON.

The page (evtool/web/: index.html, app.js, app.css; no build step, no CDN) holds no data and needs
no token. It asks for one, keeps it in the tab's sessionStorage and sends it as `Authorization:
Bearer` to the JSON routes, which answer what the CLI's `--json` prints, written by the one JSON
writer (output.json_text: money as exact decimal text):

| route | the same as |
| --- | --- |
| `GET /api/report?top=N&prefix=P` | `evtool report --json` |
| `GET /api/users/<userId>` | `evtool revenue USER --json` (404 for an unknown user) |
| `GET /api/periods?by=hour\\|day\\|week\\|month` | revenue per period, see `periods` |
| `GET /api/status` | `evtool status --json` (the receiver's part from this process) |
| `GET /api/rejects?limit=N` | `evtool rejects --json --newest --limit N`, as one array |
| `GET /api/receiver` | this receiver's counters (no CLI equivalent; /metrics has them as text) |

Database reads run in worker threads (the receiver's lookup pool), never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from aiohttp import web

from . import output, reports
from .errors import EvtoolError

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")

# path -> (file under evtool/web/, content type)
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/web/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/web/app.css": ("app.css", "text/css; charset=utf-8"),
}
PUBLIC_PATHS = frozenset(PAGE_FILES)  # no data in them: served without a token
# The page runs only its own script and talks only to its own origin; nothing inline, no framing.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self';"
                               " img-src 'self' data:; connect-src 'self'; base-uri 'none';"
                               " form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
MAX_TOP = 100  # users per ranking the page may ask for
MAX_REJECTS = 50
CHART_PERIODS = 48
MAX_WINDOW = 24 * 60  # minutes of the rolling window the page may ask for


class Reader(Protocol):
    def read(self, fn: Callable[[Store], T]) -> T:
        """fn(store) on the reader's connection, in the calling (worker) thread."""


class Probe(Protocol):
    def snapshot(self, receiver: dict[str, Any] | None = None) -> reports.Snapshot: ...

    def close(self) -> None: ...


def periods(store: Store, by: str) -> dict[str, Any]:
    """Revenue per period of event time for the chart (the rows `report --by` gives), the last
    CHART_PERIODS periods; events without a time, if any, first as the period "no time"."""
    rows = reports.revenue_by_period(store, by).to_dict()["periods"]
    untimed = [dict(r, period="no time") for r in rows if r["period"] is None]
    timed = [r for r in rows if r["period"] is not None][-CHART_PERIODS:]
    return {"by": by, "time": "event", "periods": untimed + timed}


def answer(status: int, body: Any) -> web.Response:
    """JSON written by output.json_text: the CLI's --json bytes, money with exactly its digits."""
    return web.Response(status=status, body=output.json_text(body).encode(), content_type="application/json")


def _int_arg(request: web.Request, name: str, default: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not text.isdigit() or int(text) > high:
        raise _BadArgument(f"{name} must be a whole number from 0 to {high}, not {text[:40]!r}")
    return int(text)


class _BadArgument(Exception):
    pass


def page_files() -> dict[str, tuple[bytes, str]]:
    """The page's files from the package (read once: they do not change while serving)."""
    folder = resources.files("evtool").joinpath("web")
    return {path: (folder.joinpath(name).read_bytes(), ctype) for path, (name, ctype) in PAGE_FILES.items()}


class WebView:
    """The page and its JSON routes.

    `reader` reads the database (None: no database configured, 503), `probe` takes status
    snapshots, `receiver` describes this receiver for a request (its status --json part and
    its counters).
    """

    def __init__(self, reader: Reader | None, probe: Probe | None,
                 receiver: Callable[[web.Request], dict[str, Any]]) -> None:
        self.reader = reader
        self.probe = probe
        self.receiver = receiver
        self.executor: Executor | None = None  # the receiver's lookup threads, once the app starts
        self.files = page_files()
        self._probe_lock = asyncio.Lock()  # one snapshot at a time on the probe's connection

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def add_routes(self, app: web.Application) -> None:
        for path in PAGE_FILES:
            app.router.add_get(path, self.page_file)
        app.router.add_get("/api/report", self.report)
        app.router.add_get("/api/users/{user_id:.+}", self.user)
        app.router.add_get("/api/periods", self.periods)
        app.router.add_get("/api/window", self.window)
        app.router.add_get("/api/status", self.status)
        app.router.add_get("/api/rejects", self.rejects)
        app.router.add_get("/api/receiver", self.counters)

    async def page_file(self, request: web.Request) -> web.Response:
        body, ctype = self.files[request.path]
        return web.Response(body=body, headers={"Content-Type": ctype, **PAGE_HEADERS})

    async def _read(self, what: str, fn: Callable[[Store], Any],
                    shape: Callable[[Any], web.Response] = lambda value: answer(200, value)) -> web.Response:
        """fn(store) in a worker thread, answered by shape(value); database trouble is a 503 sentence."""
        if self.reader is None:
            return answer(503, {"error": "no database configured"})
        try:
            value = await self._in_thread(self.reader.read, fn)
        except EvtoolError as exc:
            log.warning("GET %s: %s", what, exc)  # the details stay in the server's log
            resp = answer(503, {"error": "cannot read the totals from PostgreSQL; retry later"})
            resp.headers["Retry-After"] = "1"
            return resp
        return shape(value)

    async def report(self, request: web.Request) -> web.Response:
        try:
            top = _int_arg(request, "top", 10, MAX_TOP)
        except _BadArgument as exc:
            return answer(400, {"error": str(exc)})
        prefix = request.query.get("prefix") or None
        return await self._read("/api/report",
                                lambda store: reports.report(store, top=top, prefix=prefix).to_dict())

    async def user(self, request: web.Request) -> web.Response:
        user_id = request.match_info["user_id"]
        unknown = answer(404, {"error": f"unknown user: {user_id[:300]}"})
        if "\x00" in user_id:  # PostgreSQL text cannot hold a NUL: no user has one
            return unknown
        return await self._read("/api/users", lambda store: store.revenue(user_id), lambda total: unknown
                                if total is None else answer(200, output.user_revenue(user_id, total)))

    async def periods(self, request: web.Request) -> web.Response:
        by = request.query.get("by", "hour")
        if by not in ("hour", "day", "week", "month"):
            return answer(400, {"error": f"by must be hour, day, week or month, not {by[:40]!r}"})
        return await self._read("/api/periods", lambda store: periods(store, by))

    async def window(self, request: web.Request) -> web.Response:
        try:
            minutes = _int_arg(request, "minutes", 15, MAX_WINDOW)
        except _BadArgument as exc:
            return answer(400, {"error": str(exc)})
        if minutes < 1:
            return answer(400, {"error": "minutes must be at least 1"})
        return await self._read("/api/window", lambda store: reports.rolling_window(store, minutes).to_dict())

    async def rejects(self, request: web.Request) -> web.Response:
        try:
            limit = _int_arg(request, "limit", 5, MAX_REJECTS)
        except _BadArgument as exc:
            return answer(400, {"error": str(exc)})
        if limit == 0:
            return answer(200, [])
        return await self._read("/api/rejects",
                                lambda store: list(reports.rejects(store, limit=limit, newest_first=True)))

    async def status(self, request: web.Request) -> web.Response:
        if self.probe is None:
            return answer(503, {"error": "no database configured"})
        mine = self.receiver(request)
        rx = {k: mine[k] for k in ("url", "reachable", "healthy", "error")}
        async with self._probe_lock:
            snap = await self._in_thread(self.probe.snapshot, rx)
        return answer(200, snap.to_dict())

    async def counters(self, request: web.Request) -> web.Response:
        return answer(200, {"time": datetime.now(UTC), **self.receiver(request)})

    async def close(self) -> None:
        if self.probe is not None:
            async with self._probe_lock:
                await self._in_thread(self.probe.close)
