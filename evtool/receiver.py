"""`evtool serve`: the HTTP receiver that appends accepted events to the journal (design section 7).

Routes: `POST /liveEvent` (one JSON object, a JSON array or NDJSON), `GET /userEvents/<userId>`,
`GET /healthz` and `GET /readyz` (can write the journal, not shutting down), `GET /livez` (the
loop answers), `GET /metrics` (Prometheus text format; the token, or the metrics token, which
can do nothing else). The probes need no token.
Every answer but /metrics is JSON; every error is `{"error": "<sentence>"}`, aiohttp's own errors
included (unknown route, wrong method, body too large, malformed HTTP).

A request is answered 200 only after all its lines went to the journal in one append (written
and fsynced with group commit, see `appender`). A request that fails writes nothing. Turning a
body into journal lines is `intake`'s job; this module keeps auth, routes and error mapping, and
the app's resources (journal appender, metrics, the /userEvents connection) live under typed app
keys, opened and closed by `cleanup_ctx`.

Limits: the body is capped by `max_body` (aiohttp's `client_max_size`), each event line or object
by `max_line`, and reading the body by `request_timeout`, which also bounds how long a connection
may sit without a complete request head. Request line and headers use aiohttp's
defaults (8190 bytes per line and per header field, 32 KiB for all headers).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from aiohttp import StreamReader, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from . import config, events, output
from .appender import JournalAppender
from .errors import ConfigError, EvtoolError, JournalWriteError, UnknownUser
from .intake import BodyInvalid, BodyMalformed, BodyRefused, BodyTooLong, Intake, check_key, receiver_ids
from .metrics import CONTENT_TYPE as METRICS_TYPE
from .metrics import Metrics

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)

DEFAULT_TOKEN = config.TOKEN
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl"})
# Form-urlencoded is what `curl -d` and Python's urllib send by default: read as JSON too, so such
# clients of the original endpoint keep working (a real form body is then 400 malformed JSON).
JSON_TYPES = frozenset({"application/json", "application/x-www-form-urlencoded"})

_JSON = "application/json"


class RevenueLookup(Protocol):
    """What GET /userEvents/<id> reads totals with; the app closes it when it stops."""

    def __call__(self, user_id: str) -> Decimal | int | None:
        """The user's total, or None for an unknown user. Runs in a worker thread."""

    def close(self) -> None:
        """Release what the lookup holds (its database connection)."""


class StoreRevenue:
    """A RevenueLookup on one database connection: opened on first use (so `serve` starts without
    PostgreSQL), reopened after a failure, closed with the app."""

    def __init__(self, connect: Callable[[], Store]) -> None:
        self._connect = connect
        self._store: Store | None = None
        # Lookups run in threads: one at a time on the one connection, and never two connects.
        self._lock = threading.Lock()

    def __call__(self, user_id: str) -> Decimal | None:
        with self._lock:
            if self._store is None:
                self._store = self._connect()
            try:
                return self._store.revenue(user_id)
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
    fsync: bool = True
    max_body: int = 16 * 1024 * 1024  # bytes per request
    max_line: int = 1024 * 1024  # bytes per event line / single object
    request_timeout: float = 30.0  # seconds to receive a request body
    # What GET /userEvents/<id> reads totals with; the app closes it when it stops. None -> 503.
    revenue_lookup: RevenueLookup | None = None
    strict: bool = False  # events.validate without normalization (no user_id alias, no string values)
    metrics_token: str | None = None  # may GET /metrics, nothing else
    access_log: bool = False  # one log line per request (logger aiohttp.access)


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


_BODY_STATUS: dict[type[BodyRefused], int] = {BodyMalformed: 400, BodyInvalid: 422, BodyTooLong: 413}
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
        self.metrics_token = s.metrics_token.encode() if s.metrics_token else None
        self.intake = Intake(max_line=s.max_line, strict=s.strict, fresh_id=receiver_ids())
        self._reading: set[StreamReader] = set()  # bodies being read
        self._stopping = False

    def authorized(self, request: web.Request) -> bool:
        given = request.headers.get("Authorization")
        if given is None:
            return False
        if given[:7].lower() == "bearer ":
            given = given[7:]
        raw = given.strip().encode("utf-8", "surrogateescape")
        if hmac.compare_digest(raw, self.token):
            return True
        # The scrape credential opens GET /metrics only: a leaked scrape config cannot post events.
        return (self.metrics_token is not None and request.path == "/metrics"
                and hmac.compare_digest(raw, self.metrics_token))

    @web.middleware
    async def counting(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Count answers by method, route pattern and status, and time them (outermost: sees every answer)."""
        started = time.perf_counter()
        resp = await handler(request)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "other"
        metrics = request.app[METRICS_KEY]
        metrics.request(request.method, route, resp.status, time.perf_counter() - started)
        if route == "/liveEvent" and resp.status in _REJECT_REASONS:
            metrics.rejected(_REJECT_REASONS[resp.status])
        return resp

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Auth on every route but the probes, and every error as a JSON sentence."""
        try:
            if request.path not in PROBES and not self.authorized(request):
                return _error(
                    401,
                    "missing or wrong token: send it in the Authorization header",
                    {"WWW-Authenticate": "Bearer"},
                )
            return await handler(request)
        except BodyRefused as exc:
            return _error(_BODY_STATUS[type(exc)], exc.message)
        except _Refused as exc:
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
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return _error(exc.status, _http_error_message(exc, request, self.s.max_body), headers)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("internal error on %s %s", request.method, request.path[:200])
            return _error(500, "internal server error")

    # -- POST /liveEvent ----------------------------------------------------------------------

    async def live_event(self, request: web.Request) -> web.Response:
        if "Content-Type" in request.headers:
            ctype = request.content_type
            if ctype in NDJSON_TYPES:
                ndjson = True
            elif ctype in JSON_TYPES:
                ndjson = False
            else:
                raise _Refused(415, f"unsupported content type {ctype[:100]!r}: send application/json "
                               "(one event or an array) or application/x-ndjson (one event per line)")
        else:
            ndjson = False  # original clients may send no content type: treat as JSON
        key = request.headers.get("Idempotency-Key")
        if key is not None:
            check_key(key)
        body = await self._read_body(request)
        lines = self.intake.ndjson(body, key) if ndjson else self.intake.json(body, key)
        if lines.count:
            try:
                await request.app[APPENDER_KEY].append(lines.data)
            except JournalWriteError as exc:
                return _error(503, f"{exc}; nothing was stored, retry later", {"Retry-After": "1"})
            request.app[METRICS_KEY].appended(lines.count, len(lines.data))
        if lines.event_id is not None:
            return _json(200, {"message": "Event received", "eventId": lines.event_id})
        return _json(200, {"accepted": lines.count})

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body, within request_timeout; cut short when the server stops."""
        if self._stopping and not request.content.is_eof():
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
            revenue = await asyncio.to_thread(lookup, user_id)
        except UnknownUser:
            revenue = None
        except EvtoolError as exc:
            log.warning("GET /userEvents: %s", exc)  # the details stay in the server's log
            return _error(503, "cannot read the totals from PostgreSQL; retry later", {"Retry-After": "1"})
        if revenue is None:
            return _error(404, f"unknown user: {user_id[:300]}")
        body = output.json_text(output.user_revenue(user_id, revenue)).encode()  # as `revenue --json`
        return web.Response(status=200, body=body, content_type=_JSON)

    # -- GET /metrics -------------------------------------------------------------------------

    async def metrics_text(self, request: web.Request) -> web.Response:
        appender = request.app[APPENDER_KEY]
        text = request.app[METRICS_KEY].render(appender.size, appender.healthy)
        return web.Response(body=text.encode(), headers={"Content-Type": METRICS_TYPE})

    # -- GET /healthz -------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        appender = request.app[APPENDER_KEY]
        if appender.healthy:
            return _json(200, {"status": "ok"})
        return _error(503, f"cannot write the journal: {appender.last_error}", {"Retry-After": "1"})

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
    """The revenue lookup's connection, closed when the app stops."""
    yield
    lookup = app[SETTINGS_KEY].revenue_lookup
    if lookup is not None:
        await asyncio.to_thread(lookup.close)


def make_app(s: ServeSettings) -> web.Application:
    """The aiohttp application: routes, auth and JSON errors; the journal opens when it starts.

    Raises ConfigError (see check_settings).
    """
    r = _Receiver(s)
    app = web.Application(client_max_size=s.max_body, middlewares=[r.counting, r.middleware])
    app[SETTINGS_KEY] = s
    app[RECEIVER_KEY] = r
    app[METRICS_KEY] = Metrics()
    app.cleanup_ctx.append(_journal)
    app.cleanup_ctx.append(_revenue)
    app.on_shutdown.append(r.on_shutdown)
    app.router.add_post("/liveEvent", r.live_event)
    app.router.add_get("/userEvents/{user_id:.+}", r.user_events)
    app.router.add_get("/healthz", r.healthz)
    app.router.add_get("/livez", r.livez)
    app.router.add_get("/readyz", r.readyz)
    app.router.add_get("/metrics", r.metrics_text)
    return app


# ---------------------------------------------------------------------------------------------
# serving


class _JSONErrorProtocol(RequestHandler):
    """aiohttp's protocol, answering malformed HTTP with a JSON sentence instead of text."""

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
    def __call__(self) -> RequestHandler:
        return _JSONErrorProtocol(self, loop=self._loop, **self._kwargs)


ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tf "%{User-Agent}i"'  # the logger adds the time


async def start_runner(app: web.Application, host: str, port: int, *,
                       shutdown_timeout: float = 60.0, idle_timeout: float = 30.0,
                       access_log: bool = False) -> web.AppRunner:
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
    site = web.TCPSite(runner, host, port, reuse_address=True)
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
    runner = await start_runner(app, s.host, s.port, shutdown_timeout=s.request_timeout + 5,
                                idle_timeout=s.request_timeout, access_log=s.access_log)
    appender = app[APPENDER_KEY]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
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
        for sig in (signal.SIGINT, signal.SIGTERM):
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
