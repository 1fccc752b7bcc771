"""`make bench`: evtool beside minimal baselines, in one run, several times; a table and a JSON file.

    python -m tests.bench.run [--quick] [--repeat N] [--only NAME,...] [--skip NAME,...]
                              [--out bench-results.json] [--events N] [--cache DIR]

NAME is a group (process, uuids, big, tenth, uuids10, rss, send, serve, workers, revenue,
lookup, events) or a figure key (see the JSON); `--skip big,uuids10` leaves out the largest workloads.
Workloads are generated deterministically into the cache dir (default .evtool/bench-cache) and
reused; PostgreSQL is the bench's own embedded server in a temp dir, a fresh database per run.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .figures import Figure
from .measure import FIGURES, Bench, fmt_rate
from .pg import PgServer
from .procs import ROOT
from .workloads import DEFAULT_CACHE, Cache, Sizes


def git_revision() -> str:
    """HEAD's short hash, with "+dirty" when evtool/ (migrations included) differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--", "evtool") else "")


def fmt(fig: Figure, x: float) -> str:
    if fig.unit == "events/s":
        return fmt_rate(x)
    return f"{x:.1f}" if fig.unit == "MiB" else f"{x:.2f}"


def cell(fig: Figure, xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{fmt(fig, statistics.median(xs))} ({fmt(fig, min(xs))}-{fmt(fig, max(xs))})"


def table(figures: list[Figure], title: str) -> Table:
    t = Table(title=title, title_justify="left")
    right = {"justify": "right"}
    for name, kw in [("#", {}), ("figure", {"no_wrap": True}), ("unit", {}),
                     ("evtool median (min-max)", right), ("baseline median (min-max)", right),
                     ("baseline", {}), ("ratio", right), ("target", {}), ("met?", {})]:
        t.add_column(name, **kw)
    for f in figures:
        if f.error:
            t.add_row(f.issue, f.label, f.unit, "[red]error[/red]", "", f.baseline_label, "", "",
                      f"[red]{f.error.splitlines()[0][:90]}[/red]", style=None)
            continue
        ratio = f"{f.ratio:.3f}x" if f.ratio is not None else "-"
        met = {True: "[green]met[/green]", False: "[red]not met[/red]", None: "-"}[f.met]
        t.add_row(f.issue, f.label, f.unit, cell(f, f.evtool), cell(f, f.baseline), f.baseline_label, ratio,
                  f.target, met)
    return t


def selected(only: str | None, skip: str | None = None) -> list:
    known = {g for g, _, _ in FIGURES} | {k for _, k, _ in FIGURES}

    def names(arg: str | None, flag: str) -> set[str]:
        found = {n.strip() for n in (arg or "").split(",") if n.strip()}
        if found - known:
            raise SystemExit(f"unknown {flag} name(s): {', '.join(sorted(found - known))}; "
                             f"choose from {', '.join(sorted(known))}")
        return found

    keep, drop = names(only, "--only"), names(skip, "--skip")
    return [f for f in FIGURES if (not keep or f[0] in keep or f[1] in keep)
            and f[0] not in drop and f[1] not in drop]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="workloads ~10x smaller (100k events)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each side per figure (default 3)")
    ap.add_argument("--only", help="comma-separated groups or figure keys")
    ap.add_argument("--skip", help="comma-separated groups or figure keys to leave out (e.g. big)")
    ap.add_argument("--out", type=Path, default=Path("bench-results.json"), help="the JSON file")
    ap.add_argument("--events", type=int, help="base workload size (default 1M, --quick 100k)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="workload cache dir")
    a = ap.parse_args(argv)
    if a.repeat < 1:
        ap.error("--repeat must be at least 1")
    sizes = Sizes(a.events or (100_000 if a.quick else 1_000_000))
    chosen = selected(a.only, a.skip)
    err = Console(stderr=True)
    out = Console() if sys.stdout.isatty() else Console(width=170)
    revision = git_revision()
    started = time.perf_counter()
    err.print(f"evtool bench at {revision}: {sizes.events:,} events, repeat {a.repeat}, "
              f"{os.cpu_count()} cpus; cache {a.cache}")
    # Bytecode for evtool and the bench's own scripts, as an installed wheel has it: with
    # PYTHONDONTWRITEBYTECODE set (some shells, CI images), every run would compile the source
    # tree again, 30-40 ms of each `evtool` start that no installed copy pays.
    for tree in ("evtool", "tests"):
        compileall.compile_dir(ROOT / tree, quiet=1)
    pg = PgServer()
    figures: list[Figure] = []
    try:
        bench = Bench(pg, Cache(a.cache), sizes, a.repeat, err.print)
        for _group, key, measure in chosen:
            err.print(f"[bold]{key}[/bold]")
            t0 = time.perf_counter()
            try:
                got = measure(bench)
            except Exception as exc:  # one broken figure must not hide the others
                err.print(traceback.format_exc(), markup=False)
                got = Figure(key, key, "", "", "min_ratio", 0, error=f"{type(exc).__name__}: {exc}")
            # A measurement gives one row, or several: one per reference measured in its runs.
            for i, fig in enumerate(got if isinstance(got, list) else [got]):
                fig.key = key if i == 0 else f"{key}.{fig.key}"
                fig.extra["seconds"] = round(time.perf_counter() - t0, 1)
                figures.append(fig)
    finally:
        pg.stop()
    seconds = time.perf_counter() - started
    end_revision = git_revision()
    if end_revision != revision:  # others committed or edited evtool/ while the bench ran
        revision = f"{revision}..{end_revision} (changed during the run)"
    title = (f"evtool bench, {revision}, {sizes.events:,}-event workloads, {a.repeat} run(s) each side, "
             f"{os.cpu_count()} cpus, {seconds:.0f} s")
    out.print(table(figures, title))
    for f in figures:
        for note in f.notes:
            out.print(f"  {f.key}: {note}", highlight=False)
    result = {
        "revision": revision, "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1), "repeat": a.repeat, "sizes": sizes.as_dict(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "command": " ".join(["python -m tests.bench.run", *(argv if argv is not None else sys.argv[1:])]),
        "figures": [f.as_dict() for f in figures],
    }
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    out.print(f"wrote {a.out}")
    return 1 if any(f.error for f in figures) else 0


if __name__ == "__main__":
    sys.exit(main())
