"""`evtool serve`: the HTTP receiver that appends accepted events to the journal (design section 7).

Routes: `POST /liveEvent` (one JSON object, a JSON array or NDJSON), `GET /userEvents/<userId>`,
`GET /healthz` and `GET /readyz` (can write the journal, not shutting down), `GET /livez` (the
loop answers), `GET /metrics` (Prometheus text format; the token, or the metrics token, which
can do nothing else), and the live web page `GET /` with its JSON routes under /api/ (see
`webview`). The probes need no token. Every answer but /metrics and the page is JSON; every
error is `{"error": "<sentence>"}`, aiohttp's own errors
included (unknown route, wrong method, body too large, malformed HTTP).

Tokens: the token opens every route; the read token (optional) opens GET routes only, so a
browser or dashboard that holds it cannot add events. /healthz and the page's files need none.

A request is answered 200 only after all its lines went to the journal in one append (written
and fsynced with group commit, see `appender`). A request that fails writes nothing. Turning a
body into journal lines is `intake`'s job; this module keeps auth, routes and error mapping, and
the app's resources (journal appender, metrics, the /userEvents connection) live under typed app
keys, opened and closed by `cleanup_ctx`.

Limits: the body is capped by `max_body` (aiohttp's `client_max_size`), each event line or object
by `max_line`, and reading the body by `request_timeout`, which also bounds an idle keep-alive
connection; a request head must be complete within `head_timeout`. Open connections are capped
below the open-file limit (`connection_cap`), the oldest idle one closed to admit a new one.
Lookups run on their own threads with a statement timeout, so a slow database never delays the
journal's write+fsync. Request line and headers use aiohttp's defaults (8190 bytes per line and
per header field, 32 KiB for all headers).
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import ipaddress
import logging
import resource
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from hashlib import blake2b
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import orjson
from aiohttp import StreamReader, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from . import config, events, output, webview
from .appender import JournalAppender
from .errors import ConfigError, EvtoolError, JournalWriteError, UnknownUser
from .identity import RECEIVER_HEADER
from .intake import (
    BodyInvalid,
    BodyMalformed,
    BodyRefused,
    BodyTooLong,
    Intake,
    KeyReused,
    KeyWindow,
    check_key,
    receiver_ids,
)
from .mapping import Mapping
from .metrics import CONTENT_TYPE as METRICS_TYPE
from .metrics import Metrics

if TYPE_CHECKING:
    from .reports import StatusProbe
    from .store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TOKEN = config.TOKEN
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl"})
# Form-urlencoded is what `curl -d` and Python's urllib send by default: read as JSON too, so such
# clients of the original endpoint keep working (a real form body is then 400 malformed JSON).
JSON_TYPES = frozenset({"application/json", "application/x-www-form-urlencoded"})

_JSON = "application/json"
LOOKUP_TIMEOUT = 5.0  # seconds: the statement timeout of a GET /userEvents lookup


class RevenueLookup(Protocol):
    """What GET /userEvents/<id> reads totals with; the app closes it when it stops."""

    def __call__(self, user_id: str) -> Decimal | int | None:
        """The user's total, or None for an unknown user. Runs in a worker thread."""

    def close(self) -> None:
        """Release what the lookup holds (its database connection)."""


class StoreRevenue:
    """A RevenueLookup on one database connection: opened on first use (so `serve` starts without
    PostgreSQL), reopened after a failure, closed with the app. The web page reads with it too
    (`read`), one query at a time."""

    def __init__(self, connect: Callable[[], Store], timeout: float = LOOKUP_TIMEOUT) -> None:
        self._connect = connect
        self.timeout = timeout  # statement timeout: a lookup never waits longer on a lock
        self._store: Store | None = None
        # Lookups run in threads: one at a time on the one connection, and never two connects.
        self._lock = threading.Lock()

    def __call__(self, user_id: str) -> Decimal | None:
        return self.read(lambda store: store.revenue(user_id))

    def read(self, fn: Callable[[Store], T]) -> T:
        """fn(store) on the one connection, opening it if needed; closed again when fn fails on it."""
        with self._lock:
            if self._store is None:
                store = self._connect()
                try:
                    store.set_statement_timeout(self.timeout)
                except EvtoolError:
                    store.close()
                    raise
                self._store = store
            try:
                return fn(self._store)
            except EvtoolError:
                self._store.close()
                self._store = None
                raise

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


@dataclass
class ServeSettings:
    """Everything `evtool serve` needs; the CLI fills it from options and environment."""

    host: str = config.HOST
    port: int = config.PORT
    journal: Path = config.JOURNAL
    token: str | None = None  # None -> DEFAULT_TOKEN, allowed only on loopback
    read_token: str | None = None  # opens GET routes only (the web page, dashboards); never POST
    fsync: bool = True
    max_body: int = 16 * 1024 * 1024  # bytes per request
    max_line: int = 1024 * 1024  # bytes per event line / single object
    request_timeout: float = 30.0  # seconds to receive a request body; also the idle keep-alive limit
    head_timeout: float = 10.0  # seconds to finish a request head once begun (or to begin one)
    lookup_threads: int = 4  # GET /userEvents runs here, never in the pool the journal writes with
    max_connections: int | None = None  # None: the open-file limit less a reserve (connection_cap)
    # What GET /userEvents/<id> reads totals with; the app closes it when it stops. None -> 503.
    revenue_lookup: RevenueLookup | None = None
    strict: bool = False  # events.validate without normalization (no user_id alias, no string values)
    mapping: Mapping | None = None  # the declared mapping events are checked under (journal keeps their text)
    # What GET /api/status takes snapshots with (`status --json`); the app closes it. None -> 503.
    status_probe: StatusProbe | None = None
    metrics_token: str | None = None  # may GET /metrics, nothing else
    access_log: bool = False  # one log line per request (logger aiohttp.access)
    reuse_port: bool = False  # SO_REUSEPORT: one of `serve --workers N` on a shared port (see workers)
    # The journal that names this receiver for senders (Evtool-Receiver); None: `journal`. The
    # workers of one `serve --workers N` share the base journal's name, whichever answers.
    receiver_name: Path | None = None


def is_loopback(host: str) -> bool:
    """True when `host` is a loopback address or `localhost`."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_settings(s: ServeSettings) -> str:
    """Return the effective token; raise ConfigError for settings that must not start."""
    if s.read_token is not None:
        if not s.read_token:
            raise ConfigError("the read token must not be empty")
        if s.read_token == (DEFAULT_TOKEN if s.token is None else s.token):
            raise ConfigError("the read token must differ from the token (it cannot add events)")
    if s.token is not None:
        if not s.token:
            raise ConfigError("the token must not be empty")
        return s.token
    if not is_loopback(s.host):
        raise ConfigError(
            f"refusing to listen on {s.host} with the default token: "
            "pass --token or set EVTOOL_TOKEN"
        )
    return DEFAULT_TOKEN


# ---------------------------------------------------------------------------------------------
# responses


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type=_JSON, headers=headers)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json(status, {"error": message}, headers)


class _Refused(Exception):
    """A request refused with a status and a sentence (turned into a JSON error)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _ShuttingDown(Exception):
    """Set on the body stream of a request still arriving when the server stops."""


_BODY_STATUS: dict[type[BodyRefused], int] = {BodyMalformed: 400, BodyInvalid: 422, BodyTooLong: 413,
                                              KeyReused: 422}
_REJECT_REASONS = {400: "malformed", 413: "too_large", 422: "invalid"}  # POST /liveEvent refusals
PROBES = frozenset({"/healthz", "/livez", "/readyz"})  # answered without a token


def _http_error_message(exc: web.HTTPException, request: web.Request, max_body: int) -> str:
    if exc.status == 404:
        return f"not found: {request.path[:200]}"
    if exc.status == 405:
        return f"method {request.method} is not allowed on {request.path[:200]}"
    if exc.status == 413:
        return f"request body is larger than the limit of {max_body} bytes"
    return exc.reason or "request refused"


# ---------------------------------------------------------------------------------------------
# the app


class _Receiver:
    """Request handlers; one instance per app, holding settings, token and the body rules.

    What the app owns (journal appender, metrics, revenue lookup) lives under typed app keys.
    """

    def __init__(self, s: ServeSettings) -> None:
        self.s = s
        self.token = check_settings(s).encode()
        self.read_token = s.read_token.encode() if s.read_token is not None else None
        self.metrics_token = s.metrics_token.encode() if s.metrics_token else None
        self.intake = Intake(max_line=s.max_line, strict=s.strict, fresh_id=receiver_ids(), mapping=s.mapping)
        self._reading: set[StreamReader] = set()  # bodies being read
        self._stopping = False
        self.keys = KeyWindow()  # Idempotency-Key -> body digest, recent ones
        self.metrics = Metrics()
        self.app: web.Application  # set by make_app: the app's journal, for post_event
        # Which receiver this is, for senders' resume state: its host and journal. A fresh
        # receiver on the same URL (another journal) gets everything from line 1.
        name = Path(s.receiver_name or s.journal).resolve()
        where = f"{socket.gethostname()}\0{name}".encode("utf-8", "surrogateescape")
        self.receiver_id = {RECEIVER_HEADER: blake2b(where, digest_size=8).hexdigest()}

    def access(self, request: web.Request) -> str | None:
        """"write" for the token, "read" for the read token, None for neither (or none sent)."""
        given = request.headers.get("Authorization")
        if given is None:
            return None
        if given[:7].lower() == "bearer ":
            given = given[7:]
        sent = given.strip().encode("utf-8", "surrogateescape")
        if hmac.compare_digest(sent, self.token):
            return "write"
        if self.read_token is not None and hmac.compare_digest(sent, self.read_token):
            return "read"
        # The scrape credential opens GET /metrics only: a leaked scrape config cannot post events.
        if (self.metrics_token is not None and request.path == "/metrics"
                and hmac.compare_digest(sent, self.metrics_token)):
            return "read"
        return None

    @web.middleware
    async def counting(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Count answers by method, route pattern and status, and time them (outermost: sees every answer)."""
        started = time.perf_counter()
        resp = await handler(request)
        resource = request.match_info.route.resource
        self._count(request.method, resource.canonical if resource is not None else "other", resp, started)
        return resp

    def _count(self, method: str, route: str, resp: web.StreamResponse, started: float) -> None:
        """One answer in the metrics (and a refused event body by its reason)."""
        self.metrics.request(method, route, resp.status, time.perf_counter() - started)
        if route == "/liveEvent" and resp.status in _REJECT_REASONS:
            self.metrics.rejected(_REJECT_REASONS[resp.status])

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Auth on every route but the probes and the page's files, and every error as a JSON sentence."""
        try:
            if request.path not in PROBES and request.path not in webview.PUBLIC_PATHS:
                denied = self.denied(request)
                if denied is not None:
                    return denied
            return await handler(request)
        except Exception as exc:
            return await self.refusal(request, exc)

    def denied(self, request: web.Request) -> web.Response | None:
        """The answer to a request without the access its method needs, else None."""
        access = self.access(request)
        if access is None:
            return _error(401, "missing or wrong token: send it in the Authorization header",
                          {"WWW-Authenticate": "Bearer"})
        if access == "read" and request.method not in ("GET", "HEAD"):
            return _error(403, f"the read token cannot {request.method} {request.path[:200]}: "
                          "use the token (--token)")
        return None

    async def refusal(self, request: web.Request, exc: Exception) -> web.StreamResponse:
        """What a handler's exception answers: a JSON sentence with its status (re-raises what
        aiohttp must see: a redirect, a cancellation, a lost connection)."""
        if isinstance(exc, BodyRefused):
            return _error(_BODY_STATUS[type(exc)], exc.message)
        if isinstance(exc, _Refused):
            resp = _error(exc.status, exc.message)
            if exc.status in (408, 503):
                # The body is not coming (slow client, or shutting down): answer, then close the
                # connection at once instead of lingering to read the rest of the body.
                resp.force_close()
                await resp.prepare(request)
                await resp.write_eof()
                if request.protocol is not None:
                    request.protocol.force_close()
            return resp
        if isinstance(exc, web.HTTPException):
            if exc.status < 400:
                raise exc
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return _error(exc.status, _http_error_message(exc, request, self.s.max_body), headers)
        if isinstance(exc, ConnectionError):
            raise exc
        log.exception("internal error on %s %s", request.method, request.path[:200], exc_info=exc)
        return _error(500, "internal server error")

    def direct(self, handle: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
               ) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        """The server's request handler: `POST /liveEvent` straight to `post_event`, anything
        else to `handle` (the application: its router and middlewares).

        One event per request is the original clients' traffic; going past the router and the
        chain of middleware coroutines is a tenth of what such a request costs here. The answers
        are the same: `post_event` does what `counting` and `middleware` do around `live_event`.
        """
        post_event = self.post_event

        def dispatch(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
            # `Expect: 100-continue` (curl sends it for bodies over 1 KB) is answered by the
            # application's routing, before the handler: such requests take that path.
            if (request.raw_path == "/liveEvent" and request.method == "POST"
                    and "Expect" not in request.headers):
                return post_event(request)  # type: ignore[arg-type]
            return handle(request)

        return dispatch

    async def post_event(self, request: web.Request) -> web.StreamResponse:
        """`POST /liveEvent` as the middlewares would handle it: auth, errors, metrics."""
        started = time.perf_counter()
        try:
            resp = self.denied(request)
            if resp is None:
                resp = await self.live_event(request)
        except Exception as exc:
            resp = await self.refusal(request, exc)
        self._count("POST", "/liveEvent", resp, started)
        return resp

    # -- POST /liveEvent ----------------------------------------------------------------------

    async def live_event(self, request: web.Request) -> web.Response:
        raw_type = request.headers.get("Content-Type")
        if raw_type is None:
            ndjson = False  # original clients may send no content type: treat as JSON
        elif raw_type in JSON_TYPES:  # as clients nearly always send it: nothing to parse
            ndjson = False
        else:
            ctype = request.content_type
            if ctype in NDJSON_TYPES:
                ndjson = True
            elif ctype in JSON_TYPES:
                ndjson = False
            else:
                raise _Refused(415, f"unsupported content type {ctype[:100]!r}: send application/json "
                               "(one event or an array) or application/x-ndjson (one event per line)")
        key = request.headers.get("Idempotency-Key")
        if key is not None:
            check_key(key)
        # All of a small body arrives with the head: read it without _read_body's timer (and frame)
        body = await (request.read() if request.content.is_eof() else self._read_body(request))
        lines = self.intake.ndjson(body, key) if ndjson else self.intake.json(body, key)
        claimed = None
        if key is not None:
            claimed = self.keys.claim(key, (b"n" if ndjson else b"j") + body)
        if lines.count:
            try:
                await self.app[APPENDER_KEY].submit(lines.data)
            except JournalWriteError as exc:
                if claimed is not None:
                    self.keys.forget(key, claimed)  # type: ignore[arg-type]
                return _error(503, f"{exc}; nothing was stored, retry later", {"Retry-After": "1"})
            self.metrics.appended(lines.count, len(lines.data))
        if lines.event_id is not None:
            return _json(200, {"message": "Event received", "eventId": lines.event_id})
        return _json(200, {"accepted": lines.count})

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body, within request_timeout; cut short when the server stops."""
        if self._stopping:
            raise _Refused(503, "the server is shutting down; retry")
        self._reading.add(request.content)
        try:
            async with asyncio.timeout(self.s.request_timeout):
                return await request.read()
        except TimeoutError:
            raise _Refused(408, f"request body not received within {self.s.request_timeout:g} s") from None
        except _ShuttingDown:
            raise _Refused(503, "the server is shutting down; retry") from None
        finally:
            self._reading.discard(request.content)

    def stopping(self) -> None:
        """Told to stop: not ready any more (the readiness probe answers 503)."""
        self._stopping = True

    async def on_shutdown(self, app: web.Application) -> None:
        """Listening has stopped: refuse requests whose body is still arriving (aiohttp no longer
        reads it), so they fail now rather than at their timeout; requests already appending finish."""
        self._stopping = True
        for stream in list(self._reading):
            if not stream.is_eof():
                stream.set_exception(_ShuttingDown())

    # -- GET /userEvents/<userId> -------------------------------------------------------------

    async def user_events(self, request: web.Request) -> web.Response:
        user_id = request.match_info["user_id"]
        if len(user_id) > events.MAX_USER_ID or "\x00" in user_id:
            # No event can carry such an id (and PostgreSQL text cannot even hold a NUL).
            return _error(404, f"unknown user: {user_id[:300]}")
        lookup = self.s.revenue_lookup
        if lookup is None:
            return _error(503, "no database configured")
        try:
            # Its own threads: a slow database never holds a thread the journal's write+fsync needs.
            loop = asyncio.get_running_loop()
            revenue = await loop.run_in_executor(request.app[LOOKUPS_KEY], lookup, user_id)
        except UnknownUser:
            revenue = None
        except EvtoolError as exc:
            log.warning("GET /userEvents: %s", exc)  # the details stay in the server's log
            return _error(503, "cannot read the totals from PostgreSQL; retry later", {"Retry-After": "1"})
        if revenue is None:
            return _error(404, f"unknown user: {user_id[:300]}")
        body = output.json_text(output.user_revenue(user_id, revenue)).encode()  # as `revenue --json`
        return web.Response(status=200, body=body, content_type=_JSON)

    # -- this receiver, for the web page ---------------------------------------------------------

    def itself(self, request: web.Request) -> dict[str, Any]:
        """This receiver as `status --json` describes one, plus its counters (GET /api/receiver)."""
        appender = request.app[APPENDER_KEY]
        metrics = request.app[METRICS_KEY]
        return {"url": f"{request.scheme}://{request.host}", "reachable": True, "healthy": appender.healthy,
                "error": None if appender.healthy else f"cannot write the journal: {appender.last_error}",
                "journal": str(self.s.journal), "journal_size": appender.size,
                "events_accepted": metrics.events_accepted, "bytes_appended": metrics.bytes_appended}

    # -- GET /metrics -------------------------------------------------------------------------

    async def metrics_text(self, request: web.Request) -> web.Response:
        appender = request.app[APPENDER_KEY]
        text = request.app[METRICS_KEY].render(appender.size, appender.healthy)
        return web.Response(body=text.encode(), headers={"Content-Type": METRICS_TYPE})

    # -- GET /healthz -------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        appender = request.app[APPENDER_KEY]
        if appender.healthy:
            return _json(200, {"status": "ok"}, self.receiver_id)
        return _error(503, f"cannot write the journal: {appender.last_error}",
                      {"Retry-After": "1", **self.receiver_id})

    async def livez(self, request: web.Request) -> web.Response:
        """The event loop answers: a full disk is not a reason to restart the receiver."""
        return _json(200, {"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready for events: the journal can be written and the server is not shutting down."""
        if self._stopping:
            return _error(503, "shutting down")
        return await self.healthz(request)


SETTINGS_KEY = web.AppKey("settings", ServeSettings)
METRICS_KEY = web.AppKey("metrics", Metrics)
APPENDER_KEY = web.AppKey("appender", JournalAppender)
LOOKUPS_KEY = web.AppKey("lookups", ThreadPoolExecutor)
WEBVIEW_KEY = web.AppKey("webview", webview.WebView)
RECEIVER_KEY = web.AppKey("receiver", _Receiver)


async def _journal(app: web.Application) -> AsyncIterator[None]:
    """The journal's appender, open (and locked) while the app runs.

    Closed after in-flight requests finished, so their appends complete and are fsynced first.
    Raises JournalLocked or JournalWriteError at startup.
    """
    s = app[SETTINGS_KEY]
    appender = JournalAppender(s.journal, fsync=s.fsync)
    appender.on_group_written = app[METRICS_KEY].group_written
    app[APPENDER_KEY] = appender
    try:
        yield
    finally:
        await appender.close()


async def _revenue(app: web.Application) -> AsyncIterator[None]:
    """The lookups' own threads (the web page reads there too, never in the pool the journal
    writes with), the revenue lookup's and the status probe's connections, closed when the app stops."""
    s = app[SETTINGS_KEY]
    pool = ThreadPoolExecutor(max_workers=s.lookup_threads, thread_name_prefix="lookup")
    app[LOOKUPS_KEY] = pool
    app[WEBVIEW_KEY].executor = pool
    try:
        yield
    finally:
        if s.revenue_lookup is not None:
            await asyncio.get_running_loop().run_in_executor(pool, s.revenue_lookup.close)
        await app[WEBVIEW_KEY].close()
        pool.shutdown(wait=False, cancel_futures=True)


def make_app(s: ServeSettings) -> web.Application:
    """The aiohttp application: routes, auth and JSON errors; the journal opens when it starts.

    Raises ConfigError (see check_settings).
    """
    r = _Receiver(s)
    app = web.Application(client_max_size=s.max_body, middlewares=[r.counting, r.middleware])
    app[SETTINGS_KEY] = s
    app[RECEIVER_KEY] = r
    app[METRICS_KEY] = r.metrics
    r.app = app
    app.cleanup_ctx.append(_journal)
    app.cleanup_ctx.append(_revenue)
    app.on_shutdown.append(r.on_shutdown)
    app.router.add_post("/liveEvent", r.live_event)
    app.router.add_get("/userEvents/{user_id:.+}", r.user_events)
    app.router.add_get("/healthz", r.healthz)
    app.router.add_get("/livez", r.livez)
    app.router.add_get("/readyz", r.readyz)
    app.router.add_get("/metrics", r.metrics_text)
    reader = s.revenue_lookup if isinstance(s.revenue_lookup, StoreRevenue) else None
    app[WEBVIEW_KEY] = webview.WebView(reader, s.status_probe, r.itself)
    app[WEBVIEW_KEY].add_routes(app)
    return app


# ---------------------------------------------------------------------------------------------
# serving


class _JSONErrorProtocol(RequestHandler):
    """aiohttp's protocol, answering malformed HTTP with a JSON sentence instead of text, and
    closing a connection whose request head is not complete within the head timeout (sooner
    than an idle keep-alive connection, which aiohttp closes after keepalive_timeout)."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages or self._request_in_progress:  # a head is complete
            if self._head_timer is not None:
                self._disarm_head_timer()
        else:
            self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        server = self._manager
        if self._head_timer is None and isinstance(server, _JSONErrorServer):
            self._head_timer = self._loop.call_later(server.head_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._messages and not self._request_in_progress and self.transport is not None:
            self.transport.abort()

    @property
    def idle(self) -> bool:
        """No request is being read, handled or answered."""
        return not self._messages and not self._request_in_progress

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        # The parser's message may quote request bytes (headers, maybe a token): never echo it.
        text = "malformed HTTP request" if status < 500 else "internal server error"
        if status >= 500 and not isinstance(exc, ConnectionError):  # a client hanging up is no error
            log.error("error handling a request", exc_info=exc)
        resp = _error(status, text)
        resp.force_close()
        return resp


class _JSONErrorServer(Server):
    """aiohttp's server with a cap on open connections: past it, the oldest idle connection
    (no request under way) is closed to make room, else the new one; so idle or half-open
    connections can never use up the file descriptors that requests and the journal need."""

    max_connections = 1 << 30
    head_timeout = 10.0

    def __call__(self) -> RequestHandler:
        return _JSONErrorProtocol(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._connections) <= self.max_connections:
            return
        for other, other_transport in self._connections.items():
            if other is not handler and getattr(other, "idle", False) and not other_transport.is_closing():
                other_transport.abort()
                return
        transport.abort()


# Descriptors kept free: the journal, the database, logs, and what the listener accepts before the
# cap's closes take effect (asyncio accepts up to the backlog, 128, per loop turn, and an aborted
# connection's descriptor is released a turn or two later, so several bursts can overlap).
RESERVED_FILES = 512


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as servers do at start); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 16


def connection_cap(open_files: int) -> int:
    """Concurrent connections allowed under an open-file limit: the limit less a reserve."""
    return max(8, open_files - RESERVED_FILES)


ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tf "%{User-Agent}i"'  # the logger adds the time


async def start_runner(app: web.Application, host: str, port: int, *,
                       shutdown_timeout: float = 60.0, idle_timeout: float = 30.0,
                       head_timeout: float | None = None, max_connections: int | None = None,
                       access_log: bool = False, reuse_port: bool = False) -> web.AppRunner:
    """Start serving `app` on host:port (0 picks a free port); return the runner to clean up.

    A connection that has not sent a complete request head for `idle_timeout` seconds (a client
    that never finishes its headers, or an idle keep-alive connection) is closed.
    """
    # lingering_time: how long to read and drop the rest of a body we refused (default 10 s) so
    # the client sees the answer; short, because it also delays shutdown. keepalive_timeout is
    # aiohttp's idle limit, which also runs from the start of a connection: its default (an
    # hour) let slow-header clients hold connections open.
    runner = web.AppRunner(app, access_log=logging.getLogger("aiohttp.access") if access_log else None,
                           access_log_format=ACCESS_LOG_FORMAT, handle_signals=False,
                           shutdown_timeout=shutdown_timeout, lingering_time=2.0,
                           keepalive_timeout=idle_timeout)
    await runner.setup()
    if type(runner.server) is Server:
        runner.server.__class__ = _JSONErrorServer
        server: Any = runner.server
        if RECEIVER_KEY in app:  # evtool serve's app: events past the router (_Receiver.direct)
            server.request_handler = app[RECEIVER_KEY].direct(server.request_handler)
        server.head_timeout = idle_timeout if head_timeout is None else head_timeout
        if max_connections is not None:
            server.max_connections = max_connections
    site = web.TCPSite(runner, host, port, reuse_address=True, reuse_port=reuse_port or None)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def _url(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"


async def _serve(s: ServeSettings, on_ready: Callable[[str], None] | None) -> None:
    app = make_app(s)
    cap = s.max_connections or connection_cap(raise_open_file_limit())
    runner = await start_runner(app, s.host, s.port, shutdown_timeout=s.request_timeout + 5,
                                idle_timeout=s.request_timeout, access_log=s.access_log,
                                head_timeout=min(s.head_timeout, s.request_timeout), max_connections=cap,
                                reuse_port=s.reuse_port)
    # What startup made (modules, the app) lives as long as the process: out of the collector's
    # sight, so a full collection no longer walks it while requests wait (one took 108 ms under
    # load on the bench machine, against 28 ms for the whole collection frozen).
    gc.collect()
    gc.freeze()
    appender = app[APPENDER_KEY]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reopening: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        """SIGHUP: reopen the journal at its path now, as log daemons do after a rotation."""
        task = loop.create_task(appender.reopen())
        reopening.add(task)
        task.add_done_callback(reopening.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        if on_ready is not None:
            durability = "fsync on" if s.fsync else "fsync OFF: acknowledgements are not durable"
            on_ready(f"listening on {_url(runner)}, journal {s.journal}, {durability}")
            if appender.dropped_tail:
                on_ready(f"cut a partial last line ({appender.dropped_tail} bytes) off {s.journal}: a write "
                         "cut short by a crash, never acknowledged")
        await stop.wait()
        app[RECEIVER_KEY].stopping()  # /readyz says 503 from now on
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        # stop accepting, let in-flight requests finish (their appends complete and fsync), then
        # close what the app holds (cleanup_ctx): the journal, the revenue lookup's connection
        await runner.cleanup()


def run_server(s: ServeSettings, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then finish in-flight requests, fsync, close and return.

    Raises ConfigError (bad settings), JournalLocked (another serve writes the journal),
    JournalWriteError (journal cannot be opened) and OSError (address in use).
    """
    # With RLIMIT_FSIZE, exceeding it would kill us; ignored, write() fails with EFBIG instead.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    check_settings(s)

    asyncio.run(_serve(s, on_ready))
