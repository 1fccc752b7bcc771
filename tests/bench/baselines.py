"""The baselines, each a minimal subprocess: `python -m tests.bench.baselines naive|sink|client ...`.

- naive: the seed's algorithm in Python: read the file, `orjson.loads` each line, sum per user
  in a dict (int, or Decimal for non-int values), upsert the sums in one statement (unnest
  arrays, one round trip). No validation, no ids, no transaction discipline.
- sink: an aiohttp app whose POST /liveEvent appends the raw body to a file (a newline added if
  missing) with one `os.write` and one `fdatasync` per request, inside the handler: no parsing,
  no group commit (evtool serve shares one fdatasync among concurrent requests). GET
  /userEvents/<id> answers a constant JSON object (the HTTP floor for the lookup figure).
- client: aiohttp, POSTs the file's lines in N-line bodies (NDJSON) over C keep-alive connections.

Imports are lazy so each baseline starts as fast as it can.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def naive(path: Path, dsn: str) -> None:
    from decimal import Decimal

    import orjson
    import psycopg

    totals: dict[str, int | Decimal] = {}
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            e = orjson.loads(line)
            v = e["value"]
            if type(v) is not int:
                v = Decimal(str(v))
            if e["name"] == "subtract_revenue":
                v = -v
            u = e["userId"]
            totals[u] = totals.get(u, 0) + v
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS users_revenue "
                     "(user_id text PRIMARY KEY, revenue numeric NOT NULL)")
        conn.execute(
            "INSERT INTO users_revenue (user_id, revenue) SELECT * FROM unnest(%s::text[], %s::numeric[]) "
            "ON CONFLICT (user_id) DO UPDATE SET revenue = users_revenue.revenue + excluded.revenue",
            (list(totals), [Decimal(v) for v in totals.values()]))
    print(len(totals))


def sink(port: int, out: Path) -> None:
    import os

    from aiohttp import web

    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    ok = web.json_response({"message": "Event received"})

    async def live_event(request: web.Request) -> web.Response:
        body = await request.read()
        os.write(fd, body if body.endswith(b"\n") else body + b"\n")
        os.fdatasync(fd)
        return web.Response(body=ok.body, content_type="application/json")

    async def user_events(request: web.Request) -> web.Response:
        return web.json_response({"userId": request.match_info["user_id"], "revenue": 0})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/liveEvent", live_event)
    app.router.add_get("/userEvents/{user_id}", user_events)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def client(path: Path, url: str, lines_per_body: int, connections: int) -> None:
    import asyncio

    import aiohttp

    async def main() -> int:
        with open(path, "rb") as f:
            lines = [line for line in f if line.strip()]
        bodies = iter(b"".join(lines[i:i + lines_per_body]) for i in range(0, len(lines), lines_per_body))
        ctype = "application/json" if lines_per_body == 1 else "application/x-ndjson"
        headers = {"Authorization": "secret", "Content-Type": ctype}
        connector = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def worker() -> None:
                for body in bodies:
                    async with session.post(f"{url}/liveEvent", data=body, headers=headers) as resp:
                        await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"HTTP {resp.status}")
            await asyncio.gather(*(worker() for _ in range(connections)))
        return len(lines)

    print(asyncio.run(main()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.baselines", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("naive")
    p.add_argument("file", type=Path)
    p.add_argument("--dsn", required=True)
    p = sub.add_parser("sink")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("client")
    p.add_argument("file", type=Path)
    p.add_argument("--url", required=True)
    p.add_argument("--lines", type=int, default=1000)
    p.add_argument("--connections", type=int, default=4)
    a = ap.parse_args(argv)
    if a.cmd == "naive":
        naive(a.file, a.dsn)
    elif a.cmd == "sink":
        sink(a.port, a.out)
    else:
        client(a.file, a.url, a.lines, a.connections)


if __name__ == "__main__":
    sys.exit(main())
