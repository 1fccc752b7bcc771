"""Issue 9 item 5: the receiver under hostile or slow conditions. A locked database never delays
ingestion; idle connections cannot use up the open files; an incomplete request head is closed
sooner than an idle keep-alive connection; deep nesting is a 400 in every request form."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import threading
import time
from pathlib import Path

import psycopg
import pytest

from evtool.receiver import ServeSettings, make_app, start_runner

from ..conftest import Serve, evtool, http, totals

AUTH = {"Authorization": "Bearer secret"}
EVENT = b'{"userId":"u1","name":"add_revenue","value":5}'


def test_lookups_waiting_on_a_lock_never_delay_a_post(dsn, tmp_path: Path):
    evtool("db", "migrate", cwd=tmp_path, check=True)  # the schema exists
    with Serve(tmp_path) as serve:
        holder = psycopg.connect(dsn)
        holder.execute("LOCK TABLE users_revenue IN ACCESS EXCLUSIVE MODE")  # a transaction, held
        answers: list[int] = []

        def lookup(i: int) -> None:
            answers.append(http(f"{serve.url}/userEvents/user{i}", headers=AUTH, timeout=300)[0])

        lookups = [threading.Thread(target=lookup, args=(i,)) for i in range(12)]
        for t in lookups:
            t.start()
        with psycopg.connect(dsn, autocommit=True) as watch:  # a lookup is waiting on the lock
            for _ in range(600):
                waiting = watch.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                        " AND datname = current_database()").fetchone()[0]
                if waiting:
                    break
                time.sleep(0.05)
            assert waiting
        posted: list[int] = []
        post = threading.Thread(target=lambda: posted.append(
            http(serve.url + "/liveEvent", "POST", EVENT, {**AUTH, "Content-Type": "application/json"},
                 timeout=300)[0]))
        post.start()
        post.join(timeout=90)  # the failure detector only: the POST must end while the lock is held
        still_locked = holder.execute(
            "SELECT count(*) FROM pg_locks WHERE relation = 'users_revenue'::regclass"
            " AND mode = 'AccessExclusiveLock' AND granted").fetchone()[0]
        assert posted == [200] and still_locked == 1
        holder.rollback()
        holder.close()
        for t in lookups:
            t.join(timeout=300)
        assert len(answers) == 12 and set(answers) <= {404, 503}, answers
    evtool("process", cwd=tmp_path, check=True)
    assert totals(dsn) == {"u1": 5}


def _nofile(soft: int, hard: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return apply


@pytest.mark.parametrize("raise_to_hard", [True, False], ids=["soft-below-hard", "soft-equals-hard"])
def test_a_thousand_idle_connections_do_not_stop_serve(tmp_path: Path, raise_to_hard: bool):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2600:
        pytest.skip("needs a hard open-file limit above 2600 for the client side")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 4096, hard))
    server_hard = hard if raise_to_hard else 1024
    conns: list[socket.socket] = []
    try:
        with Serve(tmp_path, preexec_fn=_nofile(1024, server_hard)) as serve:
            for _ in range(1100):
                conns.append(socket.create_connection(("127.0.0.1", serve.port)))
            status, body, _ = http(serve.url + "/liveEvent", "POST", EVENT,
                                   {**AUTH, "Content-Type": "application/json"}, timeout=60)
            assert status == 200, body
            assert http(serve.url + "/healthz", timeout=60)[0] == 200
            for c in conns:
                c.close()
            conns.clear()
        log = serve.log.read_text()
        assert "Traceback" not in log and "Too many open files" not in log, log[-2000:]
    finally:
        for c in conns:
            c.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_an_incomplete_head_is_closed_sooner_than_an_idle_keep_alive(tmp_path: Path):
    async def main() -> None:
        s = ServeSettings(journal=tmp_path / "j.jsonl", port=0)
        runner = await start_runner(make_app(s), "127.0.0.1", 0, idle_timeout=60, head_timeout=1)
        port = runner.addresses[0][1]
        try:
            await asyncio.to_thread(check, port)
        finally:
            await runner.cleanup()

    def check(port: int) -> None:
        keep = socket.create_connection(("127.0.0.1", port))
        keep.settimeout(30)
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        keep.sendall(request)
        assert keep.recv(4096).startswith(b"HTTP/1.1 200")
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(b"POST /liveEvent HTTP/1.1\r\nHost: x\r\n")
        half.settimeout(30)  # the failure detector: the idle limit is 60 s
        assert half.recv(100) == b""  # closed: its head never completed
        keep.sendall(request)  # the idle keep-alive connection is still open and served
        assert keep.recv(4096).startswith(b"HTTP/1.1 200")
        keep.close()
        half.close()

    asyncio.run(main())


def _deep(levels: int) -> bytes:
    return b'{"userId":"deep","name":"add_revenue","value":1.5,"x":' + b"[" * levels + b"]" * levels + b"}"


def test_deep_nesting_is_a_400_in_every_request_form_and_a_reject_in_process(dsn, tmp_path: Path):
    deep = _deep(1010)
    forms = [
        (deep, "application/json"),
        (b"[" + deep + b"]", "application/json"),
        (b"[" + _deep(2) + b"," + deep + b"]", "application/json"),
        (deep + b"\n", "application/x-ndjson"),
        (deep.replace(b"1.5", b'"1.5"'), "application/json"),
        (deep.replace(b'"userId"', b'"user\\u0049d"'), "application/json"),  # the slow path
        (b"[" + _deep(300) + b"]", "application/json"),  # deeper than the limit, within orjson's
        (_deep(300).replace(b"1.5", b"2") + b"\n", "application/x-ndjson"),
    ]
    with Serve(tmp_path) as serve:
        for body, ctype in forms:
            status, answer, _ = http(serve.url + "/liveEvent", "POST", body, {**AUTH, "Content-Type": ctype})
            assert status == 400 and "nested" in answer["error"], (body[:80], status, answer)
        status, answer, _ = http(serve.url + "/liveEvent", "POST", b"[" + _deep(100) + b"]",
                                 {**AUTH, "Content-Type": "application/json"})
        assert status == 200, answer
    assert "Traceback" not in serve.log.read_text()
    journal = tmp_path / "server-events.jsonl"
    with open(journal, "ab") as f:  # a foreign writer's deep line: rejected, not a crash
        f.write(deep + b"\n" + _deep(1020) + b"\n")
    done = evtool("process", "--json", cwd=tmp_path, check=True)
    report = json.loads(done.stdout)
    assert report["applied"] == 1 and report["rejected"] == 2, report
    assert totals(dsn) == {"deep": 1.5}
