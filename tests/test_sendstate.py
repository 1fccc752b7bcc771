"""The sender's resume decision and its confirmed-prefix tracker, on real files, without a server."""

from __future__ import annotations

from pathlib import Path

from evtool.sendstate import Position, resume


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
