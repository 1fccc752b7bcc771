"""Running as services: JSON logs, Prometheus metrics from `serve` and `process --follow`, the
probes, the scrape credential (issue 10 item 4)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from evtool.config import TOKEN as AUTH_TOKEN

from .conftest import Serve, event_line, evtool_cmd, free_port, http

METRICS_TOKEN = "scrape-only"


def scrape(url: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""  # not listening (yet)


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def families(text: str) -> set[str]:
    return set(re.findall(r"^# TYPE (\S+) ", text, re.M))


def until(check, what: str, proc=None, bound: int = 2000):
    """Poll check() (every 10 ms, at most `bound` times) until it returns something true."""
    for _ in range(bound):
        got = check()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.01)
    raise AssertionError(f"never: {what}")


def json_lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        out.append(json.loads(line))  # every line is a JSON object: nothing else on stderr
    return out


def test_follow_logs_json_and_serves_metrics(dsn, tmp_path):
    journal = tmp_path / "server-events.jsonl"
    journal.write_bytes(event_line("u1", "1", "e1") + b"\n" + b"not json\n")
    port = free_port()
    log = tmp_path / "follow.log"
    with open(log, "wb") as err, open(tmp_path / "follow.out", "wb") as out:
        proc = subprocess.Popen(evtool_cmd("--log-format", "json", "process", "--follow", "--progress-every",
                                           "0.2", "--metrics", f"127.0.0.1:{port}",
                                           "--metrics-token", METRICS_TOKEN),
                                cwd=tmp_path, stdout=out, stderr=err)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        def applied(n: int):
            status, text = scrape(url, METRICS_TOKEN) if proc.poll() is None else (0, "")
            return status == 200 and samples(text).get("evtool_process_events_applied_total") == n and text

        until(lambda: applied(1), "1 applied", proc)
        with open(journal, "ab") as f:
            f.write(event_line("u2", "2", "e2") + b"\n" + event_line("u2", "2", "e2") + b"\n" + b'{"x": 1}\n')
        # the lag gauges are set just after the counters (a scrape may fall between): wait for both
        lag = 'evtool_process_lag_bytes{journal="server-events.jsonl"}'
        text = until(lambda: (t := applied(2)) and samples(t).get(lag) == 0 and t, "2 applied, no lag", proc)
        got = samples(text)
        assert got["evtool_process_duplicates_total"] == 1
        assert got["evtool_process_lines_rejected_total"] == 2
        assert got["evtool_process_batch_duration_seconds_count"] >= 2
        assert got["evtool_process_last_commit_timestamp_seconds"] > 0
        assert got['evtool_process_lag_bytes{journal="server-events.jsonl"}'] == 0
        assert got['evtool_process_lag_lines{journal="server-events.jsonl"}'] == 0
        assert {"process_cpu_seconds_total", "process_resident_memory_bytes",
                "evtool_build_info"} <= families(text)
        assert scrape(url)[0] == 401 and scrape(url, "wrong")[0] == 401
        until(lambda: any(r.get("event") == "progress" and r["applied"] == 2 for r in json_lines(log)),
              "a progress line counting 2 applied", proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    records = json_lines(log)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    rejects = [r for r in records if r.get("event") == "reject"]
    assert [(r["line"], r["level"]) for r in rejects] == [(2, "warning"), (5, "warning")]
    assert rejects[0]["path"] == "server-events.jsonl" and "JSON" in rejects[0]["reason"]
    progress = [r for r in records if r.get("event") == "progress"][-1]
    assert {"applied", "rate", "lag_lines", "lag_bytes"} <= set(progress)
    assert records[0]["message"].startswith("following server-events.jsonl")


def test_serve_metrics_probes_scrape_token_and_access_log(dsn, tmp_path):
    with Serve(tmp_path, "--metrics-token", METRICS_TOKEN, "--access-log",
               env={"EVTOOL_LOG_FORMAT": "json"}) as serve:
        base = serve.url
        auth = {"Authorization": f"Bearer {AUTH_TOKEN}"}
        assert http(f"{base}/liveEvent", "POST", event_line("u1", "1"), auth)[0] == 200
        assert http(f"{base}/liveEvent", "POST", b'{"userId": ""}', auth)[0] == 422
        # the scrape credential reads metrics and nothing else
        scraper = {"Authorization": f"Bearer {METRICS_TOKEN}"}
        assert http(f"{base}/liveEvent", "POST", event_line("u2", "1"), scraper)[0] == 401
        status, text = scrape(f"{base}/metrics", METRICS_TOKEN)
        assert status == 200
        got = samples(text)
        assert got["evtool_events_accepted_total"] == 1
        assert got['evtool_events_rejected_total{reason="invalid"}'] == 1
        assert got['evtool_http_request_duration_seconds_count{route="/liveEvent"}'] == 3
        assert {"evtool_build_info", "process_cpu_seconds_total", "process_open_fds",
                "process_start_time_seconds", "process_resident_memory_bytes"} <= families(text)
        for probe in ("/livez", "/readyz", "/healthz"):
            assert http(f"{base}{probe}")[0] == 200  # no token
    records = [json.loads(line) for line in serve.log.read_text().splitlines()]
    access = [r for r in records if r["logger"] == "aiohttp.access"]
    assert any('"POST /liveEvent HTTP/1.1" 422' in r["message"] for r in access), access
    assert not any(AUTH_TOKEN in r["message"] or METRICS_TOKEN in r["message"] for r in records)
    assert any(r["message"].startswith("listening on ") for r in records)


def test_readyz_fails_when_the_journal_cannot_be_written_livez_does_not(dsn, tmp_path):
    """A full disk: not ready (503), still alive (200), so a liveness probe does not restart it."""
    import resource

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    with Serve(tmp_path, preexec_fn=small_files) as serve:
        auth = {"Authorization": f"Bearer {AUTH_TOKEN}"}
        big = b"\n".join(event_line(f"user-{i:04d}", "1") for i in range(200)) + b"\n"
        status, _, _ = http(f"{serve.url}/liveEvent", "POST", big,
                            {**auth, "Content-Type": "application/x-ndjson"})
        assert status == 503
        assert http(f"{serve.url}/readyz")[0] == 503
        assert http(f"{serve.url}/livez")[0] == 200
