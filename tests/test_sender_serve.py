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

from .conftest import C_OR_PYTHON, Serve


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


def _sent(tmp_path: Path, name: str, data: bytes, batch: int) -> tuple[list[bytes], object]:
    """Send `data` (as file `name`) to a fresh serve; the journal's lines without the receive stamp."""
    work = tmp_path / name
    work.mkdir()
    src = work / "e.jsonl"
    src.write_bytes(data)
    with Serve(work) as serve:
        report = send(SendSettings(path=src, url=serve.url, batch=batch, state_dir=work / "home"))
    stamp = b',"timestamp":"'
    lines = [line[:line.rindex(stamp)] if stamp in line else line
             for line in (work / "server-events.jsonl").read_bytes().splitlines()]
    return lines, report


@pytest.mark.parametrize("loop", C_OR_PYTHON)
def test_plain_runs_read_in_blocks_send_what_the_per_line_loop_sends(tmp_path, monkeypatch, loop):
    """Runs of plain lines are id'd in blocks (sender._id_lines, in C or in Python); odd lines
    anywhere among them (blank, CRLF, leading spaces, escapes, client ids, invalid, a BOM'd first
    line, no final newline) send and report exactly what the per-line loop alone sends and reports."""
    import random

    from evtool import sender

    if loop == "python":
        monkeypatch.setattr(sender, "_fastlines", None)
    elif sender._fastlines is None:
        pytest.skip("evtool._fastlines is not built (no C compiler here)")

    rnd = random.Random(11)
    odd = [b"", b"   ", ev("crlf") + b"\r", b"  " + ev("lead"), ev("tail") + b"  ", ev("esc\\u0041"),
           ev("cid", eventId='"c-1"'), b'{"userId": "bad"}', b"not json", ev("x", "-1"), b"\t" + ev("tab")]
    lines = [ev(f"u{rnd.randrange(50)}", str(rnd.randrange(1000))) for _ in range(700)]
    for at in sorted(rnd.sample(range(1, 700), 25), reverse=True):
        lines.insert(at, rnd.choice(odd))
    data = b"\xef\xbb\xbf" + b"\n".join(lines)  # a BOM, and no final newline
    blocks = []
    real = sender._id_lines
    monkeypatch.setattr(sender, "_id_lines", lambda *a: blocks.append(r := real(*a)) or r)
    got, got_report = _sent(tmp_path, "blocks", data, 37)
    assert sum(r is not None for r in blocks) >= 5  # the block path was taken, and between odd lines
    monkeypatch.setattr(sender, "_id_lines", lambda *a: None)
    want, want_report = _sent(tmp_path, "per-line", data, 37)
    assert sorted(got) == sorted(want) and len(got) > 650  # four connections: any order
    for field in ("sent", "skipped_invalid", "failed", "invalid_lines"):
        assert getattr(got_report, field) == getattr(want_report, field), field


def test_the_c_id_loop_makes_the_python_loops_ids_and_chains(monkeypatch):
    """sender._id_lines in C (BLAKE2b written there) against the Python loop: the same ids, chains
    and refusals, for lines across BLAKE2b's 128-byte block boundaries (the chain plus the line)."""
    from evtool import sender

    if sender._fastlines is None:
        pytest.skip("evtool._fastlines is not built (no C compiler here)")
    member = b',"eventId":"0123456789abcdef:'
    lengths = [*range(8, 140), *range(240, 260), 1000, 5000]
    lines = [b'{"userId":"u","x":"' + b"a" * max(0, n - 22) + b'"}\n' for n in lengths]
    for size in (1, 7, len(lines)):
        for at in range(0, len(lines), size):
            segment = lines[at:at + size]
            c = sender._id_lines(segment, at, bytes(range(8)), member)
            monkeypatch.setattr(sender, "_fastlines", None)
            py = sender._id_lines(segment, at, bytes(range(8)), member)
            monkeypatch.undo()
            assert c == py and c is not None
    chain = bytes(8)
    for line in lines[:3]:
        chain = chain_next(chain, line[:-1])
    assert sender._id_lines(lines[:3], 0, bytes(8), member)[1] == chain
    refused = [b' {"a":1}\n', b'{"a":1}', b'{"a":1}\r\n', b'{"a":"\\\\"}\n', b'{"eventId":"x"}\n',
               b'{"a":1} \n', b'}\n', b'{\n']
    for line in refused:
        assert sender._id_lines([lines[0], line], 0, bytes(8), member) is None, line
