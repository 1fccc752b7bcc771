"""The whole pipeline through the real CLI: serve, send and process as subprocesses, real HTTP."""

from __future__ import annotations

import json
import os
import socket
from decimal import Decimal
from pathlib import Path

import pytest

from .conftest import Serve, event_line, evtool, exact, free_port, generate, http, totals


def test_pipeline_10k_events_exact_and_reruns_change_nothing(dsn, tmp_path):
    source = tmp_path / "events.jsonl"
    expected = generate(source, 12_000, "--users", "300", "--decimals", "0.3")
    with Serve(tmp_path) as serve:
        url = serve.url
        sent = evtool("send", str(source), "--url", url, "--json", cwd=tmp_path, check=True)
        assert json.loads(sent.stdout)["sent"] == 12_000
        done = evtool("process", "--json", cwd=tmp_path, check=True)
        assert json.loads(done.stdout)["applied"] == 12_000
        assert exact(totals(dsn)) == exact(expected["per_user"])

        # Re-running both: resume sends nothing; a full re-send is all duplicates.
        again = json.loads(evtool("send", str(source), "--url", url, "--json", cwd=tmp_path,
                                  check=True).stdout)
        assert again["sent"] == 0 and again["already_sent"] == 12_000
        evtool("send", str(source), "--url", url, "--from-start", cwd=tmp_path, check=True)
        rerun = json.loads(evtool("process", "--json", cwd=tmp_path, check=True).stdout)
        assert rerun["applied"] == 0 and rerun["duplicates"] == 12_000
        assert exact(totals(dsn)) == exact(expected["per_user"])

        # Appending lines (two identical ones) applies only the new ones, both of them.
        extra = '{"userId": "user1", "name": "add_revenue", "value": 0.01}\n'
        with open(source, "a") as f:
            f.write(extra * 2)
        more = json.loads(evtool("send", str(source), "--url", url, "--json", cwd=tmp_path,
                                 check=True).stdout)
        assert more["sent"] == 2
        assert json.loads(evtool("process", "--json", cwd=tmp_path, check=True).stdout)["applied"] == 2
    want = Decimal(expected["per_user"]["user1"]) + Decimal("0.02")
    assert totals(dsn)["user1"] == want
    assert evtool("revenue", "user1", cwd=tmp_path, check=True).stdout.strip() == str(want)


def test_same_event_id_sent_twice_counts_once(dsn, tmp_path):
    source = tmp_path / "events.jsonl"
    source.write_text('{"userId": "u", "name": "add_revenue", "value": 5, "eventId": "order-1"}\n'
                      '{"userId": "u", "name": "add_revenue", "value": 5, "eventId": "order-1"}\n')
    with Serve(tmp_path) as serve:
        url = serve.url
        evtool("send", str(source), "--url", url, cwd=tmp_path, check=True)
        evtool("send", str(source), "--url", url, "--from-start", "--batch", "1", cwd=tmp_path, check=True)
    evtool("process", cwd=tmp_path, check=True)
    assert totals(dsn) == {"u": 5}


def test_original_client_works_and_bad_tokens_write_nothing(dsn, tmp_path):
    """One JSON object per POST to http://localhost:<port>/liveEvent with `Authorization: secret`."""
    with Serve(tmp_path) as serve:
        url = serve.url
        live = url.replace("127.0.0.1", "localhost") + "/liveEvent"
        for value in (100, 50):
            status, body, _ = http(live, "POST", event_line("user1", value),
                                   {"Content-Type": "application/json", "Authorization": "secret"})
            assert status == 200 and body["message"] == "Event received"
        size = (tmp_path / "server-events.jsonl").stat().st_size
        event = event_line("user1", 1)
        for headers in ({}, {"Authorization": "wrong"}, {"Authorization": "Bearer wrong"}):
            status, body, _ = http(live, "POST", event, {"Content-Type": "application/json", **headers})
            assert status == 401 and body["error"]
        assert (tmp_path / "server-events.jsonl").stat().st_size == size
        evtool("process", cwd=tmp_path, check=True)
        assert http(f"{url}/userEvents/user1", headers={"Authorization": "secret"})[:2] == (
            200, {"userId": "user1", "revenue": 150})
    assert totals(dsn) == {"user1": 150}


def test_invalid_lines_in_the_source_are_reported_and_skipped(dsn, tmp_path):
    samples = Path(__file__).resolve().parent.parent / "samples"
    with Serve(tmp_path) as serve:
        url = serve.url
        result = evtool("send", str(samples / "invalid.jsonl"), "--url", url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "line 2: skipped: malformed JSON" in result.stdout
    assert "skipped 8 invalid" in result.stdout
    assert "line 6:" not in result.stdout  # "5" is read as 5 (input normalization)
    assert "line 11: skipped: ambiguous user" in result.stdout
    evtool("process", cwd=tmp_path, check=True)
    assert totals(dsn) == {"user1": 16}


def test_unreachable_receiver_exits_1(tmp_path):
    source = tmp_path / "events.jsonl"
    source.write_text('{"userId": "u", "name": "add_revenue", "value": 5}\n')
    result = evtool("send", str(source), "--url", f"http://127.0.0.1:{free_port()}",
                    "--max-retries", "1", cwd=tmp_path, env={"EVTOOL_HOME": str(tmp_path / "h")})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: ")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX")
def test_non_loopback_bind_without_token_is_refused(tmp_path):
    result = evtool("serve", "--host", "0.0.0.0", "--port", str(free_port()), cwd=tmp_path, timeout=20)
    assert result.returncode == 1
    assert "token" in result.stderr.lower()
    assert "Traceback" not in result.stderr


def test_serve_on_a_busy_port_says_so_in_one_line(tmp_path):
    """The port is held by a real listening socket: serve fails with one line and exit 1."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = evtool("serve", "--port", str(port), cwd=tmp_path, timeout=30)
        verbose = evtool("--verbose", "serve", "--port", str(port), cwd=tmp_path, timeout=30)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and "in use" in lines[0], lines
    assert str(port) in lines[0]
    # --verbose adds the traceback, and still ends with the same line and exit code
    assert verbose.returncode == 1
    assert "Traceback" in verbose.stderr and verbose.stderr.strip().splitlines()[-1] == lines[0]
