"""Prometheus text format (version 0.0.4): the receiver's counters (GET /metrics), the processor's
(`process --follow --metrics ADDR`), and what both add: evtool_build_info and the standard
process_* families (CPU, memory, open files, start time), read from /proc.

Plain ints and floats updated on the event loop (and one float list from the appender's
thread, under the GIL): counting costs a dict lookup, nothing is allocated per request.
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# fsync latency buckets, seconds (upper bounds; +Inf is implied)
FSYNC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# HTTP request and processor batch durations, seconds
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """Counts per bucket (not cumulative; the last is +Inf) and the sum of observations."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds

    def lines(self, name: str, labels: str = "") -> list[str]:
        """The _bucket/_sum/_count samples; `labels` like `route="/x",` (a trailing comma)."""
        out, cumulative = [], 0
        for bound, n in zip((*self.buckets, None), self.counts, strict=True):
            cumulative += n
            le = "+Inf" if bound is None else repr(bound)
            out.append(f'{name}_bucket{{{labels}le="{le}"}} {cumulative}')
        plain = f"{{{labels.rstrip(',')}}}" if labels else ""
        out.append(f"{name}_sum{plain} {self.sum!r}")
        out.append(f"{name}_count{plain} {cumulative}")
        return out


class _Out(list):
    def head(self, name: str, kind: str, text: str) -> None:
        self.append(f"# HELP {name} {text}")
        self.append(f"# TYPE {name} {kind}")


class Metrics:
    """What `evtool serve` counts."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}  # (method, route, status) -> count
        self.events_accepted = 0
        self.bytes_appended = 0
        self.fsync_counts = [0] * (len(FSYNC_BUCKETS) + 1)  # per bucket (not cumulative); last is +Inf
        self.fsync_sum = 0.0
        self.durations: dict[str, Histogram] = {}  # route -> request durations
        self.events_rejected: dict[str, int] = {}  # reason -> refused request bodies

    def request(self, method: str, route: str, status: int, seconds: float | None = None) -> None:
        key = (method, route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        if seconds is not None:
            h = self.durations.get(route)
            if h is None:
                h = self.durations[route] = Histogram(REQUEST_BUCKETS)
            h.observe(seconds)

    def rejected(self, reason: str) -> None:
        """A POST /liveEvent body refused for its content (`invalid`, `malformed`, `too_large`)."""
        self.events_rejected[reason] = self.events_rejected.get(reason, 0) + 1

    def appended(self, events: int, nbytes: int) -> None:
        self.events_accepted += events
        self.bytes_appended += nbytes

    def group_written(self, seconds: float) -> None:
        """One group commit's write+fsync took `seconds` (called from the appender's thread)."""
        self.fsync_counts[bisect_left(FSYNC_BUCKETS, seconds)] += 1
        self.fsync_sum += seconds

    def render(self, journal_size: int, healthy: bool) -> str:
        out: list[str] = []

        def head(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        head("evtool_http_requests_total", "counter", "HTTP requests answered, by method, route and status.")
        for (method, route, status), n in sorted(self.requests.items()):
            out.append(f'evtool_http_requests_total{{method="{method}",route="{_label(route)}",'
                       f'status="{status}"}} {n}')
        head("evtool_events_accepted_total", "counter", "Events accepted and appended to the journal.")
        out.append(f"evtool_events_accepted_total {self.events_accepted}")
        head("evtool_journal_appended_bytes_total", "counter", "Bytes appended to the journal.")
        out.append(f"evtool_journal_appended_bytes_total {self.bytes_appended}")
        head("evtool_journal_fsync_seconds", "histogram",
             "Time to write and fsync one group of appends (group commit).")
        cumulative = 0
        for bound, n in zip((*FSYNC_BUCKETS, None), self.fsync_counts, strict=True):
            cumulative += n
            le = "+Inf" if bound is None else repr(bound)
            out.append(f'evtool_journal_fsync_seconds_bucket{{le="{le}"}} {cumulative}')
        out.append(f"evtool_journal_fsync_seconds_sum {self.fsync_sum!r}")
        out.append(f"evtool_journal_fsync_seconds_count {cumulative}")
        head("evtool_journal_size_bytes", "gauge", "Current size of the journal file.")
        out.append(f"evtool_journal_size_bytes {journal_size}")
        head("evtool_journal_healthy", "gauge", "1 while the journal can be written, 0 after a failed write.")
        out.append(f"evtool_journal_healthy {int(healthy)}")
        head("evtool_http_request_duration_seconds", "histogram",
             "Time from a request's arrival to its answer, by route.")
        for route, h in sorted(self.durations.items()):
            out.extend(h.lines("evtool_http_request_duration_seconds", f'route="{_label(route)}",'))
        head("evtool_events_rejected_total", "counter",
             "POST /liveEvent bodies refused for their content (nothing of them stored), by reason.")
        for reason in ("invalid", "malformed", "too_large"):
            n = self.events_rejected.get(reason, 0)
            out.append(f'evtool_events_rejected_total{{reason="{reason}"}} {n}')
        common = _Out()
        common_families(common)
        out.extend(common)
        return "\n".join(out) + "\n"


class ProcessorMetrics:
    """What `process --follow` counts, for `--metrics ADDR`; updated by the follow loop's thread."""

    def __init__(self) -> None:
        self.applied = 0
        self.duplicates = 0
        self.rejected = 0
        self.batches = Histogram(BATCH_BUCKETS)
        self.last_commit: float | None = None  # Unix time of the last committed batch
        self.outages = 0
        self.database_up = 1
        # journal path -> (lag bytes, lag lines), set by the follow loop after each round
        self.lag: dict[str, tuple[int, int]] = {}

    def round(self, applied: int, duplicates: int, rejected: int, batches: int, seconds: float) -> None:
        """One round of a journal: `batches` batches committed in `seconds`."""
        self.applied += applied
        self.duplicates += duplicates
        self.rejected += rejected
        for _ in range(batches):  # a round's batches share its time evenly
            self.batches.observe(seconds / batches)
        if batches:
            self.last_commit = time.time()

    def render(self) -> str:
        out = _Out()
        for name, value, text in (
            ("evtool_process_events_applied_total", self.applied, "Events applied to the totals."),
            ("evtool_process_duplicates_total", self.duplicates, "Events skipped: already applied."),
            ("evtool_process_lines_rejected_total", self.rejected,
             "Journal lines rejected (see `evtool rejects`)."),
            ("evtool_process_database_outages_total", self.outages,
             "Times the database was lost for longer than --retry-for."),
        ):
            out.head(name, "counter", text)
            out.append(f"{name} {value}")
        out.head("evtool_process_database_up", "gauge", "1 while the database answers, 0 during an outage.")
        out.append(f"evtool_process_database_up {self.database_up}")
        out.head("evtool_process_lag_bytes", "gauge", "Bytes of each journal not applied yet.")
        for path, (nbytes, _) in sorted(self.lag.items()):
            out.append(f'evtool_process_lag_bytes{{journal="{_label(path)}"}} {nbytes}')
        out.head("evtool_process_lag_lines", "gauge", "Complete lines of each journal not applied yet.")
        for path, (_, lines) in sorted(self.lag.items()):
            out.append(f'evtool_process_lag_lines{{journal="{_label(path)}"}} {lines}')
        out.head("evtool_process_batch_duration_seconds", "histogram",
                 "Time to apply one batch (one transaction).")
        out.extend(self.batches.lines("evtool_process_batch_duration_seconds"))
        out.head("evtool_process_last_commit_timestamp_seconds", "gauge",
                 "Unix time of the last committed batch (0: none yet).")
        out.append(f"evtool_process_last_commit_timestamp_seconds {self.last_commit or 0!r}")
        common_families(out)
        return "\n".join(out) + "\n"


def common_families(out: _Out) -> None:
    """evtool_build_info and the process_* families every Prometheus client library exports."""
    import platform

    from . import __version__

    out.head("evtool_build_info", "gauge", "Always 1; the labels say which evtool and Python run.")
    out.append(f'evtool_build_info{{version="{_label(__version__)}",python="{platform.python_version()}"}} 1')
    cpu = os.times()
    out.head("process_cpu_seconds_total", "counter", "User and system CPU time spent, in seconds.")
    out.append(f"process_cpu_seconds_total {cpu.user + cpu.system!r}")
    try:
        pagesize = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/statm") as f:
            vsize, rss = (int(x) * pagesize for x in f.read().split()[:2])
        out.head("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.")
        out.append(f"process_resident_memory_bytes {rss}")
        out.head("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.")
        out.append(f"process_virtual_memory_bytes {vsize}")
        out.head("process_open_fds", "gauge", "Number of open file descriptors.")
        out.append(f"process_open_fds {len(os.listdir('/proc/self/fd'))}")
    except OSError:
        pass  # no /proc (not Linux): these families are left out
    out.head("process_start_time_seconds", "gauge", "Start time of the process since the Unix epoch (s).")
    out.append(f"process_start_time_seconds {_STARTED!r}")


def _process_start() -> float:
    """The process's start time from /proc (boot time + start ticks), else when this module loaded."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return time.time()


_STARTED = _process_start()


class MetricsServer:
    """GET /metrics (Prometheus text) on its own thread, for commands without an HTTP server.

    `token`, when given, must come as `Authorization: Bearer <token>` (or bare).
    """

    def __init__(self, host: str, port: int, render: Callable[[], str], token: str | None = None) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?")[0] != "/metrics":
                    return self._send(404, b'{"error": "not found: GET /metrics serves the metrics"}',
                                      "application/json")
                if token is not None:
                    given = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
                    import hmac

                    if not hmac.compare_digest(given.encode(), token.encode()):
                        return self._send(401, b'{"error": "missing or wrong metrics token"}',
                                          "application/json")
                self._send(200, outer.render().encode(), CONTENT_TYPE)

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass  # scrapes are not worth a log line each

        self.render = render
        self.httpd = ThreadingHTTPServer((host, port), Handler)  # OSError (busy port): the CLI says it
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/metrics"

    def start(self) -> MetricsServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

