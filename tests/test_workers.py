"""`evtool serve --workers N`: worker processes on one port (SO_REUSEPORT), a journal each, one
supervisor that restarts a dead worker and forwards signals; `process` and `status` read every
worker journal when given the base journal. Real subprocesses, real HTTP, real PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from evtool.appender import JournalAppender
from evtool.journal import with_workers, worker_journal

from .conftest import (
    Serve,
    evtool,
    evtool_cmd,
    exact,
    free_port,
    generate,
    http,
    journal_lines,
    start,
    totals,
)
from .faults.test_receiver_kill import confirmed_lines

SENDER_LINE = re.compile(rb'"eventId":"[0-9a-f]{16}:([0-9]+):[0-9a-f]{16}"')


def workers_of(proc: subprocess.Popen) -> list[int]:
    """The supervisor's child processes now (its workers)."""
    text = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text()
    return sorted(int(p) for p in text.split())


def wait_for(cond, what: str, proc: subprocess.Popen, log: Path, polls: int = 1200) -> None:
    """Poll cond() until true; fail (with the log) if `proc` exits first, or after `polls` polls
    50 ms apart: a hang guard counted in polls, not a timing assertion."""
    for _ in range(polls):
        if cond():
            return
        assert proc.poll() is None, f"serve left while waiting for {what}:\n{log.read_text()}"
        time.sleep(0.05)
    pytest.fail(f"no {what} after {polls} polls:\n{log.read_text()}")


class Workers(Serve):
    """`serve --workers N` as a subprocess: started (once) and ready when every worker listens;
    `with` stops it with SIGTERM and checks exit 0 and no traceback, as Serve does."""

    def __init__(self, workdir: Path, n: int = 2, *args: str) -> None:
        super().__init__(workdir, "--workers", str(n), *args)
        self.n = n

    def start(self, **kw) -> Workers:
        super().start(**kw)
        assert self.proc is not None
        wait_for(lambda: self.log.read_text().count(": listening on") >= self.n, "listening workers",
                 self.proc, self.log)
        return self

    def __enter__(self) -> Workers:
        return self if self.proc is not None else self.start()


def start_workers(tmp_path: Path, n: int = 2, *args: str) -> Workers:
    return Workers(tmp_path, n, *args).start()


def sender_lines(journals: list[Path]) -> list[int]:
    """The sender line numbers of every journal line (a line sent twice counts twice)."""
    return [int(n) for j in journals for n in SENDER_LINE.findall(j.read_bytes())]


def test_worker_journal_names(tmp_path):
    base = tmp_path / "server-events.jsonl"
    assert worker_journal(base, 0) == base
    assert worker_journal(base, 1).name == "server-events.w1.jsonl"
    assert worker_journal(tmp_path / "journal", 2).name == "journal.w2"
    for name in ("server-events.jsonl", "server-events.w1.jsonl", "server-events.w10.jsonl",
                 "server-events.w2.jsonl", "server-events.w1.jsonl.1", "server-events.wx.jsonl",
                 "server-events.w01.jsonl", "other.w1.jsonl"):
        (tmp_path / name).write_bytes(b"")
    # by worker index; a logrotate copy, a non-number and another journal's workers are not workers
    assert [p.name for p in with_workers([base, tmp_path / "server-events.w2.jsonl"])] == [
        "server-events.jsonl", "server-events.w1.jsonl", "server-events.w2.jsonl", "server-events.w10.jsonl"]


def test_two_workers_share_the_load_and_process_is_exact(dsn, tmp_path):
    events = 20_000
    source = tmp_path / "events.jsonl"
    expected = generate(source, events, "--users", "300", "--decimals", "0.3", "--seed", "11")
    evtool("db", "migrate", check=True)
    # The follower starts before the receiver: it finds the worker journals as they appear.
    follower = start(evtool_cmd("process", "--follow", "--poll", "0.05"), tmp_path, tmp_path / "follow.log")
    journals = [tmp_path / "server-events.jsonl", tmp_path / "server-events.w1.jsonl"]
    try:
        with start_workers(tmp_path, 2) as serve:
            # one receiver to senders, whichever worker answers (they resume by it)
            names = {http(f"{serve.url}/healthz")[2]["Evtool-Receiver"] for _ in range(20)}
            assert len(names) == 1
            sent = evtool("send", str(source), "--url", serve.url, "--batch", "100", "--connections", "16",
                          "--json", cwd=tmp_path, check=True)
            assert json.loads(sent.stdout)["sent"] == events
            counts = [len(journal_lines(j)) for j in journals]
            # 16 connections spread by the kernel: both workers took some (all on one: 2 in 65536)
            assert all(counts) and sum(counts) == events, counts
        # SIGTERM (Serve.stop): every worker drained, the supervisor exited 0, no traceback
        assert sorted(sender_lines(journals)) == list(range(1, events + 1))
        for _ in range(600):  # a hang guard counted in polls, 0.2 s apart
            if totals(dsn) == exact(expected["per_user"]):
                break
            assert follower.poll() is None, (tmp_path / "follow.log").read_text()
            time.sleep(0.2)
        else:
            pytest.fail("process --follow did not apply both worker journals after 600 polls")
        follower.send_signal(signal.SIGTERM)
        assert follower.wait(timeout=60) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    # a one-shot process of the base journal reads the workers' too: all applied already
    report = json.loads(evtool("process", "--json", cwd=tmp_path, check=True).stdout)
    assert report["applied"] == 0 and report["duplicates"] == 0 and report["rejected"] == 0
    assert {Path(f["path"]).name for f in report["files"]} == {j.name for j in journals}
    status = json.loads(evtool("status", "--json", "--url", "http://127.0.0.1:9", cwd=tmp_path).stdout)
    shown = {Path(j["path"]).name: j for j in status["journals"]}
    assert {j.name for j in journals} <= set(shown)
    assert all(shown[j.name]["lag_bytes"] == 0 for j in journals)


def test_a_worker_killed_mid_send_is_restarted_and_nothing_acknowledged_is_lost(dsn, tmp_path):
    events = 40_000
    source = tmp_path / "events.jsonl"
    expected = generate(source, events, "--users", "500", "--decimals", "0.3", "--seed", "12")
    home = Path(os.environ["EVTOOL_HOME"])
    journals = [tmp_path / "server-events.jsonl", tmp_path / "server-events.w1.jsonl"]
    serve = start_workers(tmp_path, 2)  # stopped (SIGTERM, exit 0 checked) at the end
    assert serve.proc is not None
    send_cmd = evtool_cmd("send", str(source), "--url", serve.url, "--batch", "100", "--connections", "8",
                          "--max-retries", "30", "--json")
    sender = start(send_cmd, tmp_path, tmp_path / "send.log")
    kills = 0
    try:
        for _ in range(2):
            before = workers_of(serve.proc)
            assert len(before) == 2
            wait_for(lambda: confirmed_lines(home) > 0 or sender.poll() is not None, "a confirmed batch",
                     serve.proc, serve.log)
            victim = before[kills % 2]
            os.kill(victim, signal.SIGKILL)
            kills += 1
            upto = confirmed_lines(home)
            have = set(sender_lines(journals))
            assert set(range(1, upto + 1)) <= have, "an acknowledged event is not in any journal"
            # the supervisor starts a new worker on the same journal
            wait_for(lambda v=victim: len(workers_of(serve.proc)) == 2 and v not in workers_of(serve.proc),
                     "a restarted worker", serve.proc, serve.log)
            wait_for(lambda k=kills: serve.log.read_text().count(": listening on") >= 2 + k, "its listening",
                     serve.proc, serve.log)
        if sender.wait(timeout=300) != 0:  # the retries ran out: a re-run resumes and finishes
            evtool(*send_cmd[3:], cwd=tmp_path, check=True, timeout=300)
        assert "died (killed by SIGKILL); restarting it" in serve.log.read_text()
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
        serve.stop()  # SIGTERM: exit 0, no traceback
    assert set(sender_lines(journals)) == set(range(1, events + 1))
    lines = sum(len(journal_lines(j)) for j in journals)
    evtool("db", "migrate", check=True)
    report = json.loads(evtool("process", "--json", cwd=tmp_path, check=True).stdout)
    assert report["applied"] == events and report["rejected"] == 0
    assert report["duplicates"] == lines - events
    assert totals(dsn) == exact(expected["per_user"])


def test_a_worker_that_cannot_start_stops_them_all_with_one_line(tmp_path):
    held = JournalAppender(tmp_path / "server-events.w1.jsonl")  # as another serve would
    try:
        proc = subprocess.run(evtool_cmd("serve", "--workers", "2", "--port", str(free_port())),
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
    finally:
        import asyncio

        asyncio.run(held.close())
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "worker 1: journal" in proc.stderr and "is locked" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: worker 1 (")


def test_workers_refuse_a_port_in_use(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(evtool_cmd("serve", "--workers", "2", "--port", str(port)), cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "Address already in use" in proc.stderr
    assert not list(tmp_path.glob("*.jsonl"))  # nothing started


def test_ctrl_c_at_a_terminal_stops_every_worker_cleanly(tmp_path):
    """SIGINT to the whole foreground process group (what a terminal's Ctrl-C does) reaches the
    supervisor only; it forwards it once, every worker drains, and the exit status is 0."""
    with start_workers(tmp_path, 2) as serve:
        assert serve.proc is not None
        workers = workers_of(serve.proc)
        event = b'{"userId":"u","name":"add_revenue","value":1}'
        status, _, _ = http(f"{serve.url}/liveEvent", "POST", event, {"Authorization": "secret"})
        assert status == 200
        os.killpg(serve.proc.pid, signal.SIGINT)
        assert serve.proc.wait(timeout=60) == 0, serve.log.read_text()
    text = serve.log.read_text()
    assert "Traceback" not in text and "left with" not in text
    for pid in workers:  # none is left behind
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_the_port_is_free_again_right_after_a_receiver_stopped_but_not_while_one_listens():
    """A restart right after a stop finds the port's last connections in TIME_WAIT: that port
    is free (as for plain serve); a port some socket listens on, even with SO_REUSEPORT, is not."""
    import socket

    import pytest

    from evtool.workers import reserve_port

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp's listener
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    with pytest.raises(OSError, match="in use"):
        reserve_port("127.0.0.1", port)
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    served.close()  # the server closes first: its side of the connection stays in TIME_WAIT
    client.close()
    listener.close()
    time.sleep(0.1)
    reserve_port("127.0.0.1", port).close()
