"""Event time: the formats read, the ones refused, and ambiguity (see evtool.eventtime)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from evtool import events, eventtime
from evtool.errors import InvalidEvent

T = datetime(2026, 11, 23, 9, 15, 30, tzinfo=UTC)


@pytest.mark.parametrize("value", [
    "2026-11-23T09:15:30Z", "2026-11-23T09:15:30+00:00", "2026-11-23T10:15:30+01:00",
    "2026-11-23T09:15:30", "2026-11-23 09:15:30", "2026/11/23 09:15:30", "2026-11-23T04:15:30-05:00",
    1795425330, "1795425330", 1795425330000, "1795425330000", 1795425330.0,
])
def test_every_form_names_the_same_instant(value):
    assert eventtime.parse(value) == T


def test_dates_are_midnight_utc_and_fractions_are_kept():
    assert eventtime.parse("2026/11/23") == datetime(2026, 11, 23, tzinfo=UTC)
    assert eventtime.parse("2026-11-23") == datetime(2026, 11, 23, tzinfo=UTC)
    assert eventtime.parse("1795425330.5").microsecond == 500000
    assert eventtime.parse("2026-11-23T09:15:30.123Z").microsecond == 123000


def test_seconds_and_milliseconds_are_told_apart_at_1e11():
    assert eventtime.parse(99_999_999_999).year == 5138  # just below: seconds
    assert eventtime.parse(100_000_000_000).year == 1973  # from 1e11 on: milliseconds


@pytest.mark.parametrize("value, why", [
    ("yesterday", "is not a time"), ("", "is not a time"), (None, "not None"), (True, "not True"),
    (-5, "negative"), ("2026-02-30", "is not a time"), ("1969-12-31T23:59:59Z", "before 1970"),
    ("2026/13/01", "is not a time"), ([1], "date-time text"), ("12/11/2026", "is not a time"),
])
def test_unreadable_times_are_refused_with_the_reason(value, why):
    with pytest.raises(InvalidEvent, match=why):
        eventtime.parse(value, "ts")


def test_two_fields_must_agree():
    base = {"userId": "u", "name": "add_revenue", "value": 1}
    assert events.validate({**base, "ts": 1795425330, "time": "2026-11-23T09:15:30Z"}).time == T
    with pytest.raises(InvalidEvent, match="ambiguous time: time and ts"):
        events.validate({**base, "ts": 1795425331, "time": "2026-11-23T09:15:30Z"})
    assert events.validate(base).time is None


def test_fast_minute_agrees_with_the_full_parse():
    for text in ["2026-11-23T09:15:30.123Z", "2026-11-23T23:59:59Z", "2024-02-29T00:00:00.5Z"]:
        assert eventtime.fast_minute({"timestamp": text}) == eventtime.minute_key(eventtime.parse(text))
    for text in ["2026-02-29T00:00:00Z", "2026-11-23T24:00:00Z", "1960-01-01T00:00:00Z"]:
        assert eventtime.fast_minute({"timestamp": text}) is None
    assert eventtime.fast_minute({"timestamp": "2026-11-23T09:15:30Z", "ts": 1}) is None
    assert eventtime.fast_minute({}) == ""
