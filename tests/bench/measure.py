"""The measurements. Each runs baseline and evtool alternately, `repeat` times, in this process's run.

evtool is always measured through its real CLI in a subprocess, and every baseline runs as a
subprocess too, so interpreter start-up counts on both sides; wall times are taken here, around
the subprocess.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from ..conftest import free_port
from .figures import Figure
from .pg import PgServer, check_totals
from .procs import PY, ROOT, Run, child_env, evtool_cmd, run, serving
from .workloads import Cache, Sizes, Workload

BARE_CLI = ("import os, psycopg; c = psycopg.connect(os.environ['EVTOOL_DSN']); "
            "print(c.execute('select revenue from users_revenue where user_id = %s', "
            "('user1',)).fetchone()[0])")


def fmt_rate(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def short(n: int) -> str:
    """1000000 -> 1M, 20000 -> 20k."""
    for div, suffix in ((1_000_000, "M"), (1000, "k")):
        if n >= div and n % (div // 10) == 0:
            return f"{n / div:g}{suffix}"
    return f"{n:,}"


@contextmanager
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="evtool-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Bench:
    """Measurements against one PostgreSQL server and one workload cache."""

    def __init__(self, pg: PgServer, cache: Cache, sizes: Sizes, repeat: int,
                 log: Callable[[str], None]) -> None:
        self.pg, self.cache, self.sizes, self.repeat, self.log = pg, cache, sizes, repeat, log

    # -- helpers -----------------------------------------------------------------------------

    def evtool_process(self, files: list[Path], dsn: str, tree_rss: bool = False) -> tuple[Run, dict]:
        """`evtool process FILES --json` against `dsn` with a fresh EVTOOL_HOME."""
        with scratch() as work:
            env = child_env(EVTOOL_DSN=dsn, EVTOOL_HOME=str(work / "home"))
            r = run(evtool_cmd("process", *map(str, files), "--json"), env=env, cwd=work, tree_rss=tree_rss)
        r.check("evtool process")
        return r, json.loads(r.stdout)

    def settle(self) -> None:
        self.pg.settle()

    def process_once(self, w: Workload, dsn: str, tree_rss: bool = False) -> Run:
        r, report = self.evtool_process([w.path], dsn, tree_rss)
        if report["applied"] != w.events or report["rejected"]:
            raise RuntimeError(f"evtool process applied {report['applied']} of {w.events}, "
                               f"rejected {report['rejected']}")
        return r

    def naive_once(self, w: Workload, dsn: str) -> Run:
        return run([PY, "-m", "tests.bench.baselines", "naive", str(w.path), "--dsn", dsn],
                   env=child_env(), cwd=ROOT).check("naive baseline")

    @contextmanager
    def populated(self) -> Iterator[str]:
        """A database holding the small workload (1k users), for the read figures."""
        w = self.cache.journal(self.sizes.small, 1000, 3)
        with self.pg.database() as dsn:
            self.process_once(w, dsn)
            yield dsn

    # -- process -----------------------------------------------------------------------------

    def process_cold(self, users: int, seed: int) -> Figure:
        w = self.cache.journal(self.sizes.events, users, seed)
        fig = Figure(f"process_cold_{users}u", f"process cold, {short(w.events)} ev / {short(users)} users",
                     "events/s", "naive processor", "min_ratio", 0.6)
        rss, reported = [], []
        for _ in range(self.repeat):
            with self.pg.database() as dsn:
                r = self.naive_once(w, dsn)
                check_totals(dsn, w.expected)
            fig.baseline.append(w.events / r.wall)
            with self.pg.database() as dsn:
                r, report = self.evtool_process([w.path], dsn)
                if report["applied"] != w.events:
                    raise RuntimeError(f"evtool process applied {report['applied']} of {w.events}")
                check_totals(dsn, w.expected)
            fig.evtool.append(w.events / r.wall)
            rss.append(r.maxrss_kib / 1024)
            reported.append(report["events_per_second"])
            self.log(f"  naive {fmt_rate(fig.baseline[-1])}/s, evtool {fmt_rate(fig.evtool[-1])}/s")
        fig.extra = {"evtool_reported_events_per_second": reported, "evtool_maxrss_mib": rss,
                     "file": str(w.path)}
        fig.notes.append("wall time around the subprocess, start-up included; empty database each time; "
                         "input is a real serve journal (every line has an eventId)")
        return fig

    def tenth_million(self) -> Figure:
        chain = self.cache.chain(self.sizes)
        n = self.sizes.events
        prior = short((len(chain) - 1) * n)
        fig = Figure("process_10th", f"process {short(n)} #{len(chain)} ({prior} applied)",
                     "events/s", f"process {short(n)} #1 (empty db)", "min_ratio", 0.8)
        template = self.pg.create()
        try:
            t0 = time.perf_counter()
            self.evtool_process([w.path for w in chain[:-1]], self.pg.url(template))
            with psycopg.connect(self.pg.url(template), autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE")
            self.log(f"  prefilled {(len(chain) - 1) * n:,} events in {time.perf_counter() - t0:.0f} s")
            fig.notes.append("the prefilled database (VACUUM ANALYZE after) is copied for each run "
                             "(CREATE DATABASE ... TEMPLATE)")
            for _ in range(self.repeat):
                with self.pg.database() as dsn:
                    fig.baseline.append(n / self.process_once(chain[0], dsn).wall)
                with self.pg.database(template) as dsn:
                    fig.evtool.append(n / self.process_once(chain[-1], dsn).wall)
                self.log(f"  1st {fmt_rate(fig.baseline[-1])}/s, last {fmt_rate(fig.evtool[-1])}/s")
        finally:
            self.pg.drop(template)
        return fig

    def peak_rss(self) -> Figure:
        big = self.cache.journal(self.sizes.events, 1000, 1)
        small = self.cache.journal(self.sizes.small, 1000, 3)
        fig = Figure("process_rss", f"process peak memory (PSS), {short(big.events)} ev",
                     "MiB", f"same, {short(small.events)} ev", "max_ratio", 1.2)
        own: dict[str, list[float]] = {"small": [], "big": []}
        rss: dict[str, list[float]] = {"small": [], "big": []}
        for _ in range(self.repeat):
            for side, w, samples in (("small", small, fig.baseline), ("big", big, fig.evtool)):
                with self.pg.database() as dsn:
                    r = self.process_once(w, dsn, tree_rss=True)
                samples.append(r.tree_pss_kib / 1024)
                rss[side].append(r.tree_rss_kib / 1024)
                own[side].append(r.maxrss_kib / 1024)
            self.log(f"  PSS {fig.baseline[-1]:.0f} vs {fig.evtool[-1]:.0f} MiB; "
                     f"RSS sum {rss['small'][-1]:.0f} vs {rss['big'][-1]:.0f}; "
                     f"main process {own['small'][-1]:.0f} vs {own['big'][-1]:.0f}")
        fig.extra = {"main_process_maxrss_mib": own, "tree_rss_sum_mib": rss}
        fig.notes.append("peak of the summed PSS of evtool and its worker processes (psutil, polled "
                         "every 20 ms), cold runs; the RSS sum and the main process's ru_maxrss: JSON")
        return fig

    # -- send -> serve -----------------------------------------------------------------------

    def _sink_run(self, w: Workload, lines: int) -> float:
        self.settle()
        with scratch() as work:
            port = free_port()
            out = work / "sink.jsonl"
            sink = [PY, "-m", "tests.bench.baselines", "sink", "--port", str(port), "--out", str(out)]
            with serving(sink, port, env=child_env(), cwd=ROOT) as url:
                r = run([PY, "-m", "tests.bench.baselines", "client", str(w.path), "--url", url,
                         "--lines", str(lines), "--connections", "4"], env=child_env(), cwd=ROOT)
            r.check("raw transfer client")
            if out.read_bytes().count(b"\n") != w.events:
                raise RuntimeError("the sink did not store every line")
            return w.events / r.wall

    def _evtool_send_run(self, w: Workload, batch: int | None) -> float:
        self.settle()
        with scratch() as work:
            port = free_port()
            env = child_env(EVTOOL_HOME=str(work / "home"))
            journal = work / "server-events.jsonl"
            serve = evtool_cmd("serve", "--port", str(port), "--journal", str(journal))
            with serving(serve, port, env=env, cwd=work) as url:
                extra = ["--batch", str(batch)] if batch else []
                r = run(evtool_cmd("send", str(w.path), "--url", url, "--json", *extra), env=env, cwd=work)
            r.check("evtool send")
            if json.loads(r.stdout)["sent"] != w.events:
                raise RuntimeError(f"evtool send: {r.stdout.strip()[:500]}")
            if journal.read_bytes().count(b"\n") != w.events:
                raise RuntimeError("the journal does not hold every event")
            return w.events / r.wall

    def send_bulk(self) -> Figure:
        w = self.cache.plain(self.sizes.bulk, 1000, 4)
        fig = Figure("send_bulk", f"send -> serve, bulk, {short(w.events)} ev",
                     "events/s", "raw, 1,000-line bodies", "min_ratio", 0.5)
        for _ in range(self.repeat):
            fig.baseline.append(self._sink_run(w, 1000))
            fig.evtool.append(self._evtool_send_run(w, None))
            self.log(f"  raw {fmt_rate(fig.baseline[-1])}/s, evtool {fmt_rate(fig.evtool[-1])}/s")
        fig.notes.append("evtool send with its defaults (--batch 1000, --connections 4); raw client: "
                         "1,000 lines per body, 4 connections; both fsync before answering "
                         "(serve: group commit; sink: one fdatasync per request)")
        return fig

    def send_single(self) -> Figure:
        w = self.cache.plain(self.sizes.single, 1000, 5)
        fig = Figure("send_single", f"send --batch 1 -> serve, {short(w.events)} ev",
                     "events/s", "raw, 1 line per request", "min_ratio", 0.5)
        for _ in range(self.repeat):
            fig.baseline.append(self._sink_run(w, 1))
            fig.evtool.append(self._evtool_send_run(w, 1))
            self.log(f"  raw {fmt_rate(fig.baseline[-1])}/s, evtool {fmt_rate(fig.evtool[-1])}/s")
        fig.notes.append("4 connections on both sides, one event per request, fsync on both sides "
                         "(the sink's fdatasync per request serializes: it is bound by the disk's "
                         "fsync latency, which evtool's group commit amortizes)")
        return fig

    # -- reads -------------------------------------------------------------------------------

    def revenue_cli(self, runs: int = 10) -> Figure:
        fig = Figure("revenue_cli", "evtool revenue user1, wall, warm", "ms",
                     "python -c psycopg select", "max_ratio", 1.5)
        with self.populated() as dsn, scratch() as work:
            env = child_env(EVTOOL_DSN=dsn, EVTOOL_HOME=str(work / "home"))
            for i in range(self.repeat * runs + 2):
                bare = run([PY, "-c", BARE_CLI], env=env, cwd=work).check("bare CLI")
                ev = run(evtool_cmd("revenue", "user1"), env=env, cwd=work).check("evtool revenue")
                if bare.stdout.strip() != ev.stdout.strip():
                    raise RuntimeError(f"evtool revenue said {ev.stdout!r}, the database {bare.stdout!r}")
                if i >= 2:  # the first pair warms caches
                    fig.baseline.append(bare.wall * 1000)
                    fig.evtool.append(ev.wall * 1000)
        fig.notes.append(f"{runs} alternating runs per repeat; samples are single runs")
        return fig

    def lookup_p99(self, rate: int = 1000, seconds: float = 5) -> Figure:
        fig = Figure("lookup_p99", f"GET /userEvents p99 at {rate:,}/s", "ms",
                     "aiohttp constant answer", "max_value", 5.0)
        p50s, rates = [], []
        load = [PY, "-m", "tests.bench.loadgen", "--rate", str(rate), "--seconds", str(seconds),
                "--users", "1000"]
        with self.populated() as dsn, scratch() as work:
            env = child_env(EVTOOL_DSN=dsn, EVTOOL_HOME=str(work / "home"))
            for _ in range(self.repeat):
                port = free_port()
                sink = [PY, "-m", "tests.bench.baselines", "sink", "--port", str(port),
                        "--out", str(work / "sink.jsonl")]
                self.settle()
                with serving(sink, port, env=child_env(), cwd=ROOT) as url:
                    base = json.loads(run([*load, url], env=child_env(), cwd=ROOT).check("loadgen").stdout)
                port = free_port()
                serve = evtool_cmd("serve", "--port", str(port), "--journal", str(work / "j.jsonl"))
                self.settle()
                with serving(serve, port, env=env, cwd=work) as url:
                    res = json.loads(run([*load, url], env=child_env(), cwd=ROOT).check("loadgen").stdout)
                if res["errors"]:
                    raise RuntimeError(f"{res['errors']} failed lookups: {res}")
                fig.baseline.append(base["p99_ms"])
                fig.evtool.append(res["p99_ms"])
                p50s.append(res["p50_ms"])
                rates.append(res["rate"])
                self.log(f"  constant p99 {base['p99_ms']} ms, evtool p50 {res['p50_ms']} "
                         f"p99 {res['p99_ms']} max {res['max_ms']} ms")
        fig.extra = {"evtool_p50_ms": p50s, "achieved_rate": rates}
        fig.notes.append(f"open loop, {seconds:g} s per run, latency from each request's due time; "
                         f"evtool p50 median {sorted(p50s)[len(p50s) // 2]} ms")
        return fig


# (group, figure key, measurement): `--only` takes either name.
FIGURES: list[tuple[str, str, Callable[[Bench], Figure]]] = [
    ("process", "process_cold_1k", lambda b: b.process_cold(1000, 1)),
    ("process", "process_cold_many", lambda b: b.process_cold(b.sizes.many_users, 2)),
    ("tenth", "process_10th", Bench.tenth_million),
    ("rss", "process_rss", Bench.peak_rss),
    ("send", "send_bulk", Bench.send_bulk),
    ("send", "send_single", Bench.send_single),
    ("revenue", "revenue_cli", Bench.revenue_cli),
    ("lookup", "lookup_p99", Bench.lookup_p99),
]
