"""Turning a request body into journal lines: bytes in, lines and a count out (design section 7).

Pure: no HTTP, no files. `evtool serve` calls it for `POST /liveEvent` and maps its errors to
statuses (`BodyMalformed` 400, `BodyInvalid` 422, `BodyTooLong` 413). Every accepted line is one
event on one line, with an `eventId`: the client's text is kept byte for byte where it already
has one, and an id is added textually where it has none (`KEY#n` under an Idempotency-Key, else
a receiver id), so the client's number text survives. An event without a time gets the time the
request was received (`"timestamp"`, see eventtime), added the same way.
"""

from __future__ import annotations

import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import blake2b
from operator import attrgetter
from typing import Annotated, Literal

import msgspec
import orjson

from . import events, eventtime, native
from .errors import InvalidEvent, MalformedJSON
from .mapping import Mapping

# The keys of an event as `evtool send` writes it (eventtime's plain keys): no alias, no other
# time field, so the common shape's remaining checks are a few type and range tests.
_PLAIN_KEYS = frozenset({"userId", "name", "value", "eventId", eventtime.STAMP_FIELD})
_ORJSON_POS = re.compile(r": line 1 column (\d+) \(char \d+\)$")


class _PlainEvent(msgspec.Struct, forbid_unknown_fields=True):
    """The sender's shape, as msgspec decodes a whole NDJSON body of it at once (`Intake._bulk`):
    nothing but these members, each of the type and within the bounds the per-line path checks.
    Values stop at int64 (orjson turns integers past uint64 into floats; those take the per-line
    path), which is far below events.MAX_INT."""

    userId: Annotated[str, msgspec.Meta(min_length=1, max_length=events.MAX_USER_ID)]
    name: Literal["add_revenue", "subtract_revenue"]
    value: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    eventId: Annotated[str, msgspec.Meta(min_length=1, max_length=events.MAX_EVENT_ID)] | msgspec.UnsetType
    eventId = msgspec.UNSET


_PLAIN_LINES = msgspec.json.Decoder(_PlainEvent)
_fastlines = native.loops  # _bulk's checks in C (plain_body), where they were built
_IDS = attrgetter("eventId")


class BodyRefused(Exception):
    """A body that cannot be accepted, with the sentence that says why; nothing of it is stored."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BodyMalformed(BodyRefused):
    """Not JSON, or an unusable Idempotency-Key."""


class BodyInvalid(BodyRefused):
    """JSON, but not events."""


class BodyTooLong(BodyRefused):
    """An event (line or object) longer than the limit."""


@dataclass(frozen=True, slots=True)
class Lines:
    """What a body becomes: complete journal lines, how many events they are, and the id of a
    single object (None for a bulk)."""

    data: bytes
    count: int
    event_id: str | None = None


class ReceiverIds:
    """A maker of receiver ids: "~" + a per-process prefix + "-" + a counter, unique by
    construction. Called for one id; `members` makes a whole body's at once (`Intake._bulk`)."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = f"{events.RECEIVER_ID_PREFIX}{os.urandom(6).hex() if prefix is None else prefix}-"
        if orjson.dumps(self.prefix)[1:-1] != self.prefix.encode():
            raise ValueError("a receiver id prefix must need no JSON escape")
        self._next = 1

    def __call__(self) -> str:
        n = self._next
        self._next = n + 1
        return f"{self.prefix}{n}"

    def members(self, count: int, after: bytes) -> list[bytes]:
        """The next `count` ids, each as the text `,"eventId":"<id>"` followed by `after`: what
        `count` calls would give, written as the per-line path writes them."""
        n = self._next
        self._next = n + count
        member = b',"eventId":"' + self.prefix.encode() + b'%d"' + after
        return list(map(member.__mod__, range(n, n + count)))


def receiver_ids() -> ReceiverIds:
    """A maker of receiver ids with a random per-process prefix."""
    return ReceiverIds()


class KeyReused(BodyRefused):
    """An Idempotency-Key seen before with another body (422, as Stripe and the IETF draft do)."""


class KeyWindow:
    """What each recent Idempotency-Key came with: the digest of its request body.

    In memory, for the last `limit` keys seen within `ttl` seconds (100,000 keys, 24 h by
    default: a few MB); a key reused with another body inside that window is refused. Beyond it
    (or across receivers, or after a restart) the processor's content check is the backstop:
    the second event is recorded as a reject, never dropped silently.
    """

    def __init__(self, limit: int = 100_000, ttl: float = 24 * 3600.0) -> None:
        self.limit, self.ttl = limit, ttl
        self._seen: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    def claim(self, key: str, body: bytes, now: float | None = None) -> bytes | None:
        """Remember `key` with this body; raise KeyReused if it came with another body.

        Returns the digest recorded when the key is new here (give it to `forget` if the request
        then fails, so a corrected retry is not refused), else None.
        """
        now = time.monotonic() if now is None else now
        seen = self._seen
        while seen and (len(seen) > self.limit or next(iter(seen.values()))[1] < now - self.ttl):
            seen.popitem(last=False)
        digest = blake2b(body, digest_size=16).digest()
        had = seen.get(key)
        if had is not None:
            if had[0] != digest:
                raise KeyReused(f"Idempotency-Key {key[:100]!r} was already used with a different request "
                                "body; use a new key for a new request (a retry must send the same body)")
            return None
        seen[key] = (digest, now)
        return digest

    def forget(self, key: str, digest: bytes) -> None:
        if self._seen.get(key, (None,))[0] == digest:
            del self._seen[key]


def check_key(key: str) -> None:
    """Refuse an Idempotency-Key that cannot be an event id."""
    try:
        events.check_event_id(key)
    except InvalidEvent as exc:
        raise BodyMalformed(f"Idempotency-Key header: {exc.reason}") from None


@dataclass(frozen=True)
class Intake:
    """The rules for one server: the per-event limit, strictness and where fresh ids come from."""

    max_line: int
    strict: bool
    fresh_id: Callable[[], str]
    clock: Callable[[], str] = eventtime.stamp  # the receive time written into untimed events
    # A declared mapping: events are checked as what they stand for under it (mapping.view);
    # the journal still gets the client's text, with only eventId / the receive time added.
    mapping: Mapping | None = None
    # Whole bodies of the sender's shape are checked at once (`_bulk`, and `_plain_one` for one
    # JSON object); False: line by line and object by object only (the tests compare the two).
    bulk: bool = True

    def ndjson(self, body: bytes, key: str | None = None) -> Lines:
        """Validate an NDJSON body: one event per line, blank lines ignored.

        With an Idempotency-Key, an event without an eventId gets `KEY#i`, i being its 1-based
        position among the request's events (blank lines are not counted), so it equals the line
        number when the body has no blank lines.
        """
        max_line = self.max_line
        parse, loads, deep_len = events.parse_json, orjson.loads, events.DEEP_LEN
        validate, event_id_of = events.validate, events.event_id_of
        common_id, uncommon = events.common_event_id, events.UNCOMMON
        strict, mapping = self.strict, self.mapping
        fast = mapping is None  # the inlined path below is for the plain shape: never under a mapping
        max_value, max_user, max_id = events.MAX_INT, events.MAX_USER_ID, events.MAX_EVENT_ID
        reserved, fast_minute, plain_keys = events.RECEIVER_ID_PREFIX, eventtime.fast_minute, _PLAIN_KEYS
        if b"\r" in body:  # a CR in valid NDJSON is whitespace; only a line-ending one is dropped
            body = body.replace(b"\r\n", b"\n")
            if body.endswith(b"\r"):
                body = body[:-1]
        elif fast and self.bulk:
            lines = self._bulk(body, key)
            if lines is not None:
                return lines
        out: list[bytes] = []
        append = out.append
        has_time = eventtime.has_time
        received: str | None = None
        stamp = b""  # `,"timestamp":"<received>"`, made once per request
        n = 0
        for lineno, raw in enumerate(body.split(b"\n"), 1):
            if not raw or raw.isspace():
                continue
            if len(raw) > max_line:
                raise BodyTooLong(f"line {lineno} is longer than the limit of {max_line} bytes")
            n += 1
            try:
                obj = loads(raw)
            except orjson.JSONDecodeError:
                obj = None
            # The sender's shape, inlined (it runs once per event): only the plain keys, an
            # integer value, a plain userId and id, no time or a canonical one. A strict subset
            # of events.common_shape; it goes out as the common shape does, below.
            common = False
            if fast and type(obj) is dict and len(raw) <= deep_len and obj.keys() <= plain_keys:
                user, value, name = obj.get("userId"), obj.get("value"), obj.get("name")
                event_id = obj.get("eventId", uncommon)  # absent: uncommon; null: the general path
                if (type(value) is int and 0 <= value < max_value and type(user) is str
                        and 0 < len(user) <= max_user and "\x00" not in user
                        and (name == "add_revenue" or name == "subtract_revenue")
                        and (event_id is uncommon or (
                            type(event_id) is str and 0 < len(event_id) <= max_id
                            and event_id[0] != reserved and event_id.isprintable()))
                        and ("timestamp" not in obj or fast_minute(obj) is not None)):
                    common, event_id = True, None if event_id is uncommon else event_id
            if not common:
                try:
                    # Validate once, build nothing: a line of the common shape (events.common_shape,
                    # the form nearly every client sends) is checked on orjson's dict and goes out as
                    # the client's bytes, with at most an id and the receive time appended as text.
                    if obj is None:  # not JSON (or `null`): parse says what is wrong
                        obj = parse(raw)  # raises MalformedJSON with the shared wording
                    if len(raw) > deep_len:
                        parse(raw)  # the depth rule, for the few lines long enough to break it
                    # under a mapping, the mapped fields decide: the common shape alone is not enough
                    event_id = common_id(obj, strict) if mapping is None else uncommon
                    common = event_id is not uncommon and (event_id is not None or "eventId" not in obj)
                    if not common:
                        view, text = (obj, raw) if mapping is None else (mapping.view(obj, raw, strict), None)
                        have_id = event_id_of(view, text, strict=strict) is not None
                        timed = has_time(view)
                        if have_id and timed:
                            append(raw)  # the client's bytes, unchanged
                            continue
                        event = validate(view, text, strict=strict)
                except MalformedJSON as exc:
                    raise BodyMalformed(f"line {lineno}: {_line_reason(exc)}") from None
                except InvalidEvent as exc:
                    raise BodyInvalid(f"line {lineno}: {exc.reason}") from None
                if not common:
                    event_id = None if have_id else _key_id(key, n) if key is not None else self.fresh_id()
                    if not timed and received is None:
                        received = self.clock()
                    append(_with_id(raw, obj, event, event_id, None if timed else received, mapping, strict))
                    continue
            # The common shape: its only possible time field is a canonical `timestamp`.
            if "timestamp" in obj:
                if event_id is not None:
                    append(raw)  # the client's bytes, unchanged
                    continue
                tail = b"}"
            else:
                if not stamp:
                    received = self.clock()
                    stamp = b',"' + eventtime.STAMP_FIELD.encode() + b'":' + orjson.dumps(received)
                tail = stamp + b"}"
            if event_id is None:
                made = _key_id(key, n) if key is not None else self.fresh_id()
                tail = b',"eventId":' + orjson.dumps(made) + tail
            append(raw.rstrip()[:-1] + tail)
        append(b"")
        return Lines(b"\n".join(out), n)

    def _bulk(self, body: bytes, key: str | None) -> Lines | None:
        """A body whose every line is the sender's shape, checked in a few passes over the whole
        body instead of line by line; None for anything else (then `ndjson`'s loop decides).

        Accepts a subset of what the per-line fast path accepts, and writes exactly what it would:
        no line may have a time (each gets the receive stamp), and either every line has an
        eventId or none has. ASCII without escapes or DEL, so each decoded string is the line's
        text and printable (JSON has no raw control characters); every line ends `}` right before
        its newline (so appending is one split and one join), and no line is blank.
        """
        if not body:
            return None
        if body[-1:] != b"\n":
            body += b"\n"
        shape = self._shape(body)
        if shape is None:
            return None
        n, missing = shape
        if missing == n and key is not None:
            try:
                _key_id(key, n)  # the longest: when it is too long, the per-line path says for which line
            except BodyMalformed:
                return None
        received = self.clock()
        stamp_end = b',"' + eventtime.STAMP_FIELD.encode() + b'":' + orjson.dumps(received) + b"}\n"
        parts = body.split(b"}\n")  # n lines without their `}`, then b""
        if missing == 0:
            return Lines(stamp_end.join(parts), n)
        many = getattr(self.fresh_id, "members", None)
        if key is not None or many is None:
            made = [_key_id(key, i) for i in range(1, n + 1)] if key is not None else [
                self.fresh_id() for _ in range(n)]
            tails = [b',"eventId":' + orjson.dumps(m) + stamp_end for m in made]
        else:
            tails = many(n, stamp_end)
        out: list[bytes] = [b""] * (2 * n)
        out[0::2] = parts[:n]
        out[1::2] = tails
        return Lines(b"".join(out), n)

    def _shape(self, body: bytes) -> tuple[int, int] | None:
        """(lines, lines without an eventId) of a body (ending with a newline) whose every line
        is the sender's shape as `_bulk` takes it, else None: in C where it was built (one pass,
        a stricter subset of `_plain_shape`'s checks), else in Python."""
        if _fastlines is None:
            return self._plain_shape(body)
        shape = _fastlines.plain_body(body, self.max_line)
        if shape is None:
            return None
        n, with_ids = shape
        return n, 0 if with_ids else n

    def _plain_shape(self, body: bytes) -> tuple[int, int] | None:
        """_bulk's checks in Python (where the C ones were not built): (lines, lines without an
        eventId) of a body (ending with a newline) of the sender's shape, else None."""
        if not body.isascii() or b"\\" in body or b"\x7f" in body:
            return None
        n = body.count(b"\n")
        if body.count(b"}\n") != n or b"\n\n" in body or body[:1] == b"\n":
            return None
        if len(body) > self.max_line and max(map(len, body.split(b"\n"))) > self.max_line:
            return None  # the per-line path names the line that is too long
        try:
            events_ = _PLAIN_LINES.decode_lines(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        if len(events_) != n:
            return None
        # Every string is printable: escape-free ASCII JSON has no raw control character below
        # 0x20 (msgspec refuses them as orjson does) and DEL was excluded above. No receiver id (`~`).
        ids = list(map(_IDS, events_))
        missing = ids.count(msgspec.UNSET)
        if missing == 0:
            if ("\n" + "\n".join(ids)).find("\n" + events.RECEIVER_ID_PREFIX) >= 0:
                return None
        elif missing != n:
            return None  # some with an id, some without: line by line
        return n, missing

    def json(self, body: bytes, key: str | None = None) -> Lines:
        """Validate an application/json body: one object, or an array of objects (a bulk)."""
        if self.mapping is None and self.bulk and body[:1] == b"{" and body[-1:] == b"}":
            lines = self._plain_one(body, key)
            if lines is not None:
                return lines
        try:
            obj = events.parse_json(body, check_depth=False)  # checked per event below
        except MalformedJSON as exc:
            raise BodyMalformed(exc.reason) from None
        if isinstance(obj, dict):
            if events.too_deep(body):
                raise BodyMalformed(events.DEEP_REASON)
            return self._single(body, obj, key)
        if not isinstance(obj, list):
            raise BodyInvalid("the body must be one event object or an array of event objects")
        spans: list[tuple[int, int] | None] | None = None
        out: list[bytes] = []
        mapping = self.mapping
        mapped_spans: list[tuple[int, int] | None] = []  # filled once, when a mapped amount needs it
        for i, el in enumerate(obj, 1):
            try:
                if mapping is not None:
                    event, timed = self._mapped(body, el, i, mapped_spans)
                elif isinstance(el, dict) and isinstance(el.get("value"), float):
                    # orjson gave a float: take the exact number from the element's text (the
                    # body is scanned once, without recursion, whatever its nesting)
                    if spans is None:
                        spans = events.object_spans(body)
                    span = spans[i - 1]
                    assert span is not None
                    el["value"] = events.exact_value(body[span[0]:span[1]], el["value"])
                if mapping is None:
                    event = events.validate(el, strict=self.strict)
                    timed = event.time is not None or eventtime.has_time(el)
            except MalformedJSON as exc:
                raise BodyMalformed(f"element {i}: {exc.reason}") from None
            except InvalidEvent as exc:
                raise BodyInvalid(f"element {i}: {exc.reason}") from None
            if event.event_id is None:
                el["eventId"] = _key_id(key, i) if key is not None else self.fresh_id()
            if not timed:
                el[eventtime.STAMP_FIELD] = self.clock()
            if mapping is None:
                el["value"] = events.value_fragment(event.value)
            else:
                mapping.write_exact(el, events.value_fragment(event.value), self.strict)
            try:
                line = orjson.dumps(el)
            except orjson.JSONEncodeError:  # orjson writes 254 levels at most: deeper than MAX_DEPTH
                raise BodyMalformed(f"element {i}: {events.DEEP_REASON}") from None
            if len(line) > self.max_line:
                raise BodyTooLong(f"element {i} is longer than the limit of {self.max_line} bytes")
            if events.too_deep(line):
                raise BodyMalformed(f"element {i}: {events.DEEP_REASON}")
            out.append(line)
        out.append(b"")
        return Lines(b"\n".join(out), len(obj))

    def _plain_one(self, body: bytes, key: str | None) -> Lines | None:
        """One object of the sender's shape, on one line (what the original clients post), checked
        as `_bulk` checks a line; None for anything else (then `_single` decides). Writes exactly
        what `_single` writes: the client's bytes, its id (else the key, else a receiver id) and
        the receive time appended as text."""
        shape = self._shape(body + b"\n")
        if shape is None:
            return None
        received = b',"' + eventtime.STAMP_FIELD.encode() + b'":' + orjson.dumps(self.clock()) + b"}\n"
        if shape[1] == 0:  # it has an eventId: the client's, in the answer
            event_id = orjson.loads(body)["eventId"]
            return Lines(body[:-1] + received, 1, event_id)
        event_id = key or self.fresh_id()
        return Lines(body[:-1] + b',"eventId":' + orjson.dumps(event_id) + received, 1, event_id)

    def _mapped(self, body: bytes, el: object, i: int, spans: list) -> tuple[events.Event, bool]:
        """A bulk element under the mapping: its event, and whether it carries a time."""
        assert self.mapping is not None
        text = None
        if isinstance(el, dict) and self.mapping.float_values(el, self.strict):
            if not spans:  # the exact amount is in the element's text: scan the body once
                spans.extend(events.object_spans(body))
            span = spans[i - 1]
            assert span is not None
            text = body[span[0]:span[1]]
        view = self.mapping.view(el, text, self.strict)
        return events.validate(view, strict=self.strict), eventtime.STAMP_FIELD in view

    def _single(self, body: bytes, obj: dict, key: str | None) -> Lines:
        """One JSON object: the original client's request."""
        if len(body) > self.max_line:
            raise BodyTooLong(f"the event is longer than the limit of {self.max_line} bytes")
        mapping = self.mapping
        common = events.common_event_id(obj, self.strict) if mapping is None else events.UNCOMMON
        if common is not events.UNCOMMON and (common is not None or "eventId" not in obj):
            # the common shape (see ndjson): no Event built, members appended as text
            raw = _one_line(body)
            if common is not None and "timestamp" in obj:
                return Lines(raw + b"\n", 1, common)
            event_id = common or key or self.fresh_id()
            tail = b"}\n" if "timestamp" in obj else (
                b',"' + eventtime.STAMP_FIELD.encode() + b'":' + orjson.dumps(self.clock()) + b"}\n")
            if common is None:
                tail = b',"eventId":' + orjson.dumps(event_id) + tail
            return Lines(raw.rstrip()[:-1] + tail, 1, event_id)
        try:
            view = obj if mapping is None else mapping.view(obj, body, self.strict)
            event = events.validate(view, body if mapping is None else None, strict=self.strict)
        except MalformedJSON as exc:
            raise BodyMalformed(exc.reason) from None
        except InvalidEvent as exc:
            raise BodyInvalid(exc.reason) from None
        event_id = event.event_id or key or self.fresh_id()
        raw = _one_line(body)
        timed = eventtime.has_time(view)
        if event.event_id is not None and timed:
            line = raw
        else:
            line = _with_id(raw, obj, event, None if event.event_id else event_id,
                            None if timed else self.clock(), mapping, self.strict)
        return Lines(line + b"\n", 1, event_id)


def _one_line(body: bytes) -> bytes:
    """A pretty-printed object as one line: raw CR/LF in valid JSON can only be whitespace
    between tokens, so replacing them keeps every field's text exactly."""
    raw = body.strip()
    if b"\n" in raw or b"\r" in raw:
        raw = raw.replace(b"\r", b" ").replace(b"\n", b" ")
    return raw


def _key_id(key: str, n: int) -> str:
    """The id of the n-th (1-based) event of a bulk request that carries an Idempotency-Key."""
    event_id = f"{key}#{n}"
    try:
        return events.check_event_id(event_id)
    except InvalidEvent as exc:
        raise BodyMalformed(f"Idempotency-Key header: id {event_id[:40]!r}...: {exc.reason}") from None


def _line_reason(exc: InvalidEvent) -> str:
    """orjson's reason for one NDJSON line, without its "line 1" (the request's line is named)."""
    return _ORJSON_POS.sub(r" at column \1", exc.reason)


def _with_id(raw: bytes, obj: dict, event: events.Event, event_id: str | None,
             received: str | None = None, mapping: Mapping | None = None, strict: bool = False) -> bytes:
    """`raw` (one line) with `"eventId"` and/or the receive time added, other text unchanged."""
    extra = {}
    if event_id is not None:
        extra["eventId"] = event_id
    if received is not None:
        extra[eventtime.STAMP_FIELD] = received
    if event_id is not None and "eventId" in obj:  # present but null: rewrite, not a second key
        obj.update(extra)
        if mapping is None:
            obj["value"] = events.value_fragment(event.value)
        else:  # the amount stays where the client put it, with its exact digits
            mapping.write_exact(obj, events.value_fragment(event.value), strict)
        return orjson.dumps(obj)
    raw = raw.rstrip()
    return raw[:-1] + b"".join(b',"' + k.encode() + b'":' + orjson.dumps(v) for k, v in extra.items()) + b"}"
