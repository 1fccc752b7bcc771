"""Defaults and where things are: ports, URL, token, journal, EVTOOL_HOME, which PostgreSQL (design 6).

Every default the commands and the library share is written here once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import Store

HOST = "127.0.0.1"  # serve listens on loopback unless told otherwise
PORT = 8000
URL = f"http://{HOST}:{PORT}"  # where send and status find the receiver
TOKEN = "secret"  # the default token, accepted on loopback only
JOURNAL = Path("server-events.jsonl")  # serve writes it, process and status read it
HOME = Path(".evtool")  # the state directory when EVTOOL_HOME is not set


def home() -> Path:
    """The state directory: $EVTOOL_HOME, default ./.evtool."""
    return Path(os.environ.get("EVTOOL_HOME") or HOME)


def pgdata() -> Path:
    """The embedded server's data directory."""
    return home() / "pg"


def explicit_dsn(dsn: str | None = None) -> str | None:
    """The DSN the user chose, if any: --dsn, EVTOOL_DSN, DATABASE_URL, or libpq's PG* variables.

    Returns "" (libpq reads PG* itself) when only PGHOST or PGDATABASE is set, and None when
    nothing is set, meaning: use the embedded server.
    """
    for candidate in (dsn, os.environ.get("EVTOOL_DSN"), os.environ.get("DATABASE_URL")):
        if candidate:
            return candidate
    if os.environ.get("PGHOST") or os.environ.get("PGDATABASE"):
        return ""
    return None


def resolve_dsn(dsn: str | None = None) -> str:
    """The DSN to connect to, starting the embedded server only when nothing else is set."""
    from . import embedded

    chosen = embedded.choose(dsn).dsn
    assert chosen is not None  # choose(start=True) always has one
    return chosen


def open_store(dsn: str | None = None) -> Store:
    """A connected Store on the chosen (or embedded) database, its schema migrated."""
    from .store import Store

    store = Store.connect(resolve_dsn(dsn))
    try:
        store.migrate()
    except BaseException:
        store.close()
        raise
    return store
