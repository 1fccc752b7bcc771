"""Issue 9, items 1 and 2: journals that change under the processor, and a full disk beside it.

Real `evtool process` / `serve` subprocesses, real files, the session's PostgreSQL. To change a
file *while a batch is parsed*, the parse workers (forked children of `process`) are stopped
with SIGSTOP, the file is changed, and they are continued: the change then lands inside the
parse, deterministically.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import process as cf_process
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from evtool import journal as journal_mod
from evtool.processor import ParsePool

from .helpers import Serve, db_totals, evtool_cmd, generate, http, session_members, start
from .test_files import file_totals

AUTH = {"Authorization": "secret"}
HANG_GUARD = 90  # seconds: a hang guard only, never a duration assertion


def children(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (the parse workers of a `process`)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z" and int(fields[1]) == pid:
                found.append(int(entry))
    return found


def stop_workers(proc: subprocess.Popen) -> list[int]:
    """Wait until `proc` forked its parse workers (a batch is being parsed), then SIGSTOP them."""
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline:
        kids = children(proc.pid)
        if kids:
            for pid in kids:
                os.kill(pid, signal.SIGSTOP)
            return kids
        assert proc.poll() is None, "process ended before forking its workers"
        time.sleep(0.001)
    raise AssertionError("no parse workers appeared")


def cont(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def finish(proc: subprocess.Popen, log: Path) -> tuple[int, str]:
    """Wait for `proc` (hang guard); kill its whole session if it hangs, and fail."""
    try:
        rc = proc.wait(timeout=HANG_GUARD)
    except subprocess.TimeoutExpired:
        rc = None
    for pid in session_members(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if rc is None:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the command hung:\n{log.read_text(errors='replace')[-2000:]}")
    return rc, log.read_text(errors="replace")


def progress(dsn: str, fp: bytes) -> int:
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT to_regclass('journal_files')").fetchone()[0] is None:
            return 0
        row = conn.execute('SELECT "offset" FROM journal_files WHERE fingerprint = %s', (fp,)).fetchone()
    return row[0] if row else 0


def fingerprint_of(data: bytes) -> bytes:
    fp = journal_mod.fingerprint(io.BytesIO(data))
    assert fp is not None
    return fp


def complete_lines(data: bytes, end: int | None = None) -> bytes:
    """The complete lines of `data` (up to `end`)."""
    data = data if end is None else data[:end]
    return data[: data.rfind(b"\n") + 1]


def totals_of(tmp_path: Path, *chunks: bytes) -> dict[str, Decimal]:
    out: dict[str, Decimal] = {}
    for i, chunk in enumerate(chunks):
        p = tmp_path / f"expected-{i}.jsonl"
        p.write_bytes(chunk)
        for user, value in file_totals(p).items():
            out[user] = out.get(user, Decimal(0)) + value
    return {u: v for u, v in out.items()}


def wait_totals(dsn: str, want: dict[str, Decimal], proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + HANG_GUARD
    got: dict = {}
    while time.monotonic() < deadline:
        try:
            got = db_totals(dsn)
        except psycopg.errors.UndefinedTable:  # the follower has not created the schema yet
            got = {}
        if got == want:
            return
        assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
        time.sleep(0.05)
    wrong = {u: (got.get(u), want.get(u)) for u in set(got) | set(want) if got.get(u) != want.get(u)}
    raise AssertionError(f"totals never matched: {len(wrong)} users differ, e.g. {list(wrong.items())[:3]}\n"
                         + log.read_text(errors="replace")[-2000:])


@pytest.fixture(scope="module")
def big_files(tmp_path_factory) -> tuple[bytes, bytes]:
    """Two journals of id-less events (~20 MB, ~23 MB), each with a first line of its own."""
    d = tmp_path_factory.mktemp("journals")
    generate(d / "a.jsonl", 220_000, "--users", "300", "--seed", "90", "--decimals", "0.3")
    generate(d / "b.jsonl", 250_000, "--users", "300", "--seed", "91", "--decimals", "0.3")
    return (d / "a.jsonl").read_bytes(), (d / "b.jsonl").read_bytes()


@pytest.mark.parametrize("at", ["first batch", "later batch"])
def test_journal_overwritten_in_place_during_a_batch_applies_no_byte_of_the_wrong_file(
        dsn, tmp_path, big_files, at):
    """`cp other.jsonl server-events.jsonl` (same inode, longer) while a batch is parsed."""
    a, b = big_files
    journal = tmp_path / "server-events.jsonl"
    journal.write_bytes(a)
    inode = journal.stat().st_ino
    log = tmp_path / "process.log"
    if at == "first batch":
        proc = start(evtool_cmd("process", "--json", str(journal)), tmp_path, log)
    else:  # small batches: overwrite once some are committed
        proc = start(evtool_cmd("process", "--json", "--batch-mb", "2", str(journal)), tmp_path, log)
        deadline = time.monotonic() + HANG_GUARD
        while progress(dsn, fingerprint_of(a)) == 0 and time.monotonic() < deadline:
            time.sleep(0.002)
    stopped = stop_workers(proc) if at == "first batch" else _stop_all_workers(proc)
    shutil.copyfile(_write(tmp_path / "other.jsonl", b), journal)
    assert journal.stat().st_ino == inode  # overwritten in place, as cp does
    cont(stopped)
    rc, out = finish(proc, log)
    committed = progress(dsn, fingerprint_of(a))
    assert rc == 1 and "Traceback" not in out, out
    assert "was applied" in out and str(journal.resolve()) in out, out
    # Only whole batches of the old file were committed, and its committed bytes are its own.
    assert (committed == 0) == (at == "first batch")
    # The new file is a new journal: applied once, from its start.
    again = subprocess.run(evtool_cmd("process", "--json", str(journal)), cwd=tmp_path,
                           capture_output=True, text=True, timeout=HANG_GUARD)
    assert again.returncode == 0, again.stderr
    assert db_totals(dsn) == totals_of(tmp_path, a[:committed], b)


def test_closing_the_parse_pool_leaves_no_thread_to_race_the_exit(tmp_path, big_files):
    """Before: `process` ending on an error (a truncated journal, say) sometimes printed an
    "OSError: Bad file descriptor" traceback after its message. The pool's manager thread was
    still closing its wake-up pipe when Python's exit hook wrote to it (CI saw it once).

    The race itself is a matter of microseconds, so the test checks its cause instead: once
    the pool is closed, no pool manager thread of ours is left running.
    """
    a, _ = big_files
    path = _write(tmp_path / "server-events.jsonl", a)
    before = set(_pool_managers())
    pool = ParsePool(2, 1 << 20, strict=False)
    with open(path, "rb") as f:
        planned = pool.submit(f, str(path), 0, len(a))
        assert planned.parsed and set(_pool_managers()) - before  # the workers are busy: a thread runs
        pool.close()
        left = set(_pool_managers()) - before
    planned.close()
    assert left == set()


def _pool_managers() -> list[threading.Thread]:
    # CPython's private class: the thread each ProcessPoolExecutor runs to manage its workers.
    return [t for t in threading.enumerate()
            if isinstance(t, cf_process._ExecutorManagerThread) and t.is_alive()]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _stop_all_workers(proc: subprocess.Popen) -> list[int]:
    kids = children(proc.pid)
    for pid in kids:
        os.kill(pid, signal.SIGSTOP)
    return kids


def test_journal_truncated_during_a_batch_ends_the_batch_without_committing(dsn, tmp_path, big_files):
    """Before: the workers spun forever at the new end of file, and `process` never ended."""
    a, _ = big_files
    journal = tmp_path / "server-events.jsonl"
    journal.write_bytes(a)
    log = tmp_path / "process.log"
    proc = start(evtool_cmd("process", "--json", str(journal)), tmp_path, log)
    stopped = stop_workers(proc)
    os.truncate(journal, len(a) // 3)
    cont(stopped)
    rc, out = finish(proc, log)
    assert rc == 1 and "Traceback" not in out, out
    assert "truncated" in out and "Nothing of the batch was applied" in out, out
    assert progress(dsn, fingerprint_of(a)) == 0 and db_totals(dsn) == {}
    # What is left is a journal like any other.
    again = subprocess.run(evtool_cmd("process", "--json", str(journal)), cwd=tmp_path,
                           capture_output=True, text=True, timeout=HANG_GUARD)
    assert again.returncode == 0, again.stderr
    assert db_totals(dsn) == totals_of(tmp_path, complete_lines(a, len(a) // 3))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_follow_whatever_the_workers_do(dsn, tmp_path, big_files, sig):
    """Workers stopped dead (SIGSTOP) mid-parse: SIGTERM/SIGINT still end `process --follow`."""
    a, _ = big_files
    journal = tmp_path / "server-events.jsonl"
    journal.write_bytes(a)
    log = tmp_path / "follow.log"
    proc = start(evtool_cmd("process", "--follow", "--json", str(journal)), tmp_path, log)
    stopped = stop_workers(proc)
    time.sleep(0.2)  # the follower is now waiting on the stopped workers
    proc.send_signal(sig)
    try:
        rc, out = finish(proc, log)
    finally:
        for pid in stopped:  # never leave a stopped process behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert rc == 0 and "Traceback" not in out, out
    assert json.loads(out[out.index("{"):])["applied"] == 0
    assert db_totals(dsn) == {}


def test_copytruncate_during_a_follow_backlog(dsn, tmp_path, big_files):
    """logrotate copytruncate while `--follow` works through a backlog: nothing lost, nothing twice.

    The batch being parsed is not committed; the copy (`server-events.jsonl.1`) is drained from
    the old offset; the truncated file goes on from 0 as a new journal.
    """
    a, _ = big_files
    journal = tmp_path / "server-events.jsonl"
    journal.write_bytes(a)
    log = tmp_path / "follow.log"
    proc = start(evtool_cmd("process", "--follow", "--json", "--batch-mb", "2", str(journal)), tmp_path, log)
    try:
        deadline = time.monotonic() + HANG_GUARD
        while progress(dsn, fingerprint_of(a)) == 0 and time.monotonic() < deadline:
            time.sleep(0.002)
        stopped = _stop_all_workers(proc)
        shutil.copyfile(journal, tmp_path / "server-events.jsonl.1")  # logrotate copytruncate
        os.truncate(journal, 0)
        cont(stopped)
        after = b"".join(b'{"userId": "after", "name": "add_revenue", "value": %d}\n' % i
                         for i in range(1, 101))
        with open(journal, "ab") as f:
            f.write(after)
        wait_totals(dsn, totals_of(tmp_path, a, after), proc, log)
    except BaseException:
        for pid in session_members(proc.pid):
            os.kill(pid, signal.SIGKILL)
        raise
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc, log)
    assert rc == 0 and "Traceback" not in out, out
    assert "copytruncate" in out and "server-events.jsonl.1" in out, out


def post(url: str, tag: str, n: int) -> None:
    body = b"".join(b'{"userId": "%s", "name": "add_revenue", "value": 1, "eventId": "%s-%d"}\n'
                    % (tag.encode(), tag.encode(), i) for i in range(n))
    headers = {**AUTH, "Content-Type": "application/x-ndjson"}
    status, answer, _ = http(f"{url}/liveEvent", "POST", body, headers)
    assert status == 200, answer


def test_rotation_under_serve_rename_sighup_and_delete_lose_nothing(dsn, tmp_path):
    """mv (logrotate create), SIGHUP and rm under a running `serve` with a follower beside it."""
    journal = tmp_path / "server-events.jsonl"
    log = tmp_path / "follow.log"
    with Serve(tmp_path, "--token", "secret") as serve:
        follower = start(evtool_cmd("process", "--follow", "--poll", "0.005", str(journal)), tmp_path, log)
        try:
            post(serve.url, "one", 50)
            wait_totals(dsn, {"one": Decimal(50)}, follower, log)  # the follower holds the file open
            os.rename(journal, tmp_path / "server-events.jsonl.1")
            post(serve.url, "two", 50)  # acknowledged after the rename: goes to a new file at the path
            assert journal.exists() and b'"two-0"' in journal.read_bytes()
            assert b'"two-' not in (tmp_path / "server-events.jsonl.1").read_bytes()
            wait_totals(dsn, {"one": Decimal(50), "two": Decimal(50)}, follower, log)
            # SIGHUP: reopen at once, before any request, as log daemons do.
            os.rename(journal, tmp_path / "server-events.jsonl.2")
            serve.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + HANG_GUARD
            while not journal.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert journal.exists() and journal.stat().st_size == 0
            post(serve.url, "three", 50)
            # Deleted under serve: what is acknowledged after that goes to a new file.
            follower_saw = journal.read_bytes()
            assert b'"three-49"' in follower_saw
            wait_totals(dsn, {"one": Decimal(50), "two": Decimal(50), "three": Decimal(50)}, follower, log)
            journal.unlink()
            post(serve.url, "four", 50)
            assert b'"four-0"' in journal.read_bytes()
            wait_totals(dsn, {u: Decimal(50) for u in ("one", "two", "three", "four")}, follower, log)
        except BaseException:
            follower.kill()
            raise
        follower.send_signal(signal.SIGTERM)
        rc, out = finish(follower, log)
        assert rc == 0 and "Traceback" not in out, out


def test_a_rotated_journal_drains_until_its_writer_leaves_it(dsn, tmp_path):
    """Lines appended to a renamed journal after the follower noticed the rename still count."""
    journal = tmp_path / "server-events.jsonl"
    line = b'{"userId": "late", "name": "add_revenue", "value": 1}\n'
    journal.write_bytes(b'{"userId": "first", "name": "add_revenue", "value": 1}\n')
    log = tmp_path / "follow.log"
    follower = start(evtool_cmd("process", "--follow", "--poll", "0.005", str(journal)), tmp_path, log)
    try:
        wait_totals(dsn, {"first": Decimal(1)}, follower, log)
        with open(journal, "ab") as writer:  # a writer that still holds the old file
            os.rename(journal, tmp_path / "server-events.jsonl.1")
            journal.write_bytes(b'{"userId": "new", "name": "add_revenue", "value": 1}\n')
            wait_totals(dsn, {"first": Decimal(1), "new": Decimal(1)}, follower, log)
            for _ in range(5):  # the follower has seen the rotation; the old writer goes on a bit
                writer.write(line)
                writer.flush()
                time.sleep(0.1)
        wait_totals(dsn, {"first": Decimal(1), "new": Decimal(1), "late": Decimal(5)}, follower, log)
    except BaseException:
        follower.kill()
        raise
    follower.send_signal(signal.SIGTERM)
    rc, out = finish(follower, log)
    assert rc == 0, out


def test_status_shows_the_lag_of_a_rotated_journal(dsn, tmp_path):
    journal = tmp_path / "server-events.jsonl"
    journal.write_bytes(b'{"userId": "a", "name": "add_revenue", "value": 1}\n')
    subprocess.run(evtool_cmd("process", str(journal)), cwd=tmp_path, check=True, capture_output=True,
                   timeout=HANG_GUARD)
    with open(journal, "ab") as f:
        f.write(b'{"userId": "a", "name": "add_revenue", "value": 2}\n' * 7)
    rotated = tmp_path / "server-events.jsonl.1"
    os.rename(journal, rotated)
    journal.write_bytes(b'{"userId": "b", "name": "add_revenue", "value": 1}\n')
    out = subprocess.run(evtool_cmd("status", "--json", str(journal)), cwd=tmp_path, capture_output=True,
                         text=True, timeout=HANG_GUARD)
    assert out.returncode in (0, 1), out.stderr
    journals = json.loads(out.stdout)["journals"]
    by_path = {j["path"]: j for j in journals}
    assert str(rotated) in by_path or str(rotated.resolve()) in by_path, journals
    entry = by_path.get(str(rotated)) or by_path[str(rotated.resolve())]
    assert entry["lag_lines"] == 7 and entry["state"] == "rotated", entry


def test_a_refused_write_is_never_seen_by_a_follower(dsn, tmp_path):
    """Full disk (RLIMIT_FSIZE on serve) with a follower polling every millisecond beside it.

    Each round puts the file-size limit of the live `serve` 100 kB past the journal's end and
    sends a 250 kB request: refused (503). Before: the first 100 kB were written, readable, then
    cut back off; the follower could read and commit those lines in between -- events the
    client was told were refused -- and the journal ended shorter than its committed offset.
    """
    journal = tmp_path / "server-events.jsonl"
    log = tmp_path / "follow.log"
    accepted = 0
    unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    with Serve(tmp_path, "--token", "secret") as serve:
        assert serve.proc is not None
        follower = start(evtool_cmd("process", "--follow", "--poll", "0.001", str(journal)), tmp_path, log)
        try:
            for i in range(120):
                for n, limited in ((3000, True), (10, False)):
                    if limited:
                        size = journal.stat().st_size if journal.exists() else 0
                        resource.prlimit(serve.proc.pid, resource.RLIMIT_FSIZE,
                                         (size + 100_000, resource.RLIM_INFINITY))
                    body = b"".join(b'{"userId": "p", "name": "add_revenue", "value": 1, '
                                    b'"eventId": "r%d-%d"}\n' % (i, k) for k in range(n))
                    status, _, _ = http(f"{serve.url}/liveEvent", "POST", body,
                                        {**AUTH, "Content-Type": "application/x-ndjson"})
                    resource.prlimit(serve.proc.pid, resource.RLIMIT_FSIZE, unlimited)
                    assert status == (503 if limited else 200)
                    accepted += 0 if limited else n
                assert follower.poll() is None, log.read_text(errors="replace")[-2000:]
            wait_totals(dsn, {"p": Decimal(accepted)}, follower, log)
        except BaseException:
            follower.kill()
            raise
        follower.send_signal(signal.SIGTERM)
        rc, out = finish(follower, log)
        assert rc == 0, out
    assert db_totals(dsn) == {"p": Decimal(accepted)}
    # The journal is whole and a plain run agrees.
    again = subprocess.run(evtool_cmd("process", "--json", str(journal)), cwd=tmp_path, capture_output=True,
                           text=True, timeout=HANG_GUARD)
    assert again.returncode == 0, again.stderr
    assert db_totals(dsn) == {"p": Decimal(accepted)}


def test_journal_renamed_during_a_plain_run_is_still_processed(dsn, tmp_path, big_files):
    """logrotate renames the journal while `process` works through it (a sibling of item 1).

    Before: the workers opened the path again, found the new file there and the run failed
    ("replaced while it was being processed"); they now read the file the run holds open.
    """
    a, _ = big_files
    journal = tmp_path / "server-events.jsonl"
    journal.write_bytes(a)
    log = tmp_path / "process.log"
    proc = start(evtool_cmd("process", "--json", "--batch-mb", "2", str(journal)), tmp_path, log)
    deadline = time.monotonic() + HANG_GUARD
    while progress(dsn, fingerprint_of(a)) == 0 and time.monotonic() < deadline:
        time.sleep(0.002)  # each later batch is parsed by workers that open the file anew
    os.rename(journal, tmp_path / "server-events.jsonl.1")
    new = b'{"userId": "new", "name": "add_revenue", "value": 1}\n'
    journal.write_bytes(new)
    rc, out = finish(proc, log)
    assert rc == 0 and "Traceback" not in out, out
    assert db_totals(dsn) == totals_of(tmp_path, a)
    assert progress(dsn, fingerprint_of(a)) == len(a)


def test_a_batch_rolled_back_leaves_the_next_one_its_batch_tables(dsn, tmp_path, monkeypatch):
    """Before: the batch tables (temporary, per connection) were marked made in the transaction
    that first made them; when that transaction rolled back (the journal changed under its
    batch, say) they were gone but still marked made, and every later batch of the same
    connection - a follower's - failed with "relation batch_digests does not exist"."""
    from evtool import processor
    from evtool.errors import JournalChanged

    path = tmp_path / "server-events.jsonl"
    with open(path, "wb") as f:
        for i in range(2000):
            f.write(b'{"userId":"u%d","name":"add_revenue","value":%d,"eventId":"order-%d"}\n'
                    % (i % 50, i % 7 + 1, i))
    check = journal_mod.check_range
    calls = []

    def changed_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise JournalChanged("changed under the batch (simulated)")
        return check(*args, **kwargs)

    monkeypatch.setattr(journal_mod, "check_range", changed_once)
    proc = processor.Processor(dsn, workers=0)  # one connection for both runs, as a follower
    try:
        with pytest.raises(JournalChanged):
            proc.process([path])
        report = proc.process([path])
    finally:
        proc.close()
    assert (report.applied, report.duplicates, report.rejected) == (2000, 0, 0)
    assert sum(db_totals(dsn).values()) == sum(i % 7 + 1 for i in range(2000))
