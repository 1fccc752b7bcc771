"""Fixtures and helpers shared by the tests.

Fixtures: one real embedded PostgreSQL per test session, a fresh database per test. Helpers: the
real CLI as a subprocess, `evtool serve` started and waited for, free ports, HTTP calls, event
lines.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from evtool import embedded
from evtool.config import PG_VARS

ROOT = Path(__file__).resolve().parent.parent
# A copy of shared/tools/gen_events.py, kept here so a bare clone can run the tests.
GEN_EVENTS = ROOT / "tests" / "gen_events.py"


@pytest.fixture(scope="session")
def pg_server():
    """DSN of the session's embedded server (maintenance database).

    Its data lives outside pytest's tmp_path tree, which pytest prunes when other sessions run.
    """
    base = Path(tempfile.mkdtemp(prefix="evtool-test-pg-"))
    pgdata = base / "data"
    dsn = embedded.ensure_running(pgdata)
    yield dsn
    embedded.stop(pgdata)
    shutil.rmtree(base, ignore_errors=True)


def _with_db(dsn: str, name: str) -> str:
    return dsn.replace("/postgres?", f"/{name}?")


@pytest.fixture
def dsn(pg_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A fresh, empty database; EVTOOL_DSN and EVTOOL_HOME point at it and a temp dir."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = _with_db(pg_server, name)
    monkeypatch.setenv("EVTOOL_DSN", url)
    monkeypatch.setenv("EVTOOL_HOME", str(tmp_path / "home"))
    for var in ("DATABASE_URL", *PG_VARS, "EVTOOL_TOKEN", "EVTOOL_URL"):
        monkeypatch.delenv(var, raising=False)
    yield url
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def evtool(*args: str, cwd: Path | None = None, timeout: float = 120, check: bool = False,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (environment inherited, so EVTOOL_DSN applies)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(evtool_cmd(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"evtool {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def totals(dsn: str) -> dict[str, Decimal]:
    """Every user's stored total."""
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT user_id, revenue FROM users_revenue").fetchall())


def journal_lines(path: Path) -> list[bytes]:
    """The journal's lines; it must end with a complete line (no partial write ever stays)."""
    data = path.read_bytes() if path.exists() else b""
    assert data == b"" or data.endswith(b"\n"), "the journal ends with a partial line"
    return data.splitlines()


def generate(path: Path, n: int, *args: str) -> dict:
    """tests/gen_events.py: `n` lines at `path`; returns its expected totals document."""
    subprocess.run([sys.executable, str(GEN_EVENTS), str(path), str(n), *args], check=True,
                   capture_output=True)
    return json.loads(Path(f"{path}.expected.json").read_text())


def exact(d: dict) -> dict[str, Decimal]:
    """Totals as Decimals: compares values, not how many trailing zeros each carries."""
    return {u: Decimal(str(v)) for u, v in d.items()}


def event_line(user: str = "u1", value: object = "1", event_id: str | None = None,
               name: str = "add_revenue", time: str | None = None) -> bytes:
    """One event as a client writes it (no newline); `value` is put in as text, so "0.10" stays."""
    extra = f', "eventId": "{event_id}"' if event_id is not None else ""
    extra += f', "timestamp": "{time}"' if time is not None else ""
    return f'{{"userId": "{user}", "name": "{name}", "value": {value}{extra}}}'.encode()


def free_port() -> int:
    """A loopback port nothing listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, proc: subprocess.Popen, timeout: float = 60) -> bool:
    """Poll `url`/healthz until it answers 200; False when `proc` exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=1).close()
            return True
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def http(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None,
         timeout: float = 10) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one request; HTTP errors are answers, not exceptions."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def evtool_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "evtool", *args]


def start(args: list[str], cwd: Path, log: Path, env: dict | None = None, **kw) -> subprocess.Popen:
    """Start a command in its own session (so its forked children can be found), output to `log`."""
    out = open(log, "ab")
    try:
        return subprocess.Popen(args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True, **kw)
    finally:
        out.close()


class Serve:
    """`evtool serve` as a real subprocess on a fixed port, which can be killed and restarted.

    `with Serve(workdir) as serve:` starts it, waits until it answers, and at the end stops it
    with SIGTERM, checking it exits 0 without a traceback (or kills it if the test failed).
    """

    def __init__(self, workdir: Path, *args: str, port: int | None = None, preexec_fn=None,
                 env: dict | None = None) -> None:
        self.workdir = workdir
        self.args = args
        self.port = port or free_port()
        self.preexec_fn = preexec_fn
        self.env = env
        self.log = workdir / f"serve-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, preexec_fn=None, timeout: float = 60) -> Serve:
        self.starts += 1
        self.proc = start(evtool_cmd("serve", "--port", str(self.port), *self.args), self.workdir,
                          self.log, self.env, preexec_fn=preexec_fn or self.preexec_fn)
        if not wait_until_serving(self.url, self.proc, timeout):
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"serve did not start: {self.log.read_text()}")
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        """SIGTERM: must exit 0 without a traceback."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=60)
        text = self.log.read_text(errors="replace")
        assert rc == 0, text
        assert "Traceback" not in text, text

    def __enter__(self) -> Serve:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if exc[0] is None:
                self.stop()
            else:
                self.kill()


# The C loops (evtool/_fastlines.c) have Python twins; the tests of each run both ways.
C_OR_PYTHON = ["c", "python"]


def c_or_python(request: pytest.FixtureRequest, module: types.ModuleType) -> Iterator[str]:
    """The body of a module-scoped fixture with params C_OR_PYTHON: `module._fastlines` is the C
    module for "c" (skipped where it was not built), None for "python" (what an install without a
    compiler runs); restored after."""
    native = module._fastlines
    if request.param == "c" and native is None:
        pytest.skip("evtool._fastlines is not built (no C compiler here); the Python code is tested")
    module._fastlines = native if request.param == "c" else None
    yield request.param
    module._fastlines = native

