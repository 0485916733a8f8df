"""DuckDB, locked down, one in-memory database per running query.

A query has a database to itself, holding only the experiments it names that the caller may
read, so one user's query never sees another's tables, and the memory limit is per query.
Creating a DuckDB database costs ~17 ms and attaching an experiment a few more, more than a
small query, so finished databases go back to a pool with their experiments attached. A
database cannot touch the file system, load extensions or change its own settings; only a
single SELECT is accepted, so nothing is ever written. A watchdog interrupts a query that runs
past its time limit (time spent waiting for the client does not count) or whose client has
gone away.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.flight as flight

from flight_server.catalog import Catalog
from flight_server.errors import InvalidArgument, NotFound
from flight_server.sources import Run
from flight_server.sql.tables import ReadContext, RunSource, runs_table

log = logging.getLogger(__name__)

TABLES = {
    "events": "one row per event of every run, with its `run` and `event` (index in the run)",
    "runs": "one row per run: events, bytes, start and end time, layout, columns",
}


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


class QueryError:
    """DuckDB's exception classes -> Flight status, with DuckDB's own message (it is good)."""

    @staticmethod
    def translate(exc: duckdb.Error, query_time_limit: float) -> Exception:
        message = str(exc)
        if isinstance(exc, duckdb.InterruptException):
            return flight.FlightCancelledError("query cancelled")
        if isinstance(exc, duckdb.CatalogException):
            return NotFound(f"{message}\nTables are <experiment>.events and <experiment>.runs "
                            "for experiments you may read (quote names with '-' or '.').")
        if isinstance(exc, duckdb.PermissionException):
            return flight.FlightUnauthorizedError(
                f"{message} (queries may read experiment tables only)")
        if isinstance(exc, duckdb.OutOfMemoryException):
            return flight.FlightServerError(f"query exceeded its memory limit: {message}")
        if isinstance(exc, duckdb.InternalException | duckdb.FatalException):
            return flight.FlightInternalError(f"query failed: {message}")
        return InvalidArgument(message)


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
        raise QueryError.translate(exc, 0) from None
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


class Session:
    """One query's database, holding exactly the experiments the query may use."""

    def __init__(self, pool: DatabasePool, experiments: dict[str, tuple[object, Loader]],
                 context: ReadContext) -> None:
        """`experiments`: name -> (its files as the catalog saw them, a loader of its runs)."""
        self.pool = pool
        self.limits = pool.limits
        self._database = pool.take(set(experiments))
        self.con = self._database.con
        self._watchdogs: list[Watchdog] = []
        self._healthy = False
        try:
            self._sync(experiments, context)
            self._healthy = True
        finally:
            if not self._healthy:
                self.close()
        self.key = tuple(sorted((e, files) for e, (files, _) in experiments.items()))

    def _sync(self, experiments: dict[str, tuple[object, Loader]], context: ReadContext) -> None:
        attached = self._database.attached
        for name in list(attached):
            if name not in experiments or attached[name][0] != experiments[name][0]:
                self._detach(name)
        for name, (files, load) in experiments.items():
            if name not in attached:
                attached[name] = (files, self._attach(name, load()))
            for source in attached[name][1]:
                source.context = context  # reads of this query: its cancel check, its pool

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for watchdog in self._watchdogs:
            watchdog.stop()
        if self.con is not None:
            self.con = None  # type: ignore[assignment]
            self.pool.give_back(self._database, self._healthy)

    def _attach(self, experiment: str, runs: list[Run]) -> list[RunSource]:
        """`<experiment>.events` and `<experiment>.runs` as views over the runs' sources."""
        schema = quote(experiment)
        self.con.execute(f"CREATE SCHEMA {schema}")
        sources, parts = [], []
        for run in runs:
            source = RunSource(run, None)
            self.con.register(_source_name(experiment, run.number), source)
            sources.append(source)
            parts.append(f"SELECT {run.number}::INTEGER AS run, * "
                         f"FROM {quote(_source_name(experiment, run.number))}")
        if not parts:
            parts = ["SELECT NULL::INTEGER AS run, NULL::BIGINT AS event WHERE false"]
        self.con.execute(f"CREATE VIEW {schema}.events AS " + " UNION ALL BY NAME ".join(parts))
        self.con.register(f"{experiment}/runs", runs_table(runs))
        self.con.execute(f"CREATE VIEW {schema}.runs AS SELECT * FROM "
                         f"{quote(experiment + '/runs')}")
        return sources

    def sources(self, schema_name: str) -> list[RunSource] | None:
        """The run sources of an attached experiment, named as DuckDB would resolve it."""
        for name, (_, sources) in self._database.attached.items():
            if name.lower() == schema_name.lower():
                return sources
        return None

    def _detach(self, experiment: str) -> None:
        _, sources = self._database.attached.pop(experiment)
        self.con.execute(f"DROP SCHEMA {quote(experiment)} CASCADE")
        for source in sources:
            self.con.unregister(_source_name(experiment, source.run.number))
        self.con.unregister(f"{experiment}/runs")

    def schema(self, query: str, params: list[object] | None = None) -> pa.Schema:
        """The result schema, without running the query (LIMIT 0 is planned away)."""
        try:
            relation = self.con.sql(query, params=params or None)
            return relation.limit(0).to_arrow_table().schema
        except duckdb.Error as exc:
            raise QueryError.translate(exc, self.limits.timeout_s) from None

    def batches(self, query: str, params: list[object] | None,
                is_cancelled: Callable[[], bool]) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
        """The result as a stream: DuckDB computes each batch as it is asked for."""
        watchdog = Watchdog(self.con, self.limits.timeout_s, is_cancelled)
        self._watchdogs.append(watchdog)
        try:
            with watchdog.running():
                relation = self.con.sql(query, params=params or None)
                reader = relation.to_arrow_reader(self.limits.result_batch_rows)
        except duckdb.Error as exc:
            watchdog.stop()
            raise watchdog.explain(exc) from None
        return reader.schema, self._pull(reader, watchdog)

    def _pull(self, reader: pa.RecordBatchReader,
              watchdog: Watchdog) -> Iterator[pa.RecordBatch]:
        try:
            while True:
                try:
                    with watchdog.running():
                        batch = reader.read_next_batch()
                except StopIteration:
                    return
                except (duckdb.Error, pa.ArrowException) as exc:
                    raise watchdog.explain(exc) from None
                yield batch
        finally:
            watchdog.stop()
            reader.close()


class Watchdog:
    """Interrupts the query when its engine time runs out or its client has gone.

    Engine time counts only while DuckDB is computing (inside `running()`), so a slow network or
    a client that reads at its own pace is never mistaken for a slow query."""

    POLL_S = 0.1

    def __init__(self, con: duckdb.DuckDBPyConnection, limit_s: float,
                 is_cancelled: Callable[[], bool]) -> None:
        self.con = con
        self.limit_s = limit_s
        self.is_cancelled = is_cancelled
        self.used_s = 0.0
        self.reason: str | None = None
        self._since: float | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="sql-watchdog", daemon=True)
        self._thread.start()

    def running(self) -> _Running:
        return _Running(self)

    def stop(self) -> None:
        self._stopped.set()

    def explain(self, exc: Exception) -> Exception:
        if self.reason == "timeout":
            return flight.FlightTimedOutError(
                f"query ran past its time limit of {self.limit_s:g} s and was stopped; narrow "
                "it (WHERE run = ..., fewer columns) or ask for a higher sql_timeout")
        if self.reason == "cancelled":
            return flight.FlightCancelledError("query cancelled by the client")
        if isinstance(exc, duckdb.Error):
            return QueryError.translate(exc, self.limit_s)
        return InvalidArgument(str(exc))

    def _watch(self) -> None:
        while not self._stopped.wait(self.POLL_S):
            with self._lock:
                running_for = 0.0 if self._since is None else time.monotonic() - self._since
                over = self.used_s + running_for > self.limit_s
            reason = "timeout" if over else "cancelled" if self.is_cancelled() else None
            if reason:
                self.reason = reason
                log.info("interrupting query: %s", reason)
                self.con.interrupt()
                return


class _Running:
    def __init__(self, watchdog: Watchdog) -> None:
        self.watchdog = watchdog

    def __enter__(self) -> None:
        with self.watchdog._lock:
            self.watchdog._since = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        w = self.watchdog
        with w._lock:
            if w._since is not None:
                w.used_s += time.monotonic() - w._since
            w._since = None


Loader = Callable[[], list[Run]]


def _source_name(experiment: str, run: int) -> str:
    return f"{experiment}/run/{run}"


def open_session(catalog: Catalog, pool: DatabasePool, query: str,
                 may_read: Callable[[str], bool], context: ReadContext) -> Session:
    """A session with every readable experiment the query names (case-insensitive, as DuckDB
    resolves names). Names the caller may not read are left out, so they fail exactly as
    names that do not exist."""
    wanted = {name.lower() for name in pool.parse(query).schemas}
    experiments = {}
    for name in catalog.experiments():
        if name.lower() in wanted and may_read(name):
            files = catalog.scan_experiment(name)
            experiments[name] = (tuple(sorted(files.items())),
                                 functools.partial(_runs, catalog, name, files))
    return Session(pool, experiments, context)


def _runs(catalog: Catalog, experiment: str, files: dict[int, object]) -> list[Run]:
    runs = []
    for number in sorted(files):
        try:
            runs.append(catalog.run(experiment, number))
        except (flight.FlightInternalError, NotFound) as exc:  # unreadable, or gone
            log.warning("sql: leaving out %s run %d: %s", experiment, number, exc)
    return runs
