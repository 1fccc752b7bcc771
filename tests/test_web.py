"""The live web page's JSON routes (no browser): exact money, what the CLI's --json prints, tokens."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from decimal import Decimal

import orjson

from evtool.processor import process
from evtool.receiver import StoreRevenue
from evtool.reports import StatusProbe
from evtool.store import Store

from .conftest import event_line as ev
from .conftest import evtool
from .test_receiver import serving

READ = {"Authorization": "Bearer look-only", "Content-Type": "application/json"}
WRITE = {"Authorization": "Bearer secret", "Content-Type": "application/json"}
# 0.1 + 0.2 prints 0.30000000000000004 as a float; 19 significant digits do not survive a double.
def workload(now: str) -> list[bytes]:
    """b's event time is `now`, taken when the test runs: in the rolling window however long
    the tests before it took."""
    return [ev("a", "0.1"), ev("a", "0.2"), ev("b", "1234567890.123456789", time=now),
            ev("c", "5.5", name="subtract_revenue"), b'{"userId": "d", "name": "add_revenue"}']


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def test_api_answers_what_the_cli_prints_with_exact_money(dsn, tmp_path):
    journal = tmp_path / "server-events.jsonl"
    now = utc_now()
    journal.write_bytes(b"\n".join(workload(now)) + b"\n")
    process(dsn, [journal])
    cli_report = evtool("report", "--json", check=True).stdout.strip().encode()

    async def main():
        async with serving(tmp_path, revenue_lookup=StoreRevenue(lambda: Store.connect(dsn)),
                           read_token="look-only",
                           status_probe=StatusProbe(dsn, [journal], url="")) as (client, _):
            async with client.get("/api/report", headers=READ) as resp:
                assert resp.status == 200
                body = await resp.read()
            assert body == cli_report
            assert b'"revenue":1234567884.923456789' in body  # the total, exactly
            async with client.get("/api/users/a", headers=READ) as resp:
                assert await resp.read() == b'{"userId":"a","revenue":0.3}'
            async with client.get("/api/users/nobody", headers=READ) as resp:
                assert resp.status == 404
            async with client.get("/api/periods?by=day", headers=READ) as resp:
                periods = json.loads(await resp.read(), parse_float=Decimal)
            assert periods["time"] == "event"  # as `report --by day`: events without a time first
            assert [p["period"] for p in periods["periods"]] == ["no time", now[:10]]
            assert sum(p["revenue"] for p in periods["periods"]) == Decimal("1234567884.923456789")
            async with client.get("/api/window?minutes=15", headers=READ) as resp:
                window = json.loads(await resp.read(), parse_float=Decimal)
            assert (window["events"], window["revenue"], window["users"]) == (
                1, Decimal("1234567890.123456789"), 1)
            async with client.get("/api/window?minutes=0", headers=READ) as resp:
                assert resp.status == 400
            async with client.get("/api/rejects?limit=5", headers=READ) as resp:
                rejects = orjson.loads(await resp.read())
            assert len(rejects) == 1 and "value" in rejects[0]["reason"]
            async with client.get("/api/status", headers=READ) as resp:
                status = orjson.loads(await resp.read())
            assert status["totals"]["applied"] == 4 and status["receiver"]["healthy"] is True
            async with client.get("/", headers={}) as resp:  # the page needs no token, holds no data
                assert resp.status == 200 and b"/web/app.js" in await resp.read()
            for path in ("/api/report", "/api/users/a", "/api/periods", "/api/status", "/api/rejects",
                         "/api/window"):
                async with client.get(path) as resp:
                    assert resp.status == 401, path
            # the read token cannot add events; the token can
            async with client.post("/liveEvent", data=ev("e", "1"), headers=READ) as resp:
                assert resp.status == 403
            assert journal.read_bytes().count(b"\n") == len(workload(utc_now()))
            async with client.post("/liveEvent", data=ev("e", "1"), headers=WRITE) as resp:
                assert resp.status == 200

    asyncio.run(main())
