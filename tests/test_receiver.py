"""The HTTP receiver and the journal appender: real HTTP on loopback, real files, real processes."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import socket
import time
from decimal import Decimal
from pathlib import Path

import aiohttp
import orjson
import psycopg
import pytest

from evtool.appender import JournalAppender
from evtool.errors import ConfigError, DatabaseUnavailable, JournalLocked
from evtool.processor import process
from evtool.receiver import ServeSettings, StoreRevenue, check_settings, make_app, start_runner
from evtool.store import Store

from .conftest import Serve, http
from .conftest import event_line as ev
from .conftest import journal_lines as lines

AUTH = {"Authorization": "secret"}
JSON = {"Content-Type": "application/json", **AUTH}
NDJSON = {"Content-Type": "application/x-ndjson", **AUTH}
ORIGINAL = b'{"userId": "user1", "name": "add_revenue", "value": 100}'


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, **kw):
    """The app on a free loopback port, with a client whose base URL points at it."""
    s = ServeSettings(journal=tmp_path / "server-events.jsonl", port=0, **kw)
    runner = await start_runner(make_app(s), "127.0.0.1", 0)
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
            client.port = port  # type: ignore[attr-defined]
            yield client, s.journal
    finally:
        await runner.cleanup()


async def post(client, body: bytes, headers: dict, **kw) -> tuple[int, dict, dict]:
    async with client.post("/liveEvent", data=body, headers=headers, **kw) as resp:
        return resp.status, orjson.loads(await resp.read()), dict(resp.headers)


async def get(client, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    async with client.get(path, headers=headers or {}) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.read()


# --- POST /liveEvent past the router (_Receiver.direct) ---------------------------------------


def test_events_past_the_router_get_the_answers_the_middlewares_give(tmp_path):
    """`POST /liveEvent` goes straight to _Receiver.post_event; `/liveEvent?via=router` takes the
    router and the middlewares. Every answer (status, body, headers that matter), the journal and
    the metrics must be the same either way."""
    cases = [
        (ORIGINAL, JSON),
        (b'{"userId":"u2","name":"subtract_revenue","value":3,"eventId":"client-1"}', JSON),
        (b'[{"userId":"u3","name":"add_revenue","value":1}]', JSON),
        (b'{"userId":"u4","name":"add_revenue","value":1}\n', NDJSON),
        (ORIGINAL, {"Content-Type": "application/json"}),  # no token: 401
        (ORIGINAL, {"Content-Type": "application/json", "Authorization": "wrong"}),
        (ORIGINAL, {"Content-Type": "application/json", "Authorization": "reader"}),  # read token: 403
        (ORIGINAL, {"Content-Type": "text/plain", **AUTH}),  # 415
        (b'{"userId": "u5"', JSON),  # malformed: 400
        (b'{"userId": "u5", "name": "add_revenue", "value": -1}', JSON),  # invalid: 422
        (b"x" * 2000, JSON),  # over max_body: 413 from aiohttp, as a JSON sentence
    ]

    async def main():
        answers = {}
        for name, via in (("direct", "/liveEvent"), ("routed", "/liveEvent?via=router")):
            (tmp_path / name).mkdir()
            async with serving(tmp_path / name, read_token="reader", max_body=1000) as (client, journal):
                got = []
                for body, headers in cases:
                    async with client.post(via, data=body, headers=headers) as resp:
                        answer = orjson.loads(await resp.read())
                        answer.pop("eventId", None)  # a receiver id: another prefix per server
                        got.append((resp.status, answer, resp.headers.get("WWW-Authenticate"),
                                    resp.content_type))
                async with client.get("/metrics", headers=AUTH) as resp:
                    text = (await resp.text()).replace("?via=router", "")
                counts = sorted(line for line in text.splitlines() if line.startswith(
                    ("evtool_http_requests_total", "evtool_events_")))
                stored = [orjson.loads(line) for line in lines(journal)]
                for event in stored:
                    if event["eventId"].startswith("~"):  # a receiver id: another prefix per server
                        del event["eventId"]
                    del event["timestamp"]  # the receive time
                answers[via] = got, counts, stored
        direct, routed = answers["/liveEvent"], answers["/liveEvent?via=router"]
        assert direct == routed
        assert [status for status, *_ in direct[0]] == [200, 200, 200, 200, 401, 401, 403, 415, 400, 422, 413]
        assert len(direct[2]) == 4
        assert any('route="/liveEvent",status="401"} 2' in line for line in direct[1])

    asyncio.run(main())


def test_a_client_that_waits_for_100_continue_gets_it(tmp_path):
    """curl sends `Expect: 100-continue` before a body over 1 KB and waits (a second) for the
    interim answer: aiohttp's routing gives it, so such requests must not skip the router."""
    body = b"\n".join(ev(f"u{i}", "1") for i in range(40)) + b"\n"
    assert len(body) > 1024

    async def main():
        async with serving(tmp_path) as (client, journal):
            reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
            writer.write(b"POST /liveEvent HTTP/1.1\r\nHost: x\r\nAuthorization: secret\r\n"
                         b"Content-Type: application/x-ndjson\r\nExpect: 100-continue\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body))
            await writer.drain()
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
            writer.write(body)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200"), head
            writer.close()
            assert len(lines(journal)) == 40

    asyncio.run(main())


# --- POST /liveEvent: single objects ----------------------------------------------------------


def test_original_client_single_object(tmp_path):
    async def main():
        async with serving(tmp_path) as (client, journal):
            status, body, _ = await post(client, ORIGINAL, JSON)
            assert status == 200
            assert body["message"] == "Event received"
            assert body["eventId"].startswith("~")
            # no Content-Type at all is treated as JSON
            status, body2, _ = await post(client, ORIGINAL, AUTH, skip_auto_headers=["Content-Type"])
            assert status == 200 and body2["eventId"] != body["eventId"]
            stored = lines(journal)
            assert len(stored) == 2
            assert stored[0].startswith(ORIGINAL[:-1])  # the client's text, id added at the end
            got = orjson.loads(stored[0])
            assert "timestamp" in got  # an untimed event gets the receive time (see eventtime)
            del got["timestamp"]
            assert got == {**orjson.loads(ORIGINAL), "eventId": body["eventId"]}

    asyncio.run(main())


def test_bearer_token_and_pretty_printed_object(tmp_path):
    async def main():
        async with serving(tmp_path, token="s3cr3t") as (client, journal):
            pretty = b'{\r\n  "userId": "a",\n  "name": "subtract_revenue",\n  "value": 0.10\n}\n'
            status, body, _ = await post(client, pretty, {"Authorization": "Bearer s3cr3t",
                                                          "Content-Type": "application/json"})
            assert status == 200
            [line] = lines(journal)
            assert b'"value": 0.10' in line  # exact text kept, now on one line
            assert orjson.loads(line)["eventId"] == body["eventId"]

    asyncio.run(main())


def test_missing_or_wrong_token_is_401_and_writes_nothing(tmp_path):
    async def main():
        async with serving(tmp_path) as (client, journal):
            for headers in ({}, {"Authorization": "wrong"}, {"Authorization": "Bearer wrong"},
                            {"Authorization": "secretx"}):
                status, body, resp_headers = await post(client, ORIGINAL, {"Content-Type": "application/json",
                                                                           **headers})
                assert status == 401, headers
                assert "token" in body["error"] and "secret" not in body["error"]
            status, _ = await get(client, "/userEvents/user1")
            assert status == 401
            assert journal.read_bytes() == b""

    asyncio.run(main())


# --- bulks ------------------------------------------------------------------------------------


def test_ndjson_bulk_keeps_lines_and_ids(tmp_path):
    async def main():
        async with serving(tmp_path) as (client, journal):
            t = "2026-11-23T10:00:00Z"
            given = [ev("a", "1", "src:1", time=t), ev("b", "12.345", "src:2", time=t),
                     ev("c", "0.1", "src:3", time=t)]
            body = given[0] + b"\r\n\n" + given[1] + b"\n   \n" + given[2]  # no final newline
            status, resp, _ = await post(client, body, NDJSON)
            assert (status, resp) == (200, {"accepted": 3})
            assert lines(journal) == given  # timed events are stored unchanged
            # an untimed one gets the receive time, and keeps the rest of what the client sent
            status, resp, _ = await post(client, ev("d", "0.10", "src:4"), NDJSON)
            assert (status, resp) == (200, {"accepted": 1})
            stored = orjson.loads(lines(journal)[-1])
            assert stored.pop("timestamp").endswith("Z")
            assert stored == {"userId": "d", "name": "add_revenue", "value": 0.1, "eventId": "src:4"}

    asyncio.run(main())


def test_bad_line_refuses_the_whole_bulk(tmp_path):
    async def main():
        async with serving(tmp_path) as (client, journal):
            good = ev("a", "1")
            status, resp, _ = await post(client, b"\n".join([good, good, b'{"userId": "x",']), NDJSON)
            assert status == 400 and resp["error"].startswith("line 3: malformed JSON")
            bad_name = b'{"userId": "x", "name": "refund", "value": 1}'
            status, resp, _ = await post(client, b"\n".join([good, bad_name, good]), NDJSON)
            assert status == 422 and resp["error"].startswith("line 2: name must be")
            status, resp, _ = await post(client, b"[" + good + b"," + ev("a", "-1") + b"]", JSON)
            assert status == 422 and resp["error"] == "element 2: value must be >= 0"
            status, resp, _ = await post(client, b'{"userId": "x"', JSON)
            assert status == 400 and "malformed JSON" in resp["error"]
            status, resp, _ = await post(client, b'"just a string"', JSON)
            assert status == 422
            assert journal.read_bytes() == b""

    asyncio.run(main())


def test_json_array_bulk_with_exact_decimals(tmp_path):
    async def main():
        async with serving(tmp_path) as (client, journal):
            body = b"[" + b",".join([ev("a", "12.345"), ev("b", "0.1", "mine"),
                                    ev("c", "123456789012345678.5"), ev("d", "7")]) + b"]"
            status, resp, _ = await post(client, body, JSON)
            assert (status, resp) == (200, {"accepted": 4})
            stored = lines(journal)
            assert [b'"value":12.345' in stored[0], b'"value":0.1' in stored[1],
                    b'"value":123456789012345678.5' in stored[2], b'"value":7' in stored[3]] == [True] * 4
            ids = [orjson.loads(line)["eventId"] for line in stored]
            assert ids[1] == "mine" and all(i.startswith("~") for i in ids[:1] + ids[2:])
            assert len(set(ids)) == 4

    asyncio.run(main())


def test_decimal_text_preserved_in_ndjson_without_ids(tmp_path):
    async def main():
        async with serving(tmp_path) as (client, journal):
            body = ev("a", "12.345") + b"\n" + ev("a", "0.1") + b"\n" + ev("a", "0.10") + b"\n"
            status, resp, _ = await post(client, body, NDJSON)
            assert (status, resp) == (200, {"accepted": 3})
            stored = lines(journal)
            for line, text in zip(stored, [b"12.345", b"0.1", b"0.10"], strict=True):
                assert b'"value": ' + text + b',"eventId":"~' in line
                assert orjson.loads(line)["userId"] == "a"

    asyncio.run(main())


def test_limits_and_content_types(tmp_path):
    async def main():
        async with serving(tmp_path, max_body=2000, max_line=120) as (client, journal):
            status, resp, _ = await post(client, b"\n".join([ev()] * 40), NDJSON)
            assert status == 413 and "2000" in resp["error"]
            long_line = ev("x" * 100)
            status, resp, _ = await post(client, ev() + b"\n" + long_line, NDJSON)
            assert status == 413 and resp["error"].startswith("line 2 ")
            status, resp, _ = await post(client, long_line, JSON)
            assert status == 413
            status, resp, _ = await post(client, ev(), {**AUTH, "Content-Type": "text/plain"})
            assert status == 415 and "application/x-ndjson" in resp["error"]
            assert journal.read_bytes() == b""

    asyncio.run(main())


# --- identity ---------------------------------------------------------------------------------


def test_idempotency_key(tmp_path):
    async def main():
        async with serving(tmp_path) as (client, journal):
            status, resp, _ = await post(client, ORIGINAL, {**JSON, "Idempotency-Key": "req-7"})
            assert (status, resp["eventId"]) == (200, "req-7")
            body = ev("a") + b"\n\n" + ev("b", event_id="own") + b"\n" + ev("c")
            status, resp, _ = await post(client, body, {**NDJSON, "Idempotency-Key": "bulk-1"})
            assert (status, resp) == (200, {"accepted": 3})
            body = b"[" + ev("d") + b"," + ev("e") + b"]"
            status, resp, _ = await post(client, body, {**JSON, "Idempotency-Key": "arr"})
            assert (status, resp) == (200, {"accepted": 2})
            ids = [orjson.loads(line)["eventId"] for line in lines(journal)]
            assert ids == ["req-7", "bulk-1#1", "own", "bulk-1#3", "arr#1", "arr#2"]

    asyncio.run(main())


def test_reserved_ids_are_refused(tmp_path):
    async def main():
        async with serving(tmp_path) as (client, journal):
            status, resp, _ = await post(client, ev(event_id="~abc-1"), JSON)
            assert status == 422 and "reserved" in resp["error"]
            status, resp, _ = await post(client, ev(event_id="~abc-1"), NDJSON)
            assert status == 422 and resp["error"].startswith("line 1:")
            status, resp, _ = await post(client, ev(), {**JSON, "Idempotency-Key": "~k"})
            assert status == 400 and "Idempotency-Key" in resp["error"]
            assert journal.read_bytes() == b""

    asyncio.run(main())


# --- other routes -----------------------------------------------------------------------------


def test_healthz_user_events_and_json_errors(tmp_path):
    totals = {"user1": Decimal("12.345"), "big": 10**19, "tiny": Decimal("0.1")}

    class Lookup:
        def __call__(self, user_id):
            if user_id == "down":
                raise DatabaseUnavailable("cannot reach PostgreSQL at localhost:5432")
            return totals.get(user_id)

        def close(self):
            self.closed = True

    lookup = Lookup()

    async def main():
        async with serving(tmp_path, revenue_lookup=lookup) as (client, _):
            assert await get(client, "/healthz") == (200, b'{"status":"ok"}')
            for user, text in [("user1", b"12.345"), ("big", b"10000000000000000000"), ("tiny", b"0.1")]:
                expected = b'{"userId":"%s","revenue":%s}' % (user.encode(), text)
                assert await get(client, f"/userEvents/{user}", AUTH) == (200, expected)
            status, body = await get(client, "/userEvents/nobody", AUTH)
            assert status == 404 and orjson.loads(body)["error"]
            status, body = await get(client, "/userEvents/down", AUTH)
            assert status == 503 and "PostgreSQL" in orjson.loads(body)["error"]
            status, body = await get(client, "/nowhere", AUTH)
            assert status == 404 and orjson.loads(body)["error"]
            async with client.get("/liveEvent", headers=AUTH) as resp:
                assert resp.status == 405 and "error" in orjson.loads(await resp.read())
        assert lookup.closed  # the app closes what it was given, when it stops
        async with serving(tmp_path) as (client, _):
            status, body = await get(client, "/userEvents/user1", AUTH)
            assert status == 503 and "no database" in orjson.loads(body)["error"]

    asyncio.run(main())


def test_user_events_connection_is_closed_when_the_server_stops(dsn, tmp_path):
    """GET /userEvents reads PostgreSQL on one connection, which the app closes when it stops."""
    journal = tmp_path / "j.jsonl"
    journal.write_bytes(ev("user1", "12.345") + b"\n")
    process(dsn, [journal])

    def backends(want: int) -> int:
        """Other connections to this test's database, given a moment to become `want`."""
        with psycopg.connect(dsn, autocommit=True) as conn:
            for _ in range(200):
                n = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                 " AND pid <> pg_backend_pid()").fetchone()[0]
                if n == want:
                    break
                time.sleep(0.01)
        return n

    async def main():
        lookup = StoreRevenue(lambda: Store.connect(dsn))
        async with serving(tmp_path, revenue_lookup=lookup) as (client, _):
            assert backends(0) == 0  # opened on first use only
            for _ in range(3):
                answer = await get(client, "/userEvents/user1", AUTH)
                assert answer == (200, b'{"userId":"user1","revenue":12.345}')
            assert backends(1) == 1  # one connection, kept
        assert backends(0) == 0

    asyncio.run(main())


def test_malformed_http_and_slow_body_get_json(tmp_path):
    async def exchange(port: int, data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        answer = head + await asyncio.wait_for(reader.readexactly(length), 5)
        assert await asyncio.wait_for(reader.read(), 2) == b""  # and the connection is closed
        writer.close()
        return answer

    async def main():
        async with serving(tmp_path, request_timeout=0.3) as (client, journal):
            answer = await exchange(client.port, b"NOT HTTP AT ALL\r\n\r\n")
            assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]
            assert answer.endswith(b'{"error":"malformed HTTP request"}')
            slow = (b"POST /liveEvent HTTP/1.1\r\nHost: x\r\nAuthorization: secret\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n" + ORIGINAL[:10])
            answer = await exchange(client.port, slow)
            assert b" 408 " in answer.split(b"\r\n")[0] and b'"error"' in answer
            assert journal.read_bytes() == b""

    asyncio.run(main())


def test_check_settings():
    assert check_settings(ServeSettings()) == "secret"
    assert check_settings(ServeSettings(host="::1")) == "secret"
    assert check_settings(ServeSettings(host="0.0.0.0", token="t")) == "t"
    with pytest.raises(ConfigError, match="EVTOOL_TOKEN"):
        check_settings(ServeSettings(host="0.0.0.0"))
    with pytest.raises(ConfigError):
        check_settings(ServeSettings(host="::1", token=""))


# --- the appender -----------------------------------------------------------------------------


def test_second_appender_on_same_file_is_refused(tmp_path):
    async def main():
        path = tmp_path / "j.jsonl"
        first = JournalAppender(path)
        with pytest.raises(JournalLocked, match="another `evtool serve`") as info:
            JournalAppender(path)
        assert str(path) in str(info.value)
        await first.close()
        again = JournalAppender(path)  # released on close
        await again.close()

    asyncio.run(main())


def test_group_commit_keeps_every_request_whole(tmp_path):
    async def main():
        appender = JournalAppender(tmp_path / "j.jsonl")
        chunks = [b"".join(b"%d-%d\n" % (i, k) for k in range(i % 5 + 1)) for i in range(300)]
        await asyncio.gather(*(appender.append(c) for c in chunks))
        assert appender.size == sum(map(len, chunks))
        await appender.close()
        data = (tmp_path / "j.jsonl").read_bytes()
        got = sorted(data.splitlines())
        assert got == sorted(b"".join(chunks).splitlines())
        for c in chunks:  # each request's lines are contiguous
            assert c in data

    asyncio.run(main())


def test_close_finishes_appends_in_flight(tmp_path):
    async def main():
        appender = JournalAppender(tmp_path / "j.jsonl")
        tasks = [asyncio.create_task(appender.append(b"%d\n" % i)) for i in range(50)]
        await asyncio.sleep(0)  # the appends are queued, the first group is being written
        await appender.close()
        await asyncio.gather(*tasks)  # every one of them succeeded
        assert sorted((tmp_path / "j.jsonl").read_bytes().split()) == sorted(b"%d" % i for i in range(50))

    asyncio.run(main())


# --- real processes ---------------------------------------------------------------------------

def fsize_limit(limit: int):
    """For Serve's preexec_fn: writes past `limit` bytes fail with EFBIG (serve ignores SIGXFSZ)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


# Python must not write .pyc files under the file size limit (before serve ignores SIGXFSZ).
NO_PYC = {"PYTHONDONTWRITEBYTECODE": "1"}


def test_serve_process_sigterm_exits_0_with_data_on_disk(tmp_path):
    journal = tmp_path / "server-events.jsonl"
    with Serve(tmp_path) as serve:
        proc, port = serve.proc, serve.port
        assert "fsync on" in serve.log.read_text()
        status, body, _ = http(f"{serve.url}/liveEvent", "POST", ORIGINAL, AUTH)
        assert status == 200
        # a request whose body is still arriving when SIGTERM comes is refused at once (503,
        # nothing stored), not left hanging until its timeout
        sock = socket.create_connection(("127.0.0.1", port))
        body2 = ev("late", "2.5")
        sock.sendall(b"POST /liveEvent HTTP/1.1\r\nHost: x\r\nAuthorization: secret\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body2) + body2[:5])
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        sock.settimeout(60)  # a guard against hanging; "at once" is that 503 comes before the body
        answer = sock.recv(4096)
        sock.close()
        assert b" 503 " in answer.split(b"\r\n")[0] and b"shutting down" in answer
        assert proc.wait(timeout=60) == 0
    [stored] = lines(journal)
    got = orjson.loads(stored)
    assert got.pop("timestamp").endswith("Z")  # the receive time of an untimed event
    assert got == {**orjson.loads(ORIGINAL), "eventId": body["eventId"]}


def test_fsync_off_says_so(tmp_path):
    with Serve(tmp_path, "--journal", "j.jsonl", "--fsync", "off") as serve:
        assert "not durable" in serve.log.read_text()
        proc = serve.proc
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0


def test_write_failure_is_503_file_unchanged_then_recovers(tmp_path):
    journal = tmp_path / "server-events.jsonl"
    with Serve(tmp_path, preexec_fn=fsize_limit(4096), env=NO_PYC) as serve:
        proc, live, healthz = serve.proc, f"{serve.url}/liveEvent", f"{serve.url}/healthz"
        assert http(live, "POST", ORIGINAL, AUTH)[0] == 200
        before = journal.read_bytes()
        big = b"\n".join(ev(f"u{i}", "1", f"big:{i}") for i in range(100))  # ~6 KB, over the limit
        status, body, headers = http(live, "POST", big, NDJSON)
        assert status == 503 and headers["Retry-After"] == "1"
        assert "journal write failed" in body["error"]
        assert journal.read_bytes() == before  # nothing of the failed request stayed
        assert http(healthz)[0] == 503
        assert http(live, "POST", ORIGINAL, AUTH)[0] == 200
        assert http(healthz)[:2] == (200, {"status": "ok"})
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    assert len(lines(journal)) == 2
