"""Subprocess helpers: timed runs with per-child peak RSS, and servers started on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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
    """One finished subprocess: wall seconds, peak RSS (KiB), exit code and output."""

    wall: float
    maxrss_kib: int
    returncode: int
    stdout: str
    stderr: str

    def check(self, what: str) -> Run:
        if self.returncode != 0:
            raise RuntimeError(f"{what} exited {self.returncode}: {self.stderr.strip()[-2000:]}")
        return self


def run(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 1800) -> Run:
    """Run `cmd`, timing it from spawn to exit; peak RSS comes from wait4 on that very child.

    wait4's ru_maxrss is the child's own peak (or that of a descendant it waited for, whichever
    is larger), not a sum over a process tree.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, env=env, cwd=cwd)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Run(wall, usage.ru_maxrss, proc.returncode, out.read().decode(errors="replace"),
                   err.read().decode(errors="replace"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(cmd: Sequence[str], port: int, *, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> Iterator[str]:
    """Start a server that answers GET /healthz on `port`; yield its base URL; SIGTERM it after."""
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=cwd)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"{url}/healthz", timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        err.seek(0)
                        raise RuntimeError(f"{' '.join(cmd)} did not start: "
                                           f"{err.read().decode(errors='replace')[-2000:]}") from None
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
