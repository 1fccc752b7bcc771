"""Every SQL statement evtool runs keeps to the rules Citus imposes (README "Scale-out").

The statements are not listed by hand: a server with pg_stat_statements records every statement
a representative run executes (tests/workload.py: process, status, report, revenue, rejects,
rejects --reapply), so a statement added tomorrow is held to the rules too. The rules:

- a row lock (FOR UPDATE/SHARE) reads one distributed table by equality on its distribution
  column (Citus refuses a lock spanning shards);
- ON CONFLICT DO UPDATE SET calls no function that is not IMMUTABLE (now() goes in the
  inserted row, read back through `excluded`), and casts nothing but parameters;
- an UPDATE applies no STABLE (or VOLATILE) function, nor a cast, to a column: cast parameters;
- no correlated subquery over a reference table (the migration makes none: checked too).

The distribution columns come from the migrations that distribute the tables (evtool/sql/005_citus.sql,
and the guarded block of each later migration that creates a table).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import psycopg
import pytest

from evtool.store import SQL_DIR

from . import workload
from .pgcluster import Server, embedded_bindir


def distribution() -> dict[str, str]:
    """{table: distribution column}, as the migrations distribute them (005 and later ones)."""
    out: dict[str, str] = {}
    for f in sorted(SQL_DIR.glob("*.sql")):  # in migration order: a later one may drop a table
        text = f.read_text()
        for table in re.findall(r"^DROP TABLE (\w+)", text, re.M):
            out.pop(table, None)
        out.update((t, c) for t, c, _ in re.findall(r"\(\d+,\s*'(\w+)',\s*'(\w+)',\s*'(\w+)'\)", text))
    return out


def reference_tables() -> set[str]:
    text = "\n".join(f.read_text() for f in SQL_DIR.glob("*.sql"))
    return set(re.findall(r"create_reference_table\s*\(\s*'(\w+)'", text, re.I))


# -- the rules --------------------------------------------------------------------------------

Volatility = Callable[[str], set[str]]  # function name -> its overloads' provolatile ('i', 's', 'v')

LOCKS = "(?:no key update|update|key share|share)"
LOCK = re.compile(rf"\bfor {LOCKS}\b")
PARAM = re.compile(r"\$\d+")
PARAM_CAST = r"\$\d+(?:::\w+)?"  # a parameter, maybe cast (the cast applies to the value, not the column)
# SQL-standard functions written without parentheses: all STABLE.
VALUE_FUNCTIONS = re.compile(r"\b(current_timestamp|current_date|current_time|localtime|localtimestamp"
                             r"|current_user|session_user|current_role|current_schema|current_catalog)\b")
NOT_FUNCTIONS = {"in", "any", "all", "some", "exists", "values", "coalesce", "nullif", "greatest",
                 "least", "row", "array", "over", "filter", "as", "and", "or", "not", "on", "using",
                 "returning", "set", "where", "select", "from"}
KEYWORDS = {"null", "true", "false", "and", "or", "not", "is", "as", "distinct", "lit"}


def clean(query: str) -> str:
    """Lower case, comments and string contents removed, whitespace collapsed."""
    q = re.sub(r"--[^\n]*", " ", query)
    q = re.sub(r"/\*.*?\*/", " ", q, flags=re.S)
    q = re.sub(r"'(?:[^']|'')*'", "'lit'", q)
    q = re.sub(r"\$(\w*)\$.*?\$\1\$", "'lit'", q, flags=re.S)
    q = re.sub(r"\s+", " ", q).strip().lower()
    # The spelling of PostgreSQL's own foreign-key checks: FROM ONLY "public"."t" ... OPERATOR(pg_catalog.=)
    q = re.sub(r"operator\(pg_catalog\.(\S+?)\)", r"\1", q.replace('"', ""))
    return re.sub(r"\bfrom only ", "from ", q).replace("public.", "")


def _until_close(s: str, start: int, stop_words: tuple[str, ...] = ()) -> str:
    """s[start:] up to the parenthesis that closes the enclosing one (or a stop word at depth 0)."""
    depth = 0
    i = start
    while i < len(s):
        c = s[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                break
        elif depth == 0 and any(s.startswith(w, i) for w in stop_words):
            break
        i += 1
    return s[start:i]


def _calls(text: str) -> list[tuple[str, str]]:
    """(function name, argument text) of every call in `text`."""
    out = []
    for m in re.finditer(r"([a-z_][\w.]*)\s*\(", text):
        name = m[1].rsplit(".", 1)[-1]
        if name not in NOT_FUNCTIONS:
            out.append((name, _until_close(text, m.end())))
    return out


def _cast_operands(text: str) -> list[str]:
    """What each `::` cast and CAST(... AS ...) applies to."""
    out = []
    for m in re.finditer(r"::", text):
        before = text[:m.start()].rstrip()
        if before.endswith(")"):  # (expr)::type: the operand is the parenthesised expression
            depth, i = 0, len(before) - 1
            while i >= 0:
                depth += {")": 1, "(": -1}.get(before[i], 0)
                if depth == 0:
                    break
                i -= 1
            out.append(before[i:])
        else:
            out.append(re.split(r"[\s(,=+*/<>-]", before)[-1])
    out += [_until_close(text, m.end()).split(" as ")[0] for m in re.finditer(r"\bcast\s*\(", text)]
    return out


def _has_column(expr: str) -> bool:
    expr = re.sub(r"::\s*[\w\[\]]+", " ", PARAM.sub(" ", expr))
    names = re.findall(r"\b[a-z_][\w.]*\b(?!\s*\()", expr)
    return any(n not in KEYWORDS for n in names)


def _not_immutable(name: str, volatility: Volatility) -> bool:
    kinds = volatility(name)
    return bool(kinds) and kinds != {"i"}


def check(query: str, dist: dict[str, str], reference: set[str], volatility: Volatility) -> list[str]:
    """The Citus rules `query` breaks (empty: none)."""
    s = clean(query)
    problems: list[str] = []

    if LOCK.search(s):
        m = re.fullmatch(rf"select .*? from (.*?) where (.*?) for {LOCKS}\b.*", s)
        target = re.fullmatch(r"(\w+)(?: (?:as )?(\w+))?", m[1]) if m else None
        if m is None or target is None:
            problems.append("row lock outside a one-table SELECT ... WHERE: Citus refuses a lock that "
                            "spans shards")
        else:
            table, alias = target[1], target[2] or target[1]
            column = dist.get(table)
            where = m[2]
            if column is None:
                problems.append(f"row lock on {table}, which the migration does not distribute")
            elif not re.search(rf"(?:^|\band )(?:{alias}\.)?\"?{column}\"? = {PARAM_CAST}(?: and\b|$)",
                               where):
                problems.append(f"row lock on {table} not by equality on its distribution column {column}")
            # other conditions ANDed to that equality stay within its shard; an OR, a list or a
            # subquery on the distribution column may not
            elif re.search(rf"\bor\b|\(select\b|\b{column}\"? (?:= any|in) ?\(", where):
                problems.append(f"row lock on {table} by a condition that may span shards: {where}")

    for m in re.finditer(r"\bon conflict\b.*?\bdo update set\b", s):
        clause = _until_close(s, m.end(), (" where ", " returning "))
        problems += [f"DO UPDATE SET calls {name}(), which is not IMMUTABLE"
                     for name, _ in _calls(clause) if _not_immutable(name, volatility)]
        problems += [f"DO UPDATE SET uses {f}, which is STABLE" for f in VALUE_FUNCTIONS.findall(clause)]
        problems += [f"DO UPDATE SET casts {op!r}: cast parameters only"
                     for op in _cast_operands(clause) if not PARAM.fullmatch(op.strip("() "))]

    for m in re.finditer(r"(?<!do )\bupdate (?:only )?\w+(?: (?:as )?\w+)? set\b", s):
        body = _until_close(s, m.start())
        problems += [f"UPDATE casts {op!r}, a column expression: cast the parameter instead"
                     for op in _cast_operands(body) if _has_column(op)]
        problems += [f"UPDATE applies {name}(), which is not IMMUTABLE, to a column"
                     for name, args in _calls(body) if _not_immutable(name, volatility) and _has_column(args)]

    for table in reference:
        if re.search(rf"\b(?:from|join) {table}\b", s) and re.search(r"\(\s*select\b", s):
            problems.append(f"subquery in a statement over reference table {table}")
    return problems


# -- the rules catch what Citus refused ---------------------------------------------------------

# The examples below are the statements as Citus saw them, some on a table a later migration
# replaced (applied_ranges, distributed by source until 006): the rules are checked against it too.
AS_REFUSED = {"applied_ranges": "source"}

REFUSED = {  # evtool's statements that Citus 14 refused, as pg_stat_statements records them
    "lock several sources":
        "SELECT a.source, a.lines * int8multirange(int8range(w.low, w.high)) FROM applied_ranges a"
        " JOIN unnest($1::text[], $2::int8[], $3::int8[]) AS w(source, low, high) USING (source)"
        " ORDER BY a.source FOR UPDATE OF a",
    "cast a column in an UPDATE":
        "UPDATE applied_ranges a SET lines = a.lines + n.lines::int8multirange, updated_at = now()"
        " FROM unnest($1::text[], $2::text[]) AS n(source, lines) WHERE a.source = n.source",
    "now() in DO UPDATE SET":
        "WITH s AS MATERIALIZED (SELECT user_id, sum(adds) AS adds FROM batch_sums GROUP BY user_id),"
        " totals AS (INSERT INTO users_revenue AS u (user_id, revenue, events)"
        " SELECT user_id, added - subtracted, adds + subtracts FROM s ORDER BY user_id"
        " ON CONFLICT (user_id) DO UPDATE SET revenue = u.revenue + excluded.revenue,"
        " events = u.events + excluded.events, updated_at = now())"
        " INSERT INTO revenue_log (user_id, adds) SELECT user_id, adds FROM s",
    "lock by a list": "SELECT 1 FROM journal_files WHERE fingerprint = ANY($1) FOR UPDATE",
    "lock one source or another": "SELECT 1 FROM applied_lines WHERE source = $1 OR source = $2 FOR UPDATE",
    "lock not by the key": "SELECT 1 FROM rejected_lines WHERE path = $1 FOR UPDATE",
    "STABLE function on a column":
        "UPDATE journal_files SET path = to_char(updated_at, $1) WHERE fingerprint = $2",
    "CURRENT_TIMESTAMP in DO UPDATE SET":
        "INSERT INTO applied_ranges (source) VALUES ($1) ON CONFLICT (source) DO UPDATE"
        " SET updated_at = CURRENT_TIMESTAMP",
}
ACCEPTED = {
    "lock cells of one source": "SELECT cell, entries FROM applied_lines WHERE source = $1::text"
                                " AND cell = ANY($2::int8[]) ORDER BY cell FOR UPDATE",
    "lock one source": "SELECT lines * int8multirange(int8range($1, $2)) FROM applied_ranges"
                       " WHERE source = $3 FOR UPDATE",
    "cast the parameter": "UPDATE applied_ranges a SET lines = a.lines + n.lines, updated_at = now()"
                          " FROM unnest($1::text[], $2::int8multirange[]) AS n(source, lines)"
                          " WHERE a.source = n.source",
    "now() inserted": "INSERT INTO users_revenue AS u (user_id, revenue, events, updated_at)"
                      " SELECT user_id, 1, 1, now() FROM s ON CONFLICT (user_id) DO UPDATE"
                      " SET revenue = u.revenue + excluded.revenue, updated_at = excluded.updated_at",
    "lock with more conditions": 'SELECT 1 FROM journal_files j WHERE j.fingerprint = $1 AND "offset" > $2'
                                 " FOR UPDATE",
}


@pytest.fixture(scope="module")
def stats_server():
    """A server recording every statement (nested ones too) in pg_stat_statements."""
    server = Server.create(embedded_bindir(), {
        "shared_preload_libraries": "'pg_stat_statements'", "pg_stat_statements.track": "all",
        "pg_stat_statements.max": "5000"})
    server.start()
    server.execute("CREATE EXTENSION pg_stat_statements")
    yield server
    server.remove()


@pytest.fixture(scope="module")
def volatility(stats_server) -> Volatility:
    rows = stats_server.execute("SELECT proname, array_agg(DISTINCT provolatile::text) FROM pg_proc"
                                " GROUP BY proname")
    table = {name: set(kinds) for name, kinds in rows}
    return lambda name: table.get(name, set())


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_the_rules_catch_statements_citus_refuses(name, volatility):
    assert check(REFUSED[name], distribution() | AS_REFUSED, set(), volatility), name


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_the_rules_accept_what_citus_runs(name, volatility):
    assert check(ACCEPTED[name], distribution() | AS_REFUSED, set(), volatility) == []


def test_a_correlated_subquery_over_a_reference_table_is_caught(volatility):
    status = ("SELECT j.fingerprint, (SELECT count(*) FROM rejected_lines r"
              " WHERE r.fingerprint = j.fingerprint) FROM journal_files j ORDER BY j.path")
    assert check(status, distribution(), set(), volatility) == []
    assert check(status, distribution(), {"journal_files"}, volatility)


def test_every_statement_evtool_runs_keeps_to_the_citus_rules(stats_server, volatility, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv("EVTOOL_HOME", str(tmp_path / "home"))
    stats_server.execute("CREATE DATABASE rules")
    stats_server.execute("SELECT pg_stat_statements_reset()")
    workload.run(stats_server.dsn("rules"), tmp_path)
    queries = [q for (q,) in stats_server.execute(
        "SELECT query FROM pg_stat_statements"
        " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = 'rules')")]

    # The recording saw the statements the rules are about, so passing means something.
    cleaned = [clean(q) for q in queries]
    assert len(queries) > 25
    assert sum(bool(LOCK.search(q)) for q in cleaned) >= 2
    assert any(" do update set " in q for q in cleaned)
    assert any(q.startswith("update ") for q in cleaned)

    dist = distribution()
    problems = {q: p for q in queries if (p := check(q, dist, reference_tables(), volatility))}
    assert problems == {}, "\n".join(f"{'; '.join(p)}:\n    {q}" for q, p in problems.items())

    # Every table is distributed by the migration (schema_migrations, the migrator's own
    # bookkeeping, stays on the coordinator), and none is a reference table.
    with psycopg.connect(stats_server.dsn("rules")) as conn:
        tables = {t for (t,) in conn.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'")}
    assert tables - {"schema_migrations"} == set(dist)
    assert reference_tables() == set()


def test_the_distribution_migration_does_nothing_without_citus(dsn):
    """On plain PostgreSQL, 005 applies (recorded) and changes nothing."""
    from evtool.store import Store

    with Store.connect(dsn) as store:
        assert "005_citus.sql" in store.migrate()
        citus = store.conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'citus'").fetchone()
        assert citus == (0,)
        tables = store.conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
        assert tables == (len(distribution()) + 1,)


def test_migrations_split_into_statements_at_their_own_semicolons():
    """The migrator runs one statement per execute (Citus forwards a DDL's whole text to the
    workers): semicolons in strings, quoted names, dollar-quoted bodies and comments stay put."""
    from evtool.store import sql_statements

    text = "SELECT ';' ; -- a;b\nSELECT $x$ ; $x$;\n/* ; */ SELECT \"a;b\" FROM t;\n-- only a comment;\n"
    assert sql_statements(text) == ["SELECT ';'", "-- a;b\nSELECT $x$ ; $x$", '/* ; */ SELECT "a;b" FROM t']
    for f in SQL_DIR.glob("*.sql"):
        statements = sql_statements(f.read_text())
        assert statements and all(s.count("$$") % 2 == 0 for s in statements), f.name


def test_a_lost_worker_connection_relayed_by_citus_is_retried():
    """A coordinator relays a killed worker's lost connection as an internal error (XX000)."""
    from psycopg import errors

    from evtool.errors import DatabaseError, DatabaseUnavailable
    from evtool.store import _translate

    lost = errors.InternalError_("terminating connection due to unexpected postmaster exit")
    assert isinstance(_translate(lost), DatabaseUnavailable)
    # a worker killed inside a transaction that wrote through it (seen by test_citus's kill test)
    essential = errors.InternalError_("failure on connection marked as essential: 127.0.0.1:48707")
    assert isinstance(_translate(essential), DatabaseUnavailable)
    at_commit = errors.InternalError_("could not commit transaction for shard 102034 on at least one "
                                      "active node")
    assert isinstance(_translate(at_commit), DatabaseUnavailable)
    assert type(_translate(errors.InternalError_("could not find shard 7"))) is DatabaseError
