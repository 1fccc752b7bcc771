"""The bench's own embedded PostgreSQL, in a temp dir, with a fresh database per measurement."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

import psycopg

from evtool import embedded


class PgServer:
    """An embedded PostgreSQL under a fresh temp dir; `stop()` removes it."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="evtool-bench-pg-"))
        self.pgdata = self.base / "data"
        self.dsn = embedded.ensure_running(self.pgdata)

    def url(self, name: str) -> str:
        return self.dsn.replace("/postgres?", f"/{name}?")

    def execute(self, sql: str) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql)

    def create(self, template: str | None = None) -> str:
        """Create an empty database (or a copy of `template`); return its name."""
        name = "b_" + uuid.uuid4().hex[:12]
        if template:
            self.execute(f"CREATE DATABASE {name} TEMPLATE {template} STRATEGY FILE_COPY")
        else:
            self.execute(f"CREATE DATABASE {name}")
        return name

    def settle(self) -> None:
        """Flush what earlier runs left dirty (a CHECKPOINT, then sync) so it cannot land in a timed run."""
        self.execute("CHECKPOINT")
        os.sync()

    def drop(self, name: str) -> None:
        self.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    @contextmanager
    def database(self, template: str | None = None) -> Iterator[str]:
        """A fresh database for one measurement; yields its DSN, drops it after."""
        name = self.create(template)
        self.settle()
        try:
            yield self.url(name)
        finally:
            self.drop(name)

    def stop(self) -> None:
        try:
            embedded.stop(self.pgdata)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def check_totals(dsn: str, expected: dict) -> None:
    """Raise unless users_revenue holds exactly the expected user count and grand total."""
    with psycopg.connect(dsn) as conn:
        users, total = conn.execute(
            "SELECT count(*), coalesce(sum(revenue), 0) FROM users_revenue").fetchone()
    if users != expected["users"] or Decimal(total) != Decimal(expected["total"]):
        raise RuntimeError(f"wrong totals: {users} users, total {total}; "
                           f"expected {expected['users']} users, total {expected['total']}")
