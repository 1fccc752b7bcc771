"""Event time: when an event happened, read from the event itself and normalized to UTC.

An event may carry its time in one of `FIELDS`. The rules (the README repeats them):

- an RFC 3339 / ISO 8601 text (`2026-11-23T09:15:00Z`, `2026-11-23T10:15:00+01:00`,
  `2026-11-23 09:15`, `2026-11-23`); without an offset it is **UTC**, never local time;
- `YYYY/MM/DD`, optionally followed by ` HH:MM[:SS[.fff]]` (UTC);
- epoch time, as a JSON number or a string of digits (with an optional fraction): below
  `MS_FROM` (1e11) it is **seconds**, from it on **milliseconds**. 1e11 seconds is the year
  5138 and 1e11 milliseconds is March 1973, so every time from 1973 to 5138 reads one way only;
- times before 1970 or after 9999 are rejected, as are `null`, empty strings and anything else.

Two fields that both carry a time must name the same instant, else the event is rejected as
ambiguous. An event without a time is valid: `evtool serve` writes the time it received it
into the stored line (`stamp`), so every journal line written by serve has one.

Periods are kept per minute of UTC (`minute_key`: "YYYY-MM-DDTHH:MM"); "" is the key of an
event without a time (a journal written by an older serve, or a foreign file).
"""

from __future__ import annotations

import re
import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation

from .errors import InvalidEvent

FIELDS = ("timestamp", "time", "ts", "eventTime", "created_at", "createdAt")
STAMP_FIELD = "timestamp"  # what serve writes into a line that has no time
MS_FROM = Decimal(10) ** 11
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
_DIGITS = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_SLASHED = re.compile(r"([0-9]{4})/([0-9]{1,2})/([0-9]{1,2})"
                      r"(?:[ T]([0-9]{2}):([0-9]{2})(?::([0-9]{2})(?:\.([0-9]{1,6}))?)?)?")
# The canonical form serve writes: read without building a datetime (see fast_minute).
_CANON = re.compile(r"[0-9]{4}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?Z")


_SECOND: tuple[int, str] = (-1, "")  # the last whole second stamped now, and its text to the point


def stamp(now: datetime | None = None) -> str:
    """The canonical text of a time (now by default): UTC, milliseconds, `Z`."""
    global _SECOND
    if now is None:  # the receiver stamps every untimed event: format each second once
        t = time.time()
        second = int(t)
        cached = _SECOND  # one tuple, swapped whole: safe from any thread
        if cached[0] != second:
            cached = _SECOND = (second, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second)))
        return f"{cached[1]}{min(999, int((t - second) * 1000)):03d}Z"
    t = now.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _shown(value: object) -> str:
    text = repr(value) if not isinstance(value, str) else '"' + value + '"'
    return text if len(text) <= 40 else text[:40] + "..."


def _epoch(number: Decimal, field: str, value: object) -> datetime:
    if number < 0:
        raise InvalidEvent(f"{field} {_shown(value)} is a negative epoch time")
    seconds = number / 1000 if number >= MS_FROM else number
    try:
        t = _EPOCH + timedelta(seconds=float(seconds))
    except (OverflowError, ValueError):
        raise InvalidEvent(f"{field} {_shown(value)} is out of range") from None
    if t > _MAX:
        raise InvalidEvent(f"{field} {_shown(value)} is after the year 9999")
    return t


def parse(value: object, field: str = "time") -> datetime:
    """The UTC instant `value` stands for; InvalidEvent with the reason when it is none."""
    if isinstance(value, bool) or value is None:
        raise InvalidEvent(f"{field} must be a date-time text or an epoch number, not {_shown(value)}")
    if isinstance(value, (int, float, Decimal)):
        try:
            number = Decimal(value) if not isinstance(value, float) else Decimal(repr(value))
        except InvalidOperation:  # pragma: no cover - finite JSON numbers only
            raise InvalidEvent(f"{field} {_shown(value)} is not a time") from None
        if not number.is_finite():
            raise InvalidEvent(f"{field} {_shown(value)} is not a time")
        return _epoch(number, field, value)
    if not isinstance(value, str):
        raise InvalidEvent(f"{field} must be a date-time text or an epoch number")
    text = value.strip()
    if not text or len(text) > 64:
        raise InvalidEvent(f"{field} {_shown(value)} is not a time")
    if _DIGITS.fullmatch(text):
        return _epoch(Decimal(text), field, value)
    m = _SLASHED.fullmatch(text)
    try:
        if m:
            y, mo, d, h, mi, s, frac = m.groups()
            t = datetime(int(y), int(mo), int(d), int(h or 0), int(mi or 0), int(s or 0),
                         int((frac or "0").ljust(6, "0")), tzinfo=UTC)
        elif text[:1].isdigit() and len(text) >= 10 and text[4] == "-":
            t = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1] in "zZ" else text)
        else:
            raise ValueError
    except ValueError:
        raise InvalidEvent(
            f"{field} {_shown(value)} is not a time: give RFC 3339 / ISO 8601 (e.g. 2026-11-23T09:15:00Z),"
            " YYYY/MM/DD, or epoch seconds or milliseconds") from None
    t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    if t < _EPOCH:
        raise InvalidEvent(f"{field} {_shown(value)} is before 1970")
    return t


def of(obj: dict) -> datetime | None:
    """The event time of an event object (None when it has none); InvalidEvent when a time
    field cannot be read or two of them disagree."""
    found: datetime | None = None
    first = ""
    for field in FIELDS:
        if field in obj:
            t = parse(obj[field], field)
            if found is None:
                found, first = t, field
            elif t != found:
                raise InvalidEvent(f"ambiguous time: {first} and {field} are both given and differ")
    return found


def has_time(obj: dict) -> bool:
    """Whether the object carries any time field (even an invalid one)."""
    return any(f in obj for f in FIELDS)


def minute_key(t: datetime | None) -> str:
    """The per-minute period key of a UTC time: "YYYY-MM-DDTHH:MM" ("" for no time)."""
    if t is None:
        return ""
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}"


def fast_minute(obj: dict) -> str | None:
    """The minute key of an object whose time needs no full parse, else None.

    No time field at all gives ""; a `timestamp` in the canonical form serve writes (and no
    other time field) gives its first 16 characters (see stamp_minute). Anything else is for `of`.
    """
    t = obj.get("timestamp")
    if not obj.keys() <= _PLAIN_KEYS and ("time" in obj or "ts" in obj or "eventTime" in obj
                                          or "created_at" in obj or "createdAt" in obj):
        return None  # (one set comparison settles the common shape: no other time field)
    if t is None:
        return None if "timestamp" in obj else ""
    if type(t) is not str:
        return None
    minute = STAMP_MINUTE.get(t)
    return minute if minute is not None else stamp_minute(t)


def stamp_minute(t: str) -> str | None:
    """The minute key of a canonical `timestamp` text (the `_CANON` form, a real date from
    1970 on), else None; remembered in STAMP_MINUTE (bounded), as many events share a stamp.

    The minute ("YYYY-MM-DDTHH:MM") is checked once per distinct minute (_MINUTE_OK), the
    seconds with slices; together the same as _CANON and a real date from 1970 on.
    """
    if t[-1:] != "Z" or t[16:17] != ":":
        return _remember(t, None)
    minute = t[:16]
    ok = _MINUTE_OK.get(minute)
    if ok is None:
        ok = _minute_ok(minute)
        if len(_MINUTE_OK) < 100_000:
            _MINUTE_OK[minute] = ok
    if not ok:
        return _remember(t, None)
    minute = _MINUTES.setdefault(minute, minute)  # one string per minute in STAMP_MINUTE
    rest = t[17:-1]  # "SS" or "SS.f" to "SS.fffffffff"
    sec = rest[:2]
    if not (len(sec) == 2 and sec.isdigit() and sec.isascii() and sec < "60"):
        return _remember(t, None)
    frac = rest[2:]
    if frac and not (frac[0] == "." and 2 <= len(frac) <= 10 and frac[1:].isdigit() and frac[1:].isascii()):
        return _remember(t, None)
    return _remember(t, minute)


def _remember(t: str, minute: str | None) -> str | None:
    if minute is not None:  # (a None is not remembered: STAMP_MINUTE.get's None means "unknown")
        if len(STAMP_MINUTE) >= _STAMPS_KEPT:
            STAMP_MINUTE.clear()  # stamps come in time order: the old ones are not seen again
            _MINUTES.clear()
        STAMP_MINUTE[t] = minute
    return minute


# A canonical timestamp text -> its minute key. serve stamps in milliseconds, so at 100k events
# a second about 100 lines share each text: one dict lookup each instead of the checks.
STAMP_MINUTE: dict[str, str] = {}
_STAMPS_KEPT = 16_384  # about 2 MB
_MINUTES: dict[str, str] = {}
_MINUTE_OK: dict[str, bool] = {}
_PLAIN_KEYS = frozenset({"userId", "name", "value", "eventId", "timestamp"})


def _minute_ok(minute: str) -> bool:
    """"YYYY-MM-DDTHH:MM" of _CANON's form, a real date from 1970 on, hour below 24."""
    if not _CANON.fullmatch(minute + ":00Z"):
        return False
    try:
        ok = date.fromisoformat(minute[:10]).year >= 1970
    except ValueError:
        return False
    return ok and minute[11:13] <= "23"
