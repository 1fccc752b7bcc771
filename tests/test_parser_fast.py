"""The processor's per-line loop (parser.parse) against the slow reference, on fuzzed journals.

parse inlines the common shape (events.common_shape, eventtime.fast_minute, identity.classify)
and caches what lines share (timestamp text -> minute, the last sender source and cell). The
reference here reads every line the slow way: the shared validator (events.validate), the full
time parse (eventtime.of) and identity.classify. Both must accept and reject the same lines, for
the same reasons, and give the same sums, identity entries and opaque rows.
"""

from __future__ import annotations

import json
import shutil
from array import array
from decimal import Decimal

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evtool import events, eventtime, identity, parser, store
from evtool.errors import InvalidEvent

from .conftest import C_OR_PYTHON, c_or_python

SRC = "1cf54481b2d1479b"


@pytest.fixture(autouse=True, scope="module", params=C_OR_PYTHON)
def loop(request: pytest.FixtureRequest):
    """Every test here runs twice: with the C loop (evtool/_fastlines.c) taking the lines it
    takes, and with the Python loops alone (as where it could not be built)."""
    yield from c_or_python(request, parser)


CHAIN = "2b7b1de2052eb1ca"

_users = st.one_of(
    st.sampled_from(["user24", "u", "x" * 256, "x" * 257, "", "a\x00b", "é", "ü" * 256, "日本", " "]),
    st.text(max_size=8), st.integers(0, 3), st.none())
_names = st.sampled_from(["add_revenue", "subtract_revenue", "Add_revenue", "", None, 1])
_values = st.one_of(
    st.integers(0, 1000),
    st.sampled_from([0, -1, 10**20 - 1, 10**20, 2**63, 1.5, 0.1, "12", "x", True, None]),
    st.integers(-10, 10**21))
_event_ids = st.one_of(
    st.sampled_from([
        f"{SRC}:1:{CHAIN}", f"{SRC}:1024:{CHAIN}", f"{SRC}:1025:{CHAIN}", f"{SRC}:7", f"{SRC}:0:{CHAIN}",
        f"{SRC}:07:{CHAIN}", f"{SRC}:{'9' * 18}:{CHAIN}", f"{SRC}:{'9' * 19}:{CHAIN}",
        f"{SRC.upper()}:3:{CHAIN}", f"{SRC}:3:{CHAIN.upper()}", f"{SRC[:15]}:3:{CHAIN}",
        f"{SRC}:3:{CHAIN[:15]}", f"{SRC}:3:{CHAIN}0", f"{SRC}:3:", f"{SRC}:3:{CHAIN}:", f"{SRC}::{CHAIN}",
        f"{SRC}:٣:{CHAIN}", f"{SRC}:3 :{CHAIN}", f"abcdefabcdefabcd:2:{CHAIN}", f"{SRC}:+3:{CHAIN}",
        "~r1", "~", "", "opaque-1", "x" * 128, "x" * 129, "a\x01b", "a\x00b", 5, None, [],
    ]),
    st.builds(lambda s, n, c: f"{s}:{n}:{c}", st.sampled_from([SRC, "0000000000000000"]),
              st.integers(1, 5000), st.sampled_from([CHAIN, "0" * 16, "f" * 16])))
_stamps = st.one_of(
    st.sampled_from([
        "2026-11-23T14:34:29.191Z", "2026-11-23T14:34:29Z", "2026-11-23T14:34:29.1Z",
        "2026-11-23T14:34:29.123456789Z", "2026-11-23T14:34:29.1234567890Z", "2026-11-23T14:34:29.Z",
        "2026-11-23T24:00:00.000Z", "2026-02-30T10:00:00.000Z", "2024-02-29T10:00:00.000Z",
        "1969-12-31T23:59:59.999Z", "1970-01-01T00:00:00.000Z", "2026-11-23T14:34:60.000Z",
        "2026-11-23T14:60:00.000Z", "2026-11-23T14:34:29.191z", "2026-11-23 14:34:29.191Z",
        "2026-11-23T14:34:29.191+01:00", "2026-11-23T14:34:29.191", "2026-11-23", "2026/11/23",
        "2026-11-23T14:34:2٩.191Z", "2026-11-23T14:34:29.19١Z", "2026-1١-23T14:34:29.191Z",
        "", " 2026-11-23T14:34:29.191Z", "1764000000", "x", "9999-12-31T23:59:59.999Z",
        "10000-01-01T00:00:00.000Z", "2026-13-01T00:00:00.000Z", "2026-00-10T00:00:00.000Z",
    ]),
    st.builds(lambda mi, s, ms: f"2026-11-23T14:{mi:02d}:{s:02d}.{ms:03d}Z",
              st.integers(0, 61), st.integers(0, 61), st.integers(0, 999)),
    st.integers(-5, 2 * 10**12), st.none(), st.booleans())


@st.composite
def _line(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 19))
    if kind == 0:
        return draw(st.sampled_from([b"", b"  ", b"\t", b"{", b"[]", b"null", b"1", b"\xff\xfe",
                                     b'{"userId": "u\xff", "name": "add_revenue", "value": 1}',
                                     b"[" * 300 + b"]" * 300, b'"\x00"', b"{}"]))
    obj: dict = {}
    order = draw(st.permutations(["userId", "name", "value", "eventId", "timestamp"]))
    for key in order:
        if key == "userId" and draw(st.integers(0, 19)):
            obj[key] = draw(_users)
        elif key == "name" and draw(st.integers(0, 19)):
            obj[key] = draw(_names)
        elif key == "value" and draw(st.integers(0, 19)):
            obj[key] = draw(_values)
        elif key == "eventId" and draw(st.booleans()):
            obj[key] = draw(_event_ids)
        elif key == "timestamp" and draw(st.integers(0, 3)):
            obj[key] = draw(_stamps)
    if draw(st.integers(0, 9)) == 0:  # another time field, an alias, an unknown key
        extra = draw(st.sampled_from(["ts", "time", "eventTime", "created_at", "createdAt", "user_id",
                                      "note"]))
        obj[extra] = draw(st.one_of(_stamps, _users))
    style = draw(st.integers(0, 3))
    if style == 0:
        return json.dumps(obj, separators=(",", ":")).encode()
    if style == 1:
        return json.dumps(obj).encode()  # spaces, \\u escapes
    if style == 2:
        return json.dumps(obj, ensure_ascii=False).encode()
    # serve's shape: the client's bytes, then ,"eventId":...,"timestamp":... appended
    stamped = {k: obj.pop(k) for k in ("eventId", "timestamp") if k in obj}
    text = json.dumps(obj, ensure_ascii=False)
    if stamped:
        text = text[:-1] + ("," if obj else "") + json.dumps(stamped, separators=(",", ":"))[1:]
    return text.encode()


def _reference(data: bytes, strict: bool) -> parser.ParsedPart:
    """What parse must give: every line through the full validator and identity.classify."""
    out = parser.ParsedPart(0, len(data), strict=strict)
    pos = 0
    index = -1
    for index, line in enumerate(data.split(b"\n")[:-1]):
        start = pos
        pos += len(line) + 1
        line = line[:-1] if line.endswith(b"\r") else line
        if not line.strip(b" \t\r\n\f\v"):
            continue
        try:
            obj = events.parse_json(line)
            ev = events.validate(obj, line, allow_reserved=True, strict=strict)
            key = (ev.user_id, eventtime.minute_key(ev.time))
        except InvalidEvent as exc:
            out.rejects.append((start, index, line, exc.reason))
            continue
        is_add, value = ev.name == "add_revenue", ev.value
        kind, m = identity.classify(ev.event_id)
        if kind is identity.Kind.POSITION:
            parser.add(out.fresh, key, is_add, value)
        elif m is None:
            digests = identity.event_digest(ev.event_id), identity.content_digest(key[0], is_add, value)
            out.opaque.append((*digests, key, is_add, value, start, index))
        else:
            part = out.sources.setdefault(m[1], parser.SourcePart())
            n = int(m[2])
            cell = part.cells.setdefault(identity.cell_of(n), bytearray())
            cell += identity.entry(n, identity.chain_of(m))
            parser.add(part.sums, key, is_add, value)
    out.lines = index + 1
    out.finish()
    return out


def _row_sums(rows: bytes | parser.Rows) -> dict:
    """COPY rows (store.copy_rows) summed per (user, minute), as PostgreSQL sums them."""
    if isinstance(rows, parser.Rows):
        rows = b"".join(rows.chunks())
    out: dict = {}
    for row in rows.decode().split("\n")[:-1]:  # (escaped as COPY escapes them: the same both sides)
        user, minute, *s = row.split("\t")
        t = out.setdefault((user, minute), [0, 0, 0, 0])
        for i, v in enumerate(s):
            t[i] += Decimal(v)
    return out


def _facts(part: parser.ParsedPart) -> tuple:
    """What a part means: its sums (C tables and dicts together), its COPY rows as summed, its
    users, cells, opaque events, rejects and counts."""
    return (parser.all_sums(part.fresh, part.fresh_table),
            {s: (p.cells, parser.all_sums(p.sums, p.table), p.repeats, p.count, _row_sums(p.rows),
                 sorted(set(p.users)))
             for s, p in part.sources.items()},
            part.opaque, part.rejects, part.lines, _row_sums(part.fresh_rows), sorted(set(part.fresh_users)),
            part.opaque_rows, part.opaque_sum_rows, part.opaque_count, part.opaque_repeats,
            sorted(part.users), part.fresh_count)


def _opaque_rows(rows: bytes | bytearray) -> list[bytes]:
    size = store.DIGEST_ROW.size
    return sorted(bytes(rows[i:i + size]) for i in range(0, len(rows), size))


def _worker_facts(part: parser.ParsedPart) -> tuple:
    """_facts as a worker's part (parse_range) has them: its opaque ids that the C loop took are
    DIGEST_ROWs and sums in a table, not events (ParsedPart.opaque_table): the same rows in
    another order, and the same sums as COPY rows."""
    facts = list(_facts(part))
    facts[2] = None  # the events: only the Python loops' are kept
    facts[7:9] = [_opaque_rows(part.opaque_rows), _row_sums(part.opaque_sum_rows)]
    return tuple(facts)


def _in_worker_mode(part: parser.ParsedPart) -> parser.ParsedPart:
    part.opaque_table, part.opaque_buf = parser._new_table(), bytearray()
    return part


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_line(), max_size=40), crlf=st.lists(st.booleans(), max_size=40),
       cut=st.integers(0, 40), strict=st.booleans())
def test_parse_decides_every_line_as_the_full_validator(lines: list[bytes], crlf: list[bool], cut: int,
                                                        strict: bool) -> None:
    ends = [b"\r\n" if i < len(crlf) and crlf[i] else b"\n" for i in range(len(lines))]
    pieces = [line + end for line, end in zip(lines, ends, strict=True)]
    data = b"".join(pieces)
    want = _reference(data, strict)
    assert _facts(parser.parse(data, 0, strict=strict)) == _facts(want)
    # in two calls, as parse_range feeds it pieces: the same part
    head = b"".join(pieces[:cut])
    out = parser.ParsedPart(0, len(data), strict=strict)
    parser.parse(head, 0, out, close=False)
    parser.parse(data[len(head):], len(head), out)
    assert _facts(out) == _facts(want)
    # as a worker parses (parse_range): the C loop's opaque ids as rows, in C
    out = _in_worker_mode(parser.ParsedPart(0, len(data), strict=strict))
    parser.parse(head, 0, out, close=False)
    parser.parse(data[len(head):], len(head), out)
    assert _worker_facts(out) == _worker_facts(want)


def test_a_run_of_serve_lines_sums_per_user_minute_and_keeps_every_entry() -> None:
    """A concrete run of the shape serve writes (the case the caches are for), with its figures."""
    lines = []
    for n in range(1, 3001):
        stamp = f"2026-11-23T14:{34 + n // 1000:02d}:29.{n % 7:03d}Z"
        lines.append(b'{"userId": "u%d", "name": "%s", "value": %d,"eventId":"%s:%d:%s","timestamp":"%s"}'
                     % (n % 3, b"add_revenue" if n % 4 else b"subtract_revenue", n, SRC.encode(), n,
                        CHAIN.encode(), stamp.encode()))
    data = b"\n".join(lines) + b"\n"
    got = parser.parse(data, 0)
    assert _facts(got) == _facts(_reference(data, False))
    part = got.sources[SRC]
    assert part.count == 3000 and sorted(part.cells) == [0, 1, 2]
    sums = parser.all_sums(part.sums, part.table)
    added = sum(s[1] for s in sums.values())
    assert added == sum(n for n in range(1, 3001) if n % 4)
    assert {k[1] for k in sums} == {"2026-11-23T14:34", "2026-11-23T14:35", "2026-11-23T14:36",
                                         "2026-11-23T14:37"}


def test_the_timestamp_cache_stays_bounded_and_remembers_only_valid_stamps() -> None:
    """A worker parses millions of lines: what it remembers per stamp text has a cap."""
    kept = eventtime._STAMPS_KEPT
    for i in range(kept + 10):
        text = f"2026-11-23T{i // 60000 % 24:02d}:{i // 1000 % 60:02d}:{i // 10 % 60:02d}.{i % 10:03d}Z"
        assert eventtime.fast_minute({"timestamp": text}) == text[:16]
    assert 0 < len(eventtime.STAMP_MINUTE) <= kept
    assert eventtime.fast_minute({"timestamp": "2026-11-23T24:00:00.000Z"}) is None
    assert "2026-11-23T24:00:00.000Z" not in eventtime.STAMP_MINUTE


# -- the plain path: a piece msgspec decodes and checks whole (parser._plain_lines) ---------------

_ascii = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e, blacklist_characters='"\\'),
                 max_size=8)
_plain_ids = st.one_of(
    _event_ids.filter(lambda e: not isinstance(e, str) or (e.isascii() and e.isprintable())),
    st.uuids().map(str), st.sampled_from(["~r1", "~", "~" + "x" * 127, "~" + "x" * 128]),
    st.builds(lambda n: f"~0a1b2c3d4e5f-{n}", st.integers(1, 3000)))
_A = b'{"userId":"u1","name":"add_revenue","value":1}'
_REFUSED = [  # what msgspec must refuse, or _plain_lines leave to the per-line loop
    _A + _A, _A + b" " + _A, _A[:20] + b"\n" + _A[20:], _A[:15] + b"\n" + _A[15:], _A + b"  ", b"", b" ",
    b"[]", b"{}",
    b'{"userId":"u1","name":"add_revenue","value":3,"eventId":null}',
    b'{"userId":"u1","name":"add_revenue","value":3,"timestamp":null}',
    b'{"userId":"u1","name":"add_revenue","value":3,"note":"x"}',
    b'{"userId":"u\\u00e9","name":"add_revenue","value":1}',
    b'{"userId":"\xc3\xa9","name":"add_revenue","value":1}',
    _A + b"\r",
    *(b'{"userId":"u1","name":"add_revenue","value":%s}' % v
      for v in (b"-1", b"true", b"null", b"18446744073709551616", b"99999999999999999999", b'"x"')),
    b'{"userId":"u1","name":"add_revenue","value":"x","value":2.5}',  # (msgspec checks each)
]
_READ_ALIKE = [  # read whole; the same as line by line
    b"  " + _A, b'{"userId":"u1","userId":"u2","name":"add_revenue","value":2}',  # (the last key wins)
    *(b'{"userId":"u1","name":"add_revenue","value":%s}' % v
      for v in (b"1.5", b"1.0", b"1e2", b'"1.5"', b'"0012"', b"1e400", b"-0.0", b"-0.5")),
    b'{"userId":"u1","name":"add_revenue","value":"1.5","value":2.5}',
]
_OFF_SHAPE = _REFUSED + _READ_ALIKE


@st.composite
def _plain_line(draw: st.DrawFn) -> bytes:
    """Mostly what serve writes (ASCII, no escapes, a flat object of the five members), with
    what msgspec must refuse or leave to the per-line checks mixed in now and then."""
    odd = draw(st.integers(0, 29))
    if odd == 0:
        return draw(st.sampled_from(_OFF_SHAPE))
    users = st.one_of(st.sampled_from(["user24", "u", "x" * 256, "x" * 257, "", " "]), _ascii)
    values = st.integers(0, 1000).map(str) if odd > 3 else st.one_of(_DECIMALS, st.sampled_from(
        ["0", str(2**63 - 1), str(2**64 - 1), '"1.5"', '"0012"', '"12.50"', '" 1"', '"1e2"', '"-1"']))
    obj: dict = {"userId": draw(users),
                 "name": draw(st.sampled_from(["add_revenue", "subtract_revenue"] * 9 + ["Add_revenue"])),
                 "value": _VALUE}
    if draw(st.integers(0, 3)):
        obj["eventId"] = draw(_plain_ids)
    if draw(st.integers(0, 3)):
        obj["timestamp"] = draw(_stamps.filter(lambda t: isinstance(t, str) and t.isascii()))
    keys = draw(st.permutations(list(obj)))
    obj = {k: obj[k] for k in keys}
    text = json.dumps(obj, separators=(",", ":") if draw(st.booleans()) else None)
    return text.replace(json.dumps(_VALUE), draw(values)).encode()


_VALUE = "\0value"  # where the value's own text goes
_DECIMALS = st.one_of(  # numbers as JSON texts: exact decimals, exponents, limits, negatives
    st.decimals(min_value=-1, max_value=10**21, allow_nan=False, allow_infinity=False, places=3).map(str),
    st.sampled_from(["12.50", "0.1", "1e2", "1E-7", "1e-19", "-0.0", "0.000000000000000001",
                     "0.0000000000000000001", "99999999999999999999.5", "1e20", "1e400", "1.0", "5E+0"]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_plain_line(), max_size=30), cut=st.integers(0, 30), strict=st.booleans())
def test_a_piece_read_whole_gives_what_the_full_validator_gives(lines: list[bytes], cut: int,
                                                                strict: bool) -> None:
    """The plain path's decisions (and its per-line fallbacks) against the reference, whole and
    in two pieces; whether a piece is read whole or line by line must never show in the part."""
    pieces = [line + b"\n" for line in lines]
    data = b"".join(pieces)
    want = _facts(_reference(data, strict))
    assert _facts(parser.parse(data, 0, strict=strict)) == want
    head = b"".join(pieces[:cut])
    out = parser.ParsedPart(0, len(data), strict=strict)
    parser.parse(head, 0, out, close=False)
    parser.parse(data[len(head):], len(head), out)
    assert _facts(out) == want


def test_only_a_piece_of_one_flat_object_a_line_is_read_whole() -> None:
    """The fuzz above covers both paths only if _plain_lines takes the pieces it should."""
    a = (b'{"userId":"u1","name":"add_revenue","value":1,"eventId":"%s:5:%s","timestamp":"%s"}'
         % (SRC.encode(), CHAIN.encode(), b"2026-11-23T14:34:29.191Z"))
    b = b'{"userId": "u2", "name": "subtract_revenue", "value": 7}'
    plain = parser._plain_lines(a + b"\n" + b + b"\n")
    assert plain is not None and [p.userId for p in plain] == ["u1", "u2"]
    assert plain[1].eventId is msgspec.UNSET
    for line in _OFF_SHAPE:
        data = b + b"\n" + line + b"\n"
        assert (parser._plain_lines(data) is None) == (line in _REFUSED), line
        assert _facts(parser.parse(data, 0)) == _facts(_reference(data, False))


def test_sender_ids_out_of_order_or_repeated_within_a_cell_are_sorted_and_counted_once() -> None:
    """A cell whose lines came in order is kept as it is (SourcePart.in_order); one that saw a
    line again, an earlier line, or a return below its last line after another cell is sorted."""
    def line(n: int) -> bytes:
        return (b'{"userId":"u","name":"add_revenue","value":1,"eventId":"%s:%d:%s"}\n'
                % (SRC.encode(), n, CHAIN.encode()))
    orders = ([1, 2, 3], [3, 2, 1], [1, 2, 2], [1, 1025, 2], [1, 1025, 1], [2, 1025, 3], [5, 1030, 1029, 4],
              list(range(1, 2100)))
    for order in orders:
        data = b"".join(map(line, order))
        got = parser.parse(data, 0)
        assert _facts(got) == _facts(_reference(data, False)), order
        part = got.sources[SRC]
        assert part.count == len(order) and part.repeats == (len(set(order)) != len(order))
        assert b"".join(part.cells.values()) == b"".join(
            identity.entry(n, bytes.fromhex(CHAIN)) for n in sorted(set(order)))


def test_a_string_value_is_never_taken_for_the_number_it_spells() -> None:
    """msgspec reads "12.50" as the Decimal 12.50, and the parser remembers checked decimals;
    neither may let a string through where the validator refuses it (strict) or reads it by
    its own rules (leading zeros), even right after the same number was seen."""
    number = b'{"userId":"u1","name":"add_revenue","value":12.50}\n'
    for string in (b'"12.50"', b'"012.5"', b'"12.5e0"'):
        line = number.replace(b"12.50", string)
        for strict in (False, True):
            for data in (number + line, number * 3 + line + number):
                parser.parse(number, 0)  # the number is known before the string comes
                want = _facts(_reference(data, strict))
                assert _facts(parser.parse(data, 0, strict=strict)) == want, (data, strict)
                assert _facts(parser.parse(line, 0, strict=strict)) == _facts(_reference(line, strict))


# -- the C loop (evtool/_fastlines.c): what it takes, and what it leaves to the Python loops --------

def test_the_c_loop_is_built_where_a_compiler_is() -> None:
    """make test installs the package with its C loop; only a machine without a compiler may lack
    it (the install goes on without it, and the Python loops give the same results)."""
    from evtool import _fastlines  # noqa: F401 (ImportError where it was not built)

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")


_C_TAKES = [  # every line of these the C loop must take whole (else the fuzz tests only Python)
    _A, b'{"userId": "user24", "name": "subtract_revenue", "value": 783,"eventId":"%s:1:%s",'
        b'"timestamp":"2026-11-23T14:34:29.191Z"}' % (SRC.encode(), CHAIN.encode()),
    b'\t{ "value" :\t0 , "name":"add_revenue","userId":"x"}',
    b'{"userId":"u","name":"add_revenue","value":%s}' % (b"9" * 18),
    b'{"userId":"u","name":"add_revenue","value":1,"eventId":"~"}',
    b'{"userId":"u","name":"add_revenue","value":1,"eventId":"%s"}' % (b"x" * 128),
    b'{"userId":"u","name":"add_revenue","value":1,"eventId":"%s:%s"}' % (SRC.encode(), b"9" * 18),
    b'{"userId":"%s","name":"add_revenue","value":1}' % (b"u" * 256), b"  " + _A,
]
_C_LEAVES = [  # and each of these it must leave, at its start, to the Python loops
    *_REFUSED, *(line for line in _READ_ALIKE if line != b"  " + _A),
    b'{"userId":"u","name":"add_revenue","value":%s}' % (b"9" * 19),
    b'{"userId":"u","name":"add_revenue","value":01}', b'{"userId":"u","name":"add_revenue","value":-0}',
    b'{"userId":"u","name":"add_revenue","value":1,"eventId":""}',
    b'{"userId":"u","name":"add_revenue","value":1,"eventId":"%s"}' % (b"x" * 129),
    b'{"userId":"%s","name":"add_revenue","value":1}' % (b"u" * 257), b'{"userId":"u","name":"add_revenue"}',
    b'{"userId":"u","name":"add_revenue","value":1,"timestamp":"2026-11-23T24:00:00.000Z"}',
    b'{"userId":"u","name":"add_revenue","value":1,"timestamp":""}', b'{"userId":"u","name":"add","value":1}',
    b'{"userId":"u","name":"add_revenue","value":1,"value":1}',
    b'{"userId":"u\\u0041","name":"add_revenue","value":1}',
    b'{"userId":"u","name":"add_revenue","value":1} ', b'{"userId":"u","name":"add_revenue","value":1,}',
    b'{"userId":"u" "name":"add_revenue","value":1}', b'{"userId":"u","name":"add_revenue","value":1\x0b}',
]


def test_the_c_loop_takes_the_plain_shape_and_stops_at_the_first_line_it_leaves(loop: str) -> None:
    if loop != "c":
        pytest.skip("the C loop's own test")
    for line in _C_TAKES:
        data = (line + b"\n") * 3
        out = parser.ParsedPart(0, len(data))
        got = parser._fastlines.sum_lines(data, 0, 0, 0, out.fresh_table, out.sources, out.opaque)
        assert got == (len(data), 3), line
    for line in _C_LEAVES:
        data = _A + b"\n" + line + b"\n" + _A + b"\n"
        out = parser.ParsedPart(0, len(data))
        got = parser._fastlines.sum_lines(data, 0, 0, 0, out.fresh_table, out.sources, out.opaque)
        assert got == (len(_A) + 1, 1), line
        # nothing of the line it left
        assert parser.all_sums(out.fresh, out.fresh_table) == {("u1", ""): [1, 1, 0, 0]}, line
        assert _facts(parser.parse(data, 0)) == _facts(_reference(data, False)), line


def test_bytes_after_the_last_newline_are_left_as_the_python_loops_leave_them() -> None:
    """A range whose file was overwritten under the parse may end mid-line: never an error."""
    data = _A + b"\n" + _A[:20]
    assert _facts(parser.parse(data, 0)) == _facts(parser.parse(_A + b"\n", 0))


def test_a_piece_of_lines_the_c_loop_leaves_is_summed_as_the_python_loops_sum_it() -> None:
    """Past parser._NATIVE_STOPS lines left in one piece, the rest goes to the Python loops whole."""
    odd = [b'{"userId":"u%d","name":"add_revenue","value":%d.5}' % (i % 3, i) for i in range(40)]
    data = b"\n".join(line for pair in zip(odd, [_A] * 40, strict=True) for line in pair) + b"\n"
    assert _facts(parser.parse(data, 0)) == _facts(_reference(data, False))


def test_sums_past_64_bits_and_after_a_decimal_stay_exact() -> None:
    """The C loop's table counts a key's events in 64-bit sums and moves them to its exact Python
    sums (Table.extra) before an add would overflow: sums past 2**64, and sums that a decimal line
    (the Python loops', in the part's dict) made a Decimal, stay exact."""
    big = b'{"userId":"u","name":"add_revenue","value":999999999999999999}\n'
    data = big * 40 + b'{"userId":"u","name":"add_revenue","value":0.5}\n' + big * 3
    got = parser.parse(data, 0)
    sums = parser.all_sums(got.fresh, got.fresh_table)
    assert sums[("u", "")][:2] == [44, events.MONEY.add(43 * (10**18 - 1), Decimal("0.5"))]
    assert _facts(got) == _facts(_reference(data, False))


def test_a_sums_table_renders_what_the_dicts_would(loop: str) -> None:
    """parser's C table (Table.rows, users, count) gives the COPY rows, the hash() of each user
    and the count that store.copy_rows and parser.user_hashes give for the same sums in a dict."""
    if loop != "c":
        pytest.skip("the C loop's own test")
    lines = [b'{"userId":"user%d","name":"%s","value":%d,"timestamp":"2026-11-23T14:%02d:00Z"}'
             % (i % 997, b"add_revenue" if i % 3 else b"subtract_revenue", i, i % 7) for i in range(20_000)]
    data = b"\n".join(lines) + b"\n"
    part = parser.parse(data, 0)
    table = part.fresh_table
    assert part.fresh == {} and len(table) == 997 * 7 and table.count == 20_000
    sums = table.to_dict()
    assert _row_sums(table.rows()) == _row_sums(store.copy_rows(sums))
    assert sorted(array("q", table.users())) == sorted({hash(k[0]) for k in sums})
    assert table.held <= table.nbytes < 2 * table.held  # what parser.held counts, and what is reserved
    assert _facts(part) == _facts(_reference(data, False))


def test_a_workers_rows_go_through_its_spill_file_in_chunks(tmp_path, monkeypatch) -> None:
    """With a spill file (the committing process's), parse_range writes each group's COPY rows
    there, ROW_CHUNK table keys at a time, and the part carries only where they are: read back
    through the file, they are the rows the same part renders in memory."""
    monkeypatch.setattr(parser, "ROW_CHUNK", 100)  # many chunks
    path = tmp_path / "j.jsonl"
    src = "00000000000000aa"
    ids = [b',"eventId":"%s:%d"' % (src.encode(), i + 1) if i % 2 else b"" for i in range(20_000)]
    path.write_bytes(b"".join(b'{"userId":"user%d","name":"add_revenue","value":%d%s}\n' % (i % 997, i, eid)
                              for i, eid in enumerate(ids)))
    st = path.stat()
    here = parser.parse_range(str(path), (st.st_dev, st.st_ino), 0, st.st_size)
    spill = tmp_path / "spill"
    spill.write_bytes(b"")
    sst = spill.stat()
    there = parser.parse_range(str(path), (st.st_dev, st.st_ino), 0, st.st_size,
                               spill=(str(spill), sst.st_dev, sst.st_ino))
    assert here.fresh_rows.spans == [] and len(there.fresh_rows.spans) == 1 and there.fresh_rows.data == b""
    with open(spill, "rb") as f:
        there.spill_fd = f.fileno()
        batch = parser.Batch([there])  # gives each Rows the file's descriptor
        for mine, theirs in [(here.fresh_rows, there.fresh_rows),
                             (here.sources[src].rows, batch.parts[0].sources[src].rows)]:
            assert theirs.count == mine.count == 997 and theirs.size == mine.size
            assert b"".join(theirs.chunks(size=1000)) == mine.data


def test_a_workers_opaque_ids_are_the_rows_and_sums_the_python_loops_give(tmp_path, monkeypatch) -> None:
    """In a worker (parse_range) the C loop computes an opaque id's digests itself (BLAKE2b, as
    identity.event_digest and content_digest) and writes its DIGEST_ROW: at the limits of the
    id and user lengths (a digest over one 128-byte block and over several), beside lines the
    Python loops take (a decimal value, an escape), a repeated id, and a table flushed to the
    spill file (TABLE_FLUSH small): the same rows, sums, users, count and repeat as the
    reference."""
    monkeypatch.setattr(parser, "TABLE_FLUSH", 4096)
    lines = []
    for i in range(3000):
        user = ("x" * 256 if i % 7 == 0 else f"user{i % 301}").encode()
        eid = ("e" * 127 + str(i % 10) if i % 5 == 0 else f"id-{i}-{'z' * (i % 200)}"[:128]).encode()
        value = b"%d.5" % i if i % 11 == 0 else b"%d" % (i * 999_999_999_999 % 10**18)
        name = b"add_revenue" if i % 3 else b"subtract_revenue"
        stamp = b',"timestamp":"2026-11-23T14:%02d:00Z"' % (i % 60) if i % 4 else b""
        lines.append(b'{"userId":"%s","name":"%s","value":%s,"eventId":"%s"%s}'
                     % (user, name, value, eid, stamp))
    lines.append(b'{"userId":"\\u00e9","name":"add_revenue","value":1,"eventId":"esc"}')
    lines.append(lines[10])  # a client's retry: the same id again
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / "j.jsonl"
    path.write_bytes(data)
    st_ = path.stat()
    spill = tmp_path / "spill"
    spill.write_bytes(b"")
    sst = spill.stat()
    want = _reference(data, False)
    assert want.opaque_repeats and want.opaque_count == len(lines)
    got = parser.parse_range(str(path), (st_.st_dev, st_.st_ino), 0, len(data), piece=16384,
                             spill=(str(spill), sst.st_dev, sst.st_ino))
    with open(spill, "rb") as f:
        got.spill_fd = f.fileno()
        parser.Batch([got])  # gives each Rows the file's descriptor
        assert (got.opaque_count, got.opaque_repeats) == (want.opaque_count, True)
        assert _opaque_rows(got.opaque_rows) == _opaque_rows(want.opaque_rows)
        assert _row_sums(got.opaque_sum_rows) == _row_sums(want.opaque_sum_rows)
        assert sorted(set(got.opaque_users)) == sorted(set(want.opaque_users))
        assert got.opaque == []  # shipped: the events stay in the worker, their rows go
        if parser._fastlines is not None:
            assert len(got.opaque_sum_rows.spans) > 1  # the C loop's sums, flushed while it parsed


def test_a_parts_digest_rows_are_sorted_and_a_repeat_found_however_the_ids_fall(loop: str) -> None:
    """_fastlines.sort_digest_rows sorts a part's rows by digest (65,536 buckets by the first two
    bytes, each by insertion) and finds an id given twice: also where ids were chosen to crowd
    one bucket (a hostile client can find digests with a common prefix: that bucket is sorted
    by qsort, never quadratically) and in a bucket of one."""
    if loop != "c":
        pytest.skip("the C loop's own test")
    import random

    rng = random.Random(7)

    def row(digest: bytes, i: int) -> bytes:
        return store.DIGEST_ROW.pack(4, 16, digest, 8, b"c" * 8, 8, 0, 8, i)

    rows = [row(rng.randbytes(16), i) for i in range(5000)]
    rows += [row(b"\x00\x00" + rng.randbytes(14), i) for i in range(400)]  # a crowded bucket
    rows += [row(b"\xff\xff" + b"\x00" * 14, 1)]  # alone in the last bucket
    for repeat in (None, 5001, 5401):
        got = rows + ([] if repeat is None else [rows[repeat - 1]])
        rng.shuffle(got)
        buf = bytearray(b"".join(got))
        assert parser._fastlines.sort_digest_rows(buf) is (repeat is not None)
        assert bytes(buf) == b"".join(sorted(got, key=lambda r: r[6:22]))
    assert parser._fastlines.sort_digest_rows(bytearray()) is False


def test_lines_taken_back_cancel_what_they_counted_and_name_their_events() -> None:
    """processor.apply takes the events of the lines not applied back out of a batch's sums,
    a chunk of lines at a time (parser.take_back_lines, the same loops as a part): what they
    take back cancels exactly what the lines counted in, whichever loop takes a line (decimals,
    escapes, amounts past 64 bits go to the Python loop), and each line's digests are the ones
    its parse gave, for the caller to check the line is still the event parsed. A line that
    is no opaque-id event (the file changed under the run) takes nothing back."""
    lines = [
        b'{"userId":"u1","name":"add_revenue","value":5,"eventId":"a"}',
        b'{"userId":"u1","name":"subtract_revenue","value":2,"eventId":"b",'
        b'"eventTime":"2026-11-23T14:34:29Z"}',
        b'{"userId":"u\\u00e9","name":"add_revenue","value":1.25,"eventId":"c"}',
        b'{"userId":"u2","name":"add_revenue","value":99999999999999999999,"eventId":"d"}',
        b'{"userId":"u2","name":"add_revenue","value":99999999999999999999,"eventId":"e"}',
        b'{"userId":"u1","name":"add_revenue","value":5,"eventId":"a"}',  # a retry: taken back twice
    ]
    counted = parser.parse(b"\n".join(lines) + b"\n", 0)
    assert counted.opaque_count == len(lines) and not counted.rejects
    back: parser.Sums = {}
    ids = parser.take_back_lines(back, lines)
    assert ids == [(d, c) for d, c, *_ in sorted(counted.opaque, key=lambda o: o[-1])]
    assert ids[0] == (identity.event_digest("a"), identity.content_digest("u1", True, 5))
    parser.merge(back, counted.opaque_sums)
    assert back.keys() == counted.opaque_sums.keys() and all(s == [0, 0, 0, 0] for s in back.values())
    for other in (b'{"userId":"u1","name":"add_revenue","value":5}',  # no id: a fresh event
                  f'{{"userId":"u1","name":"add_revenue","value":5,"eventId":"{SRC}:1:{CHAIN}"}}'.encode(),
                  b'{"userId":"u1","name":"add_revenue","value":-5,"eventId":"a"}',  # invalid
                  b'{"userId":"u1","name":"add_revenue","value":5,"eventId":"a"'):  # cut short
        back = {}
        assert parser.take_back_lines(back, [lines[0], other]) is None and back == {}
