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
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import duckdb

from flight_server.errors import InvalidArgument
from flight_server.sql.errors import translate
from flight_server.sql.tables import RunSource
from schemas.json_input import excerpt


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 300.0  # engine time per query, not counting time waiting for the client
    memory_limit: str = "2GB"
    threads: int = 2
    result_batch_rows: int = 65536  # rows per result batch when the rows are small
    spill_limit: str = "1GB"  # what one query may spill to disk beyond memory_limit
    spill_root: Path | None = None  # where each database's private spill directory is made


def _locked_config(limits: Limits, spill_dir: Path | None) -> dict[str, object]:
    return {
        "enable_external_access": False,  # no files, no ATTACH, no COPY, no INSTALL
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "allow_community_extensions": False,
        "allow_unsigned_extensions": False,
        "memory_limit": limits.memory_limit,
        "threads": limits.threads,
        # DuckDB lets a query read its temp directory even without external access (it must
        # spill there), so each database has its own, lent to one query at a time.
        "temp_directory": str(spill_dir) if spill_dir is not None else "",
        "max_temp_directory_size": limits.spill_limit if spill_dir is not None else "0B",
        "lock_configuration": True,  # last: SET can no longer undo any of the above
    }



@dataclass
class _Database:
    """A locked-down database and the connection that holds its registered run sources."""

    db: duckdb.DuckDBPyConnection
    con: duckdb.DuckDBPyConnection
    attached: dict[str, tuple[object, list[RunSource]]]  # experiment -> (files, sources)
    spill_dir: Path

    def spilled(self) -> bool:
        """Whether a query left spill files (DuckDB removes them when it frees the blocks)."""
        return any(self.spill_dir.iterdir())

    def close(self) -> None:
        self.con.close()
        self.db.close()
        shutil.rmtree(self.spill_dir, ignore_errors=True)


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
        self._parser = duckdb.connect(":memory:", config=_locked_config(Limits(), None))
        self.spill_root = Path(limits.spill_root or tempfile.gettempdir())
        self._parsed: OrderedDict[str, Parsed] = OrderedDict()
        try:  # the first database now: settings DuckDB refuses stop the start, not each query
            self.give_back(self.take(set()), healthy=True)
        except duckdb.Error as exc:
            self.close()
            raise ValueError(f"the SQL settings (sql_memory_limit, sql_spill_limit, "
                             f"sql_threads) are not valid: {exc}") from None

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
        self.spill_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        spill_dir = Path(tempfile.mkdtemp(prefix="query-", dir=self.spill_root))  # 0700
        try:
            db = duckdb.connect(":memory:", config=_locked_config(self.limits, spill_dir))
        except BaseException:
            shutil.rmtree(spill_dir, ignore_errors=True)
            raise
        return _Database(db, db.cursor(), {}, spill_dir)

    def give_back(self, database: _Database, healthy: bool) -> None:
        # A database whose spill directory is not empty is never lent again: the next query,
        # perhaps another user's, could otherwise read what this one spilled.
        reuse = healthy and not database.spilled()
        with self._lock:
            if reuse and len(self._idle) < self.keep:
                self._idle.append(database)
                return
        database.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for database in idle:
            database.close()
        self._parser.close()


PARSE_CACHE = 512


@dataclass(frozen=True)
class Parsed:
    schemas: frozenset[str]  # schema names of the tables the query names
    tables: frozenset[tuple[str, str]]  # (schema, table) of those, lower case
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
    try:
        kind = statements[0].type
    except ValueError:  # a statement type newer than DuckDB's Python enum ("CONNECT")
        kind = None
    if kind is not duckdb.StatementType.SELECT:
        name = kind.name if kind is not None else "non-SELECT"
        raise InvalidArgument(f"only SELECT queries are served (this is a {name} "
                              "statement); experiment data is read-only")
    try:
        tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [query]).fetchone()[0])
    except RecursionError:
        raise InvalidArgument("the query is nested too deeply; simplify it") from None
    if tree.get("error"):
        raise InvalidArgument(f"{tree.get('error_type', 'parser')} error: "
                              f"{tree.get('error_message')}")
    tables = _checked_tables(tree)
    return Parsed(frozenset(schema for schema, _ in tables), frozenset(
        (schema.lower(), table.lower()) for schema, table in tables),
        len(statements[0].named_parameters), tree)


# Table functions a query may call: those that make rows from their arguments, and those that
# describe the query's own database (its experiments' views and columns). Every other one reads
# files or describes the server: duckdb_settings() shows its directories, glob() lists its
# spill files, query() runs SQL this parser never saw.
INTROSPECTION = frozenset({"duckdb_tables", "duckdb_views", "duckdb_columns", "duckdb_schemas",
                           "duckdb_types", "duckdb_functions", "duckdb_keywords",
                           "duckdb_constraints", "pragma_table_info"})
TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest"}) | INTROSPECTION
# Functions and tables that describe the host or the engine rather than the data.
HIDDEN_PREFIXES = ("duckdb_", "pragma_", "sqlite_", "pg_")
HIDDEN_FUNCTIONS = frozenset({"current_setting", "getvariable", "getenv"})


def _checked_tables(tree: dict) -> set[tuple[str, str]]:
    """(schema, table) of the qualified tables a query names, once it is known to call no
    function that reaches beyond its own experiments' data."""
    found: set[tuple[str, str]] = set()
    todo: list[object] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, list):
            todo.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        kind = node.get("type")
        if kind == "BASE_TABLE":
            name = str(node.get("table_name", ""))
            qualified = bool(node.get("schema_name"))
            if qualified:
                found.add((node["schema_name"], name))
            hidden = name.lower().startswith(HIDDEN_PREFIXES) and name.lower() not in INTROSPECTION
            if hidden or (not qualified and ("/" in name or "." in name)):  # a file's name
                raise InvalidArgument(f"the table {excerpt(name, 60)} is not available: queries "
                                      "read <experiment>.events and <experiment>.runs, not the "
                                      "server's files or settings")
        elif kind == "TABLE_FUNCTION":
            name = str((node.get("function") or {}).get("function_name", "")).lower()
            if name not in TABLE_FUNCTIONS:
                raise InvalidArgument(
                    f"the table function {excerpt(name, 60)} is not available: queries read "
                    "<experiment>.events and <experiment>.runs, not the server's files or "
                    f"settings (table functions: {', '.join(sorted(TABLE_FUNCTIONS))})")
        elif node.get("class") == "FUNCTION":
            name = str(node.get("function_name", "")).lower()
            if name in HIDDEN_FUNCTIONS or (name.startswith(HIDDEN_PREFIXES)
                                            and name not in INTROSPECTION):
                raise InvalidArgument(f"the function {excerpt(name, 60)} is not available: "
                                      "queries see their experiments' data, not the server")
        todo.extend(node.values())
    return found


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
