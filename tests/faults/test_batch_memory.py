"""Issue 9 item 7 (second bullet): what a batch holds is bounded by distinct users too, not only
by `--batch-mb`: a worker part ends once it holds MAX_USERS_PER_PART users, and the batch there."""

from __future__ import annotations

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
