"""Issue 9 item 4: money exact to the documented limits (below 1e20, up to 18 decimals), on every
path: the validator, the parse workers' per-user sums, the receiver's re-serialisation, and the
fast path that reads a value from the raw text.
"""

from __future__ import annotations

import decimal
import json
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evtool import events, parser
from evtool.errors import InvalidEvent

from ..conftest import Serve, evtool, http, totals

AUTH = {"Authorization": "Bearer secret"}
BIG = "19999999999999999999.999999999"  # 29 significant digits: more than the default context
NEAR = "9999999999.999999999999999999"  # 28 digits; twice it is 29


def line(user: str, value: str, extra: str = "") -> bytes:
    return f'{{"userId":"{user}","name":"add_revenue","value":{value}{extra}}}'.encode()


def test_the_validator_keeps_every_accepted_value_exactly_and_never_rounds():
    assert decimal.getcontext().prec == 28  # the default context is what used to round
    assert events.parse_line(line("u", BIG)).value == Decimal(BIG)
    top = "99999999999999999999.999999999999999999"  # 38 digits: the largest value accepted
    assert events.parse_line(line("u", top)).value == Decimal(top)
    with pytest.raises(InvalidEvent, match="more than 18 digits"):
        events.parse_line(line("u", "12345678901.1234567890123456789"))  # 19 decimals, 30 digits
    with pytest.raises(InvalidEvent, match="more than 18 digits"):
        events.parse_line(line("u", "0.1234567890123456789"))
    # trailing zeros are not digits that need keeping
    assert events.parse_line(line("u", "1.5" + "0" * 60)).value == Decimal("1.5")
    assert decimal.getcontext().prec == 28  # and the library did not change the global context


def test_the_parse_workers_sum_per_user_exactly():
    data = b"\n".join([line("a", NEAR), line("a", NEAR), line("b", NEAR), line("b", "10000000000000000000"),
                       line("c", "10000000000000000000"), line("c", NEAR)]) + b"\n"
    part = parser.parse(data, 0)
    want = {"a": Decimal("19999999999.999999999999999998"),
            "b": Decimal("10000000009999999999.999999999999999999")}
    want["c"] = want["b"]
    # keyed by (user, minute of event time): these events have no time
    assert {u: s[1] for (u, _), s in part.fresh.items()} == want  # comparisons are exact
    merged: parser.Sums = {}
    parser.merge(merged, part.fresh)
    parser.merge(merged, part.fresh)
    assert merged["a", ""][1] == Decimal("39999999999.999999999999999996")


def test_exact_values_survive_serve_and_process(dsn, tmp_path: Path):
    """The documented limits, end to end, in every request form; integers from 2^64 up to 1e20
    (which orjson cannot write) are never a 5xx."""
    big_ints = [2**64, 2**64 + 1, 10**20 - 1]
    with Serve(tmp_path) as serve:
        url = serve.url + "/liveEvent"
        posts = [
            (line("big", BIG), {}),
            (b"[" + line("pair", NEAR) + b"," + line("pair", NEAR) + b"]", {}),
            (b"[" + b",".join(line("ints", str(v)) for v in big_ints) + b"]", {}),
            (line("null", str(2**64), ',"eventId":null'), {}),
            (b"[" + line("nullarr", str(10**20 - 1), ',"eventId":null') + b"]", {}),
            (line("ndj", str(2**64 + 7), ',"eventId":null') + b"\n" + line("ndj", BIG) + b"\n",
             {"Content-Type": "application/x-ndjson"}),
        ]
        for body, headers in posts:
            status, answer, _ = http(url, "POST", body,
                                     {**AUTH, "Content-Type": "application/json", **headers})
            assert status == 200, (body, answer)
        status, answer, _ = http(url, "POST", line("r", "0.1234567890123456789"), AUTH)
        assert status == 422 and "18 digits" in answer["error"], answer
    assert "Traceback" not in serve.log.read_text()
    evtool("process", cwd=tmp_path, check=True)
    got = totals(dsn)
    assert got["big"] == Decimal(BIG)
    assert got["pair"] == Decimal("19999999999.999999999999999998")
    assert got["ints"] == sum(big_ints)
    assert got["null"] == 2**64
    assert got["nullarr"] == 10**20 - 1
    assert got["ndj"] == Decimal("38446744073709551622.999999999")
    assert "r" not in got


# -- the fast path that reads a value from the raw text ------------------------------------------

_key_chars = st.sampled_from(["v", "a", "l", "u", "e", "\\u0061", "\\u0076", '\\"', "\\\\", "x", " ", "\\/"])
keys = st.one_of(st.just("value"), st.just("v\\u0061lue"), st.just('x\\"value'), st.just('\\"value\\"'),
                 st.lists(_key_chars, max_size=7).map("".join))
decimals_text = st.one_of(
    st.decimals(min_value=0, max_value=10**6, places=6, allow_nan=False, allow_infinity=False).map(str),
    st.sampled_from(["0.1", "0.10000000000000000001", "0.1000000000000000000", "1.5", "2.5", "1e2",
                     "1.0E-3", "7"]),
)


def _string_with_value(s: str) -> str:
    return json.dumps(s)


scalar_text = st.one_of(decimals_text, st.sampled_from(["true", "null", '"value"', '"\\"value\\": 9.5"',
                                                          '{"value": 3.25}', '[1.5, {"value": 0.5}]',
                                                          '"value\\":1"']),
                        st.text(max_size=8).map(_string_with_value))


@st.composite
def objects(draw) -> bytes:
    """An object's JSON text with escaped keys, duplicate keys, nested objects, strings holding
    "value", and always a top-level `value` that is a decimal number (as orjson reads a float)."""
    members = draw(st.lists(st.tuples(keys, scalar_text), max_size=5))
    nest = draw(st.integers(0, 3))
    # the top-level value, its key maybe spelt with an escape (and maybe given twice)
    for _ in range(draw(st.integers(1, 2))):
        key = draw(st.sampled_from(["value", "v\\u0061lue", "\\u0076alue"]))
        members.insert(draw(st.integers(0, len(members))), (key, draw(decimals_text)))
    text = "{" + ", ".join(f'"{k}": {v}' for k, v in members) + "}"
    for _ in range(nest):
        text = text[:-1] + f', "n": {{"value": {draw(decimals_text)}, "s": "\\"value\\": 1"}}}}'
    return text.encode()


@settings(max_examples=400, deadline=None)
@given(objects())
def test_the_fast_path_reads_what_a_full_parser_reads(text: bytes):
    try:
        want = json.loads(text, parse_float=Decimal, parse_int=Decimal)["value"]
    except ValueError:
        return
    parsed = events.parse_json(text)
    assert isinstance(parsed, dict)
    got_value = parsed["value"]
    if not isinstance(got_value, float):
        return  # an integer: read exactly by orjson itself
    assert events.exact_value(text, got_value) == want
    text = text[:-1] + b', "userId": "u", "name": "add_revenue"}'
    try:
        expected = events.validate(json.loads(text, parse_float=Decimal), strict=True).value
    except InvalidEvent:
        expected = None
    # the value the fast path applies is the one a full parser reads
    try:
        got = events.validate(events.parse_json(text), text, strict=True).value
    except InvalidEvent:
        got = None
    assert got == expected
    # and the totals through the real parser agree
    part = parser.parse(text + b"\n", 0)
    if expected is None:
        assert part.rejects
    else:
        assert not part.rejects, part.rejects
        assert Decimal(part.fresh["u", ""][1]) == expected


def test_an_escaped_key_beside_a_quoted_value_key_is_read_as_json_reads_it():
    text = b'{"userId":"u","name":"add_revenue","v\\u0061lue": 0.1, "x\\"value": 0.10000000000000000001}'
    assert events.parse_line(text).value == Decimal("0.1")
