"""The receiver's counters, rendered in the Prometheus text format (version 0.0.4) for GET /metrics.

Plain ints and floats updated on the event loop (and one float list from the appender's
thread, under the GIL): counting costs a dict lookup, nothing is allocated per request.
"""

from __future__ import annotations

from bisect import bisect_left

# fsync latency buckets, seconds (upper bounds; +Inf is implied)
FSYNC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """What `evtool serve` counts."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}  # (method, route, status) -> count
        self.events_accepted = 0
        self.bytes_appended = 0
        self.fsync_counts = [0] * (len(FSYNC_BUCKETS) + 1)  # per bucket (not cumulative); last is +Inf
        self.fsync_sum = 0.0

    def request(self, method: str, route: str, status: int) -> None:
        key = (method, route, status)
        self.requests[key] = self.requests.get(key, 0) + 1

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
        return "\n".join(out) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

