"""Locked-down DuckDB databases, lent to one query at a time, and the query parser.

A query has a database to itself, holding only the experiments it names that the caller may
read, so one user's query never sees another's tables, and the memory limit is per query.
Creating a DuckDB database costs ~17 ms and attaching an experiment a few more, more than a
small query, so finished databases go back to a pool with their experiments attached. A
database cannot touch the file system, load extensions or change its own settings; the parser
accepts a single SELECT only, so nothing is ever written.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import duckdb

from flight_server.errors import InvalidArgument
from flight_server.sql.errors import translate
from flight_server.sql.tables import RunSource


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 300.0  # engine time per query, not counting time waiting for the client
    memory_limit: str = "2GB"
    threads: int = 2
    result_batch_rows: int = 65536  # rows per result batch when the rows are small


def _locked_config(limits: Limits) -> dict[str, object]:
    return {
        "enable_external_access": False,  # no files, no ATTACH, no COPY, no INSTALL
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "allow_community_extensions": False,
        "allow_unsigned_extensions": False,
        "memory_limit": limits.memory_limit,
        "threads": limits.threads,
        "lock_configuration": True,  # last: SET can no longer undo any of the above
    }



@dataclass
class _Database:
    """A locked-down database and the connection that holds its registered run sources."""

    db: duckdb.DuckDBPyConnection
    con: duckdb.DuckDBPyConnection
    attached: dict[str, tuple[object, list[RunSource]]]  # experiment -> (files, sources)


class DatabasePool:
    """Locked-down databases lent to one query at a time.

    A database keeps the experiments its last query attached: the next query that names the same
    experiments, unchanged on disk, reuses them (attaching costs more than a small query).
    Before a database is lent, every experiment the new query does not name, or may not read,
    is dropped, so a query only ever sees its own experiments."""

    def __init__(self, limits: Limits, keep: int = 4) -> None:
        self.limits = limits
        self.keep = keep
        self._idle: list[_Database] = []
        self._lock = threading.Lock()
        self._parser = duckdb.connect(":memory:", config=_locked_config(Limits()))
        self._parsed: OrderedDict[str, Parsed] = OrderedDict()

    @property
    def idle(self) -> int:
        """Databases waiting for a query: one comes back each time a query ends, however."""
        with self._lock:
            return len(self._idle)

    def parse(self, query: str) -> Parsed:
        """The query's schemas and parameter count; refuses anything but one SELECT statement.
        Remembered: a query is parsed for planning, again for DoGet, and often repeated."""
        with self._lock:
            hit = self._parsed.get(query)
            if hit is not None:
                self._parsed.move_to_end(query)
                return hit
        with self._parser.cursor() as con:
            parsed = _parse(con, query)
        with self._lock:
            self._parsed[query] = parsed
            if len(self._parsed) > PARSE_CACHE:
                self._parsed.popitem(last=False)
        return parsed

    def take(self, wanted: set[str]) -> _Database:
        """The idle database that already holds most of `wanted`, or a new one."""
        with self._lock:
            if self._idle:
                best = max(self._idle, key=lambda d: len(wanted & d.attached.keys()))
                self._idle.remove(best)
                return best
        db = duckdb.connect(":memory:", config=_locked_config(self.limits))
        return _Database(db, db.cursor(), {})

    def give_back(self, database: _Database, healthy: bool) -> None:
        with self._lock:
            if healthy and len(self._idle) < self.keep:
                self._idle.append(database)
                return
        database.con.close()
        database.db.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for database in idle:
            database.con.close()
            database.db.close()
        self._parser.close()


PARSE_CACHE = 512


@dataclass(frozen=True)
class Parsed:
    schemas: frozenset[str]  # schema names of the tables the query names
    parameters: int  # `?` / `$name` placeholders
    tree: dict  # DuckDB's parse tree (json_serialize_sql)


def _parse(con: duckdb.DuckDBPyConnection, query: str) -> Parsed:
    try:
        statements = con.extract_statements(query) if query.strip() else []
    except duckdb.Error as exc:
        raise translate(exc) from None
    if len(statements) != 1:
        raise InvalidArgument(f"send exactly one SELECT statement per query "
                              f"(got {len(statements)})")
    if statements[0].type is not duckdb.StatementType.SELECT:
        kind = statements[0].type.name
        raise InvalidArgument(f"only SELECT queries are served (this is a {kind} "
                              "statement); experiment data is read-only")
    tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [query]).fetchone()[0])
    if tree.get("error"):
        raise InvalidArgument(f"{tree.get('error_type', 'parser')} error: "
                              f"{tree.get('error_message')}")
    found: set[str] = set()
    _walk_tables(tree, found)
    return Parsed(frozenset(found), len(statements[0].named_parameters), tree)


def _walk_tables(node: object, found: set[str]) -> None:
    if isinstance(node, dict):
        if node.get("type") == "BASE_TABLE" and node.get("schema_name"):
            found.add(node["schema_name"])
        for value in node.values():
            _walk_tables(value, found)
    elif isinstance(node, list):
        for value in node:
            _walk_tables(value, found)


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
