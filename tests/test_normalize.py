"""Input normalization: `user_id` as an alias, numeric strings as numbers; `--strict` turns it off.

The rules live only in events.validate, so sender, receiver and processor give a line the
same verdict; these tests check each of them, and the processor's inline fast path too.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
from click.testing import CliRunner

from evtool import events, eventtime, parser
from evtool.cli import cli
from evtool.errors import InvalidEvent
from evtool.processor import process

from .conftest import totals
from .test_receiver import JSON, NDJSON, lines, post, serving


def parse(text: str, **kw) -> events.Event:
    return events.parse_line(text.encode(), **kw)


@pytest.mark.parametrize("text, value", [
    ('"100"', 100), ('"12.50"', Decimal("12.50")), ('"0"', 0), ('"0.5"', Decimal("0.5")),
    ('"99999999999999999999.5"', Decimal("99999999999999999999.5")),
])
def test_numeric_strings_are_read_exactly(text, value):
    ev = parse(f'{{"userId": "u", "name": "add_revenue", "value": {text}}}')
    assert ev.value == value and type(ev.value) is type(value)


@pytest.mark.parametrize("text, reason", [
    ('""', "not a plain decimal number"), ('" 5"', "not a plain decimal number"),
    ('"5 "', "not a plain decimal number"), ('"-5"', "not a plain decimal number"),
    ('"+5"', "not a plain decimal number"), ('"1e3"', "not a plain decimal number"),
    ('"1.2.3"', "not a plain decimal number"), ('"12."', "not a plain decimal number"),
    ('".5"', "not a plain decimal number"), ('"007"', "not a plain decimal number"),
    ('"1,000"', "not a plain decimal number"), ('"NaN"', "not a plain decimal number"),
    ('"Infinity"', "not a plain decimal number"), ('"\\u0665"', "not a plain decimal number"),
    ('"0x10"', "not a plain decimal number"), ('"' + "1" * 65 + '"', "more than 64 characters"),
    ('"100000000000000000000"', "less than 1e20"),
    ('"0.1000000000000000000001"', "more than 18 digits"),
])
def test_ambiguous_strings_are_rejected_with_a_reason(text, reason):
    with pytest.raises(InvalidEvent, match=reason):
        parse(f'{{"userId": "u", "name": "add_revenue", "value": {text}}}')


def test_user_id_alias():
    assert parse('{"user_id": "u7", "name": "add_revenue", "value": 1}').user_id == "u7"
    same = parse('{"userId": "u7", "user_id": "u7", "name": "add_revenue", "value": 1}')
    assert same.user_id == "u7"
    with pytest.raises(InvalidEvent, match="ambiguous user"):
        parse('{"userId": "u7", "user_id": "u8", "name": "add_revenue", "value": 1}')
    with pytest.raises(InvalidEvent, match="userId must be a non-empty string"):
        parse('{"user_id": "", "name": "add_revenue", "value": 1}')


def test_strict_turns_normalization_off():
    with pytest.raises(InvalidEvent, match="user_id is read as userId only when not strict"):
        parse('{"user_id": "u7", "name": "add_revenue", "value": 1}', strict=True)
    with pytest.raises(InvalidEvent, match="numeric string is read only when not strict"):
        parse('{"userId": "u7", "name": "add_revenue", "value": "1"}', strict=True)
    # strict: user_id is just another field, kept and ignored
    ev = parse('{"userId": "u7", "user_id": "u8", "name": "add_revenue", "value": 1}', strict=True)
    assert ev.user_id == "u7"


@pytest.mark.parametrize("strict", [False, True])
def test_processor_fast_path_agrees_with_the_validator(strict):
    samples = [
        b'{"userId": "a", "name": "add_revenue", "value": 1}',
        b'{"userId": "a", "user_id": "b", "name": "add_revenue", "value": 1}',
        b'{"userId": "a", "user_id": "a", "name": "add_revenue", "value": 1}',
        b'{"user_id": "b", "name": "subtract_revenue", "value": "2.5"}',
        b'{"userId": "a", "name": "add_revenue", "value": "2.50"}',
        b'{"userId": "a", "name": "add_revenue", "value": "-1"}',
        b'{"userId": "a", "name": "add_revenue", "value": 1, "timestamp": "2026-11-23T09:15:30.250Z"}',
        b'{"userId": "a", "name": "add_revenue", "value": 1, "timestamp": "2026-02-30T09:15:30.250Z"}',
        b'{"userId": "a", "name": "add_revenue", "value": 1, "timestamp": "2026-11-23T24:15:30Z"}',
        b'{"userId": "a", "name": "add_revenue", "value": 1, "timestamp": null}',
        b'{"userId": "a", "name": "add_revenue", "value": 1, "ts": 1763889330123}',
        b'{"userId": "a", "name": "add_revenue", "value": 1, "ts": 1763889330,'
        b' "time": "2025-11-23T09:15:30Z"}',
        b'{"userId": "a", "name": "add_revenue", "value": 1, "ts": 1763889330,'
        b' "time": "2025-11-23T10:15:31+01:00"}',
    ]
    for raw in samples:
        try:
            ev = events.parse_line(raw, allow_reserved=True, strict=strict)
            key = (ev.user_id, eventtime.minute_key(ev.time))
            want = (key, ev.name == "add_revenue", ev.value, ev.event_id)
        except InvalidEvent as exc:
            want = exc.reason
        try:
            got = parser._event(raw, strict)
        except InvalidEvent as exc:
            got = exc.reason
        assert got == want, raw


JOURNAL = (
    '{"user_id": "u1", "name": "add_revenue", "value": "12.50"}\n'
    '{"userId": "u1", "name": "add_revenue", "value": 100}\n'
    '{"userId": "u2", "user_id": "u3", "name": "add_revenue", "value": 1}\n'
    '{"userId": "u2", "name": "add_revenue", "value": "1e3", "eventId": "0123456789abcdef:4"}\n'
    '{"userId": "u2", "name": "add_revenue", "value": "7", "eventId": "0123456789abcdef:5"}\n'
    '{"userId": "u2", "name": "add_revenue", "value": "3", "eventId": "opaque-1"}\n'
)


def test_processor_normalizes_by_default(dsn, tmp_path):
    journal = tmp_path / "j.jsonl"
    journal.write_text(JOURNAL)
    report = process(dsn, [journal])
    assert (report.applied, report.rejected) == (4, 2)
    assert totals(dsn) == {"u1": Decimal("112.5"), "u2": 10}
    reasons = [r for f in report.files for _, r in f.reject_samples]
    assert reasons[0] == "ambiguous user: userId and user_id are both given and differ"
    assert reasons[1].startswith('value "1e3" is not a plain decimal number')


def test_process_strict_rejects_what_needs_normalizing(dsn, tmp_path):
    journal = tmp_path / "j.jsonl"
    journal.write_text(JOURNAL)
    result = CliRunner().invoke(cli, ["process", str(journal), "--strict", "--json"])
    assert result.exit_code == 0, result.output
    assert '"applied":2,' in result.output and '"rejected":4,' in result.output
    # strict: the line with userId and a different user_id is valid (user_id is just a field)
    assert totals(dsn) == {"u1": 100, "u2": 1}


def test_send_strict_skips_what_needs_normalizing(tmp_path):
    source = tmp_path / "events.jsonl"
    source.write_text('{"user_id": "u1", "name": "add_revenue", "value": "5"}\n')
    result = CliRunner().invoke(cli, ["send", str(source), "--strict", "--url", "http://127.0.0.1:9",
                                      "--max-retries", "0"], env={"EVTOOL_HOME": str(tmp_path / "h")})
    assert result.exit_code == 0, result.output
    assert "line 1: skipped: userId is missing" in result.output
    assert "skipped 1 invalid" in result.output


def test_receiver_normalizes_and_stores_lines_as_received(tmp_path):
    line = b'{"user_id": "u1", "name": "add_revenue", "value": "12.50", "eventId": "e1"}'

    async def main():
        async with serving(tmp_path) as (client, journal):
            status, body, _ = await post(client, line, NDJSON)
            assert status == 200 and body == {"accepted": 1}
            status, body, _ = await post(client, b'[{"user_id": "u2", "name": "add_revenue", "value": "3"}]',
                                         JSON)
            assert status == 200
            stored = lines(journal)
            assert stored[0].startswith(line[:-1] + b',"timestamp":"')  # the receive time, added
            assert events.parse_line(stored[1], allow_reserved=True).value == 3

    asyncio.run(main())


def test_receiver_strict_refuses_with_422(tmp_path):
    async def main():
        async with serving(tmp_path, strict=True) as (client, journal):
            status, body, _ = await post(client, b'{"userId": "u1", "name": "add_revenue", "value": "5"}',
                                         JSON)
            assert status == 422 and "not strict" in body["error"]
            status, body, _ = await post(client, b'{"user_id": "u1", "name": "add_revenue", "value": 5}\n',
                                         NDJSON)
            assert status == 422 and body["error"].startswith("line 1: userId is missing")
            assert lines(journal) == []

    asyncio.run(main())
