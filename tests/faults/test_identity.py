"""Issue 9 items 3 and 7: identities that collide or split, and a cost that must not grow.

The rule (README, Guarantees): line n of a file and line n of another file are the same event
iff their first n lines are byte-identical (line endings and a leading BOM aside). Where the
file lives, where `send` runs and whether its state exists do not matter. Everything here runs
the real `evtool send`, `serve` and `process` as subprocesses against real PostgreSQL.
"""

from __future__ import annotations

import json
import os
import shutil
from decimal import Decimal
from pathlib import Path

import psycopg

from evtool.processor import Processor

from ..conftest import evtool
from .helpers import Serve, db_totals, free_port, http

HEADER = b'{"userId": "header", "name": "add_revenue", "value": 0}'


def ev(user: str, value: int | str = 1) -> bytes:
    return f'{{"userId": "{user}", "name": "add_revenue", "value": {value}}}'.encode()


def write(path: Path, lines: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def sum_of(*groups: list[bytes]) -> dict[str, Decimal]:
    """The totals the given event lines make, each line once."""
    out: dict[str, Decimal] = {}
    for lines in groups:
        for line in lines:
            obj = json.loads(line, parse_float=Decimal)
            out[obj["userId"]] = out.get(obj["userId"], Decimal(0)) + Decimal(obj["value"])
    return {u: v for u, v in out.items()}


def send(path: Path, url: str, home: Path, cwd: Path, *args: str) -> str:
    cwd.mkdir(parents=True, exist_ok=True)
    done = evtool("send", str(path), "--url", url, *args, cwd=cwd, env={"EVTOOL_HOME": str(home)})
    assert done.returncode == 0, done.stderr
    return done.stderr


def process(workdir: Path) -> dict:
    done = evtool("process", "--json", str(workdir / "server-events.jsonl"), cwd=workdir)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_same_first_line_other_file_is_new_without_state(dsn, tmp_path):
    """A file replaced by another with the same first line, sent again from another directory
    (another state): its events are new, not dropped as the old file's."""
    old = [HEADER, ev("a", 1), ev("b", 2)]
    new = [HEADER, ev("c", 5), ev("d", 7), ev("a", 11)]
    src = tmp_path / "exports" / "today.jsonl"
    with Serve(tmp_path) as serve:
        write(src, old)
        send(src, serve.url, tmp_path / "home1", tmp_path / "cwd1")
        write(src, new)
        send(src, serve.url, tmp_path / "home2", tmp_path / "cwd2")
    process(tmp_path)
    assert db_totals(dsn) == sum_of(old, new[1:])


def test_moved_copied_and_linked_file_counts_once(dsn, tmp_path):
    lines = [HEADER, *(ev(f"u{i % 7}", i) for i in range(1, 40))]
    src = write(tmp_path / "a" / "events.jsonl", lines)
    with Serve(tmp_path) as serve:
        send(src, serve.url, tmp_path / "home", tmp_path)
        copy = tmp_path / "b" / "copy.jsonl"
        copy.parent.mkdir()
        shutil.copy(src, copy)
        send(copy, serve.url, tmp_path / "home-b", tmp_path / "b")
        link = tmp_path / "c" / "link.jsonl"
        link.parent.mkdir()
        os.link(src, link)
        send(link, serve.url, tmp_path / "home", tmp_path / "c")
        moved = tmp_path / "d" / "moved.jsonl"
        moved.parent.mkdir()
        src.rename(moved)
        send(moved, serve.url, tmp_path / "home-d", tmp_path / "d", "--from-start")
    report = process(tmp_path)
    assert db_totals(dsn) == sum_of(lines)
    # The copy and the move were sent in full (other states) and were all duplicates; the link,
    # sent with the first state, was recognised as already sent and not read again.
    assert report["files"][0]["duplicates"] == 2 * len(lines)


def test_a_diverging_file_is_new_from_the_first_line_that_differs(dsn, tmp_path):
    first = [HEADER, *(ev(f"u{i}", i) for i in range(1, 10))]
    k = 6  # lines 1..5 equal, line 6 differs, 7.. follow it (equal text, still new events)
    second = first[:k - 1] + [ev("changed", 100)] + first[k:]
    with Serve(tmp_path) as serve:
        send(write(tmp_path / "one.jsonl", first), serve.url, tmp_path / "home", tmp_path)
        send(write(tmp_path / "two.jsonl", second), serve.url, tmp_path / "home", tmp_path)
    report = process(tmp_path)
    assert db_totals(dsn) == sum_of(first, second[k - 1:])
    assert report["files"][0]["duplicates"] == k - 1


def test_resume_after_an_in_place_rewrite_of_the_middle(dsn, tmp_path):
    """The state says 10 lines were sent; line 5 is rewritten in place (same length) and lines
    are appended: the resume notices, sends from the start, and the totals follow the rule."""
    first = [HEADER, *(ev(f"u{i}", i) for i in range(1, 10))]
    src = write(tmp_path / "e.jsonl", first)
    second = first[:4] + [ev("u9", 4)] + first[5:] + [ev("late", 1000)]
    assert len(second[4]) == len(first[4])
    with Serve(tmp_path) as serve:
        send(src, serve.url, tmp_path / "home", tmp_path)
        with open(src, "r+b") as f:  # same inode, same size up to the old end
            f.write(b"".join(line + b"\n" for line in second))
        note = send(src, serve.url, tmp_path / "home", tmp_path)
    assert "differs from what was sent before" in note and str(src) in note
    process(tmp_path)
    assert db_totals(dsn) == sum_of(first, second[4:])


def test_idempotency_key_reused_with_another_body(dsn, tmp_path):
    key = {"Content-Type": "application/x-ndjson", "Idempotency-Key": "batch-42", "Authorization": "secret"}
    body = ev("a", 3) + b"\n" + ev("b", 4) + b"\n"
    other = ev("a", 5) + b"\n"
    with Serve(tmp_path) as serve:
        assert http(serve.url + "/liveEvent", "POST", body, key)[0] == 200
        status, answer, _ = http(serve.url + "/liveEvent", "POST", other, key)
        assert status == 422 and "already used with a different request body" in answer["error"]
        assert http(serve.url + "/liveEvent", "POST", body, key)[0] == 200  # a true retry
    assert len((tmp_path / "server-events.jsonl").read_bytes().splitlines()) == 4  # nothing of `other`
    process(tmp_path)
    assert db_totals(dsn) == {"a": Decimal(3), "b": Decimal(4)}


def test_same_event_id_with_other_content_is_a_reject_not_a_drop(dsn, tmp_path):
    one = write(tmp_path / "one.jsonl", [ev("x", 1), b'{"userId": "a", "name": "add_revenue", "value": 5,'
                                                   b' "eventId": "order-1"}'])
    two = write(tmp_path / "two.jsonl", [ev("y", 1), b'{"eventId": "order-1", "userId": "a",'
                                                   b' "name": "add_revenue", "value": 5.0}',
                                         b'{"userId": "a", "name": "add_revenue", "value": 7,'
                                         b' "eventId": "order-1"}'])
    done = evtool("process", "--json", str(one), str(two), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    files = json.loads(done.stdout)["files"]
    assert [(f["applied"], f["duplicates"], f["rejected"]) for f in files] == [(2, 0, 0), (1, 1, 1)]
    assert db_totals(dsn) == {"x": Decimal(1), "y": Decimal(1), "a": Decimal(5)}
    listed = evtool("rejects", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "eventId order-1 was already applied with different content" in listed.stdout
    assert f"{one.resolve()} line 2" in listed.stdout


def test_a_source_with_gaps_costs_the_same_per_batch_late_as_early(dsn, tmp_path):
    """A sender source with a gap every other line (own-id lines between its lines): the
    database work of a batch must not grow with the source's history. Counted as WAL bytes
    written per batch (the rows a batch rewrites), early batches against late ones."""
    src = "0123456789abcdef"
    path = tmp_path / "server-events.jsonl"
    with open(path, "wb") as f:
        for i in range(1, 60_001):
            f.write(b'{"userId": "u%d", "name": "add_revenue", "value": 1, "eventId": "%s:%d"}\n'
                    % (i % 50, src.encode(), 2 * i - 1))  # ids 1, 3, 5...: a gap between each
    wal: list[int] = []
    with psycopg.connect(dsn, autocommit=True) as watch:
        def lsn() -> int:
            return int(watch.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0])

        last = [lsn()]

        def batch_done(_offset: int) -> None:
            now = lsn()
            wal.append(now - last[0])
            last[0] = now

        proc = Processor(dsn, batch_bytes=48 * 1024, workers=0)
        try:
            proc.process_file(path, batch_done)
        finally:
            proc.close()
    assert len(wal) >= 80
    early, late = sorted(wal[5:25])[10], sorted(wal[-20:])[10]  # medians
    assert late <= 2 * early, (early, late)
    assert db_totals(dsn) == {f"u{i}": Decimal(1200) for i in range(50)}


def test_a_fresh_receiver_on_the_same_url_gets_the_file_again(dsn, tmp_path):
    """Issue 10: after `make demo` (a receiver on 127.0.0.1:8000 with its own journal), the
    by-hand steps start another receiver on the same URL: `send` must send the file to it, not
    say it was sent (its state is per receiver: URL and the receiver's host and journal)."""
    lines = [ev(f"u{i}", i) for i in range(1, 6)]
    src = write(tmp_path / "events.jsonl", lines)
    port = free_port()
    (tmp_path / "demo").mkdir()
    with Serve(tmp_path / "demo", port=port) as demo:
        send(src, demo.url, tmp_path / "home", tmp_path)
        send(src, demo.url, tmp_path / "home", tmp_path)  # nothing new for the same receiver
    (tmp_path / "by-hand").mkdir()
    with Serve(tmp_path / "by-hand", port=port) as fresh:
        send(src, fresh.url, tmp_path / "home", tmp_path)
    assert len((tmp_path / "demo" / "server-events.jsonl").read_bytes().splitlines()) == len(lines)
    assert len((tmp_path / "by-hand" / "server-events.jsonl").read_bytes().splitlines()) == len(lines)
