"""Where things are: EVTOOL_HOME, and which PostgreSQL to use (design section 6)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The state directory: $EVTOOL_HOME, default ./.evtool."""
    return Path(os.environ.get("EVTOOL_HOME") or ".evtool")


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
    chosen = explicit_dsn(dsn)
    if chosen is not None:
        return chosen
    from . import embedded

    return embedded.ensure_running(home() / "pg")
