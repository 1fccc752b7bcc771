"""Issue 11: `send` to `evtool serve` validates once. Lines go out unchecked (the receiver
validates each one and refuses a bulk with a bad line whole); a refused bulk is then checked
here, so what is sent, skipped and reported is what checking every line first gave.

Real `evtool serve` subprocess on loopback, the sender in-process (to count its parses).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evtool import events
from evtool.identity import bare_line, chain_next, chain_start, source_id
from evtool.sender import SendSettings, send

from .conftest import Serve


def ev(user: str, value: str = "1", **extra: str) -> bytes:
    more = "".join(f', "{k}": {v}' for k, v in extra.items())
    return f'{{"userId": "{user}", "name": "add_revenue", "value": {value}{more}}}'.encode()


def journal(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "server-events.jsonl").read_bytes().splitlines()]


@pytest.fixture
def parses(monkeypatch) -> list[bytes]:
    """Every line the sender parses itself."""
    seen: list[bytes] = []
    real = events.parse_json

    def counting(raw, **kw):
        seen.append(raw)
        return real(raw, **kw)

    monkeypatch.setattr(events, "parse_json", counting)
    return seen


def test_plain_lines_are_not_parsed_by_the_sender_and_get_their_ids(tmp_path, parses):
    lines = [ev(f"u{i}", str(i)) for i in range(1, 301)]
    lines[5] = ev("client", "6", eventId='"order-6"')  # a client id: checked here, sent as it is
    src = tmp_path / "e.jsonl"
    src.write_bytes(b"".join(line + b"\n" for line in lines))
    with Serve(tmp_path) as serve:
        report = send(SendSettings(path=src, url=serve.url, batch=50, state_dir=tmp_path / "home"))
    assert (report.sent, report.failed, report.skipped_invalid) == (300, 0, 0)
    assert parses == [lines[5]]  # only the line that names an eventId
    source = source_id(lines[0])
    chain, want = chain_start(source), {}
    for n, line in enumerate(lines, 1):
        chain = chain_next(chain, bare_line(line))
        want[n] = f"{source}:{n}:{chain.hex()}"
    got = journal(tmp_path)
    assert [e["eventId"] for e in got if e["userId"] != "client"] == [want[n] for n in want if n != 6]
    assert [e["eventId"] for e in got if e["userId"] == "client"] == ["order-6"]


def test_a_bulk_the_receiver_refuses_is_checked_here_and_its_valid_lines_delivered(tmp_path):
    lines = [
        ev("ok1"),
        b"{not json}",  # malformed, yet ends like an object: sent unchecked, refused, found here
        ev("neg", "-1"),
        ev("bad", '"1e2"'),
        ev("ok2"),
        ev("rsv", eventId='"~server-made"'),
        ev("ok3", name='"refund"'),
        b'{"userId": "x", "name": "add_revenue", "value": 1',  # truncated: no closing brace
        ev("ok4"),
    ]
    src = tmp_path / "e.jsonl"
    src.write_bytes(b"".join(line + b"\n" for line in lines))
    with Serve(tmp_path) as serve:
        report = send(SendSettings(path=src, url=serve.url, batch=4, state_dir=tmp_path / "home"))
    assert (report.sent, report.failed, report.skipped_invalid) == (3, 0, 6)
    assert [n for n, _ in report.invalid_lines] == [2, 3, 4, 6, 7, 8]
    assert "malformed JSON" in report.invalid_lines[0][1]  # the file's text judged, not the id added
    assert "value must be >= 0" in report.invalid_lines[1][1]
    assert [e["userId"] for e in journal(tmp_path)] == ["ok1", "ok2", "ok4"]
    assert report.stopped is None


def test_strict_sends_check_every_line_here(tmp_path, parses):
    lines = [ev(f"u{i}") for i in range(20)]
    src = tmp_path / "e.jsonl"
    src.write_bytes(b"".join(line + b"\n" for line in lines))
    with Serve(tmp_path, "--strict") as serve:
        report = send(SendSettings(path=src, url=serve.url, strict=True, state_dir=tmp_path / "home"))
    assert (report.sent, report.skipped_invalid) == (20, 0)
    assert len(parses) == 20
