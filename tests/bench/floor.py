"""CPU floors per journal line on this machine (issue 11): what the parse alone costs.

    python -m tests.bench.floor JOURNAL [LINES]

Prints CPU microseconds per line (user+sys of this process, one core) for:
- orjson.loads of every line, and nothing else (no engine in Python parses JSON faster);
- a minimal exact sum: loads, the three fields, int/Decimal per user (the naive baseline's loop);
- evtool's parser on the same bytes (parser.parse_range: validation, identity, per-minute sums,
  the COPY rows), i.e. what `process` pays per line before the database.
Divide a target's time budget (lines / target rate, times the cores) by these to see whether
any Python loop can reach it.
"""

from __future__ import annotations

import itertools
import os
import resource
import sys
from decimal import Decimal

import orjson

from evtool import parser


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def per_line(fn, lines: int) -> float:
    best = float("inf")
    for _ in range(3):
        t = cpu()
        fn()
        best = min(best, cpu() - t)
    return best / lines * 1e6


def main() -> None:
    path = sys.argv[1]
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else 200_000
    with open(path, "rb") as f:
        data = b"".join(line for line in itertools.islice(f, limit))
    lines = data.splitlines()
    n = len(lines)
    loads = orjson.loads

    def only_loads() -> None:
        for raw in lines:
            loads(raw)

    def naive() -> None:
        sums: dict[str, object] = {}
        for raw in lines:
            o = loads(raw)
            v = o["value"]
            v = v if type(v) is int else Decimal(str(v))
            if o["name"] != "add_revenue":
                v = -v
            u = o["userId"]
            sums[u] = sums.get(u, 0) + v

    st = os.stat(path)
    end = len(data)

    def evtool_parse() -> None:
        parser.parse_range(path, (st.st_dev, st.st_ino), 0, end, 8 << 20, False, None, 10**9)

    print(f"{n} lines of {path}")
    for name, fn in (("orjson.loads only", only_loads), ("minimal exact sum (naive loop)", naive),
                     ("evtool parser.parse_range", evtool_parse)):
        print(f"  {name:34s} {per_line(fn, n):6.2f} CPU-us/line")


if __name__ == "__main__":
    main()
