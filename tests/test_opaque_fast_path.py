"""The parse loop's inlined opaque-id path decides exactly as the full validator does."""

from __future__ import annotations

from decimal import Decimal

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from evtool import identity, parser
from evtool.errors import InvalidEvent

IDS = st.one_of(
    st.text(min_size=0, max_size=12),  # printable or not, empty, any character
    st.sampled_from(["~r:1", "~", "a" * 256, "a" * 257, "x\ty", "0123456789abcdef:7",
                     "0123456789abcdef:7:0123456789abcdef", "0123456789abcdef:0", "order 1", "é"]),
    st.uuids().map(str),
    st.integers(min_value=-2**63, max_value=2**63 - 1), st.none(),
)


def reference(lines: list[bytes]) -> tuple[list, list, dict]:
    """(opaque, rejects, fresh) line by line through the full validator and classify."""
    opaque, rejects, fresh = [], [], {}
    offset = 0
    for index, line in enumerate(lines):
        try:
            key, is_add, value, eid = parser._event(line)
        except InvalidEvent as exc:
            rejects.append((offset, index, line, exc.reason))
        else:
            kind, m = identity.classify(eid)
            if kind is identity.Kind.OPAQUE:
                opaque.append((identity.event_digest(eid), identity.content_digest(key[0], is_add, value),
                               key, is_add, value, offset, index))
            elif kind is identity.Kind.POSITION:
                parser.add(fresh, key, is_add, value)
        offset += len(line) + 1
    return opaque, rejects, fresh


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(IDS, st.sampled_from(["add_revenue", "subtract_revenue"]),
                          st.integers(min_value=0, max_value=10**6), st.sampled_from(["u1", "ü", "u" * 300])),
                min_size=1, max_size=8))
def test_inlined_opaque_ids_match_the_full_validator(events):
    lines = []
    for eid, name, value, user in events:
        obj = {"userId": user, "name": name, "value": value}
        if eid is not None:
            obj["eventId"] = eid
        lines.append(orjson.dumps(obj))
    got = parser.parse(b"\n".join(lines) + b"\n", 0, close=False)
    opaque, rejects, fresh = reference(lines)
    assert got.opaque == opaque
    assert got.rejects == rejects
    assert parser.all_sums(got.fresh, got.fresh_table) == fresh


def test_the_stored_digests_never_change_between_versions():
    """applied_events keeps these digests across upgrades: a new way of computing them (a seeded
    hasher, an int's %d) must give the very same bytes, or a resent id would count twice."""
    assert identity.event_digest("order-1").hex() == "56eea00bbcad2f0a2ca2cc13492405d7"
    assert identity.content_digest("user1", True, 523).hex() == "c1d393a21982e97a"
    assert identity.content_digest("user1", False, Decimal("1.50")).hex() == "70e4f2c45412bff4"
    assert identity.content_digest("é", True, 0).hex() == "c4f8858af111bbd9"
