"""Open-loop GET load: `python -m tests.bench.loadgen URL --rate R --seconds S --users K`.

Request i is due at t0 + i/R and is fired then whatever the earlier ones are doing; its latency
is measured from that due time (so a stalled server or client shows, no coordinated omission).
Prints one JSON object: requests, errors, 404s (a lookup all the same), achieved rate, p50/p99/max in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json


async def load(url: str, rate: float, seconds: float, users: int, token: str) -> dict:
    import aiohttp

    headers = {"Authorization": token}
    latencies: list[float] = []
    errors = not_found = 0
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
        async def one(i: int, due: float) -> None:
            nonlocal errors, not_found
            try:
                async with session.get(f"{url}/userEvents/user{i % users + 1}", headers=headers) as resp:
                    await resp.read()
                    if resp.status == 404:
                        not_found += 1
                    elif resp.status != 200:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append(loop.time() - due)

        for i in range(min(200, int(rate))):  # warm-up: connections, server caches; not counted
            await one(i, loop.time())
        latencies.clear()
        errors = not_found = 0
        n = int(rate * seconds)
        t0 = loop.time() + 0.05
        tasks = []
        for i in range(n):
            due = t0 + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
        elapsed = loop.time() - t0
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 3)

    return {"requests": n, "errors": errors, "not_found": not_found, "rate": round(n / elapsed, 1),
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": round(latencies[-1] * 1000, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--token", default="secret")
    a = ap.parse_args()
    print(json.dumps(asyncio.run(load(a.url, a.rate, a.seconds, a.users, a.token))))


if __name__ == "__main__":
    main()
