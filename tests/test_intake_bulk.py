"""The whole-body check of NDJSON bodies (`Intake._bulk`) against the line-by-line path.

`_bulk` is a fast path: for every body, the journal lines it writes (or the refusal it raises)
must be exactly those of the per-line path, and it must be the path that sender-shaped bodies
take (else the speed-up silently disappears).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evtool import intake
from evtool.intake import BodyRefused, Intake, ReceiverIds

from .conftest import C_OR_PYTHON, c_or_python

NOW = "2026-11-23T09:00:00.000Z"


@pytest.fixture(autouse=True, scope="module", params=C_OR_PYTHON)
def check(request: pytest.FixtureRequest):
    """Every test here runs twice: with _bulk's checks in C (evtool/_fastlines.c, plain_body) and
    with the Python ones alone (as where the C module could not be built)."""
    yield from c_or_python(request, intake)


def pair(max_line: int = 1 << 20, plain_ids: bool = False, strict: bool = False) -> tuple[Intake, Intake]:
    """The same rules twice, with the same (deterministic) ids and clock: whole-body and per-line."""
    def make(bulk: bool, ids: Callable[[], str]) -> Intake:
        return Intake(max_line=max_line, strict=strict, fresh_id=ids, clock=lambda: NOW, bulk=bulk)
    if plain_ids:  # a maker without `members`: the whole-body path calls it once per line
        counters = itertools.count(1), itertools.count(1)
        return make(True, lambda: f"~t-{next(counters[0])}"), make(False, lambda: f"~t-{next(counters[1])}")
    return make(True, ReceiverIds("t")), make(False, ReceiverIds("t"))


def outcome(read: Callable[[bytes, str | None], intake.Lines], body: bytes, key: str | None) -> tuple:
    try:
        lines = read(body, key)
    except BodyRefused as exc:
        return type(exc).__name__, exc.message
    return lines.data, lines.count, lines.event_id


def same(body: bytes, key: str | None = None, max_line: int = 1 << 20, plain_ids: bool = False,
         strict: bool = False, kind: str = "ndjson") -> tuple:
    """The answer to `body` (`kind`: Intake.ndjson or Intake.json) with the fast paths and without."""
    fast, slow = pair(max_line, plain_ids, strict)
    got, want = outcome(getattr(fast, kind), body, key), outcome(getattr(slow, kind), body, key)
    assert got == want, body[:300]
    return got


def sender_body(n: int, ids: bool, rnd: random.Random) -> bytes:
    out = []
    for i in range(1, n + 1):
        line = b'{"userId": "user%d", "name": "%s", "value": %d}' % (
            rnd.randrange(1000), rnd.choice([b"add_revenue", b"subtract_revenue"]), rnd.randrange(10**6))
        if ids:
            line = line[:-1] + b',"eventId":"0123456789abcdef:%d:%016x"}' % (i, rnd.getrandbits(64))
        out.append(line)
    return b"\n".join(out) + b"\n"


@pytest.mark.parametrize("ids", [True, False])
@pytest.mark.parametrize("key", [None, "req-7"])
def test_sender_bodies_take_the_whole_body_path_and_write_what_the_per_line_path_writes(ids, key):
    body = sender_body(500, ids, random.Random(5))
    fast, _ = pair()
    assert fast._bulk(body, key) is not None  # the fast path is taken, not silently skipped
    data, count, event_id = same(body, key)
    assert count == 500 and event_id is None and data.count(b"\n") == 500
    # and without the final newline, the same; and with an id maker that makes one id at a time
    same(body[:-1], key)
    assert same(body, key, plain_ids=True) == (data, count, event_id)


# Lines that must each leave the whole-body path to the per-line one, or be refused the same way.
ODD_LINES = [
    b'{"userId":"a","name":"add_revenue","value":1,"timestamp":"2026-11-23T09:00:00.000Z"}',
    b'{"userId":"a","name":"add_revenue","value":1,"eventId":null}',
    b'{"userId":"a","name":"add_revenue","value":1,"eventId":"~mine"}',
    b'{"userId":"a","name":"add_revenue","value":1,"eventId":""}',
    b'{"userId":"a","name":"add_revenue","value":1,"eventId":"a\x7fb"}',
    b'{"userId":"a\x7fb","name":"add_revenue","value":1}',
    b'{"userId":"a\\u0000","name":"add_revenue","value":1}',
    b'{"userId":"a\\u0001","name":"add_revenue","value":1}',
    b'{"userId":"\xc3\xa9","name":"add_revenue","value":1}',
    b'{"userId":"\xff","name":"add_revenue","value":1}',
    b'{"userId":"a\tb","name":"add_revenue","value":1}',
    b'{"userId":"a\x1fb","name":"add_revenue","value":1}',
    b'{"userId":"a\x00b","name":"add_revenue","value":1}',
    b'{"userId":"a","name":"add_revenue","value":1,"eventId":"x\x0by"}',
    b'{"userId":"a","name":"add_revenue","value":1,"eventId":"x\x7f"}',
    b'{"userId":"","name":"add_revenue","value":1}',
    b'{"userId":"' + b"u" * 257 + b'","name":"add_revenue","value":1}',
    b'{"userId":"' + b"u" * 256 + b'","name":"add_revenue","value":1}',
    b'{"userId":"a","name":"add_revenue","value":1,"eventId":"' + b"i" * 129 + b'"}',
    b'{"userId":"a","name":"add_revenue","value":1,"eventId":"' + b"i" * 128 + b'"}',
    b'{"userId":"a","name":"add_revenue","value":-1}',
    b'{"userId":"a","name":"add_revenue","value":-0}',
    b'{"userId":"a","name":"add_revenue","value":1.5}',
    b'{"userId":"a","name":"add_revenue","value":1e3}',
    b'{"userId":"a","name":"add_revenue","value":"12"}',
    b'{"userId":"a","name":"add_revenue","value":true}',
    b'{"userId":"a","name":"add_revenue","value":9223372036854775807}',
    b'{"userId":"a","name":"add_revenue","value":9223372036854775808}',
    b'{"userId":"a","name":"add_revenue","value":18446744073709551616}',
    b'{"userId":"a","name":"add_revenue","value":99999999999999999999}',
    b'{"userId":"a","name":"add_revenue","value":100000000000000000000}',
    b'{"userId":"a","name":"other","value":1}',
    b'{"userId":"a","name":"add_revenue"}',
    b'{"userId":"a","value":1}',
    b'{"user_id":"a","name":"add_revenue","value":1}',
    b'{"userId":"a","name":"add_revenue","value":1,"extra":{"x":[1,2]}}',
    b'{"userId":"a","userId":"b","name":"add_revenue","value":1}',
    b'{"userId":"a","name":"add_revenue","value":"x","value":1}',
    b'{"userId":"a","name":"add_revenue","value":1,"value":"x"}',
    b'{"userId":"a","name":"add_revenue","value":1,"eventId":"x","eventId":"~y"}',
    b'{"userId":"a","name":"add_revenue","value":1,"eventId":"~y","eventId":"x"}',
    b'{"userId":"a","name":"add_revenue","value":1,}',
    b'{"userId":"a","name":"add_revenue","value":01}',
    b'{"userId":"a","name":"add_revenue","value":1} ',
    b' {"userId" : "a" ,"name":"add_revenue" , "value":1}',
    b'{"userId":"a","name":"add_revenue","value":1}{"userId":"a","name":"add_revenue","value":1}',
    b'[{"userId":"a","name":"add_revenue","value":1}]',
    b'"just a string"',
    b"null",
    b"not json",
    b"   ",
    b"",
    b"\r",
]


@pytest.mark.parametrize("odd", ODD_LINES, ids=range(len(ODD_LINES)))
@pytest.mark.parametrize("where", [0, 1, 2])
def test_an_odd_line_anywhere_in_a_sender_body_gets_the_per_line_answer(odd, where):
    lines = sender_body(3, True, random.Random(1)).split(b"\n")[:3]
    lines.insert(where, odd)
    for key in (None, "k"):
        same(b"\n".join(lines) + b"\n", key)
        same(b"\n".join(lines), key)
        same(b"\n".join(lines) + b"\n", key, strict=True)
    plain = sender_body(3, False, random.Random(2)).split(b"\n")[:3]
    plain.insert(where, odd)
    same(b"\n".join(plain) + b"\n")
    same(b"\n".join(plain) + b"\n", plain_ids=True)


def test_lines_longer_than_the_limit_and_keys_too_long_for_ids_are_refused_the_same_way():
    body = sender_body(20, False, random.Random(3))
    for max_line in (40, 55, 60, 200, len(body) - 1, len(body) + 1):
        same(body, max_line=max_line)
    for key in ("k" * 120, "k" * 126, "k" * 127):  # `KEY#n` passes 128 characters at some line
        same(body, key)


_piece = st.sampled_from([b'{', b'}', b'"userId"', b'"name"', b'"value"', b'"eventId"', b'"timestamp"',
                          b':', b',', b' ', b'"add_revenue"', b'"subtract_revenue"', b'"u1"', b'"~x"',
                          b'"s:1:0"', b'0', b'7', b'-1', b'1.5', b'null', b'\n', b'\r\n', b'\\',
                          b'"\xc3\xa9"', b'"a\\"b"', b'123456789012345678901'])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(_piece, max_size=16).map(b"".join), min_size=1, max_size=4),
       st.sampled_from([None, "k"]))
def test_fuzzed_bodies_get_the_same_answer(noise, key):
    base = sender_body(2, True, random.Random(4)).split(b"\n")[:2]
    same(b"\n".join(base + noise), key)
    same(b"\n".join(noise + base) + b"\n", key)
    template = b'{"userId":"u","name":"add_revenue","value":1,"eventId":"e"}'
    for piece in noise:  # the noise spliced into an otherwise valid line
        cut = len(piece) % len(template)
        same(b"\n".join([*base, template[:cut] + piece + template[cut:]]), key)


# -- one JSON object (the original clients' request): Intake._plain_one against Intake._single

def same_json(body: bytes, key: str | None = None, max_line: int = 1 << 20, strict: bool = False) -> tuple:
    return same(body, key, max_line, strict=strict, kind="json")


@pytest.mark.parametrize("key", [None, "req-7"])
def test_one_sender_shaped_object_takes_the_fast_path_and_writes_what_single_writes(key):
    fast, _ = pair()
    plain = b'{"userId": "user1", "name": "add_revenue", "value": 5}'
    with_id = b'{"userId":"u9","name":"subtract_revenue","value":70,"eventId":"order-17"}'
    for body in (plain, with_id):
        assert fast._plain_one(body, key) is not None  # taken, not silently skipped
    data, count, event_id = same_json(plain, key)
    assert count == 1 and data == plain[:-1] + b',"eventId":"%s","timestamp":"%s"}\n' % (
        (key or "~t-1").encode(), NOW.encode()) and event_id == (key or "~t-1")
    data, count, event_id = same_json(with_id, key)
    assert event_id == "order-17" and data == with_id[:-1] + b',"timestamp":"%s"}\n' % NOW.encode()
    for max_line in (len(plain) - 1, len(plain)):  # the limit, either side
        same_json(plain, key, max_line=max_line)


@pytest.mark.parametrize("odd", ODD_LINES, ids=range(len(ODD_LINES)))
def test_odd_single_objects_get_the_answer_single_gives(odd):
    for key in (None, "k"):
        same_json(odd, key)
        same_json(odd, key, strict=True)
        same_json(odd.replace(b",", b",\n  "), key)  # pretty-printed


@settings(max_examples=300, deadline=None)
@given(st.lists(_piece, max_size=16).map(b"".join), st.sampled_from([None, "k"]), st.booleans())
def test_fuzzed_single_objects_get_the_same_answer(piece, key, with_id):
    template = (b'{"userId":"u","name":"add_revenue","value":1,"eventId":"e"}' if with_id
                else b'{"userId":"u","name":"add_revenue","value":1}')
    cut = len(piece) % len(template)
    same_json(template[:cut] + piece + template[cut:], key)
    same_json(piece, key)
