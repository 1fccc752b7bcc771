"""The command line: a thin click layer over the library modules."""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn

# Importing each command module registers its command on the group.
from . import db, events, process, rejects, report, revenue, send, serve, status  # noqa: F401
from .base import cli, finish

finish(cli)

__all__ = ["cli", "main"]


def main() -> NoReturn:
    """Run the command line, then leave (see `leave`)."""
    try:
        cli(prog_name="evtool")
    except SystemExit as exc:
        leave(exc.code)
    leave(0)


def leave(code: object) -> NoReturn:
    """Exit with `code` as `sys.exit` would, without tearing the interpreter down module by
    module: 30-45 ms of every one-shot command (5% of a million-event `process`), spent on
    nothing, since a command has closed what it opened (connections, workers, files) when it
    returns. The exit handlers still run and the output is flushed. While another thread
    still runs, the ordinary exit is taken, which waits for it."""
    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.exit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message") prints the message and exits 1
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`evtool ... | head`) or stream: nothing to add
            pass
    os._exit(status)
