"""`evtool serve --workers N`: N receiver processes on one port, one supervisor (README, Operations).

Each worker is a whole `serve` (its own event loop, intake, group commit and journal) listening
on the same address with SO_REUSEPORT, so the kernel spreads new connections over them and
every core can validate and write. Worker i writes `journal.worker_journal(base, i)` (worker 0
the base journal itself, worker 1 `server-events.w1.jsonl`, ...) under its own lock: two
workers can never write one file, and `process`/`status` given the base journal read them all
(`journal.with_workers`).

The supervisor (the process the user started) only forks, watches and signals:
- SIGTERM/SIGINT are forwarded to every worker, which drains its requests and fsyncs as plain
  `serve` does; the supervisor returns once all have left (status 0 when every one left 0).
  SIGHUP is forwarded too (each worker reopens its journal, after a rotation).
- a worker that dies (a crash, SIGKILL, the OOM killer) is started again on the same journal,
  after a delay that doubles while it keeps dying young; its torn last line, never
  acknowledged, is cut by the appender as at any start. Requests it was answering fail at the
  client (connection reset) and are retried by `send`: nothing acknowledged is lost.
- a worker that fails before it ever listened (journal locked, bad settings) stops them all:
  that is a configuration to fix, not a crash to retry.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import EvtoolError
from .journal import worker_journal
from .receiver import ServeSettings

log = logging.getLogger("evtool.serve")

MAX_WORKERS = 256
STARTUP_TIMEOUT = 120.0  # seconds for every worker to listen at the first start
RESTART_DELAY = (0.1, 10.0)  # seconds before restarting a dead worker: first, cap (doubling)
YOUNG = 10.0  # a worker that dies within this many seconds of its start doubles the next delay
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)

# The body of a worker process: (index, its settings, call once listening) -> exit status.
WorkerMain = Callable[[int, ServeSettings, Callable[[str], None]], int]


class WorkersFailed(EvtoolError):
    """A worker could not start, or did not stop cleanly."""


@dataclass
class _Worker:
    index: int
    settings: ServeSettings
    pid: int = 0
    pid_was: int = 0  # the pid of the last process started (for the log once it died)
    started: float = 0.0
    ready_fd: int = -1  # read end of the pipe the worker writes one byte to once listening
    ready: bool = False  # has listened at least once (since the supervisor started)
    delay: float = RESTART_DELAY[0]
    restart_at: float | None = None  # when a dead worker is started again


def worker_settings(s: ServeSettings, index: int, port: int) -> ServeSettings:
    """Worker `index`'s settings: its own journal, the group's port, SO_REUSEPORT, and the base
    journal as the receiver's name (senders resume by it, whichever worker answers)."""
    return dataclasses.replace(s, journal=worker_journal(s.journal, index), port=port, reuse_port=True,
                               receiver_name=s.receiver_name or s.journal)


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket holding the group's port while it runs.

    First the port is bound without SO_REUSEPORT, so a port already in use (another `serve`
    group, or any other program) is an error here instead of a silent share of its traffic.
    Port 0 picks a free port, which every worker then binds.
    """
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
        # SO_REUSEADDR, as every worker sets it: a port whose last connections linger in
        # TIME_WAIT is free; one with a listener (even a SO_REUSEPORT one) is not, on Linux.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(addr)  # OSError EADDRINUSE: the CLI says "Address already in use"
        addr = (addr[0], probe.getsockname()[1], *addr[2:])
    held = socket.socket(family, kind, proto)
    try:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(addr)
    except BaseException:
        held.close()
        raise
    return held


def supervise(s: ServeSettings, workers: int, main: WorkerMain) -> None:
    """Run `workers` receivers on s.host:s.port until SIGTERM/SIGINT; return once all drained.

    Raises WorkersFailed when a worker fails before it first listened (the others are stopped)
    or leaves with a non-zero status while stopping; OSError when the port is in use.
    """
    if not 1 <= workers <= MAX_WORKERS:
        raise WorkersFailed(f"--workers must be between 1 and {MAX_WORKERS}")
    held = reserve_port(s.host, s.port)
    port = held.getsockname()[1]
    group = [_Worker(i, worker_settings(s, i, port)) for i in range(workers)]
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    stopping = False
    starting = True  # until every worker has listened once
    failed: list[str] = []
    try:
        for w in group:
            _start(w, main, old_mask)
        log.info("supervising %d workers on %s:%d (pids %s); journals %s", workers, s.host, port,
                 " ".join(str(w.pid) for w in group), ", ".join(str(w.settings.journal) for w in group))
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while any(w.pid for w in group) or (not stopping and any(w.restart_at for w in group)):
            waiting = [w for w in group if w.pid and w.ready_fd >= 0]
            timeout = 0.05 if waiting else 0.5
            for w in group:
                if w.restart_at is not None:
                    timeout = max(0.0, min(timeout, w.restart_at - time.monotonic()))
            info = signal.sigtimedwait(_SIGNALS, timeout)
            if info is not None and info.si_signo != signal.SIGCHLD:
                if info.si_signo == signal.SIGHUP:
                    _signal_all(group, signal.SIGHUP)
                else:
                    if not stopping:
                        log.info("stopping %d workers (they finish their requests first)", workers)
                    stopping = True
                    _signal_all(group, signal.SIGTERM)
            _note_ready(group)
            for w, status in _reap(group):
                code = os.waitstatus_to_exitcode(status)
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
                if stopping:
                    if code != 0:
                        failed.append(f"worker {w.index} left with {how}")
                    continue
                if not w.ready:  # never listened: a setting or the journal, not a crash
                    failed.append(f"worker {w.index} ({w.settings.journal}) did not start ({how})")
                    stopping = True
                    _signal_all(group, signal.SIGTERM)
                    continue
                if time.monotonic() - w.started >= YOUNG:
                    w.delay = RESTART_DELAY[0]  # it had been running: a new failure, not a loop
                w.restart_at = time.monotonic() + w.delay
                log.warning("worker %d (pid %d, %s) died (%s); restarting it in %.1f s", w.index,
                            w.pid_was, w.settings.journal, how, w.delay)
                w.delay = min(w.delay * 2, RESTART_DELAY[1])  # the next, should it die young again
            now = time.monotonic()
            for w in group:
                if w.restart_at is not None and not stopping and now >= w.restart_at:
                    w.restart_at = None
                    _start(w, main, old_mask)
                    log.info("worker %d restarted (pid %d)", w.index, w.pid)
            if starting and all(w.ready for w in group):
                starting = False
            if starting and not stopping and now > deadline:
                failed.append(f"the workers did not all listen within {STARTUP_TIMEOUT:g} s")
                stopping = True
                _signal_all(group, signal.SIGTERM)
    finally:
        for w in group:
            if w.pid:  # leaving on an exception: take no worker's orphan along
                _kill(w.pid, signal.SIGTERM)
            if w.ready_fd >= 0:
                os.close(w.ready_fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        held.close()
    if failed:
        raise WorkersFailed("; ".join(failed))


def _start(w: _Worker, main: WorkerMain, mask: set[signal.Signals]) -> None:
    """Fork worker `w`; in the child run `main` and leave with its status, never returning."""
    if w.ready_fd >= 0:
        os.close(w.ready_fd)
    r, wr = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child (its coverage is the subprocess tests)
        code = 1
        try:
            os.close(r)
            # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which
            # forwards it once (a second signal while a worker drains would cut the drain short).
            os.setpgid(0, 0)
            for sig in _SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            _die_with_parent()
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            said = []

            def ready(message: str) -> None:
                log.info("worker %d: %s", w.index, message)
                if not said:
                    said.append(True)
                    os.write(wr, b"1")
                    os.close(wr)

            code = main(w.index, w.settings, ready)
        except KeyboardInterrupt:
            code = 130
        except BaseException:
            log.exception("worker %d failed", w.index)
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(wr)
    w.pid = w.pid_was = pid
    w.ready_fd, w.started = r, time.monotonic()


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the supervisor dies (even by SIGKILL), so no worker is left
    holding the port and its journal without anyone to stop it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _note_ready(group: list[_Worker]) -> None:
    fds = [w.ready_fd for w in group if w.ready_fd >= 0]
    if not fds:
        return
    readable, _, _ = select.select(fds, [], [], 0)
    for w in group:
        if w.ready_fd in readable:
            if os.read(w.ready_fd, 1):
                w.ready = True
            os.close(w.ready_fd)  # said it once (or died before saying it: the reaper tells)
            w.ready_fd = -1


def _reap(group: list[_Worker]) -> list[tuple[_Worker, int]]:
    """The workers that have exited since the last call, with their wait status."""
    gone = []
    for w in group:
        if not w.pid:
            continue
        try:
            pid, status = os.waitpid(w.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = w.pid, 0
        if pid:
            _note_ready([w])  # a byte written just before dying still counts as listened
            w.pid = 0
            gone.append((w, status))
    return gone


def _signal_all(group: list[_Worker], sig: signal.Signals) -> None:
    for w in group:
        if w.pid:
            _kill(w.pid, sig)


def _kill(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise


def journals(base: Path, workers: int) -> list[Path]:
    """The journals `serve --workers N --journal base` writes, worker 0's first."""
    return [worker_journal(base, i) for i in range(workers)]
