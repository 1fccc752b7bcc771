"""`evtool serve`: the HTTP receiver that appends accepted events to the journal (design section 7).

Routes: `POST /liveEvent` (one JSON object, a JSON array or NDJSON), `GET /userEvents/<userId>`,
`GET /healthz`, `GET /metrics` (Prometheus text format; the token is needed, as on data routes).
Every answer but /metrics is JSON; every error is `{"error": "<sentence>"}`, aiohttp's own errors
included (unknown route, wrong method, body too large, malformed HTTP).

A request is answered 200 only after all its lines went to the journal in one append (written
and fsynced with group commit, see `appender`). A request that fails writes nothing.

Limits: the body is capped by `max_body` (aiohttp's `client_max_size`), each event line or object
by `max_line`, and reading the body by `request_timeout`, which also bounds how long a connection
may sit without a complete request head. Request line and headers use aiohttp's
defaults (8190 bytes per line and per header field, 32 KiB for all headers).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import json
import logging
import os
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from aiohttp import StreamReader, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from . import config, events, output
from .appender import JournalAppender
from .errors import ConfigError, EvtoolError, InvalidEvent, JournalWriteError, MalformedJSON, UnknownUser
from .metrics import CONTENT_TYPE as METRICS_TYPE
from .metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_TOKEN = config.TOKEN
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl"})
# Form-urlencoded is what `curl -d` and Python's urllib send by default: read as JSON too, so such
# clients of the original endpoint keep working (a real form body is then 400 malformed JSON).
JSON_TYPES = frozenset({"application/json", "application/x-www-form-urlencoded"})

_JSON = "application/json"
_ORJSON_POS = re.compile(r": line 1 column (\d+) \(char \d+\)$")

APPENDER_KEY = web.AppKey("appender", JournalAppender)


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
    # Sync function used by GET /userEvents/<id>, run in a thread. None -> 503.
    revenue_lookup: Callable[[str], Decimal | int | None] | None = None
    strict: bool = False  # events.validate without normalization (no user_id alias, no string values)


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
    """Request handlers; one instance per app, holding settings, token and the id generator."""

    def __init__(self, s: ServeSettings, appender: JournalAppender) -> None:
        self.s = s
        self.appender = appender
        self.token = check_settings(s).encode()
        # Receiver-made ids: "~" + random per-process prefix + "-" + counter, unique by construction.
        self._id_prefix = f"{events.RECEIVER_ID_PREFIX}{os.urandom(6).hex()}-"
        self._counter = itertools.count(1)
        self._reading: set[StreamReader] = set()  # bodies being read
        self._stopping = False
        self.metrics = Metrics()
        appender.on_group_written = self.metrics.fsync

    def fresh_id(self) -> str:
        return f"{self._id_prefix}{next(self._counter)}"

    def authorized(self, request: web.Request) -> bool:
        given = request.headers.get("Authorization")
        if given is None:
            return False
        if given[:7].lower() == "bearer ":
            given = given[7:]
        return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), self.token)

    @web.middleware
    async def counting(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Count answers by method, route pattern and status (outermost: sees every answer)."""
        resp = await handler(request)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "other"
        self.metrics.request(request.method, route, resp.status)
        return resp

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Auth on every route but /healthz, and every error as a JSON sentence."""
        try:
            if request.path != "/healthz" and not self.authorized(request):
                return _error(
                    401,
                    "missing or wrong token: send it in the Authorization header",
                    {"WWW-Authenticate": "Bearer"},
                )
            return await handler(request)
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
            try:
                events.check_event_id(key)
            except InvalidEvent as exc:
                raise _Refused(400, f"Idempotency-Key header: {exc.reason}") from None
        body = await self._read_body(request)
        if ndjson:
            data, count = self._ndjson(body, key)
            single_id = None
        else:
            data, count, single_id = self._json(body, key)
        if count:
            try:
                await self.appender.append(data)
            except JournalWriteError as exc:
                return _error(503, f"{exc}; nothing was stored, retry later", {"Retry-After": "1"})
            self.metrics.appended(count, len(data))
        if single_id is not None:
            return _json(200, {"message": "Event received", "eventId": single_id})
        return _json(200, {"accepted": count})

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

    async def on_shutdown(self, app: web.Application) -> None:
        """Listening has stopped: refuse requests whose body is still arriving (aiohttp no longer
        reads it), so they fail now rather than at their timeout; requests already appending finish."""
        self._stopping = True
        for stream in list(self._reading):
            if not stream.is_eof():
                stream.set_exception(_ShuttingDown())

    def _key_id(self, key: str, n: int) -> str:
        """The id of the n-th (1-based) event of a bulk request that carries an Idempotency-Key."""
        event_id = f"{key}#{n}"
        try:
            return events.check_event_id(event_id)
        except InvalidEvent as exc:
            raise _Refused(400, f"Idempotency-Key header: id {event_id[:40]!r}...: {exc.reason}") from None

    def _ndjson(self, body: bytes, key: str | None) -> tuple[bytes, int]:
        """Validate an NDJSON body; return the lines to store and how many events they are.

        With an Idempotency-Key, an event without an eventId gets `KEY#i`, i being its 1-based
        position among the request's events (blank lines are not counted), so it equals the line
        number when the body has no blank lines.
        """
        max_line = self.s.max_line
        parse = events.parse_json
        validate, event_id_of = events.validate, events.event_id_of
        strict = self.s.strict
        if b"\r" in body:  # a CR in valid NDJSON is whitespace; only a line-ending one is dropped
            body = body.replace(b"\r\n", b"\n")
            if body.endswith(b"\r"):
                body = body[:-1]
        out: list[bytes] = []
        append = out.append
        n = 0
        for lineno, raw in enumerate(body.split(b"\n"), 1):
            if not raw or raw.isspace():
                continue
            if len(raw) > max_line:
                raise _Refused(413, f"line {lineno} is longer than the limit of {max_line} bytes")
            n += 1
            try:
                obj = parse(raw)
                if event_id_of(obj, raw, strict=strict) is not None:
                    append(raw)  # fast path: the client's bytes, unchanged
                    continue
                event = validate(obj, raw, strict=strict)
            except MalformedJSON as exc:
                raise _Refused(400, f"line {lineno}: {_line_reason(exc)}") from None
            except InvalidEvent as exc:
                raise _Refused(422, f"line {lineno}: {exc.reason}") from None
            event_id = self._key_id(key, n) if key is not None else self.fresh_id()
            append(_with_id(raw, obj, event, event_id))
        append(b"")
        return b"\n".join(out), n

    def _json(self, body: bytes, key: str | None) -> tuple[bytes, int, str | None]:
        """Validate an application/json body: one object, or an array of objects (a bulk)."""
        try:
            obj = events.parse_json(body)
        except MalformedJSON as exc:
            raise _Refused(400, exc.reason) from None
        if isinstance(obj, dict):
            if len(body) > self.s.max_line:
                raise _Refused(413, f"the event is longer than the limit of {self.s.max_line} bytes")
            try:
                event = events.validate(obj, body, strict=self.s.strict)
            except InvalidEvent as exc:
                raise _Refused(422, exc.reason) from None
            event_id = event.event_id or key or self.fresh_id()
            # A pretty-printed object becomes one line: raw CR/LF in valid JSON can only be
            # whitespace between tokens, so replacing them keeps every field's text exactly.
            raw = body.strip()
            if b"\n" in raw or b"\r" in raw:
                raw = raw.replace(b"\r", b" ").replace(b"\n", b" ")
            line = raw if event.event_id is not None else _with_id(raw, obj, event, event_id)
            return line + b"\n", 1, event_id
        if not isinstance(obj, list):
            raise _Refused(422, "the body must be one event object or an array of event objects")
        exact: list[Any] | None = None
        out: list[bytes] = []
        for i, el in enumerate(obj, 1):
            if isinstance(el, dict) and isinstance(el.get("value"), float):
                # orjson gave a float: take the exact number from the text, read once for the body
                if exact is None:
                    exact = json.loads(body, parse_float=Decimal, parse_int=Decimal)
                el["value"] = exact[i - 1]["value"]
            try:
                event = events.validate(el, strict=self.s.strict)
            except InvalidEvent as exc:
                raise _Refused(422, f"element {i}: {exc.reason}") from None
            if event.event_id is None:
                el["eventId"] = self._key_id(key, i) if key is not None else self.fresh_id()
            el["value"] = events.value_fragment(event.value)
            line = orjson.dumps(el)
            if len(line) > self.s.max_line:
                raise _Refused(413, f"element {i} is longer than the limit of {self.s.max_line} bytes")
            out.append(line)
        out.append(b"")
        return b"\n".join(out), len(obj), None

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
        text = self.metrics.render(self.appender.size, self.appender.healthy)
        return web.Response(body=text.encode(), headers={"Content-Type": METRICS_TYPE})

    # -- GET /healthz -------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        if self.appender.healthy:
            return _json(200, {"status": "ok"})
        return _error(503, f"cannot write the journal: {self.appender.last_error}", {"Retry-After": "1"})


def _line_reason(exc: InvalidEvent) -> str:
    """orjson's reason for one NDJSON line, without its "line 1" (the request's line is named)."""
    return _ORJSON_POS.sub(r" at column \1", exc.reason)


def _with_id(raw: bytes, obj: dict, event: events.Event, event_id: str) -> bytes:
    """`raw` (one line, an object without an id) with `"eventId"` added, other text unchanged."""
    if "eventId" in obj:  # present but null: rewrite rather than add a second key
        obj["eventId"] = event_id
        obj["value"] = events.value_fragment(event.value)
        return orjson.dumps(obj)
    raw = raw.rstrip()
    return raw[:-1] + b',"eventId":' + orjson.dumps(event_id) + b"}"


def make_app(s: ServeSettings, appender: JournalAppender) -> web.Application:
    """The aiohttp application: routes, auth and JSON errors. Raises ConfigError (see check_settings)."""
    r = _Receiver(s, appender)
    app = web.Application(client_max_size=s.max_body, middlewares=[r.counting, r.middleware])
    app[APPENDER_KEY] = appender
    app.on_shutdown.append(r.on_shutdown)
    app.router.add_post("/liveEvent", r.live_event)
    app.router.add_get("/userEvents/{user_id:.+}", r.user_events)
    app.router.add_get("/healthz", r.healthz)
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


async def start_runner(app: web.Application, host: str, port: int, *,
                       shutdown_timeout: float = 60.0, idle_timeout: float = 30.0) -> web.AppRunner:
    """Start serving `app` on host:port (0 picks a free port); return the runner to clean up.

    A connection that has not sent a complete request head for `idle_timeout` seconds (a client
    that never finishes its headers, or an idle keep-alive connection) is closed.
    """
    # lingering_time: how long to read and drop the rest of a body we refused (default 10 s) so
    # the client sees the answer; short, because it also delays shutdown. keepalive_timeout is
    # aiohttp's idle limit, which also runs from the start of a connection: its default (an
    # hour) let slow-header clients hold connections open.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout,
                           lingering_time=2.0, keepalive_timeout=idle_timeout)
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


async def _serve(s: ServeSettings, appender: JournalAppender, on_ready: Callable[[str], None] | None) -> None:
    app = make_app(s, appender)
    runner = await start_runner(app, s.host, s.port, shutdown_timeout=s.request_timeout + 5,
                                idle_timeout=s.request_timeout)
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
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        # stop accepting, let in-flight requests finish (their appends complete and fsync)
        await runner.cleanup()


def run_server(s: ServeSettings, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then finish in-flight requests, fsync, close and return.

    Raises ConfigError (bad settings), JournalLocked (another serve writes the journal),
    JournalWriteError (journal cannot be opened) and OSError (address in use).
    """
    # With RLIMIT_FSIZE, exceeding it would kill us; ignored, write() fails with EFBIG instead.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    check_settings(s)

    async def main() -> None:
        appender = JournalAppender(s.journal, fsync=s.fsync)
        try:
            await _serve(s, appender, on_ready)
        finally:
            await appender.close()

    asyncio.run(main())
