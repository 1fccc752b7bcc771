"""GET /metrics on the receiver: Prometheus text, the same token as data routes."""

from __future__ import annotations

import asyncio
import re

from evtool.metrics import FSYNC_BUCKETS, Metrics

from .test_receiver import AUTH, JSON, NDJSON, ORIGINAL, ev, post, serving


def samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value for every sample line of a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-z_]+(?:\{.*\})?) (\S+)", line)
        assert m, line
        out[m[1]] = float(m[2])
    return out


def test_metrics_count_requests_events_bytes_and_fsyncs(tmp_path):
    async def main():
        async with serving(tmp_path) as (client, journal):
            async with client.get("/metrics") as resp:
                assert resp.status == 401  # same token as the data routes
            assert (await post(client, ORIGINAL, JSON))[0] == 200
            assert (await post(client, ev("u1") + b"\n" + ev("u2") + b"\n", NDJSON))[0] == 200
            assert (await post(client, b'{"userId": ""}', JSON))[0] == 422
            async with client.get("/userEvents/someone", headers=AUTH) as resp:
                assert resp.status == 503  # no database configured
            async with client.get("/metrics", headers=AUTH) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
                text = await resp.text()
            size = journal.stat().st_size
        got = samples(text)
        assert got['evtool_http_requests_total{method="POST",route="/liveEvent",status="200"}'] == 2
        assert got['evtool_http_requests_total{method="POST",route="/liveEvent",status="422"}'] == 1
        assert got['evtool_http_requests_total{method="GET",route="/metrics",status="401"}'] == 1
        assert got['evtool_http_requests_total{method="GET",route="/userEvents/{user_id}",status="503"}'] == 1
        assert got["evtool_events_accepted_total"] == 3
        assert got["evtool_journal_appended_bytes_total"] == size
        assert got["evtool_journal_size_bytes"] == size
        assert got["evtool_journal_healthy"] == 1
        assert got['evtool_journal_fsync_seconds_bucket{le="+Inf"}'] == 2
        assert got["evtool_journal_fsync_seconds_count"] == 2
        assert got["evtool_journal_fsync_seconds_sum"] > 0
        assert "# TYPE evtool_journal_fsync_seconds histogram" in text

    asyncio.run(main())


def test_unknown_routes_share_one_label(tmp_path):
    async def main():
        async with serving(tmp_path) as (client, _):
            for path in ("/a", "/b", "/c"):
                async with client.get(path, headers=AUTH) as resp:
                    assert resp.status == 404
            async with client.get("/metrics", headers={"Authorization": "Bearer secret"}) as resp:
                return samples(await resp.text())

    got = asyncio.run(main())
    assert got['evtool_http_requests_total{method="GET",route="other",status="404"}'] == 3


def test_histogram_buckets_are_cumulative():
    m = Metrics()
    for seconds in (0.0001, 0.003, 0.003, 0.2, 10.0):
        m.group_written(seconds)
    got = samples(m.render(0, True))
    assert got['evtool_journal_fsync_seconds_bucket{le="0.0005"}'] == 1
    assert got['evtool_journal_fsync_seconds_bucket{le="0.005"}'] == 3
    assert got['evtool_journal_fsync_seconds_bucket{le="0.25"}'] == 4
    assert got[f'evtool_journal_fsync_seconds_bucket{{le="{FSYNC_BUCKETS[-1]!r}"}}'] == 4
    assert got['evtool_journal_fsync_seconds_bucket{le="+Inf"}'] == 5
    assert got["evtool_journal_fsync_seconds_count"] == 5
