"""Issue 9 item 7 (second bullet): what a batch holds is bounded by distinct users too, not only
by `--batch-mb`: a worker part ends once it holds MAX_USERS_PER_PART users, and the batch there."""

from __future__ import annotations

import pickle
from pathlib import Path

from evtool import parser, processor

from ..conftest import totals


def test_a_batch_ends_where_a_part_holds_too_many_distinct_users(dsn, tmp_path: Path):
    n, cap = 60_000, 5_000
    path = tmp_path / "server-events.jsonl"
    with open(path, "wb") as f:
        for i in range(n):
            user = f"{i:08d}" + "x" * 248  # 256 characters, all distinct
            f.write(b'{"userId":"%s","name":"add_revenue","value":%d}\n' % (user.encode(), i % 7 + 1))
    report = processor.process(dsn, [path], batch_bytes=64 << 20, workers=2, inline_bytes=0,
                               piece_bytes=64 << 10, max_users=cap)
    assert report.applied == n and report.rejected == 0
    # each batch held at most workers * (cap + one piece) users: many batches, not one
    assert report.files[0].batches >= n // (2 * (cap + 300)), report.files[0].batches
    got = totals(dsn)
    assert len(got) == n and sum(got.values()) == sum(i % 7 + 1 for i in range(n))
    # and a rerun finds nothing left: every cut batch ended on a line boundary, nothing twice
    again = processor.process(dsn, [path], batch_bytes=64 << 20, workers=2, inline_bytes=0, max_users=cap)
    assert again.applied == 0 and again.duplicates == 0


def test_a_part_is_cut_after_the_piece_that_passes_the_cap(tmp_path: Path):
    path = tmp_path / "j.jsonl"
    lines = [b'{"userId":"u%d","name":"add_revenue","value":1}\n' % i for i in range(1000)]
    path.write_bytes(b"".join(lines))
    st = path.stat()
    part = parser.parse_range(str(path), (st.st_dev, st.st_ino), 0, st.st_size, piece=4096, max_users=100)
    assert part.cut and 100 < len(part.users) < 200 and part.end < st.st_size
    assert part.end == sum(len(x) for x in lines[:part.lines])  # on a line boundary
    whole = parser.parse_range(str(path), (st.st_dev, st.st_ino), 0, st.st_size, piece=4096)
    assert not whole.cut and whole.end == st.st_size and len(whole.users) == 1000


def test_many_users_are_parsed_about_once_not_again_after_each_cut(dsn, tmp_path: Path):
    """A journal whose parts keep reaching the users cap gets smaller batches planned to fit,
    instead of every cut throwing away the other parts and the batch parsed ahead (the work
    then grew with the number of cuts: 1M events of 100k users ran 4x slower)."""
    n, cap = 80_000, 2_000
    path = tmp_path / "server-events.jsonl"
    with open(path, "wb") as f:
        for i in range(n):
            f.write(b'{"userId":"u%d","name":"add_revenue","value":%d}\n' % (i, i % 7 + 1))
    size = path.stat().st_size
    proc = processor.Processor(dsn, batch_bytes=64 << 20, workers=2, inline_bytes=0, piece_bytes=16 << 10,
                               max_users=cap)
    try:
        report = proc.process([path])
    finally:
        proc.close()
    assert report.applied == n and report.rejected == 0
    assert report.files[0].batches >= n // (2 * cap)  # bounded by users, as above
    assert proc.pool.submitted_bytes <= 2 * size, (proc.pool.submitted_bytes, size)
    assert sum(totals(dsn).values()) == sum(i % 7 + 1 for i in range(n))


def test_a_worker_part_crosses_as_rows_and_counts_not_as_sums_and_user_ids(tmp_path: Path):
    """Issue 11: what a worker sends the committing process is its COPY rows, and 8 bytes a user
    to count them: not also a dict of sums and a list of user ids beside the rows (the main
    process of a 10M-event, 1M-user run held 380 MiB of them)."""
    path = tmp_path / "j.jsonl"
    n = 20_000
    with open(path, "wb") as f:
        for i in range(n):
            user = f"user{i:06d}" + "x" * 60
            f.write(b'{"userId":"%s","name":"add_revenue","value":%d,"eventId":"00000000000000aa:%d"}\n'
                    % (user.encode(), i % 7 + 1, i + 1) if i % 2 else
                    b'{"userId":"%s","name":"add_revenue","value":%d}\n' % (user.encode(), i % 7 + 1))
    st = path.stat()
    part = parser.parse_range(str(path), (st.st_dev, st.st_ino), 0, st.st_size)
    rows = part.fresh_rows + b"".join(p.rows for p in part.sources.values())
    assert rows.count(b"\n") == n and len(part.users) == n
    pickled = len(pickle.dumps(part))
    # the rows once, 8 bytes a user (+ slack for the cells and the dataclasses), nothing else
    assert pickled < len(rows) + 10 * n + 8 * n + 4096, (pickled, len(rows))


def test_the_main_process_applies_worker_rows_with_sender_ids_already_seen(dsn, tmp_path: Path):
    """A batch whose sender lines were partly applied before re-derives those sums from the
    journal (the part arrives without them): totals stay exact, the repeats count once."""
    path = tmp_path / "server-events.jsonl"
    first = b"".join(b'{"userId":"u%d","name":"add_revenue","value":%d,"eventId":"00000000000000aa:%d"}\n'
                     % (i % 50, i % 7 + 1, i + 1) for i in range(3000))
    path.write_bytes(first)
    assert processor.process(dsn, [path], workers=2, inline_bytes=0).applied == 3000
    # a second journal carrying the same sender lines again, plus new ones and position lines
    again = tmp_path / "other.jsonl"
    more = b"".join(b'{"userId":"u%d","name":"add_revenue","value":%d,"eventId":"00000000000000aa:%d"}\n'
                    % (i % 50, i % 7 + 1, i + 1) for i in range(2000, 4000))
    plain = b"".join(b'{"userId":"p%d","name":"add_revenue","value":3}\n' % i for i in range(500))
    again.write_bytes(more + plain)
    report = processor.process(dsn, [again], workers=2, inline_bytes=0)
    assert (report.applied, report.duplicates) == (1000 + 500, 1000)
    assert len(report.users) == 50 + 500  # users whose totals changed, each once
    got = totals(dsn)
    want: dict[str, int] = {}
    for i in range(4000):
        want[f"u{i % 50}"] = want.get(f"u{i % 50}", 0) + i % 7 + 1
    want.update({f"p{i}": 3 for i in range(500)})
    assert got == want
