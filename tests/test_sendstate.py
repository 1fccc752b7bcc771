"""The sender's resume decision and its confirmed-prefix tracker, on real files, without a server."""

from __future__ import annotations

from pathlib import Path

from evtool.sendstate import ConfirmedPrefix, Position, resume


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
        first = resume(f, str(path), None)
    assert first.start == Position() and first.new_source_reason is None
    first.state.set_position(Position(8, 2, 4, b"two\n"))
    _file(path, b"one\ntwo\nthree\n")
    with open(path, "rb") as f:
        again = resume(f, str(path), first.state)
        full = resume(f, str(path), first.state, from_start=True)
    assert again.start == Position(8, 2, 4, b"two\n") and again.new_source_reason is None
    assert again.state.source == first.state.source  # same ids
    assert full.start == Position() and full.state.source == first.state.source


def test_a_replaced_file_is_a_new_source(tmp_path):
    path = _file(tmp_path / "e.jsonl", b"one\ntwo\n")
    with open(path, "rb") as f:
        first = resume(f, str(path), None)
    first.state.set_position(Position(8, 2, 4, b"two\n"))
    for data, why in [(b"one\n", "shorter than what was sent"), (b"uno\ntwo\n", "different content"),
                      (b"one\nTWO\nthree\n", "different content")]:
        _file(path, data)
        with open(path, "rb") as f:
            decided = resume(f, str(path), first.state)
        assert decided.start == Position()
        assert decided.state.generation == 1 and decided.state.source != first.state.source
        assert f"({why}); sending it as a new source" in decided.new_source_reason
