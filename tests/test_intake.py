"""Request bodies to journal lines, without a server: what `POST /liveEvent` stores, and refuses."""

from __future__ import annotations

import itertools

import orjson
import pytest

from evtool.intake import BodyInvalid, BodyMalformed, BodyTooLong, Intake, check_key, receiver_ids

from .conftest import event_line


def intake(max_line: int = 1 << 20, strict: bool = False) -> Intake:
    counter = itertools.count(1)
    return Intake(max_line=max_line, strict=strict, fresh_id=lambda: f"~t-{next(counter)}", clock=lambda: NOW)


NOW = "2026-11-23T09:00:00.000Z"
STAMP = b',"timestamp":"' + NOW.encode() + b'"}'


def test_ndjson_keeps_lines_with_ids_and_counts_events():
    given = [event_line("a", "1", "src:1"), event_line("b", "12.345", "src:2")]
    body = given[0] + b"\r\n\n  \n" + given[1]  # CRLF, blank lines, no final newline
    lines = intake().ndjson(body)
    stamped = b"\n".join(g[:-1] + STAMP for g in given) + b"\n"
    assert (lines.data, lines.count, lines.event_id) == (stamped, 2, None)
    # A line that has an id and a time is kept byte for byte.
    timed = [g[:-1] + b', "ts": 1700000000}' for g in given]
    assert intake().ndjson(b"\n".join(timed)).data == b"\n".join(timed) + b"\n"


def test_an_event_without_a_time_gets_the_receive_time():
    timed = event_line("b", "2")[:-1] + b', "time": "2026/11/20"}'
    lines = intake().ndjson(event_line("a", "1") + b"\n" + timed)
    first, second = (orjson.loads(x) for x in lines.data.splitlines())
    assert first["timestamp"] == NOW and "timestamp" not in second and second["time"] == "2026/11/20"
    single = orjson.loads(intake().json(event_line("c", "3")).data)
    assert single["timestamp"] == NOW
    bulk = [orjson.loads(x) for x in intake().json(b"[" + event_line("d") + b"]").data.splitlines()]
    assert bulk[0]["timestamp"] == NOW
    with pytest.raises(BodyInvalid, match="ambiguous time"):
        intake().ndjson(event_line("e")[:-1] + b', "ts": 1700000000, "time": "2026-11-20"}')
    with pytest.raises(BodyInvalid, match="not a time"):
        intake().ndjson(event_line("e")[:-1] + b', "ts": "yesterday"}')


def test_ndjson_adds_ids_textually_keeping_the_number_text():
    lines = intake().ndjson(event_line("a", "0.10") + b"\n" + event_line("b", "7") + b"\n")
    assert lines.data.splitlines() == [event_line("a", "0.10")[:-1] + b',"eventId":"~t-1"' + STAMP,
                                       event_line("b", "7")[:-1] + b',"eventId":"~t-2"' + STAMP]


def test_idempotency_key_numbers_the_events_of_a_bulk():
    body = event_line("a") + b"\n\n" + event_line("b", event_id="own") + b"\n" + event_line("c")
    ids = [orjson.loads(x)["eventId"] for x in intake().ndjson(body, "k").data.splitlines()]
    assert ids == ["k#1", "own", "k#3"]
    array = b"[" + event_line("d") + b"," + event_line("e") + b"]"
    ids = [orjson.loads(x)["eventId"] for x in intake().json(array, "arr").data.splitlines()]
    assert ids == ["arr#1", "arr#2"]
    with pytest.raises(BodyMalformed, match="Idempotency-Key"):
        check_key("~reserved")
    with pytest.raises(BodyMalformed, match="Idempotency-Key header: id"):
        intake().ndjson(event_line("a"), "k" * 300)


def test_single_object_is_one_line_with_its_id():
    pretty = b'{\r\n  "userId": "a",\n  "name": "subtract_revenue",\n  "value": 0.10\n}\n'
    lines = intake().json(pretty)
    assert lines.count == 1 and lines.event_id == "~t-1"
    assert lines.data.count(b"\n") == 1 and b'"value": 0.10' in lines.data
    assert intake().json(event_line("a", event_id="mine"), "key").event_id == "mine"
    assert intake().json(event_line("a"), "key").event_id == "key"


def test_array_values_are_exact():
    body = b"[" + event_line("a", "12.345") + b"," + event_line("c", "123456789012345678.5") + b"]"
    stored = intake().json(body).data.splitlines()
    assert b'"value":12.345' in stored[0] and b'"value":123456789012345678.5' in stored[1]


@pytest.mark.parametrize("body, ndjson, error, message", [
    (event_line() + b'\n{"userId": "x",', True, BodyMalformed, "line 2: malformed JSON"),
    (b'{"userId": "x", "name": "refund", "value": 1}', True, BodyInvalid, "line 1: name must be"),
    (b"[" + event_line("a", "-1") + b"]", False, BodyInvalid, "element 1: value must be >= 0"),
    (b'{"userId": "x"', False, BodyMalformed, "malformed JSON"),
    (b'"just a string"', False, BodyInvalid, "the body must be one event object"),
    (event_line("x" * 100), True, BodyTooLong, "line 1 is longer than the limit of 80 bytes"),
    (event_line("x" * 100), False, BodyTooLong, "the event is longer than the limit of 80 bytes"),
    (b"[" + event_line("x" * 100) + b"]", False, BodyTooLong, "element 1 is longer"),
    (event_line(event_id="~abc-1"), True, BodyInvalid, "line 1: .*reserved"),
])
def test_refusals_say_which_line_and_why(body, ndjson, error, message):
    rules = intake(max_line=80)
    with pytest.raises(error, match=message):
        rules.ndjson(body) if ndjson else rules.json(body)


def test_strict_refuses_what_needs_normalizing():
    with pytest.raises(BodyInvalid, match="userId is missing"):
        intake(strict=True).ndjson(b'{"user_id": "u1", "name": "add_revenue", "value": 5}')


def test_receiver_ids_are_unique_and_reserved():
    make = receiver_ids()
    ids = [make() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(i.startswith("~") for i in ids)
    assert receiver_ids()() != make()


# Lines of every shape a client sends, with and without id and time, odd spacing, a null id, the
# user_id alias, a decimal, a string value: the common shape and what only `validate` accepts.
VARIANTS = [
    event_line("a", "1"), event_line("a", "1", "own"), event_line("a", "1", time="2026-11-23T08:00:00.000Z"),
    event_line("a", "1", "own", time="2026-11-23T08:00:00Z"), event_line("a", "0.10"),
    event_line("a", "1")[:-1] + b', "ts": 1700000000}',
    b'  {"userId":"b","name":"subtract_revenue","value":5}  ',
    b'{"userId":"c","name":"add_revenue","value":2,"eventId":null}',
    b'{"user_id":"d","name":"add_revenue","value":3}', b'{"userId":"e","name":"add_revenue","value":"4.50"}',
    b'{"userId":"f","name":"add_revenue","value":1,"timestamp":"2026-11-23 08:00"}',
    b'{"userId":"g\\u00e9","name":"add_revenue","value":99999999999999999999}',
    b'{"userId":"h","name":"add_revenue","value":1,"extra":{"nested":[1,2,{"x":null}]}}',
]


@pytest.mark.parametrize("key", [None, 'k"\\'])
def test_every_line_is_stored_as_validate_and_with_id_would_store_it(key):
    """The receiver's one-pass path (no Event built for the common shape) stores exactly what the
    full path stores: validate, then the id and receive time added to the client's text."""
    from evtool import events, eventtime
    from evtool.intake import _key_id, _with_id

    got = intake().ndjson(b"\n".join(VARIANTS), key).data.splitlines()
    made = itertools.count(1)
    for n, (raw, line) in enumerate(zip(VARIANTS, got, strict=True), 1):
        raw = raw.strip()
        obj = orjson.loads(raw)
        event = events.validate(obj, raw)
        event_id = None if event.event_id else _key_id(key, n) if key else f"~t-{next(made)}"
        timed = eventtime.has_time(obj)
        stamp = None if timed else NOW
        want = raw if event_id is None and timed else _with_id(raw, obj, event, event_id, stamp)
        assert line.strip() == want, raw
        # one object per request: the same text, and the id it answers with (a key is the id itself)
        single = intake().json(raw, key)
        one_id = event.event_id or key or "~t-1"
        added = None if event.event_id else one_id
        want = raw if event.event_id and timed else _with_id(raw, obj, event, added, stamp)
        assert (single.data, single.event_id) == (want + b"\n", one_id), raw


def test_the_common_shape_is_validated_once_without_building_an_event(monkeypatch):
    """Validate once: a bulk of common-shape lines (with or without id or time) never reaches
    `events.validate` (which builds an Event and its time): the checks on orjson's dict suffice."""
    from evtool import events
    from evtool import intake as intake_module

    calls = []
    real = events.validate

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(events, "validate", counting)
    monkeypatch.setattr(intake_module.events, "validate", counting)
    common = [event_line(f"u{i}", str(i), f"id{i}" if i % 2 else None,
                         time="2026-11-23T08:00:00.000Z" if i % 3 else None) for i in range(300)]
    lines = intake().ndjson(b"\n".join(common))
    assert lines.count == 300 and calls == []
    assert intake().json(common[0]).count == 1 and calls == []
    intake().ndjson(VARIANTS[-4])  # a string value: only validate reads it
    assert calls


def test_the_senders_shape_is_checked_inline(monkeypatch):
    """Issue 11: lines of the plain shape (the keys `send` writes, an integer value) are checked
    in the loop itself, not through the general common-shape function; the journal lines are
    the same as the general path makes (see the equivalence test above)."""
    from evtool import events
    from evtool import intake as intake_module

    calls = []
    real = events.common_event_id
    monkeypatch.setattr(intake_module.events, "common_event_id",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    plain = [event_line(f"u{i}", str(i), f"s:{i}" if i % 2 else None,
                        time="2026-11-23T08:00:00.000Z" if i % 3 else None) for i in range(300)]
    lines = intake().ndjson(b"\n".join(plain))
    assert lines.count == 300 and calls == []
    assert lines.data.count(b'"timestamp"') == 300 and lines.data.count(b'"eventId"') == 300
    intake().ndjson(event_line("u", "1.5"))  # a decimal value: the general path
    assert calls
