"""Issue 9 item 7 (second bullet): what a batch holds is bounded by distinct users too, not only
by `--batch-mb`. The sums of the C loop are in tables that a worker writes to its spill file once
they hold parser.TABLE_FLUSH bytes (and starts afresh): they never cut a batch. What cannot go
there (the Python loops' dicts: decimal values here; opaque-id events) ends a worker part once it
holds parser.MAX_HELD bytes, and the batch there.

A dict key is estimated at parser._KEY_BYTES besides the id's characters: so a part that passed
its cap held at most `_users(cap, id_len)` users before the piece that passed it."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tracemalloc
from decimal import Decimal
from pathlib import Path

import pytest

from evtool import identity, output, parser, processor, store

from ..conftest import totals


def _users(cap: int, id_len: int) -> int:
    """The most users of `id_len` characters a part holds in dicts without passing `cap` bytes."""
    return cap // (parser._KEY_BYTES + id_len)


def _distinct_long_users(tmp_path: Path, n: int, fraction: bytes) -> Path:
    """A journal of `n` events of distinct 256-character users, values i % 7 + 1 then `fraction`."""
    path = tmp_path / "server-events.jsonl"
    with open(path, "wb") as f:
        for i in range(n):
            user = f"{i:08d}" + "x" * 248
            f.write(b'{"userId":"%s","name":"add_revenue","value":%d%s}\n'
                    % (user.encode(), i % 7 + 1, fraction))
    return path


def test_many_distinct_users_flush_the_tables_and_never_cut_the_batch(dsn, tmp_path: Path, monkeypatch):
    """Issue 11: 60,000 distinct 256-character users, integer values (the C loop's tables): one
    batch, its workers' tables written to their spill files whenever they held 1 MB."""
    monkeypatch.setattr(parser, "TABLE_FLUSH", 1 << 20)  # the workers are forked after this
    n = 60_000
    path = _distinct_long_users(tmp_path, n, b"")
    report = processor.process(dsn, [path], batch_bytes=64 << 20, workers=2, inline_bytes=0,
                               piece_bytes=64 << 10, max_held=1 << 20)
    assert report.applied == n and report.rejected == 0 and report.files[0].batches == 1
    got = totals(dsn)
    assert len(got) == n and sum(got.values()) == sum(i % 7 + 1 for i in range(n))
    # what a worker did: many flushes, each table within the bound (plus one piece) when written
    st = path.stat()
    with open(tmp_path / "spill", "w+b") as sf:
        sst = os.fstat(sf.fileno())
        part = parser.parse_range(str(path), (st.st_dev, st.st_ino), 0, st.st_size, piece=64 << 10,
                                  spill=(sf.name, sst.st_dev, sst.st_ino))
    spans = part.fresh_rows.spans
    assert not part.cut and part.fresh_count == n and part.fresh_rows.count == n and len(spans) >= 10
    row = len(b"\t\t1\t1\t0\t0\n") + 256  # at most a row's bytes, here
    assert max(length for _, length in spans) < ((1 << 20) // (32 + 256) + (64 << 10) // 300) * row


def test_a_batch_ends_where_a_part_holds_too_many_distinct_users(dsn, tmp_path: Path):
    """The same users with decimal values: summed by the Python loops in dicts, which are cut."""
    n, cap = 60_000, 2_500_000
    path = _distinct_long_users(tmp_path, n, b".5")
    report = processor.process(dsn, [path], batch_bytes=64 << 20, workers=2, inline_bytes=0,
                               piece_bytes=64 << 10, max_held=cap)
    assert report.applied == n and report.rejected == 0
    # each batch held at most workers * (cap + one piece) users: many batches, not one
    assert report.files[0].batches >= n // (2 * (_users(cap, 256) + 300)), report.files[0].batches
    got = totals(dsn)
    assert len(got) == n and sum(got.values()) == sum(Decimal(i % 7 + 1) + Decimal("0.5") for i in range(n))
    # and a rerun finds nothing left: every cut batch ended on a line boundary, nothing twice
    again = processor.process(dsn, [path], batch_bytes=64 << 20, workers=2, inline_bytes=0, max_held=cap)
    assert again.applied == 0 and again.duplicates == 0


def test_a_part_is_cut_after_the_piece_that_passes_the_cap(tmp_path: Path):
    path = tmp_path / "j.jsonl"
    lines = [b'{"userId":"u%d","name":"add_revenue","value":1.5}\n' % i for i in range(1000)]
    path.write_bytes(b"".join(lines))
    st = path.stat()
    cap = 30_000
    part = parser.parse_range(str(path), (st.st_dev, st.st_ino), 0, st.st_size, piece=4096, max_held=cap)
    assert part.cut and part.held > cap and len(part.users) < 1000 and part.end < st.st_size
    # within the cap until its last piece (at most 4096 / 45 lines): not far past it
    assert len(part.users) <= _users(cap, 2) + 100, len(part.users)
    assert part.end == sum(len(x) for x in lines[:part.lines])  # on a line boundary
    whole = parser.parse_range(str(path), (st.st_dev, st.st_ino), 0, st.st_size, piece=4096)
    assert not whole.cut and whole.end == st.st_size and len(whole.users) == 1000


def _note_cuts(monkeypatch: pytest.MonkeyPatch) -> set[int]:
    """The offsets where parts that had to end early (parser.held) start, as batches are made."""
    cut: set[int] = set()
    batch = processor._Planned.batch

    def noting_cuts(planned: processor._Planned, *args: object) -> parser.Batch:
        b = batch(planned, *args)
        cut.update(p.offset for p in planned._parts if p.cut)
        return b

    monkeypatch.setattr(processor._Planned, "batch", noting_cuts)
    return cut


@pytest.mark.parametrize("ids", ["none", "sender", "opaque"])
def test_many_users_are_parsed_once_not_again_after_each_cut(dsn, tmp_path: Path, ids: str, monkeypatch):
    """A journal whose parts keep reaching the users cap gets smaller batches planned to fit,
    instead of every cut throwing away the other parts and the batch parsed ahead (the work
    then grew with the number of cuts: 1M events of 100k users ran 4x slower). Nor is the
    first cut's work thrown away, before the run has learnt the journal's density."""
    # an opaque-id event is held as ~400 bytes (parser._OPAQUE_BYTES): the cap is some pieces' worth
    n, cap = 80_000, 800 << 10
    path = tmp_path / "server-events.jsonl"
    eid = {"none": lambda i: b"", "sender": lambda i: b',"eventId":"00000000000000ab:%d"' % (i + 1),
           "opaque": lambda i: b',"eventId":"order-%d"' % i}[ids]
    with open(path, "wb") as f:
        for i in range(n):
            f.write(b'{"userId":"u%d","name":"add_revenue","value":%d.5%s}\n' % (i, i % 7 + 1, eid(i)))
    size = path.stat().st_size
    # batches of a third of the file: the first one planned blind is followed by others
    proc = processor.Processor(dsn, batch_bytes=size // 3, workers=2, inline_bytes=0, piece_bytes=16 << 10,
                               max_held=cap)
    starts: list[int] = []  # where each range handed to the workers starts, in order
    cut = _note_cuts(monkeypatch)
    submit = proc.pool.submit
    proc.pool.submit = lambda f, p, start, end: starts.append(start) or submit(f, p, start, end)
    try:
        report = proc.process([path])
    finally:
        proc.close()
    assert report.applied == n and report.rejected == 0
    assert report.files[0].batches >= n // (2 * (_users(cap, 6) + 400))  # bounded, as above
    # handed over in journal order: the rest of a cut part is never queued behind later bytes
    assert len(starts) > 2 and starts == sorted(set(starts)), starts
    # once the first batch showed how dense the journal is, batches are planned to fit: only
    # its parts were cut (the short batches that end a cut part's rest do not undo that)
    assert 0 < len(cut) <= 2, sorted(cut)
    # every byte parsed once: a cut keeps the parts after it, and only the rest of the cut
    # part's own range is parsed again
    assert proc.parsed_bytes == size, (proc.parsed_bytes, size)
    assert sum(totals(dsn).values()) == sum(Decimal(i % 7 + 1) + Decimal("0.5") for i in range(n))
    if ids != "none":  # the ids of the parts kept across a cut (sender cells spilled) were recorded
        copy = tmp_path / "copy.jsonl"
        copy.write_bytes(b'{"userId":"other","name":"add_revenue","value":1}\n' + path.read_bytes())
        again = processor.process(dsn, [copy], batch_bytes=64 << 20, workers=2, inline_bytes=0,
                                  piece_bytes=16 << 10, max_held=cap)
        assert (again.applied, again.duplicates) == (1, n)


def test_the_short_batch_that_ends_a_cut_parts_rest_does_not_resize_the_batches_after_it(dsn, tmp_path: Path,
                                                                                        monkeypatch):
    """The rest of a part cut short is planned in batches sized to fit, the last one shorter
    (it ends where the rest ends). That one holds few users because it is short, not because
    the journal thinned out: batches after it stay sized to fit, and are not cut again."""
    n, cap = 40_000, 512 << 10
    path = tmp_path / "server-events.jsonl"
    with open(path, "wb") as f:
        for i in range(n):
            f.write(b'{"userId":"u%d","name":"add_revenue","value":1.5}\n' % i)
    size = path.stat().st_size
    cut = _note_cuts(monkeypatch)
    report = processor.process(dsn, [path], batch_bytes=size // 3, workers=1, inline_bytes=0,
                               piece_bytes=16 << 10, max_held=cap)
    assert report.applied == n and sum(totals(dsn).values()) == Decimal("1.5") * n
    assert report.files[0].batches > 3 and cut == {0}, (report.files[0].batches, sorted(cut))


def test_two_processors_on_one_journal_with_cut_parts_apply_each_event_once(dsn, tmp_path: Path):
    """Parts cut short, kept for later batches and ranges planned again, while another processor
    commits batches of the same journal: the plans of a processor that finds its offset moved are
    dropped (kept parts, ranges and all), and the two apply each event exactly once."""
    n, cap = 60_000, 128 << 10
    path = tmp_path / "server-events.jsonl"
    with open(path, "wb") as f:
        for i in range(n):
            eid = b"00000000000000ab:%d" % (i + 1) if i % 2 else b"order-%d" % i
            f.write(b'{"userId":"u%d","name":"add_revenue","value":%d,"eventId":"%s"}\n'
                    % (i, i % 7 + 1, eid))
    size = path.stat().st_size
    script = ("import json, sys; from pathlib import Path; from evtool import processor; "
              f"r = processor.process(sys.argv[1], [Path(sys.argv[2])], batch_bytes={size // 4}, workers=2, "
              f"inline_bytes=0, piece_bytes=16 << 10, max_held={cap}); "
              "print(json.dumps([r.applied, r.duplicates, r.rejected]))")
    procs = [subprocess.Popen([sys.executable, "-c", script, dsn, str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    counts = [json.loads(out) for out, _ in outs]
    assert sum(c[0] for c in counts) == n and all(c[2] == 0 for c in counts), counts
    got = totals(dsn)
    assert len(got) == n and sum(got.values()) == sum(i % 7 + 1 for i in range(n))


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
    rows = part.fresh_rows.data + b"".join(p.rows.data for p in part.sources.values())
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


def _sender_lines(numbers: range, source: bytes = b"00000000000000aa") -> bytes:
    return b"".join(b'{"userId":"u%d","name":"add_revenue","value":%d,"eventId":"%s:%d:%016x"}\n'
                    % (n % 10, n % 7 + 1, source, n, n * 7919) for n in numbers)


def test_the_committing_process_never_holds_a_batch_of_sender_identity_entries(dsn, tmp_path: Path,
                                                                                 monkeypatch):
    """Issue 4's memory bound, lost with issue 9's chains: every sender-id event carries a
    10-byte identity entry, and the committing process held a whole batch's (received from the
    workers, in the batch, escaped to four times their size in one UPDATE parameter): its peak
    grew with the events of a batch, up to 128 MiB of journal. The entries now reach it through
    a spill file per worker part and go to the database a statement at a time."""
    n = 200_000
    path = tmp_path / "server-events.jsonl"
    path.write_bytes(_sender_lines(range(1, n + 1)))
    monkeypatch.setattr(store, "CELL_WRITE_BYTES", 32 << 10, raising=False)  # a statement, made small
    peaks = []  # what the process held at most while it applied the batch (traced since the start)
    real_apply = processor.apply

    def apply(*args, **kwargs):
        tracemalloc.reset_peak()
        outcome = real_apply(*args, **kwargs)
        peaks.append(tracemalloc.get_traced_memory()[1])
        return outcome

    monkeypatch.setattr(processor, "apply", apply)
    tracemalloc.start()
    try:
        report = processor.process(dsn, [path], workers=2, inline_bytes=0)  # one batch, two parts
    finally:
        tracemalloc.stop()
    assert (report.applied, report.files[0].batches, len(peaks)) == (n, 1, 1)
    entries = n * identity.ENTRY  # 2 MB: what one copy of the batch's entries takes
    assert peaks[0] < entries // 3, (peaks, entries)  # was 5x the entries; now ~0.1x
    assert sum(totals(dsn).values()) == sum(i % 7 + 1 for i in range(1, n + 1))


def test_spilled_cells_decide_repeats_across_parts_and_against_stored_lines(dsn, tmp_path: Path):
    """The spilled entries still decide exactly-once: a line repeated in the other part of the
    same batch (a sender's retry) counts once, and a second journal re-sending half of them
    applies only the other half."""
    n = 40_000
    path = tmp_path / "server-events.jsonl"
    path.write_bytes(_sender_lines(range(1, n + 1)) + _sender_lines(range(1, 1001)))  # 1..1000 again
    report = processor.process(dsn, [path], workers=2, inline_bytes=0, piece_bytes=64 << 10)
    assert (report.applied, report.duplicates, report.files[0].batches) == (n, 1000, 1)
    other = tmp_path / "other.jsonl"
    plain = b'{"userId":"p","name":"add_revenue","value":5}\n'
    other.write_bytes(plain + _sender_lines(range(n // 2, n + n // 2)))  # n/2 + 1 of them seen
    report = processor.process(dsn, [other], workers=2, inline_bytes=0, piece_bytes=64 << 10)
    assert (report.applied, report.duplicates) == (1 + n // 2 - 1, n // 2 + 1)
    want: dict[str, int] = {"p": 5}
    for i in range(1, n + n // 2):
        want[f"u{i % 10}"] = want.get(f"u{i % 10}", 0) + i % 7 + 1
    assert totals(dsn) == want
    # and nothing is left to apply: the cells hold every line once
    again = processor.process(dsn, [path, other], workers=2, inline_bytes=0)
    assert again.applied == 0 and again.duplicates == 0


def test_the_count_of_users_touched_is_exact_then_bounded(dsn, tmp_path: Path, monkeypatch):
    """Issue 11: "no structure may grow with distinct users". The run's count of users touched
    kept the hash of every one (~64 MiB at 1M users, forever under --follow); past EXACT_USERS
    it is now a HyperLogLog estimate in 16 KiB, said to be one."""
    few = processor.DistinctUsers()
    few.update(hash(f"u{i}") for i in range(1000))
    few.update(hash(f"u{i}") for i in range(500))
    assert (len(few), few.exact) == (1000, True)
    many = processor.DistinctUsers()
    for start in range(0, 300_000, 50_000):  # batches over 300k users, each seen twice
        many.update([hash(f"user{i}") for i in range(start, start + 50_000)] * 2)
    assert not many.exact and abs(len(many) - 300_000) < 300_000 * 0.04, len(many)
    assert many._exact is None and len(many._registers) == 1 << 14  # what it holds: 16 KiB
    # one batch of 1M users (one big batch) never makes a set of them on the way to the estimate
    hashes = [hash(f"big{i}") for i in range(1_000_000)]
    tracemalloc.start()
    big = processor.DistinctUsers()
    big.update(hashes)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert not big.exact and abs(len(big) - 1_000_000) < 1_000_000 * 0.04
    assert peak < 16 << 20, peak  # a set of 1M hashes: ~40 MiB; of EXACT_USERS: ~5
    # through the CLI's report: the estimate is said to be one
    monkeypatch.setattr(processor.DistinctUsers, "EXACT_USERS", 100)
    path = tmp_path / "server-events.jsonl"
    path.write_bytes(b"".join(b'{"userId":"p%d","name":"add_revenue","value":1}\n' % i for i in range(3000)))
    report = processor.process(dsn, [path], workers=0)
    assert not report.users.exact and abs(len(report.users) - 3000) < 3000 * 0.05
    assert output.process_dict(report)["users_exact"] is False


def test_a_worker_writes_only_to_the_spill_file_it_was_given(tmp_path: Path):
    """A spill file is named by a descriptor number of the committing process; were the number
    taken by another file meanwhile (it never is while a worker may open it), the worker refuses
    it by inode before writing or truncating anything."""
    path = tmp_path / "j.jsonl"
    path.write_bytes(_sender_lines(range(1, 3001)))
    st = path.stat()
    other = tmp_path / "not-the-spill-file"
    other.write_bytes(b"keep me")
    ost = other.stat()
    with pytest.raises(OSError, match="not the spill file"):
        parser.parse_range(str(path), (st.st_dev, st.st_ino), 0, st.st_size,
                           spill=(str(other), ost.st_dev, ost.st_ino + 1))
    assert other.read_bytes() == b"keep me"
    # given the right one, the part crosses with its records, not its entries
    part = parser.parse_range(str(path), (st.st_dev, st.st_ino), 0, st.st_size, piece=4096,
                              spill=(str(other), ost.st_dev, ost.st_ino))
    source = part.sources["00000000000000aa"]
    assert source.cells == {} and source.count == 3000 and len(source.spilled) % 3 == 0
    # the entries, then the rows (written from byte 0: "keep me" was overwritten, never truncated)
    rows = [r for r in (part.fresh_rows, part.opaque_sum_rows, source.rows) if r.size]
    assert [r.spans[0][0] for r in rows] == [3000 * identity.ENTRY] and source.rows.count == rows[0].count
    assert other.stat().st_size == 3000 * identity.ENTRY + source.rows.size


def test_a_large_batch_that_must_decide_lines_one_by_one_is_applied_in_smaller_batches(dsn, tmp_path: Path,
                                                                                        monkeypatch):
    """Sender lines repeated within a batch, or applied before with new ones beside them, are
    decided line by line with the batch's bytes in the committing process: a batch larger than
    processor.LINE_BY_LINE_BYTES is rolled back and the journal from there planned in batches of
    that size, which grow again (doubling) after each batch of new lines."""
    monkeypatch.setattr(processor, "LINE_BY_LINE_BYTES", 64 << 10)
    monkeypatch.setattr(identity, "TAKE_BACK_MAX", 0)  # no retry taken back by finding its lines
    decided: list[int] = []  # the size of each batch whose lines were decided one by one
    real_apply = processor.apply

    def apply(store, b, reread, *args, **kwargs):
        def counted() -> bytes:
            data = reread()
            decided.append(b.end - b.offset)
            return data
        return real_apply(store, b, counted, *args, **kwargs)

    monkeypatch.setattr(processor, "apply", apply)
    path = tmp_path / "server-events.jsonl"
    first = _sender_lines(range(1, 20_001))
    path.write_bytes(first + _sender_lines(range(5000, 5100)))  # a retry of 100 lines, at the end
    report = processor.process(dsn, [path], workers=2, inline_bytes=0)
    assert (report.applied, report.duplicates, report.rejected) == (20_000, 100, 0)
    assert decided and max(decided) <= (64 << 10) * 5 // 4, decided  # (a batch may run a quarter over)
    # fewer batches than the journal in slow-path-sized ones: they grew again in between
    assert 1 < report.files[0].batches < path.stat().st_size // (64 << 10), report.files[0].batches
    want: dict[str, int] = {}
    for n in range(1, 20_001):
        want[f"u{n % 10}"] = want.get(f"u{n % 10}", 0) + n % 7 + 1
    assert totals(dsn) == want
    # a second journal carrying lines applied before, then new ones: the same, from its start
    other = tmp_path / "other.jsonl"
    half = first[: first.index(b"\n", len(first) // 2) + 1]
    other.write_bytes(b'{"userId":"other","name":"add_revenue","value":1}\n' + half
                      + _sender_lines(range(20_001, 22_001)))
    decided.clear()
    again = processor.process(dsn, [other], workers=2, inline_bytes=0)
    assert (again.duplicates, again.applied) == (half.count(b"\n"), 1 + 2000)
    assert decided and max(decided) <= (64 << 10) * 5 // 4, decided
