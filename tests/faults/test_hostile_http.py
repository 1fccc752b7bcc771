"""Scenario 7 and the Security bullets: hostile requests to a real `evtool serve`.

Every request gets an answer (never a hang), never a 5xx, always JSON with a human sentence for
an error and no internals; a refused request writes nothing; what is accepted is exactly what
`process` then applies without a single reject; and the server is healthy afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evtool.receiver import ServeSettings, make_app, start_runner

from ..conftest import evtool
from .helpers import Serve, free_port

TOKEN = "secret"
GOOD_AUTH = (TOKEN, f"Bearer {TOKEN}", f"bearer {TOKEN}", f" {TOKEN}")  # header values lose outer spaces


# -- raw HTTP ----------------------------------------------------------------------------------


def raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 15) -> tuple[int, dict, bytes]:
    """Send raw bytes; return (status, headers, body) of the answer. A hang fails the test."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(head + body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the whole body was read: the answer is still there
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
            if _complete(b"".join(chunks)):
                break
    answer = b"".join(chunks)
    assert answer, "no answer"
    top, _, payload = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = top.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, payload


def _complete(answer: bytes) -> bool:
    top, sep, payload = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in top.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(payload) >= int(value)
    return False


def request_bytes(method: str, path: str, headers: list[tuple[str, bytes]], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name.encode() + b": " + value for name, value in headers]
    lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n"


def check_error_body(status: int, headers: dict, payload: bytes, *secrets: str) -> str:
    """A JSON object with a sentence; no traceback, no file paths, no secret. Returns the sentence."""
    assert headers.get("content-type", "").startswith("application/json"), (status, headers)
    doc = json.loads(payload)
    assert isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"].strip(), doc
    text = payload.decode("utf-8", "replace")
    for leak in ("Traceback", 'File "', ".py", "/work/", "site-packages", *secrets):
        assert leak not in text, (leak, text)
    return doc["error"]


# -- the server under attack -------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_server(pg_server, tmp_path_factory):
    """One `evtool serve` (default limits) for the whole module, with its own database."""
    name = "h_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    dsn = pg_server.replace("/postgres?", f"/{name}?")
    workdir = tmp_path_factory.mktemp("hostile")
    env = {"EVTOOL_DSN": dsn, "EVTOOL_HOME": str(workdir / "home")}
    serve = Serve(workdir, env=env).start()
    serve.dsn = dsn  # type: ignore[attr-defined]
    serve.journal = workdir / "server-events.jsonl"  # type: ignore[attr-defined]
    serve.accepted = 0  # type: ignore[attr-defined]
    yield serve
    serve.stop()
    text = serve.log.read_text(errors="replace")
    assert "Traceback" not in text and "internal error" not in text, text
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def journal_size(serve: Serve) -> int:
    path: Path = serve.journal  # type: ignore[attr-defined]
    return path.stat().st_size if path.exists() else 0


# -- strategies ---------------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**25, 10**25), st.text(max_size=20),
                    st.floats(allow_nan=True, allow_infinity=True))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
numbers = st.one_of(
    st.integers(0, 10**21),
    st.decimals(min_value=0, max_value=10**21, allow_nan=False, allow_infinity=False, places=2),
    st.sampled_from(["1e400", "-1", "0.1234567890123456789012", "1E2", "-0", "00", "1.", ".5", "NaN",
                     "Infinity", "1e-400", "0x10", "true"]),
)


good_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1, max_size=20)
good_ids = good_text.filter(lambda t: t[0] != "~" and t.isprintable())


@st.composite
def event_text(draw) -> bytes:
    """One event-like JSON object as text: half of them valid, the rest subtly or grossly wrong."""
    if draw(st.booleans()):
        value = draw(st.one_of(st.integers(0, 10**6), st.decimals(0, 10**6, places=2)))
        items = [f'"userId": {json.dumps(draw(good_text))}',
                 f'"name": "{draw(st.sampled_from(["add_revenue", "subtract_revenue"]))}"',
                 f'"value": {value}']
        if draw(st.booleans()):
            items.append(f'"eventId": {json.dumps(draw(good_ids))}')
        if draw(st.booleans()):
            items.append(f'"extra": {json.dumps(draw(json_values))}')
        return ("{" + ", ".join(draw(st.permutations(items))) + "}").encode()
    parts = {
        "userId": draw(st.one_of(st.just("u1"), st.text(min_size=0, max_size=300), json_values,
                                 st.just("a\u0000b"), st.just("x" * 257))),
        "name": draw(st.one_of(st.sampled_from(["add_revenue", "subtract_revenue", "refund", ""]),
                               json_values)),
        "value": draw(st.one_of(numbers, json_values)),
    }
    if draw(st.booleans()):
        parts["eventId"] = draw(st.one_of(st.text(max_size=140), st.sampled_from(["~mine", "ok-1", "\x01"]),
                                          json_values))
    if draw(st.booleans()):
        parts[draw(st.sampled_from(["user_id", "extra", "meta"]))] = draw(json_values)
    keys = list(parts)
    if draw(st.booleans()):
        keys = draw(st.permutations(keys))
    drop = draw(st.sampled_from([None, *keys]))
    items = []
    for key in keys:
        if key == drop:
            continue
        value = parts[key]
        if isinstance(value, Decimal):
            text = format(value, "f")
        elif isinstance(value, str) and key == "value" and value[:1] in "-0123456789.NIt1":
            text = value  # a raw numeric literal, right or wrong
        else:
            text = json.dumps(value, allow_nan=True)
        items.append(f"{json.dumps(key)}: {text}")
    return ("{" + ", ".join(items) + "}").encode("utf-8", "surrogatepass")


@st.composite
def hostile_body(draw) -> tuple[str, bytes]:
    """(kind, body)."""
    kind = draw(st.sampled_from(["event", "array", "ndjson", "binary", "mutated", "nested", "blank"]))
    if kind == "event":
        return kind, draw(event_text())
    if kind == "array":
        return kind, b"[" + b", ".join(draw(st.lists(event_text(), max_size=5))) + b"]"
    if kind == "ndjson":
        lines = draw(st.lists(st.one_of(event_text(), st.binary(max_size=30), st.just(b"")), max_size=6))
        return kind, draw(st.sampled_from([b"\n", b"\r\n"])).join(lines)
    if kind == "binary":
        return kind, draw(st.binary(max_size=500))
    if kind == "mutated":  # a valid event with invalid UTF-8, NUL or control bytes spliced in
        body = b'{"userId": "u1", "name": "add_revenue", "value": 5}'
        at = draw(st.integers(0, len(body)))
        junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\x00", b"\xed\xa0\x80", b"\x1b", b"\\u0000",
                                     b"\\ud800", b'"']))
        return kind, body[:at] + junk + body[at:]
    if kind == "nested":
        depth = draw(st.sampled_from([10, 200, 1000, 50_000]))
        inner = b"[" * depth + b"]" * depth
        if draw(st.booleans()):
            return kind, b'{"userId": "u1", "name": "add_revenue", "value": 1, "extra": ' + inner + b"}"
        return kind, inner
    return kind, draw(st.sampled_from([b"", b" ", b"\n\n", b"null", b"[]", b"{}", b"0"]))


authorization = st.sampled_from([None, *GOOD_AUTH, *GOOD_AUTH, TOKEN, TOKEN, "wrong", "Bearer ", "",
                                 "Bearer wrong", "secretx", "Basic c2VjcmV0", "s\u00e9cret"])
content_types = st.sampled_from([None, "application/json", "application/json", "application/x-ndjson",
                                 "application/x-ndjson", "application/ndjson",
                                 "application/json; charset=utf-8", "text/plain", "application/xml",
                                 "multipart/form-data; boundary=x", "application/x-www-form-urlencoded",
                                 "", "application/json, text/plain", "*/*"])
idempotency_keys = st.sampled_from([None, "key-1", "~reserved", "k" * 200, "a\tb", "\u00e9t\u00e9"])
routes = st.sampled_from([("POST", "/liveEvent")] * 8 + [("GET", "/liveEvent"), ("POST", "/nope"),
                                                         ("GET", "/userEvents/u1"), ("PUT", "/liveEvent"),
                                                         ("POST", "/healthz"), ("GET", "/metrics")])


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=routes, auth=authorization, ctype=content_types, key=idempotency_keys, body=hostile_body())
def test_hostile_requests_get_a_4xx_json_and_write_nothing(hostile_server, route, auth, ctype, key, body):
    method, path = route
    kind, payload = body
    headers: list[tuple[str, bytes]] = []
    if auth is not None:
        headers.append(("Authorization", auth.encode()))
    if ctype is not None:
        headers.append(("Content-Type", ctype.encode()))
    if key is not None:
        headers.append(("Idempotency-Key", key.encode()))
    before = journal_size(hostile_server)
    head = request_bytes(method, path, headers, payload)
    status, resp_headers, answer = raw_request(hostile_server.port, head, payload)
    after = journal_size(hostile_server)
    assert status < 500, (status, answer)
    if auth not in GOOD_AUTH and path != "/healthz":
        assert status == 401, (status, answer)
    if status >= 400:
        check_error_body(status, resp_headers, answer)
        assert after == before, "a refused request wrote to the journal"
        return
    if (method, path) != ("POST", "/liveEvent"):
        assert after == before
        return
    assert status == 200
    doc = json.loads(answer)
    accepted = doc.get("accepted", 1 if "eventId" in doc else None)
    assert isinstance(accepted, int)
    grown = hostile_server.journal.read_bytes()[before:]  # type: ignore[attr-defined]
    assert grown.count(b"\n") == accepted and (grown.endswith(b"\n") or accepted == 0)
    hostile_server.accepted += accepted  # type: ignore[attr-defined]


@st.composite
def valid_event(draw) -> bytes:
    value = draw(st.one_of(st.integers(0, 10**6), st.decimals(0, 10**6, places=2)))
    items = [f'"userId": {json.dumps(draw(good_text))}',
             f'"name": "{draw(st.sampled_from(["add_revenue", "subtract_revenue"]))}"', f'"value": {value}']
    if draw(st.booleans()):
        items.append(f'"eventId": {json.dumps(draw(good_ids))}')
    return ("{" + ", ".join(items) + "}").encode()


INVALID = [
    b'{"userId": "u1", "name": "refund", "value": 5}',
    b'{"userId": "u1", "name": "add_revenue", "value": -1}',
    b'{"userId": "u1", "name": "add_revenue", "value": true}',
    b'{"userId": "", "name": "add_revenue", "value": 1}',
    b'{"userId": "u1", "value": 1}',
    b'{"userId": "u1", "name": "add_revenue", "value": ',
    b'{"userId": "u1", "name": "add_revenue", "value": 1, "eventId": "~x"}',
    b'"just a string"',
    b'{"userId": "u1", "name": "add_revenue", "value": 1e400}',
    b"\xff\xfe",
]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(items=st.lists(st.tuples(valid_event(), st.sampled_from([None] * 20 + INVALID)), min_size=1,
                      max_size=12),
       form=st.sampled_from(["ndjson", "array", "single"]), key=st.booleans())
def test_bulks_are_all_or_nothing(hostile_server, items, form, key):
    lines = [bad if bad is not None else good for good, bad in items]
    if form == "single":
        lines = lines[:1]
    if form == "ndjson":
        body = b"\n".join(lines)
    else:
        body = b"[" + b", ".join(lines) + b"]" if form == "array" else lines[0]
    ctype = b"application/x-ndjson" if form == "ndjson" else b"application/json"
    headers = [("Authorization", b"secret"), ("Content-Type", ctype)]
    if key:
        headers.append(("Idempotency-Key", os.urandom(6).hex().encode()))
    before = journal_size(hostile_server)
    head = request_bytes("POST", "/liveEvent", headers, body)
    status, resp_headers, answer = raw_request(hostile_server.port, head, body)
    grown = hostile_server.journal.read_bytes()[before:]  # type: ignore[attr-defined]
    if any(bad is not None for _, bad in items[:len(lines)]):
        assert status in (400, 413, 422), (status, answer)
        check_error_body(status, resp_headers, answer)
        assert grown == b""
    else:
        assert status == 200, answer
        assert grown.count(b"\n") == len(lines) and grown.endswith(b"\n")
        hostile_server.accepted += len(lines)  # type: ignore[attr-defined]


def test_after_the_attack_the_server_is_healthy_and_process_takes_every_accepted_line(hostile_server):
    """Runs after the property test (same module server): everything stored is valid to `process`."""
    status, _, _ = raw_request(hostile_server.port, request_bytes("GET", "/healthz", [], b""))
    assert status == 200
    assert hostile_server.proc.poll() is None
    event = b'{"userId": "after", "name": "add_revenue", "value": 1.25}'
    head = request_bytes("POST", "/liveEvent", [("Authorization", b"secret"),
                                                ("Content-Type", b"application/json")], event)
    status, _, _ = raw_request(hostile_server.port, head, event)
    assert status == 200
    journal = hostile_server.journal  # type: ignore[attr-defined]
    lines = len(journal.read_bytes().splitlines())
    db = hostile_server.dsn  # type: ignore[attr-defined]
    result = evtool("process", "--json", str(journal), env={"EVTOOL_DSN": db})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    # The receiver and the processor agree on what is valid: the only lines the processor
    # rejects are eventIds reused with other content (hypothesis reuses short ids often), which
    # only the processor can see across requests
    with psycopg.connect(db) as conn:
        reasons = [r for (r,) in conn.execute("SELECT reason FROM rejected_lines")]
    assert len(reasons) == report["rejected"], report
    assert all("was already applied with different content" in r for r in reasons), reasons
    assert report["applied"] + report["duplicates"] + report["rejected"] == lines
    accepted = hostile_server.accepted  # type: ignore[attr-defined]
    assert accepted >= 50  # the 200 path was well exercised
    print(f"\nhostile requests: {accepted} events accepted, {lines} lines, "
          f"applied {report['applied']}, duplicates {report['duplicates']}, rejected {report['rejected']}"
          " (reused ids)")


# -- limits, on by default ----------------------------------------------------------------------


def post_live(port: int, body: bytes, ctype: bytes = b"application/json") -> tuple[int, dict, bytes]:
    headers = [("Authorization", b"secret"), ("Content-Type", ctype)]
    return raw_request(port, request_bytes("POST", "/liveEvent", headers, body), body, timeout=60)


def test_default_limits_body_line_headers(hostile_server):
    port = hostile_server.port
    before = journal_size(hostile_server)
    line = b'{"userId": "big", "name": "add_revenue", "value": 1, "pad": "' + b"x" * 1_100_000 + b'"}'
    cases = {
        "body over 16 MiB": (b"\n".join([b'{"userId": "u", "name": "add_revenue", "value": 1}'] * 340_000),
                             b"application/x-ndjson"),
        "NDJSON line over 1 MiB": (line, b"application/x-ndjson"),
        "one object over 1 MiB": (line, b"application/json"),
    }
    for what, (body, ctype) in cases.items():
        status, headers, answer = post_live(port, body, ctype)
        assert status == 413, (what, status, answer)
        check_error_body(status, headers, answer)
    for what, head in {
        "a header over 8 KiB": request_bytes("GET", "/healthz", [("X-Big", b"h" * 9000)], b""),
        "200 headers": request_bytes("GET", "/healthz", [(f"X-{i}", b"1") for i in range(200)], b""),
        "a request line over 8 KiB": request_bytes("GET", "/" + "p" * 9000, [], b""),
        "a token over 8 KiB": request_bytes("POST", "/liveEvent", [("Authorization", b"s" * 9000)], b"{}"),
    }.items():
        status, headers, answer = raw_request(port, head)
        assert 400 <= status < 500, (what, status)
        check_error_body(status, headers, answer, "s" * 100)
    assert journal_size(hostile_server) == before
    assert raw_request(port, request_bytes("GET", "/healthz", [], b""))[0] == 200
    assert ServeSettings().request_timeout == 30 and ServeSettings().max_line == 1 << 20


# -- slow clients -------------------------------------------------------------------------------


def test_slow_clients_are_cut_off_and_do_not_block_others(tmp_path):
    """The in-process app on a real socket, with a 1 s request time limit."""

    async def main() -> None:
        s = ServeSettings(journal=tmp_path / "j.jsonl", port=0, request_timeout=1.0)
        runner = await start_runner(make_app(s), "127.0.0.1", 0,
                                    idle_timeout=s.request_timeout)
        port = runner.addresses[0][1]
        try:
            await attack(port)
        finally:
            await runner.cleanup()

    async def attack(port: int) -> None:
        body = b'{"userId": "u1", "name": "add_revenue", "value": 5}'
        head = request_bytes("POST", "/liveEvent", [("Authorization", b"secret"),
                                                    ("Content-Type", b"application/json")], body)
        conns = []
        for i in range(60):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if i % 3 == 0:
                writer.write(head + body[:10])  # a body that never finishes
            elif i % 3 == 1:
                writer.write(head[:30])  # headers that never finish
            # else: connects and says nothing
            conns.append((i % 3, reader, writer))
        # Meanwhile a normal client is served at once.
        status, _, _ = await asyncio.to_thread(raw_request, port, head, body, 60)
        assert status == 200
        # Each slow client is answered 408 (body) or disconnected (no complete request).
        for kind, reader, writer in conns:
            answer = await asyncio.wait_for(reader.read(), timeout=120)  # a guard against hanging
            if kind == 0:
                assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
                assert b'"error"' in answer
            writer.close()
        assert (tmp_path / "j.jsonl").read_bytes().count(b"\n") == 1

    asyncio.run(main())


SERVE = """
import sys
from pathlib import Path
from evtool.receiver import ServeSettings, run_server
s = ServeSettings(port=int(sys.argv[1]), journal=Path(sys.argv[2]), request_timeout=2.0)
run_server(s, on_ready=lambda message: print(message, flush=True))
"""


def test_run_server_cuts_off_clients_that_never_finish_their_headers(tmp_path):
    """run_server, as `evtool serve` calls it, in its own process with a 2 s request time limit
    (30 s by default): a connection without a complete request is closed, not held for an hour."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(port), str(tmp_path / "j.jsonl")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith(b"listening on")
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        socks[0].sendall(b"POST /liveEvent HTTP/1.1\r\nHost: x\r\n")
        socks[1].sendall(b"GET /heal")
        for sock in socks:
            sock.settimeout(120)  # a guard against hanging; the server's limit is 2 s
            assert sock.recv(100) == b""
            sock.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


# -- security -----------------------------------------------------------------------------------


def test_data_routes_need_the_token_and_healthz_does_not(hostile_server):
    port = hostile_server.port
    for method, path in (("POST", "/liveEvent"), ("GET", "/userEvents/u1"), ("GET", "/metrics"),
                         ("GET", "/userEvents/%2e%2e%2f"), ("DELETE", "/liveEvent")):
        for auth in ([], [("Authorization", b"wrong")], [("Authorization", b"Bearer")]):
            status, headers, answer = raw_request(port, request_bytes(method, path, auth, b"{}"), b"{}")
            assert status == 401, (method, path, status)
            assert "token" in check_error_body(status, headers, answer, TOKEN)
    assert raw_request(port, request_bytes("GET", "/healthz", [], b""))[0] == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_non_loopback_bind_without_an_explicit_token_is_refused(tmp_path, host):
    result = evtool("serve", "--host", host, "--port", str(free_port()), cwd=tmp_path, timeout=30,
                    env={"EVTOOL_TOKEN": ""})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: ") and "token" in line
    journal = tmp_path / "server-events.jsonl"
    assert not journal.exists() or journal.stat().st_size == 0


def test_empty_token_is_refused_and_an_explicit_token_binds_anywhere(tmp_path):
    result = evtool("serve", "--token", "", "--port", str(free_port()), cwd=tmp_path, timeout=30)
    assert result.returncode in (1, 2) and "token" in result.stderr.lower()
    with Serve(tmp_path, "--host", "0.0.0.0", env={"EVTOOL_TOKEN": "x-long-random-token"}):
        pass


def test_the_token_is_never_logged_nor_echoed(dsn, tmp_path):
    token = "T0k3n-" + uuid.uuid4().hex
    env = {"EVTOOL_TOKEN": token}
    with Serve(tmp_path, env=env) as serve:
        port = serve.port
        seen = []
        for auth in (token, f"Bearer {token}", token + "x", "x" + token, token[:-1]):
            for body in (b'{"userId": "u", "name": "add_revenue", "value": 1}', b"{bad", b"\xff"):
                key = b"k-" + os.urandom(4).hex().encode()
                head = request_bytes("POST", "/liveEvent", [("Authorization", auth.encode()),
                                                            ("Content-Type", b"application/json"),
                                                            ("Idempotency-Key", key)], body)
                seen.append(raw_request(port, head, body))
        # malformed HTTP carrying the token in a header
        for junk in (b"POST /liveEvent HTTP/1.1\r\nAuthorization: %s\r\nBad Header\r\n\r\n" % token.encode(),
                     b"GARBAGE " + token.encode() + b"\r\n\r\n"):
            seen.append(raw_request(port, junk))
        for _, _, answer in seen:
            assert token.encode() not in answer and token[:-1].encode() not in answer
        assert {s for s, _, _ in seen} >= {200, 400, 401}
        # the sender with a wrong token: refused, and its output does not show either token
        source = tmp_path / "events.jsonl"
        source.write_text('{"userId": "u", "name": "add_revenue", "value": 1}\n')
        wrong = "W-" + uuid.uuid4().hex
        sent = evtool("send", str(source), "--url", serve.url, cwd=tmp_path, env={"EVTOOL_TOKEN": wrong})
        assert sent.returncode == 1
        for text in (sent.stdout, sent.stderr):
            assert wrong not in text and token not in text
    text = serve.log.read_text(errors="replace")
    assert token not in text and token[:-1] not in text
    for state in (Path(os.environ["EVTOOL_HOME"]) / "send-state").glob("*"):
        assert wrong not in state.read_text(errors="replace")


def test_user_events_route_answers_json_for_odd_user_ids(hostile_server):
    """GET /userEvents/<id> with odd ids: 404 JSON (unknown user), never a 5xx."""
    port = hostile_server.port
    for user in ("%00", "%ff%fe", "a%2Fb", "x" * 5000, "%F0%9F%98%80", "..%2F..%2Fetc%2Fpasswd"):
        status, headers, answer = raw_request(port, request_bytes(
            "GET", f"/userEvents/{user}", [("Authorization", b"secret")], b""))
        assert status in (400, 404, 414), (user[:20], status, answer[:200])
        check_error_body(status, headers, answer)


def test_dropped_connections_mid_body_write_nothing(hostile_server):
    port = hostile_server.port
    before = journal_size(hostile_server)
    body = b"\n".join(b'{"userId": "cut", "name": "add_revenue", "value": %d}' % i for i in range(2000))
    head = request_bytes("POST", "/liveEvent", [("Authorization", b"secret"),
                                                ("Content-Type", b"application/x-ndjson")], body)
    for cut in (0, 10, len(body) // 2, len(body) - 1):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head + body[:cut])
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        time.sleep(0.1)
    time.sleep(0.3)
    assert journal_size(hostile_server) == before
    assert raw_request(port, request_bytes("GET", "/healthz", [], b""))[0] == 200


def test_many_connections_at_once_all_answered(hostile_server):
    port = hostile_server.port
    body = b'{"userId": "many", "name": "add_revenue", "value": 1, "eventId": "many-%d"}'

    def one(i: int) -> int:
        b = body % i
        return raw_request(port, request_bytes("POST", "/liveEvent", [("Authorization", b"secret")], b), b)[0]

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(64) as pool:
        statuses = list(pool.map(one, range(500)))
    assert statuses == [200] * 500
