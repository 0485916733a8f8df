"""A query's session: its database, its experiments attached, its results streamed.

A watchdog interrupts a query that runs past its time limit (time spent waiting for the client
does not count) or whose client has gone away.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator

import duckdb
import pyarrow as pa
import pyarrow.flight as flight

from flight_server.catalog import Catalog
from flight_server.config import parse_size
from flight_server.errors import InvalidArgument, NotFound
from flight_server.sources import Run
from flight_server.sql.databases import DatabasePool, Limits, quote
from flight_server.sql.errors import translate
from flight_server.sql.tables import ReadContext, RunSource, runs_table

log = logging.getLogger(__name__)

TABLES = {
    "events": "one row per event of every run, with its `run` and `event` (index in the run)",
    "runs": "one row per run: events, bytes, start and end time, layout, columns",
}  # and "live/<stream>" for each live stream: the events it holds when the query starts
LIVE_PREFIX = "live/"

# experiment -> {stream: (its bytes, a snapshot of its events)}: the live streams a query may
# read; only those a query names are taken, for that query
LiveTables = Callable[[str], dict[str, tuple[int, Callable[[], pa.Table]]]]


class Session:
    """One query's database, holding exactly the experiments the query may use."""

    def __init__(self, pool: DatabasePool, experiments: dict[str, tuple[object, Loader]],
                 context: ReadContext,
                 live: dict[str, dict[str, Callable[[], pa.Table]]] | None = None) -> None:
        """`experiments`: name -> (its files as the catalog saw them, a loader of its runs);
        `live`: experiment -> {stream: its events now}, snapshots taken for this query."""
        self.pool = pool
        self.limits = pool.limits
        self._database = pool.take(set(experiments))
        self.con = self._database.con
        self._watchdogs: list[Watchdog] = []
        self._live: list[tuple[str, str]] = []  # (view, registered name), dropped at close
        self._healthy = False
        live_key = []
        try:
            self._sync(experiments, context)
            for experiment, streams in (live or {}).items():
                for stream, snapshot in sorted(streams.items()):
                    live_key.append((experiment, stream, self._add_live(experiment, stream,
                                                                        snapshot())))
            self._healthy = True
        finally:
            if not self._healthy:
                self.close()
        self.key = (tuple(sorted((e, files) for e, (files, _) in experiments.items())),
                    tuple(live_key))

    def _add_live(self, experiment: str, stream: str, table: pa.Table) -> str:
        """`<experiment>."live/<stream>"`: a snapshot of the stream's events, for this query."""
        registered = f"{experiment}/{LIVE_PREFIX}{stream}"
        view = f"{quote(experiment)}.{quote(LIVE_PREFIX + stream)}"
        self.con.register(registered, table)
        self._live.append((view, registered))
        self.con.execute(f"CREATE VIEW {view} AS SELECT * FROM {quote(registered)}")
        return table.schema.to_string(show_schema_metadata=False)

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
        if self.con is not None and self._live:
            try:  # a database lent again holds no other query's snapshot
                for view, registered in self._live:
                    self.con.execute(f"DROP VIEW IF EXISTS {view}")
                    self.con.unregister(registered)
            except duckdb.Error:
                self._healthy = False
            self._live = []
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
            raise translate(exc) from None

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
            return translate(exc)
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
                 may_read: Callable[[str], bool], context: ReadContext,
                 live_tables: LiveTables | None = None) -> Session:
    """A session with every readable experiment the query names (case-insensitive, as DuckDB
    resolves names), and their live streams. Names the caller may not read are left out, so
    they fail exactly as names that do not exist."""
    parsed = pool.parse(query)
    wanted = {name.lower() for name in parsed.schemas}
    experiments, live = {}, {}
    for name in catalog.experiments():
        if name.lower() in wanted and may_read(name):
            files = catalog.scan_experiment(name)
            experiments[name] = (tuple(sorted(files.items())),
                                 functools.partial(_runs, catalog, name, files))
            streams = live_tables(name) if live_tables is not None else {}
            taken = {s: _within(pool.limits, name, s, *table) for s, table in streams.items()
                     if (name.lower(), (LIVE_PREFIX + s).lower()) in parsed.tables}
            if taken:
                live[name] = taken
    return Session(pool, experiments, context, live)


def _within(limits: Limits, experiment: str, stream: str, nbytes: int,
            snapshot: Callable[[], pa.Table]) -> Callable[[], pa.Table]:
    """The snapshot, if the stream fits in a query's memory: a live table is read whole."""
    most = parse_size(limits.memory_limit)
    if nbytes > most:
        raise InvalidArgument(
            f'{experiment}."{LIVE_PREFIX}{stream}" holds {nbytes / 2**20:.0f} MiB, more than a '
            f"query may hold in memory ({limits.memory_limit}); subscribe to the stream with a "
            "filter instead, or query it once it has ended as a run")
    return snapshot


def _runs(catalog: Catalog, experiment: str, files: dict[int, object]) -> list[Run]:
    runs = []
    for number in sorted(files):
        try:
            runs.append(catalog.run(experiment, number))
        except (flight.FlightInternalError, NotFound) as exc:  # unreadable, or gone
            log.warning("sql: leaving out %s run %d: %s", experiment, number, exc)
    return runs
