"""Defaults and where things are: ports, URL, token, journal, EVTOOL_HOME, which PostgreSQL (design 6).

Every default the commands and the library share is written here once.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

if TYPE_CHECKING:
    from .store import Store

HOST = "127.0.0.1"  # serve listens on loopback unless told otherwise
PORT = 8000
URL = f"http://{HOST}:{PORT}"  # where send and status find the receiver
TOKEN = "secret"  # the default token, accepted on loopback only
JOURNAL = Path("server-events.jsonl")  # serve writes it, process and status read it
# libpq's environment variables that choose a server, database, role or service (psql's "which
# database"). Those that only tune a connection (PGSSLMODE, PGAPPNAME, ...) do not choose one.
PG_VARS = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD", "PGSERVICE",
           "PGSERVICEFILE")


def home() -> Path:
    """The state directory: $EVTOOL_HOME, else $XDG_DATA_HOME/evtool, else ~/.local/share/evtool.

    Never the working directory: every command, from any directory, finds the same embedded
    server and the same resume state (as log shippers keep theirs in one data directory).
    """
    if os.environ.get("EVTOOL_HOME"):
        return Path(os.environ["EVTOOL_HOME"])
    xdg = os.environ.get("XDG_DATA_HOME")
    # The XDG spec says a relative value is invalid and is to be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "evtool"


def pgdata() -> Path:
    """The embedded server's data directory."""
    return home() / "pg"


def explicit_dsn(dsn: str | None = None) -> str | None:
    """The DSN the user chose, if any: --dsn, EVTOOL_DSN, DATABASE_URL, or libpq's PG* variables.

    Returns "" (libpq reads its environment itself: PGSERVICE, PGPORT, ...) when any of libpq's
    variables naming a server, database, user or service is set, as psql would use them; None
    when nothing is set, meaning: use the embedded server.
    """
    for candidate in (dsn, os.environ.get("EVTOOL_DSN"), os.environ.get("DATABASE_URL")):
        if candidate:
            return candidate
    if any(os.environ.get(var) for var in PG_VARS):
        return ""
    return None


_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)(.*)$", re.S)
_KV_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s&]*)", re.I)
MASK = "***"


def _uri_password(rest: str) -> str | None:
    """The password of a URI's userinfo (`rest` is what follows "://"), as written: everything
    between the first ':' and the last '@' (a password may hold '@', ':' or '/')."""
    at = rest.rfind("@")
    if at < 0:
        return None
    userinfo = rest[:at]
    colon = userinfo.find(":")
    return None if colon < 0 else userinfo[colon + 1:]


def mask_dsn(dsn: str) -> str:
    """The DSN with its password replaced by ***, for display: a URI's userinfo password (which
    may hold '@', ':', '/' or %-escapes), a `password=` query parameter, and a key=value DSN's
    password, quoted or not."""
    m = _URI.match(dsn)
    if m:
        scheme, rest = m.groups()
        password = _uri_password(rest)
        if password is not None:
            at = rest.rfind("@")
            colon = rest.find(":")
            rest = rest[:colon + 1] + MASK + rest[at:]
        dsn = scheme + rest
    return _KV_PASSWORD.sub(lambda k: k.group(1) + MASK, dsn)


def dsn_secrets(dsn: str) -> list[str]:
    """Every form in which `dsn`'s password might be quoted back (as written, %-decoded,
    unquoted), longest first."""
    found: list[str] = []
    m = _URI.match(dsn)
    if m:
        password = _uri_password(m.group(2))
        if password:
            found += [password, unquote(password)]
    for k in _KV_PASSWORD.finditer(dsn):
        value = k.group(2)
        found.append(value)
        if value.startswith("'"):
            inner = value[1:-1] if value.endswith("'") and len(value) > 1 else value[1:]
            found += [inner, re.sub(r"\\(.)", r"\1", inner)]
        found.append(unquote(value))
    for secret in list(found):
        # libpq splits a userinfo at its first '@' and quotes the rest back as host and port
        pieces = secret.split("@")
        found += [pieces[0], *(p + "@" for p in pieces[1:])]
        found += [p for p in re.split(r"[@:/]", secret) if len(p) > 1]
    return sorted({f for f in found if f}, key=len, reverse=True)


def mask_secrets(text: str, dsn: str | None) -> str:
    """`text` (an error message that may quote the DSN) with every form of its password masked."""
    if dsn:
        for secret in dsn_secrets(dsn):
            text = text.replace(secret, MASK + "@" if secret.endswith("@") else MASK)
    return mask_dsn(text)


def resolve_dsn(dsn: str | None = None) -> str:
    """The DSN to connect to, starting the embedded server only when nothing else is set."""
    from . import embedded

    chosen = embedded.choose(dsn).dsn
    assert chosen is not None  # choose(start=True) always has one
    return chosen


def open_store(dsn: str | None = None, *, migrate: bool) -> Store:
    """A connected Store on the chosen (or embedded) database.

    Writers pass migrate=True (the missing migrations are applied); readers pass False: the
    schema version is checked, and SchemaBehind says what to run, so a SELECT-only role reads.
    """
    from .store import Store

    store = Store.connect(resolve_dsn(dsn))
    try:
        if migrate:
            store.migrate()
        else:
            store.check_schema()
    except BaseException:
        store.close()
        raise
    return store
