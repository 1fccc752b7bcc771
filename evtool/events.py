"""Events: the one validator shared by sender, receiver and processor (design section 2).

A line is parsed with orjson; numbers that orjson could only give as a float (decimals, and
integers too large for 64 bits) are re-read from the text with the standard library as exact
`Decimal`s, so a value is never rounded. Values with more than `MAX_SCALE` digits after the
point, or of `MAX_ABS` or more, are rejected rather than rounded.

Normalization (on unless `strict=True`), only where it cannot change meaning:

- `user_id` is an alias of `userId`; an object with both, different, is rejected as ambiguous;
- a string `value` that is the plain text of a non-negative decimal number ("100", "12.50":
  digits, at most one point with digits on both sides, no leading zeros, no sign, exponent or
  spaces) is read as exactly that number; any other string is rejected with the reason.

It lives only here, so sender, receiver and processor give every line the same verdict.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow

import orjson

from . import eventtime
from .errors import InvalidEvent, MalformedJSON

NAMES = ("add_revenue", "subtract_revenue")
MAX_USER_ID = 256
MAX_EVENT_ID = 128
MAX_SCALE = 18  # digits after the decimal point that are kept exactly
MAX_ABS = Decimal(10) ** 20
MAX_INT = 10**20  # an integer value must be below this (MAX_ABS as an int: no Decimal compare)
# Arrays and objects nested in an event, the event itself counted: below orjson's writing limit
# (254), as the receiver re-serialises some events.
MAX_DEPTH = 200
DEEP_LEN = 2 * MAX_DEPTH  # a text this short cannot nest deeper
DEEP_REASON = f"malformed JSON: nested more than {MAX_DEPTH} levels deep"
# Ids that start with this are made by `evtool serve`; clients may not send them.
RECEIVER_ID_PREFIX = "~"

Value = int | Decimal

# The context every sum of money is computed in (never Python's default 28 digits, which rounds
# a sum of two valid values): a value has at most 20 + 18 = 38 digits, a sum of up to 10^60 of
# them fits in 100; Inexact is trapped so a rounding can never pass silently.
MONEY = Context(prec=100, Emax=999_999, Emin=-999_999, traps=[Inexact, InvalidOperation, Overflow])
_I64 = 2**63  # orjson writes ints in [-2^63, 2^64) only


def money_add(a: Value, b: Value) -> Value:
    """a + b, exactly: ints stay ints, anything with a Decimal is added in the MONEY context."""
    if type(a) is int and type(b) is int:
        return a + b
    return MONEY.add(a, b)


@dataclass(slots=True)
class Event:
    """A valid event. `value` is exact: an int, or a Decimal when it has a fraction."""

    user_id: str
    name: str
    value: Value
    event_id: str | None
    obj: dict
    time: datetime | None = None  # event time, UTC (see eventtime); None when the event has none


_VALUE_TEXT = re.compile(rb'"value"\s*:\s*(-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)')
# JSON's tokens that matter for finding a top-level member: strings (escapes kept), brackets,
# colons, commas and numbers. Literals and whitespace are skipped. Used on text orjson accepted.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|-?[0-9][-+.0-9eE]*')


def _is_value_key(token: bytes) -> bool:
    return token == b'"value"' or (b"\\" in token and json.loads(token) == "value")


def _value_text(raw: bytes) -> bytes | None:
    """The number text of the top-level object's last `value` member (as every JSON parser
    here reads duplicates: the last wins), or None when it is not a number.

    A scan of tokens with a depth counter: no recursion, so any nesting orjson accepts is read.
    """
    depth = 0
    key: bytes | None = None  # the last string at depth 1
    pending = False  # after "key:" at depth 1, before its value
    found: bytes | None = None
    for m in _TOKENS.finditer(raw):
        tok = m.group()
        c = tok[:1]
        if c == b'"':
            if depth == 1:
                if pending:
                    pending = False
                    if _is_value_key(key):  # type: ignore[arg-type]
                        found = None
                else:
                    key = tok
        elif c == b"{" or c == b"[":
            if pending:
                pending = False
                if _is_value_key(key):  # type: ignore[arg-type]
                    found = None
            depth += 1
        elif c == b"}" or c == b"]" or c == b",":
            if depth == 1 and pending:  # a literal (true, false, null) was the value
                pending = False
                if _is_value_key(key):  # type: ignore[arg-type]
                    found = None
            if c != b",":
                depth -= 1
        elif c == b":":
            if depth == 1:
                pending = True
        elif depth == 1 and pending:  # a number
            pending = False
            if _is_value_key(key):  # type: ignore[arg-type]
                found = tok
    return found


def object_spans(body: bytes) -> list[tuple[int, int] | None]:
    """For a JSON array (text orjson accepted): each element's [start, end) when it is an
    object, else None. Non-recursive, like `_value_text`."""
    spans: list[tuple[int, int] | None] = []
    depth = 0
    start = 0
    for m in _TOKENS.finditer(body):
        c = m.group()[:1]
        if c == b"{" or c == b"[":
            depth += 1
            if depth == 2:
                spans.append(None)
                if c == b"{":
                    start = m.start()
        elif c == b"}" or c == b"]":
            depth -= 1
            if depth == 1 and c == b"}":
                spans[-1] = (start, m.end())
        elif depth == 1 and c != b"," and c != b":":  # a string or number element
            spans.append(None)
    return spans


def exact_value(text: bytes | str, parsed: float) -> Decimal:
    """The exact Decimal of an object's `value`, from its JSON text (orjson gave `parsed`).

    Fast path: text without a backslash cannot hide a key behind an escape or a quote inside a
    string, so its one `"value"` token is the top-level key. Anything else is scanned token by
    token (`_value_text`). Both agree with json.loads(parse_float=Decimal); a property test pins it.
    """
    raw = text.encode() if isinstance(text, str) else text
    if b"\\" not in raw and raw.count(b'"value"') == 1:
        found = _VALUE_TEXT.findall(raw)
        if len(found) == 1:
            return Decimal(found[0].decode())
    number = _value_text(raw)
    if number is None:  # pragma: no cover - orjson read a number there
        raise MalformedJSON("malformed JSON: value is not a number")
    return Decimal(number.decode())


def check_decimal(d: Decimal) -> Value:
    """The value of a finite Decimal within the limits, exactly: an int when it is whole, else
    the Decimal without trailing zeros. Context-free: no step here can round."""
    if not d.is_finite():
        raise InvalidEvent("value must be a finite number")
    if d < 0:  # comparisons are exact, whatever the context
        raise InvalidEvent("value must be >= 0")
    if d >= MAX_ABS:
        raise InvalidEvent(f"value must be less than 1e{MAX_ABS.adjusted()}")
    _, digits, exponent = d.as_tuple()
    assert isinstance(exponent, int)
    if not any(digits):
        return 0
    zeros = len(digits) - len(bytes(digits).rstrip(b"\0"))
    exponent += zeros
    if exponent < -MAX_SCALE:
        raise InvalidEvent(
            f"value has more than {MAX_SCALE} digits after the point and cannot be kept exactly"
        )
    if exponent >= 0:
        return int(d)
    return Decimal((0, digits[:len(digits) - zeros], exponent))


def depth(raw: bytes) -> int:
    """How deep arrays and objects nest in a JSON text orjson accepted (non-recursive)."""
    deepest = level = 0
    for m in _TOKENS.finditer(raw):
        c = m.group()[:1]
        if c == b"{" or c == b"[":
            level += 1
            if level > deepest:
                deepest = level
        elif c == b"}" or c == b"]":
            level -= 1
    return deepest


def too_deep(raw: bytes | str) -> bool:
    """Whether an event's text nests deeper than MAX_DEPTH. Each level takes two bytes and an
    opening bracket, so only a text long enough, with enough brackets, is scanned: for a common
    event the cost is one length comparison."""
    if len(raw) <= DEEP_LEN:
        return False
    data = raw.encode() if isinstance(raw, str) else raw
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return False
    return depth(data) > MAX_DEPTH


def parse_json(raw: bytes | str, *, check_depth: bool = True) -> object:
    """Parse one JSON text, raising MalformedJSON with a short reason (also for an event nested
    deeper than MAX_DEPTH: the same verdict in every request form and in the processor)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedJSON(f"malformed JSON: {exc}") from None
    if check_depth and too_deep(raw):
        raise MalformedJSON(DEEP_REASON)
    return obj


_PLAIN_DECIMAL = re.compile(r"(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")
USER_ID_ALIAS = "user_id"


def _string_value(text: str) -> Decimal:
    """The exact number a plain decimal string stands for; InvalidEvent for anything else."""
    if len(text) > 64:
        raise InvalidEvent("value is a string of more than 64 characters")
    if _PLAIN_DECIMAL.fullmatch(text):
        return Decimal(text)
    shown = text if len(text) <= 40 else text[:40] + "..."
    raise InvalidEvent(
        f"value {json.dumps(shown)} is not a plain decimal number: a string value must be digits "
        "with at most one point, without sign, exponent, spaces or leading zeros"
    )


def common_shape(obj: object, strict: bool = False) -> bool:
    """Whether `obj` is an event of the common shape, valid without further checks but its id.

    An integer value, a plain userId, a known name, and (unless strict) no `user_id` alias,
    which may disagree with `userId`. `validate` accepts a superset of it. The processor's hot
    loop (parser.parse) inlines the same test; a test pins the two together.
    """
    if type(obj) is not dict:
        return False
    user_id = obj.get("userId")
    name = obj.get("name")
    value = obj.get("value")
    return (type(value) is int and 0 <= value < MAX_INT and type(user_id) is str
            and 0 < len(user_id) <= MAX_USER_ID and "\x00" not in user_id
            and (name == "add_revenue" or name == "subtract_revenue")
            and (strict or USER_ID_ALIAS not in obj) and eventtime.fast_minute(obj) is not None)


UNCOMMON = "\0uncommon"  # common_event_id's answer for anything else (no eventId can hold a NUL)


def common_event_id(obj: object, strict: bool = False, allow_reserved: bool = False) -> str | None:
    """The eventId (None: no id, or null) of a valid event of the common shape whose id, if any,
    is acceptable; UNCOMMON for anything else, which `validate` decides. Builds nothing."""
    if common_shape(obj, strict):
        event_id = obj.get("eventId")  # type: ignore[union-attr]
        if event_id is None or (
            type(event_id) is str and 0 < len(event_id) <= MAX_EVENT_ID and event_id.isprintable()
            and (allow_reserved or event_id[0] != RECEIVER_ID_PREFIX)
        ):
            return event_id
    return UNCOMMON


def event_id_of(obj: object, raw: bytes | str | None = None, *, allow_reserved: bool = False,
                strict: bool = False) -> str | None:
    """Validate like `validate`, but return only the eventId (None when there is none).

    For the sender's and receiver's per-line loops: the common shape is checked in a few
    operations and no Event is built.
    """
    event_id = common_event_id(obj, strict, allow_reserved)
    if event_id is not UNCOMMON:
        return event_id
    return validate(obj, raw, allow_reserved=allow_reserved, strict=strict).event_id


def validate(obj: object, raw: bytes | str | None = None, *, allow_reserved: bool = False,
             strict: bool = False) -> Event:
    """Check a parsed object against the event rules and return the Event.

    `raw` is the JSON text `obj` came from; it is needed only to read a decimal value exactly.
    `allow_reserved` lets receiver-made ids through (the processor reads them from journals).
    `strict` turns normalization off (see the module docstring): no `user_id` alias, no
    string values.
    """
    if not isinstance(obj, dict):
        raise InvalidEvent("an event must be a JSON object")
    user_id = obj.get("userId")
    if not strict and USER_ID_ALIAS in obj:
        alias = obj[USER_ID_ALIAS]
        if "userId" not in obj:
            user_id = alias
        elif type(alias) is not type(user_id) or alias != user_id:
            raise InvalidEvent("ambiguous user: userId and user_id are both given and differ")
    if not isinstance(user_id, str) or not user_id:
        if strict and "userId" not in obj and USER_ID_ALIAS in obj:
            raise InvalidEvent("userId is missing (user_id is read as userId only when not strict)")
        raise InvalidEvent("userId must be a non-empty string")
    if len(user_id) > MAX_USER_ID:
        raise InvalidEvent(f"userId is longer than {MAX_USER_ID} characters")
    if "\x00" in user_id:
        raise InvalidEvent("userId may not contain NUL characters")
    name = obj.get("name")
    if name not in NAMES:
        raise InvalidEvent("name must be add_revenue or subtract_revenue")
    if "value" not in obj:
        raise InvalidEvent("value is missing")
    value = obj["value"]
    if isinstance(value, str) and not strict:
        value = _string_value(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        if isinstance(value, str):
            raise InvalidEvent("value must be a number (a numeric string is read only when not strict)")
        raise InvalidEvent("value must be a number")
    if isinstance(value, int):
        if value < 0:
            raise InvalidEvent("value must be >= 0")
        if value >= MAX_ABS:
            raise InvalidEvent(f"value must be less than 1e{MAX_ABS.adjusted()}")
    else:
        if isinstance(value, float):
            if raw is None:
                raise InvalidEvent("value must be given as JSON text to be read exactly")
            value = exact_value(raw, value)
        value = check_decimal(value)
    event_id = obj.get("eventId")
    if event_id is not None:
        check_event_id(event_id, allow_reserved=allow_reserved)
    return Event(user_id, name, value, event_id, obj, eventtime.of(obj))


def check_event_id(event_id: object, *, allow_reserved: bool = False) -> str:
    """Raise InvalidEvent unless `event_id` is an acceptable id."""
    if not isinstance(event_id, str) or not event_id:
        raise InvalidEvent("eventId must be a non-empty string")
    if len(event_id) > MAX_EVENT_ID:
        raise InvalidEvent(f"eventId is longer than {MAX_EVENT_ID} characters")
    if not event_id.isprintable():
        raise InvalidEvent("eventId must contain printable characters only")
    if not allow_reserved and event_id.startswith(RECEIVER_ID_PREFIX):
        raise InvalidEvent(f"eventId may not start with {RECEIVER_ID_PREFIX!r} (reserved for the receiver)")
    return event_id


def parse_line(raw: bytes, *, allow_reserved: bool = False, strict: bool = False) -> Event:
    """Parse and validate one line (without its line ending)."""
    return validate(parse_json(raw), raw, allow_reserved=allow_reserved, strict=strict)


def format_value(value: Value) -> str:
    """The exact JSON text of a value: no exponent, no float rounding, no trailing zeros."""
    if isinstance(value, int):
        return str(value)
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def value_fragment(value: Value) -> int | orjson.Fragment:
    """What to hand orjson so a value is written with exactly its digits."""
    if type(value) is int and -_I64 <= value < 2 * _I64:
        return value
    return orjson.Fragment(format_value(value).encode())

