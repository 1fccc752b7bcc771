"""`make demo`: the whole pipeline on the embedded PostgreSQL, with the commands it runs shown.

serve (on a free port) -> send samples/events.jsonl -> process -> revenue for each user -> stop.
Run it twice: the second run sends nothing new and applies nothing, and the totals stay the same.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVTOOL = [sys.executable, "-m", "evtool"]
WORK = ROOT / ".evtool" / "demo"
USERS = ["user1", "user2", "user3", "user4", "user5"]


def show(*args: str) -> None:
    print(f"\n$ evtool {' '.join(args)}", flush=True)


def run(*args: str) -> str:
    show(*args)
    proc = subprocess.run([*EVTOOL, *args], cwd=WORK, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"demo: `evtool {' '.join(args)}` exited {proc.returncode}")
    return proc.stdout


def free_port(preferred: int = 8000) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise SystemExit("demo: no free port")


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: evtool serve exited {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("demo: the receiver did not come up")


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    # One state directory for the demo: the embedded server and the sender's resume state.
    os.environ.setdefault("EVTOOL_HOME", str(ROOT / ".evtool"))
    run("db", "url")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    show("serve", "--port", str(port), "&")
    server = subprocess.Popen([*EVTOOL, "serve", "--port", str(port)], cwd=WORK)
    try:
        wait_healthy(url, server)
        run("send", str(ROOT / "samples" / "events.jsonl"), "--url", url)
        run("process")
        for user in USERS:
            run("revenue", user)
        run("revenue", "user2", "--json")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
    print(f"\nreceiver stopped (exit {code}); journal: {WORK / 'server-events.jsonl'}")
    print("Run `make demo` again: nothing is sent or applied twice, the totals stay the same.")
    if code != 0:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
