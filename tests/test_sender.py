"""The sender against a real HTTP sink on loopback (no mocks).

The sink is a tiny aiohttp app in a background thread that records what it receives and can be
told to fail in the ways the sender must survive.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from evtool.errors import DeliveryFailed, SourceError
from evtool.identity import source_id
from evtool.sender import SendSettings, send
from evtool.sendstate import StateStore

from .conftest import event_line as ev
from .conftest import free_port

ID_RE = re.compile(r"^([0-9a-f]{16}):(\d+):([0-9a-f]{16})$")


class Sink:
    """A minimal receiver: checks the token, records lines, fails on request."""

    def __init__(self) -> None:
        self.token = "secret"
        self.requests: list[tuple[str, bytes]] = []  # (content type, body) of accepted requests
        self.attempts = 0
        self.fail_503 = 0  # answer 503 to the next N requests
        self.retry_after = "0"
        self.drop = 0  # close the connection without answering for the next N requests
        self.reject_user: str | None = None  # 400 for any request containing this userId
        self.accept_budget: int | None = None  # accept this many requests, then 503 for good
        self.lock = threading.Lock()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        with self.lock:
            self.attempts += 1
            if request.headers.get("Authorization") != self.token:
                return web.json_response({"error": "missing or wrong token"}, status=401)
            if self.drop:
                self.drop -= 1
                request.transport.close()
                return web.Response()
            if self.accept_budget is not None:
                if self.accept_budget == 0:
                    return web.json_response({"error": "down"}, status=503)
                self.accept_budget -= 1
            if self.fail_503:
                self.fail_503 -= 1
                return web.json_response(
                    {"error": "cannot write"}, status=503, headers={"Retry-After": self.retry_after}
                )
            ctype = request.headers.get("Content-Type", "")
            lines = body.splitlines() if ctype == "application/x-ndjson" else [body]
            objs = [orjson.loads(line) for line in lines]
            if self.reject_user and any(o["userId"] == self.reject_user for o in objs):
                return web.json_response({"error": f"user {self.reject_user} not welcome"}, status=400)
            self.requests.append((ctype, body))
        if ctype == "application/x-ndjson":
            return web.json_response({"accepted": len(objs)})
        return web.json_response({"message": "Event received", "eventId": objs[0].get("eventId")})

    def lines(self) -> list[bytes]:
        out: list[bytes] = []
        for ctype, body in self.requests:
            out.extend(body.splitlines() if ctype == "application/x-ndjson" else [body])
        return out

    def events(self) -> list[dict]:
        return [orjson.loads(line) for line in self.lines()]

    def ids(self) -> list[str]:
        return [e["eventId"] for e in self.events()]


@contextmanager
def running_sink() -> Iterator[Sink]:
    """A Sink serving on a free loopback port in a background thread."""
    s = Sink()
    app = web.Application()
    app.router.add_post("/liveEvent", s.handle)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    loop.run_until_complete(site.start())
    s.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield s
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.run_until_complete(runner.cleanup())
    loop.close()


@pytest.fixture
def sink():
    with running_sink() as s:
        yield s


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def settings(sink: Sink, path: Path, home: Path, **kw) -> SendSettings:
    kw.setdefault("max_retries", 3)
    return SendSettings(path=path, url=sink.url, state_dir=home, **kw)


def write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def test_delivers_all_lines_with_structured_ids(sink, tmp_path, home):
    src = tmp_path / "events.jsonl"
    src.write_bytes(ev("a") + b"\r\n" + b"\n" + ev("b") + b"\n" + b"   \n" + ev("c") + b"\n")
    report = send(settings(sink, src, home, batch=2))
    assert (report.sent, report.failed, report.skipped_invalid) == (3, 0, 0)
    assert all(ct == "application/x-ndjson" for ct, _ in sink.requests)
    got = {e["userId"]: ID_RE.match(e["eventId"]) for e in sink.events()}
    assert {u: int(m.group(2)) for u, m in got.items()} == {"a": 1, "b": 3, "c": 5}
    assert len({m.group(1) for m in got.values()}) == 1
    assert report.source == got["a"].group(1)


def test_ids_are_stable_across_resends_and_from_start(sink, tmp_path, home):
    src = write(tmp_path / "e.jsonl", [ev(f"u{i}") for i in range(7)])
    first = send(settings(sink, src, home, batch=3))
    ids = sink.ids()
    assert first.sent == 7 and len(set(ids)) == 7

    again = send(settings(sink, src, home, batch=3))
    assert (again.sent, again.already_sent) == (0, 7)
    assert sink.ids() == ids

    redo = send(settings(sink, src, home, batch=3, from_start=True))
    assert redo.sent == 7 and redo.new_source_reason is None
    assert sink.ids()[7:] == ids

    fresh = send(settings(sink, src, tmp_path / "other-home", batch=5))
    assert sink.ids()[14:] == ids and fresh.source == first.source


def test_identical_lines_get_different_ids(sink, tmp_path, home):
    src = write(tmp_path / "e.jsonl", [ev("same", "5")] * 3)
    send(settings(sink, src, home))
    ids = sink.ids()
    assert len(ids) == 3 and len(set(ids)) == 3
    assert [int(ID_RE.match(i).group(2)) for i in ids] == [1, 2, 3]


def test_ids_follow_content_not_paths(sink, tmp_path, home):
    a = write(tmp_path / "a.jsonl", [ev("x"), ev("y")])
    b = write(tmp_path / "b.jsonl", [ev("x"), ev("y")])  # a copy: the same events
    c = write(tmp_path / "c.jsonl", [ev("x"), ev("z")])  # same first line, then another event
    d = write(tmp_path / "d.jsonl", [ev("w")])
    reports = [send(settings(sink, f, home, from_start=True)) for f in (a, b, c, d)]
    assert reports[0].source == reports[1].source == reports[2].source != reports[3].source
    ids = sink.ids()
    assert ids[0:2] == ids[2:4] and ids[4] == ids[0] and ids[5] != ids[1]
    assert len(set(ids)) == 4


def test_client_event_id_is_kept(sink, tmp_path, home):
    src = write(tmp_path / "e.jsonl", [ev("a", event_id="order-17"), ev("b")])
    send(settings(sink, src, home))
    events = {e["userId"]: e for e in sink.events()}
    assert events["a"]["eventId"] == "order-17"
    assert sink.lines()[0].count(b"eventId") == 1
    assert ID_RE.match(events["b"]["eventId"])


def test_invalid_lines_are_reported_and_never_sent(sink, tmp_path, home):
    src = write(
        tmp_path / "e.jsonl",
        [
            ev("ok1"),
            b"{not json",
            ev("neg", "-1"),
            ev("bad", '"1e2"'),  # "12" would be read as 12 (input normalization)
            ev("ok2"),
            ev("rsv", event_id="~server-made"),
            ev("ok3", name="refund"),
        ],
    )
    report = send(settings(sink, src, home))
    assert report.sent == 2 and report.skipped_invalid == 5
    assert [n for n, _ in report.invalid_lines] == [2, 3, 4, 6, 7]
    assert "malformed JSON" in report.invalid_lines[0][1]
    assert [e["userId"] for e in sink.events()] == ["ok1", "ok2"]
    assert report.failed == 0


def test_decimal_text_is_preserved(sink, tmp_path, home):
    src = write(tmp_path / "e.jsonl", [ev("a", "12.345"), ev("b", "1.10"), ev("c", "100000000000000000001")])
    send(settings(sink, src, home))
    body = b"\n".join(sink.lines())
    assert b'"value": 12.345,' in body or b'"value": 12.345}' in body
    assert b'"value": 1.10' in body
    assert b'"value": 100000000000000000001' not in body  # too large: rejected, not rounded
    assert len(sink.lines()) == 2


def test_resume_sends_only_appended_lines(sink, tmp_path, home):
    src = write(tmp_path / "e.jsonl", [ev(f"u{i}") for i in range(3)])
    first = send(settings(sink, src, home))
    with src.open("ab") as f:
        f.write(ev("u3") + b"\n" + ev("u4") + b"\n")
    second = send(settings(sink, src, home))
    assert (second.sent, second.already_sent, second.new_source_reason) == (2, 3, None)
    assert second.source == first.source
    assert [int(ID_RE.match(i).group(2)) for i in sink.ids()] == [1, 2, 3, 4, 5]


def test_unterminated_last_line_is_resent_with_the_same_id(sink, tmp_path, home):
    src = tmp_path / "e.jsonl"
    src.write_bytes(ev("a") + b"\n" + ev("b"))
    assert send(settings(sink, src, home)).sent == 2
    with src.open("ab") as f:
        f.write(b"\n" + ev("c") + b"\n")
    again = send(settings(sink, src, home))
    assert (again.sent, again.already_sent, again.new_source_reason) == (2, 1, None)
    ids = sink.ids()
    assert ids[1] == ids[2]  # b, sent twice with one id
    assert [int(ID_RE.match(i).group(2)) for i in ids] == [1, 2, 2, 3]


def test_unterminated_line_appended_after_a_resume_point(sink, tmp_path, home):
    src = write(tmp_path / "e.jsonl", [ev("a")])
    send(settings(sink, src, home))
    with src.open("ab") as f:
        f.write(ev("b"))  # no newline yet
    for _ in range(2):
        report = send(settings(sink, src, home))
        assert (report.sent, report.already_sent, report.new_source_reason) == (1, 1, None)
    ids = sink.ids()
    assert ids[1] == ids[2] and ID_RE.match(ids[1]).group(2) == "2"


def test_byte_order_mark_on_the_first_line(sink, tmp_path, home):
    src = tmp_path / "e.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + ev("a") + b"\n" + ev("b") + b"\n")
    report = send(settings(sink, src, home))
    assert report.sent == 2 and report.skipped_invalid == 0
    assert [e["userId"] for e in sink.events()] == ["a", "b"]


def test_state_file_records_the_resume_point(sink, tmp_path, home):
    src = write(tmp_path / "e.jsonl", [ev("a"), ev("b")])
    report = send(settings(sink, src, home))
    [state_file] = (home / "send-state").glob("*.json")
    state = orjson.loads(state_file.read_bytes())
    assert state["path"] == str(src.resolve()) and state["source"] == report.source
    assert (state["offset"], state["line"], state["url"]) == (src.stat().st_size, 2, sink.url)
    assert state["chain"] == ID_RE.match(sink.ids()[-1]).group(3)
    assert not list((home / "send-state").glob("*.tmp*"))


@pytest.mark.parametrize(
    "replacement, note, same",
    [
        ([ev("other")], False, 0),  # another first line: another source, nothing saved for it
        ([ev("u0")], True, 1),  # same first line, truncated
        ([ev("u0"), ev("zz"), ev("u2"), ev("u3")], True, 1),  # same first line, rewritten after it
        ([ev("new"), ev("u1"), ev("u2"), ev("u3")], False, 0),  # first line differs
    ],
)
def test_replaced_file_is_sent_from_where_it_differs(sink, tmp_path, home, replacement, note, same):
    src = write(tmp_path / "e.jsonl", [ev("u0"), ev("u1"), ev("zz-long-line-to-shift-offsets")])
    send(settings(sink, src, home))
    old = sink.ids()
    write(src, replacement)
    second = send(settings(sink, src, home))
    assert (second.new_source_reason is not None) == note
    if note:
        assert str(src.resolve()) in second.new_source_reason
        assert "sending it from the start" in second.new_source_reason
    assert second.sent == len(replacement) and second.already_sent == 0
    new = sink.ids()[len(old):]
    assert new[:same] == old[:same] and not set(new[same:]) & set(old)  # new from where it differs
    # The replacement is remembered: the next run resumes instead of flagging it again.
    third = send(settings(sink, src, home))
    assert (third.sent, third.new_source_reason, third.source) == (0, None, second.source)


def test_from_start_resends_with_the_same_ids(sink, tmp_path, home):
    src = write(tmp_path / "e.jsonl", [ev("u0"), ev("u1"), ev("u2")])
    send(settings(sink, src, home))
    write(src, [ev("u0")])
    redo = send(settings(sink, src, home, from_start=True))
    assert redo.new_source_reason is None and redo.sent == 1
    assert sink.ids()[-1] == sink.ids()[0]


def test_state_is_kept_per_destination(sink, tmp_path, home):
    src = write(tmp_path / "e.jsonl", [ev("u0"), ev("u1")])
    assert send(settings(sink, src, home)).sent == 2
    assert send(settings(sink, src, home)).sent == 0
    # Another receiver (here: the same one under another URL) has seen nothing of it.
    other = SendSettings(path=src, url=sink.url.replace("127.0.0.1", "localhost"), state_dir=home,
                         max_retries=3)
    assert send(other).sent == 2
    # A dead receiver is not "done" because the file went elsewhere before.
    dead = SendSettings(path=src, url=f"http://127.0.0.1:{free_port()}", state_dir=home, max_retries=0)
    with pytest.raises(DeliveryFailed, match="cannot reach"):
        send(dead)


def test_503_with_retry_after_is_retried(sink, tmp_path, home):
    src = write(tmp_path / "e.jsonl", [ev(f"u{i}") for i in range(10)])
    sink.fail_503 = 3
    report = send(settings(sink, src, home, batch=4, connections=1, max_retries=5))
    assert report.sent == 10 and report.failed == 0
    assert report.retried == 3
    assert sorted(e["userId"] for e in sink.events()) == sorted(f"u{i}" for i in range(10))


def test_retry_after_is_honoured(sink, tmp_path, home, monkeypatch):
    """The wait before the retry is the receiver's Retry-After (what was asked, not a stopwatch)."""
    from evtool import sender

    waits: list[float] = []
    real = sender._delay
    monkeypatch.setattr(sender, "_delay", lambda attempt, retry_after: waits.append(
        real(attempt, retry_after)) or waits[-1])
    src = write(tmp_path / "e.jsonl", [ev("a")])
    sink.fail_503, sink.retry_after = 1, "1"
    report = send(settings(sink, src, home))
    assert report.sent == 1 and report.retried == 1
    assert waits == [1.0]


def test_dropped_connections_are_retried(sink, tmp_path, home):
    src = write(tmp_path / "e.jsonl", [ev(f"u{i}") for i in range(6)])
    sink.drop = 2
    report = send(settings(sink, src, home, batch=2, connections=2, max_retries=6))
    assert report.sent == 6 and report.failed == 0 and report.retried >= 2
    assert len(set(sink.ids())) == 6


def test_persistent_503_stops_the_run(sink, tmp_path, home):
    src = write(tmp_path / "e.jsonl", [ev(f"u{i}") for i in range(6)])
    sink.fail_503 = 10_000
    report = send(settings(sink, src, home, batch=2, connections=1, max_retries=2))
    assert report.sent == 0 and report.failed >= 2 and report.retried == 2
    assert report.stopped and "503" in report.stopped
    assert sink.attempts == 3  # one batch tried 1 + 2 times, then the run stopped


def test_interrupted_run_resumes_without_loss_or_new_ids(sink, tmp_path, home):
    src = write(tmp_path / "e.jsonl", [ev(f"u{i}") for i in range(20)])
    sink.accept_budget = 3
    first = send(settings(sink, src, home, batch=2, connections=1, max_retries=1))
    assert first.sent == 6 and first.failed > 0 and first.stopped
    sink.accept_budget = None
    second = send(settings(sink, src, home, batch=2, connections=1))
    assert (second.already_sent, second.sent, second.failed) == (6, 14, 0)
    ids = sink.ids()
    assert len(ids) == len(set(ids)) == 20
    assert sorted(int(ID_RE.match(i).group(2)) for i in ids) == list(range(1, 21))


def test_permanent_4xx_fails_only_that_line_and_resume_keeps_it(sink, tmp_path, home):
    users = ["a", "b", "c", "bad", "d", "e", "f", "g"]
    src = write(tmp_path / "e.jsonl", [ev(u) for u in users])
    sink.reject_user = "bad"
    report = send(settings(sink, src, home, batch=4, connections=1))
    assert report.failed == 1 and report.sent == 7
    assert report.errors and "line 4" in report.errors[0] and "not welcome" in report.errors[0]
    assert report.stopped is None
    # The failed batch holds the resume point back: a re-run sends it (and what follows) again.
    sink.reject_user = None
    again = send(settings(sink, src, home, batch=4, connections=1))
    assert again.already_sent == 0 and again.failed == 0
    assert "bad" in [e["userId"] for e in sink.events()]
    assert send(settings(sink, src, home)).already_sent == 8


def test_wrong_token_stops_quickly(sink, tmp_path, home):
    src = write(tmp_path / "e.jsonl", [ev(f"u{i}") for i in range(50)])
    report = send(settings(sink, src, home, batch=5, connections=1, token="nope"))
    assert report.failed > 0 and report.sent == 0
    assert report.stopped and "401" in report.stopped
    assert sink.attempts <= 3


def test_unreachable_receiver_raises_delivery_failed(tmp_path, home):
    src = write(tmp_path / "e.jsonl", [ev("a"), ev("b")])
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(
        DeliveryFailed, match=r"cannot reach the receiver at .*: connection refused; is `evtool serve`"
    ):
        send(SendSettings(path=src, url=url, state_dir=home, max_retries=2))


def test_batch_one_sends_single_json_objects(sink, tmp_path, home):
    src = write(tmp_path / "e.jsonl", [ev("a", "0.5"), ev("b"), ev("c")])
    report = send(settings(sink, src, home, batch=1, connections=2))
    assert report.sent == 3
    assert [ct for ct, _ in sink.requests] == ["application/json"] * 3
    for _, body in sink.requests:
        assert b"\n" not in body and isinstance(orjson.loads(body), dict)
    assert sorted(e["userId"] for e in sink.events()) == ["a", "b", "c"]


def test_progress_callbacks(sink, tmp_path, home):
    src = write(tmp_path / "e.jsonl", [ev(f"u{i}") for i in range(20)])
    totals: list[int] = []
    progress: list[tuple[int, int]] = []
    send(
        settings(sink, src, home, batch=3),
        on_progress=lambda b, n: progress.append((b, n)),
        on_total=totals.append,
    )
    assert totals == [src.stat().st_size]
    assert progress[-1] == (src.stat().st_size, 20)


def test_missing_file_is_a_source_error(tmp_path, home):
    with pytest.raises(SourceError, match="nope.jsonl"):
        send(SendSettings(path=tmp_path / "nope.jsonl", state_dir=home))


def test_second_concurrent_send_of_the_same_file_is_refused(sink, tmp_path, home):
    src = write(tmp_path / "e.jsonl", [ev("a")])
    holder = StateStore(home, source_id(ev("a")), sink.url, str(src))
    holder.lock()
    try:
        with pytest.raises(SourceError, match="already being sent"):
            send(settings(sink, src, home))
    finally:
        holder.unlock()
    assert send(settings(sink, src, home)).sent == 1
