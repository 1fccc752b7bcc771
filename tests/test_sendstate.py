"""The sender's resume decision and its confirmed-prefix tracker, on real files, without a server."""

from __future__ import annotations

from pathlib import Path

from evtool.identity import chain_next, chain_start
from evtool.sendstate import ConfirmedPrefix, Position, resume

URL = "http://127.0.0.1:8080"


def test_confirmed_prefix_moves_over_contiguous_batches_only():
    at = [Position(offset=10 * (i + 1), line=i + 1) for i in range(5)]
    prefix = ConfirmedPrefix(Position())
    assert prefix.confirm(1, at[1], True) is False  # batch 0 is still out
    assert prefix.position == Position()
    assert prefix.confirm(0, at[0], True) is True  # 0 and 1 now form the prefix
    assert prefix.position == at[1]
    assert prefix.confirm(3, at[3], True) is False
    assert prefix.confirm(2, at[2], False) is False  # a gap: the point stops here for good
    assert prefix.blocked and prefix.position == at[1]
    assert prefix.confirm(4, at[4], True) is False and prefix.position == at[1]


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_resume_at_the_saved_point_of_an_appended_file(tmp_path):
    path = _file(tmp_path / "e.jsonl", b"one\ntwo\n")
    with open(path, "rb") as f:
        first = resume(f, str(path), URL, None)
    src = first.state.source
    assert first.start == Position(0, 0, chain_start(src)) and first.new_source_reason is None
    at = Position(8, 2, chain_next(chain_next(chain_start(src), b"one"), b"two"))
    first.state.set_position(at)
    _file(path, b"one\r\ntwo\nthree\n")  # line endings aside, the same first two lines
    with open(path, "rb") as f:
        again = resume(f, str(path), URL, first.state)
        full = resume(f, str(path), URL, first.state, from_start=True)
    assert again.new_source_reason is not None  # the offset moved: no line ends there now
    _file(path, b"one\ntwo\nthree\n")
    with open(path, "rb") as f:
        again = resume(f, str(path), URL, first.state)
    assert again.start == at and again.new_source_reason is None
    assert again.state.source == src == full.state.source  # same ids
    assert full.start == Position(0, 0, chain_start(src))


def test_a_file_that_differs_before_the_saved_point_is_sent_from_the_start(tmp_path):
    path = _file(tmp_path / "e.jsonl", b"one\ntwo\n")
    with open(path, "rb") as f:
        first = resume(f, str(path), URL, None)
    src = first.state.source
    first.state.set_position(Position(8, 2, chain_next(chain_next(chain_start(src), b"one"), b"two")))
    for data in [b"one\n", b"one\nTWO\nthree\n", b"one\ntwo"]:
        _file(path, data)
        with open(path, "rb") as f:
            decided = resume(f, str(path), URL, first.state)
        assert decided.start == Position(0, 0, chain_start(src)) and decided.state.source == src
        assert "differs from what was sent before" in decided.new_source_reason
