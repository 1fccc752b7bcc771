"""The sender: stream a JSONL file to `evtool serve` (or any compatible receiver), exactly once.

Design sections 3 and 8. The file is read line by line (never whole), each line is checked with
the shared validator (or, sent to `evtool serve`, by the receiver: see `_Run.trusts_receiver`
and `_Run.recheck`), events without an `eventId` get the deterministic id
`<source>:<line>:<chain>` (see `identity`: the same bytes up to a line give the same id wherever
the file lives; inserted textually, so the client's number text is kept), and bulks are POSTed
over a few keep-alive connections. Delivery is at-least-once; the ids make it exactly-once.

Resume: the state (see `sendstate`) records the end of the highest *contiguous* prefix of
batches the receiver answered 200 for, always at the end of a complete line, per source and
receiver; a re-run starts there once the file's bytes before it are verified. A final line
without a newline is sent but not counted as done, so it is re-sent (with the same id) next time.
Concurrent sends of the same source to the same receiver are refused while the first holds the
state lock.

Several receivers (`urls`): bulks are spread over them round-robin, and a receiver that fails a
request (cannot be reached, times out, answers 5xx/429) is set aside for a backoff while its bulk
goes to the next one, the way Filebeat's `loadbalance` output does; the ids make a bulk re-sent
through another receiver harmless.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
import urllib.error
import urllib.request
from binascii import hexlify
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import aiohttp
import orjson
from yarl import URL

from . import config, events, native
from .errors import ConfigError, DeliveryFailed, InvalidEvent, SourceError
from .identity import CHAIN_LEN, CHAIN_SEED, RECEIVER_HEADER, bare_line, chain_next, source_id
from .mapping import Mapping
from .sendstate import BOM, ConfirmedPrefix, Position, StateStore, first_line, resume

_fastlines = native.loops  # the id loop in C (_id_lines), where it was built

MAX_INVALID_KEPT = 100
MAX_ERRORS_KEPT = 20
BACKOFF_BASE = 0.2
BACKOFF_CAP = 5.0
RETRY_AFTER_CAP = 60.0
BACKSLASH = 0x5C  # `int in bytes` is a memchr; `bytes in bytes` costs ten times more in CPython 3.11
SAVE_EVERY = 1.0
PROGRESS_EVERY = 0.1
READ_AHEAD = 1 << 18  # bytes of lines read at once (f.readlines' hint)
# Final answers that depend on the content of a bulk: split it to deliver the rest and find the line.
SPLIT_STATUSES = frozenset({400, 413, 422})
# Final answers that every later request would get too: stop instead of sending the whole file.
STOP_STATUSES = frozenset({401, 403, 404, 405, 415})


@dataclass
class SendSettings:
    """What `send` does; defaults match `evtool send`."""

    path: Path
    url: str = config.URL
    urls: tuple[str, ...] = ()  # several receivers to spread bulks over; empty: just `url`
    token: str = config.TOKEN
    batch: int = 1000
    connections: int = 4
    from_start: bool = False
    max_retries: int = 8
    state_dir: Path = field(default_factory=config.home)
    timeout: float = 30.0
    strict: bool = False  # events.validate without normalization
    mapping: Mapping | None = None  # the declared mapping lines are checked (and their ids read) under

    @property
    def receivers(self) -> tuple[str, ...]:
        """The receivers' base URLs, without a trailing slash, each once, in the order given."""
        return tuple(dict.fromkeys(u.rstrip("/") for u in (self.urls or (self.url,))))


@dataclass
class SendReport:
    """The outcome of one `send`. `failed > 0` means some events were not delivered."""

    source: str  # the 16-hex source id (the first half of every generated eventId)
    path: str = ""  # the resolved path of the file
    sent: int = 0
    skipped_invalid: int = 0
    already_sent: int = 0  # lines before the resume point, not read again
    retried: int = 0
    failed: int = 0
    retryable: int = 0  # of `failed`, those that failed only for transient reasons (retrying may work)
    seconds: float = 0.0
    invalid_lines: list[tuple[int, str]] = field(default_factory=list)
    new_source_reason: str | None = None
    errors: list[str] = field(default_factory=list)  # the receiver's refusals, first few
    stopped: str | None = None  # why the run ended before the end of the file, if it did

    @property
    def events_per_second(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


@dataclass(slots=True)
class _Batch:
    seq: int
    lines: list[bytes]
    linenos: list[int]
    pos: Position  # the resume point once this batch and all before it are delivered


@dataclass(slots=True, eq=False)  # compared by identity: a bulk's tried set holds them
class _Receiver:
    url: URL  # its /liveEvent
    down_until: float = 0.0  # monotonic time before which it gets no new bulk
    failures: int = 0  # consecutive failed requests


class _Receivers:
    """Where the next request goes: round-robin over the receivers not set aside.

    A failed request sets its receiver aside for a backoff that doubles with each consecutive
    failure (a success resets it), or for the Retry-After it gave; after that it gets bulks
    again, which is how a restarted receiver comes back into use.
    """

    def __init__(self, base_urls: tuple[str, ...]) -> None:
        self.all = [_Receiver(URL(u + "/liveEvent")) for u in base_urls]
        self.next = 0

    def pick(self, tried: Collection[_Receiver] = ()) -> _Receiver:
        """The next receiver in turn that is not set aside nor in `tried`, else the one back
        soonest."""
        now = time.monotonic()
        n = len(self.all)
        for i in range(n):
            r = self.all[(self.next + i) % n]
            if r.down_until <= now and r not in tried:
                self.next = (self.next + i + 1) % n
                return r
        return min(self.all, key=lambda r: r.down_until)

    def any_up(self, tried: Collection[_Receiver] = ()) -> bool:
        """Whether a receiver not set aside nor in `tried` is left."""
        now = time.monotonic()
        return any(r.down_until <= now and r not in tried for r in self.all)

    def failed(self, r: _Receiver, retry_after: str | None) -> None:
        r.failures += 1
        backoff = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(r.failures, 8))
        asked = _retry_after(retry_after)
        r.down_until = time.monotonic() + (backoff if asked is None else asked)

    @staticmethod
    def succeeded(r: _Receiver) -> None:
        r.failures, r.down_until = 0, 0.0


def send(
    settings: SendSettings,
    on_progress: Callable[[int, int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> SendReport:
    """Send `settings.path` to the receiver; blocking. Returns the report.

    `on_total(total_bytes)` is called once, `on_progress(bytes_done, events_sent)` as batches are
    confirmed (at most ~10 times a second, and once at the end); `bytes_done` is the confirmed
    resume offset.

    Raises `SourceError` when the file cannot be read (or is being sent by another process), and
    `DeliveryFailed` only when the receiver could not be reached at all: the connection failed on
    every attempt and nothing was delivered in this run. Everything else is in the report: refused
    batches count in `failed`, and a request that still fails after `max_retries` stops the run
    (`stopped` says why, its events count in `failed`). Progress is saved either way.
    """
    if settings.batch < 1:
        raise ConfigError("--batch must be at least 1")
    if settings.connections < 1:
        raise ConfigError("--connections must be at least 1")
    if settings.max_retries < 0:
        raise ConfigError("--max-retries must be 0 or more")
    path = Path(settings.path)
    try:
        f = open(path, "rb")  # closed below, after the run
        if not path.is_file():
            f.close()
            raise IsADirectoryError(21, "not a regular file")
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        resolved = str(path.resolve())
        # the state is per source and destination: the receivers, as URLs and as the ids they
        # give (one of each for a single receiver)
        url = " ".join(settings.receivers)
        receiver = " ".join(receiver_id(u, min(settings.timeout, 5.0)) for u in settings.receivers)
        store = StateStore(settings.state_dir, source_id(first_line(f)), url, resolved, receiver)
        store.lock()
        try:
            return _Run(settings, f, resolved, store, on_progress, on_total).run()
        finally:
            store.unlock()
    finally:
        f.close()


def receiver_id(url: str, timeout: float) -> str:
    """The id `evtool serve` gives on /healthz (its host and journal; see receiver), or "" when
    the receiver gives none or cannot be reached (the send then finds out why)."""
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=timeout) as resp:
            return resp.headers.get(RECEIVER_HEADER, "")[:64]
    except urllib.error.HTTPError as exc:
        return (exc.headers.get(RECEIVER_HEADER) or "")[:64]
    except (OSError, ValueError):
        return ""


class _Run:
    """One send: the reader, the workers and the bookkeeping, all on one event loop."""

    def __init__(
        self,
        settings: SendSettings,
        f: BinaryIO,
        resolved: str,
        store: StateStore,
        on_progress: Callable[[int, int], None] | None,
        on_total: Callable[[int], None] | None,
    ) -> None:
        self.s = settings
        self.f = f
        self.store = store
        self.on_progress = on_progress
        self.on_total = on_total
        self.size = os.fstat(f.fileno()).st_size
        decided = resume(f, resolved, store.url, store.load(), from_start=settings.from_start,
                         receiver=store.receiver)
        self.state = decided.state
        self.start = decided.start
        src = self.state.source
        self.report = SendReport(source=src, path=resolved, new_source_reason=decided.new_source_reason)
        self.report.already_sent = self.start.line
        self.id_prefix = (src + ":").encode()
        self.id_member = b',"eventId":"' + self.id_prefix  # what the reader appends, before `<n>:<c>"}`
        # Whether lines may go out unchecked: only to `evtool serve` (it names itself on
        # /healthz), which validates every line and refuses a bulk with a bad one (400/422);
        # then that bulk is checked here (recheck). Strict or mapped sends check every line.
        self.trusts_receiver = (settings.mapping is None and not settings.strict
                                and all(store.receiver.split(" ")))
        self.confirmed = ConfirmedPrefix(self.start)
        self.dirty = True
        self.delivered_any = False
        self.unreachable: str | None = None
        self.last_progress = 0.0

    # --- bookkeeping -------------------------------------------------------------------------

    def complete(self, seq: int, pos: Position, ok: bool) -> None:
        if self.confirmed.confirm(seq, pos, ok):
            self.dirty = True
        if self.on_progress is not None and not self.confirmed.blocked:
            now = time.monotonic()
            if now - self.last_progress >= PROGRESS_EVERY:
                self.last_progress = now
                self.on_progress(self.confirmed.position.offset, self.report.sent)

    def save(self) -> None:
        self.state.set_position(self.confirmed.position)
        self.store.save(self.state)
        self.dirty = False

    async def saver(self) -> None:
        while True:
            await asyncio.sleep(SAVE_EVERY)
            if self.dirty:
                self.dirty = False
                self.state.set_position(self.confirmed.position)
                # Never leave a write running in its thread when cancelled: the final save must
                # come after it, or an older state could land last.
                write = asyncio.ensure_future(asyncio.to_thread(self.store.save, self.state))
                try:
                    await asyncio.shield(write)
                except asyncio.CancelledError:
                    await write
                    raise

    def stop(self, reason: str) -> None:
        if self.report.stopped is None:
            self.report.stopped = reason

    def error(self, message: str) -> None:
        if len(self.report.errors) < MAX_ERRORS_KEPT:
            self.report.errors.append(message)

    # --- the run -----------------------------------------------------------------------------

    def run(self) -> SendReport:
        if self.on_total is not None:
            self.on_total(self.size)
        t0 = time.perf_counter()
        try:
            asyncio.run(self.main())
        finally:
            self.report.seconds = time.perf_counter() - t0
            self.report.invalid_lines.sort()  # a rechecked bulk reports its lines when answered
            self.save()
        if self.on_progress is not None:
            finished = self.report.failed == 0 and self.report.stopped is None
            self.on_progress(self.size if finished else self.confirmed.position.offset, self.report.sent)
        if self.unreachable is not None and not self.delivered_any:
            urls = self.s.receivers
            where = f"the receiver at {urls[0]}" if len(urls) == 1 else f"any receiver of {', '.join(urls)}"
            raise DeliveryFailed(f"cannot reach {where}: {self.unreachable}; is `evtool serve` running?")
        return self.report

    async def main(self) -> None:
        s = self.s
        single = s.batch == 1
        ctype = "application/json" if single else "application/x-ndjson"
        self.receivers = _Receivers(s.receivers)
        connector = aiohttp.TCPConnector(limit=s.connections)
        timeout = aiohttp.ClientTimeout(total=s.timeout)
        headers = {"Authorization": s.token, "Content-Type": ctype}
        queue: asyncio.Queue[_Batch | None] = asyncio.Queue(maxsize=2 * s.connections)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
            self.session = session
            self.single = single
            workers = [asyncio.create_task(self.worker(queue)) for _ in range(s.connections)]
            saver = asyncio.create_task(self.saver())

            async def read_then_finish() -> None:
                await self.reader(queue)
                for _ in workers:
                    await queue.put(None)

            try:
                await asyncio.gather(read_then_finish(), *workers)
            finally:
                saver.cancel()
                for w in workers:
                    w.cancel()
                await asyncio.gather(saver, *workers, return_exceptions=True)

    async def reader(self, queue: asyncio.Queue) -> None:
        """Read, validate and id the lines after the resume point; queue them in batches."""
        f, batch_size, report, prefix = self.f, self.s.batch, self.report, self.id_member
        parse_json, event_id_of = events.parse_json, events.event_id_of
        strict = self.s.strict
        view = self.s.mapping.view if self.s.mapping is not None else None
        trusting = self.trusts_receiver
        pos = self.start
        offset, lineno, chain = pos.offset, pos.line, pos.chain
        before = chain  # the chain before the last line read
        raw = b"\n"
        lines: list[bytes] = []
        linenos: list[int] = []
        seq = 0
        try:
            f.seek(offset)
            while block := f.readlines(READ_AHEAD):
                at = 0
                while at < len(block):
                    segment = block[at:at + batch_size - len(lines)]
                    at += len(segment)
                    done = _id_lines(segment, lineno, chain, prefix) if trusting and offset else None
                    if done is not None:
                        # every line of the sender's plain shape: ids appended in one tight loop
                        ided, chain, before = done
                        lines += ided
                        linenos += range(lineno + 1, lineno + 1 + len(ided))
                        lineno += len(ided)
                        offset += sum(map(len, segment))
                        raw = segment[-1]
                    else:
                        for raw in segment:
                            lineno += 1
                            if lineno & 4095 == 0:
                                await asyncio.sleep(0)  # workers and saver run in long invalid stretches
                            start = offset
                            offset += len(raw)
                            before, chain = chain, chain_next(chain, bare_line(raw, start == 0))
                            text = raw.strip()
                            if not text:
                                continue
                            if start == 0 and text.startswith(BOM):
                                text = text[3:].lstrip()
                            if (trusting and text[-1:] == b"}" and BACKSLASH not in text
                                    and text.find(b'"eventId"') < 0):
                                # No eventId member can hide in a text without that key or an escape:
                                # the id is appended unchecked, the receiver validates (see
                                # trusts_receiver, recheck).
                                event_id = None
                            else:
                                try:
                                    if view is None:
                                        event_id = event_id_of(parse_json(text), text, strict=strict)
                                    else:  # the mapped id field, if the line has one, is its eventId
                                        mapped = view(parse_json(text), text, strict)
                                        event_id = event_id_of(mapped, strict=strict)
                                except InvalidEvent as exc:
                                    self.skip(lineno, exc.reason)
                                    continue
                            if event_id is None:
                                text = b'%b%b%d:%b"}' % (text[:-1], prefix, lineno, chain.hex().encode())
                            lines.append(text)
                            linenos.append(lineno)
                    if len(lines) >= batch_size:
                        if report.stopped is not None:
                            return
                        done_at = _position_after(raw, offset, lineno, chain, before)
                        await queue.put(_Batch(seq, lines, linenos, done_at))
                        seq += 1
                        lines, linenos = [], []
        except OSError as exc:
            raise SourceError(f"cannot read {self.state.path}: {exc.strerror or exc}") from None
        if report.stopped is not None:
            return
        done = _position_after(raw, offset, lineno, chain, before)
        if lines:
            await queue.put(_Batch(seq, lines, linenos, done))
        else:
            self.complete(seq, done, True)

    async def worker(self, queue: asyncio.Queue) -> None:
        while True:
            batch = await queue.get()
            if batch is None:
                return
            if self.report.stopped is not None:
                failed = len(batch.lines)
                self.report.failed += failed
            else:
                failed = await self.deliver(batch.lines, batch.linenos)
            self.complete(batch.seq, batch.pos, failed == 0)

    async def deliver(self, lines: list[bytes], linenos: list[int], checked: bool = False) -> int:
        """POST these lines, retrying transient failures; return how many were not delivered.

        `checked`: every line was validated here (else a refused bulk is rechecked first)."""
        n = len(lines)
        report = self.report
        body = lines[0] if self.single else b"\n".join(lines) + b"\n"
        attempt = 0
        # The receivers that failed this bulk since the last counted attempt. Each other one
        # gets it at most once in between, even if a concurrent success puts one that failed
        # it back in turn meanwhile (counting failovers instead let the bulk go back to it).
        tried: set[_Receiver] = set()
        while True:
            if report.stopped is not None:
                report.failed += n
                return n
            retry_after = None
            receiver = self.receivers.pick(tried)
            try:
                async with self.session.post(receiver.url, data=body) as resp:
                    status = resp.status
                    payload = await resp.read()
                    if status == 200:
                        if not self.single:
                            accepted = _accepted(payload)
                            if accepted is not None and accepted != n:
                                return self.refuse(lines, linenos, f"the receiver accepted {accepted} of {n}")
                        report.sent += n
                        self.delivered_any = True
                        self.receivers.succeeded(receiver)
                        return 0
                    retry_after = resp.headers.get("Retry-After")
                reason = f"HTTP {status}: {_message(payload)}"
                transient = status in (408, 429) or status >= 500
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                status = None
                reason = _describe(exc)
                transient = True
            if transient:
                self.receivers.failed(receiver, retry_after)
                tried.add(receiver)
                if self.receivers.any_up(tried):
                    # Fail over at once to a receiver that is not set aside: not counted against
                    # --max-retries, but at most once per other receiver between counted attempts.
                    report.retried += 1
                    continue
                tried.clear()
                if attempt >= self.s.max_retries:
                    if status is None and self.unreachable is None:
                        self.unreachable = reason
                    self.stop(f"the receiver still failed after {self.s.max_retries} retries: {reason}")
                    report.failed += n
                    report.retryable += n
                    return n
                attempt += 1
                report.retried += 1
                await asyncio.sleep(_delay(attempt, retry_after))
                continue
            if status in SPLIT_STATUSES and not checked and self.trusts_receiver:
                return await self.recheck(lines, linenos)
            if status in SPLIT_STATUSES and n > 1:
                mid = n // 2
                return await self.deliver(lines[:mid], linenos[:mid], True) + await self.deliver(
                    lines[mid:], linenos[mid:], True
                )
            if status in STOP_STATUSES:
                self.stop(f"the receiver refused the request: {reason}")
            return self.refuse(lines, linenos, reason)

    async def recheck(self, lines: list[bytes], linenos: list[int]) -> int:
        """A bulk sent unchecked was refused for its content: validate its lines here as the
        reader would have (invalid ones are skipped and reported), then deliver the rest."""
        keep, kept_linenos = [], []
        for line, lineno in zip(lines, linenos, strict=True):
            try:
                events.event_id_of(events.parse_json(self._original(line, lineno)), line)
            except InvalidEvent as exc:
                self.skip(lineno, exc.reason)
                continue
            keep.append(line)
            kept_linenos.append(lineno)
        return await self.deliver(keep, kept_linenos, True) if keep else 0

    def _original(self, line: bytes, lineno: int) -> bytes:
        """The file's text of a line as sent: without the id the reader appended to it."""
        tail = b"%b%d:" % (self.id_member, lineno)
        at = len(line) - len(tail) - CHAIN_LEN - 2
        return line[:at] + b"}" if at > 0 and line[at:at + len(tail)] == tail else line

    def skip(self, lineno: int, reason: str) -> None:
        """Count an invalid line (not sent), keeping the first few reasons."""
        self.report.skipped_invalid += 1
        if len(self.report.invalid_lines) < MAX_INVALID_KEPT:
            self.report.invalid_lines.append((lineno, reason))

    def refuse(self, lines: list[bytes], linenos: list[int], reason: str) -> int:
        n = len(lines)
        self.report.failed += n
        where = f"line {linenos[0]}" if n == 1 else f"lines {linenos[0]}-{linenos[-1]}"
        self.error(f"{where}: {reason}")
        return n




def _id_lines(segment: list[bytes], lineno: int, chain: bytes, member: bytes,
              ) -> tuple[list[bytes], bytes, bytes] | None:
    """The lines of `segment` (raw, from a file, none its first line) with their sender ids
    appended, as the reader's per-line loop writes them when it trusts the receiver; with the
    chain after the last line and the one before it. None unless every line is plain: `{` first,
    `}` right before its newline (so the line is its own stripped text and bare line), no CR, no
    backslash, no `"eventId"`. `lineno`, `chain`: before the segment.
    """
    if _fastlines is not None:  # the same checks and loop in C (BLAKE2b there too), 2.3x faster
        return _fastlines.id_lines(segment, lineno, chain, member)
    text = b"".join(segment)
    n = len(segment)
    if (text[:1] != b"{" or text[-1:] != b"\n" or text.count(b"}\n") != n or text.count(b"\n{") != n - 1
            or b"\r" in text or BACKSLASH in text or b'"eventId"' in text):
        return None
    bare = text.split(b"\n")
    bare.pop()  # the empty text after the last newline
    copy = CHAIN_SEED.copy
    out: list[bytes] = []
    append = out.append
    before = chain
    form = b"%b" + member + b'%d:%b"}'
    for line in bare:  # identity.chain_next and the per-line loop's format, inlined
        h = copy()
        h.update(chain + line)
        before, chain = chain, h.digest()
        lineno += 1
        append(form % (line[:-1], lineno, hexlify(chain)))
    return out, chain, before


def _position_after(raw: bytes, offset: int, lineno: int, chain: bytes, before: bytes) -> Position:
    """The resume point after line `lineno` (`raw`, ending at `offset`, `chain` through it,
    `before` the chain before it).

    A line without a newline can only be the last one; it is sent but the resume point stays at
    its start, so it is read again (same id, line endings aside) once it is complete.
    """
    if raw[-1:] == b"\n":
        return Position(offset, lineno, chain)
    return Position(offset - len(raw), lineno - 1, before)


def _delay(attempt: int, retry_after: str | None) -> float:
    """Full-jitter exponential backoff, or the receiver's Retry-After (seconds) when given."""
    asked = _retry_after(retry_after)
    if asked is not None:
        return asked
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))


def _retry_after(value: str | None) -> float | None:
    """A Retry-After in seconds (capped), or None when absent or an HTTP date (our own backoff then)."""
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), RETRY_AFTER_CAP)
    except ValueError:
        return None


def _accepted(payload: bytes) -> int | None:
    try:
        value = orjson.loads(payload).get("accepted")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def _message(payload: bytes) -> str:
    """The receiver's human sentence from an error body (JSON `error`/`message`, else the text)."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        for key in ("error", "message", "detail", "reason"):
            if isinstance(obj.get(key), str):
                return obj[key]
    text = payload.decode("utf-8", "replace").strip()
    return text[:200] or "(no message)"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        err = exc.os_error
        if isinstance(err, socket.gaierror):  # getaddrinfo's codes are not errnos ("unknown error -2")
            return f"cannot resolve the host {exc.host!r}: {err.strerror or err}"
        if err is not None and err.errno:
            return os.strerror(err.errno).lower()  # "connection refused", not asyncio's wording
        return str(err or exc)
    return str(exc) or type(exc).__name__
