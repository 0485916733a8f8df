"""Flight SQL on the Flight server: commands in, DuckDB results out as streams.

The server hands any descriptor, ticket, action or DoPut whose payload is a Flight SQL message
(a protobuf Any) to this module. Queries run when DoGet asks for their results, never at
GetFlightInfo, which only plans the query to return its schema; the result is streamed batch by
batch as DuckDB produces it. Commands this server does not support answer UNIMPLEMENTED
(`pyarrow.ArrowNotImplementedError`), which drivers such as ADBC rely on to fall back.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Executor

import pyarrow as pa
import pyarrow.flight as flight
from google.protobuf.message import Message

import schemas.flight_sql as fsql
from flight_server.catalog import Catalog
from flight_server.errors import InvalidArgument
from flight_server.metrics import Metrics
from flight_server.security.policy import Identity
from flight_server.security.tickets import TicketSeal
from flight_server.sources.streaming import BatchSizing
from flight_server.sql import direct, handles, metadata
from flight_server.sql.databases import DatabasePool, Limits, quote
from flight_server.sql.engine import LIVE_PREFIX, TABLES, LiveTables, Session, open_session
from flight_server.sql.handles import Statement
from flight_server.sql.tables import ReadContext
from schemas.json_input import excerpt

log = logging.getLogger(__name__)

CREATE_PREPARED = "CreatePreparedStatement"
CLOSE_PREPARED = "ClosePreparedStatement"
ACTIONS = {
    CREATE_PREPARED: "Flight SQL: prepare a query (handle, result schema)",
    CLOSE_PREPARED: "Flight SQL: close a prepared statement",
}
# Standard actions that drivers send and that need no answer here but UNIMPLEMENTED.
UNSUPPORTED_ACTIONS = frozenset({
    "BeginTransaction", "EndTransaction", "BeginSavepoint", "EndSavepoint", "CancelQuery",
    "CreatePreparedSubstraitPlan", "CancelFlightInfo", "RenewFlightEndpoint",
    "SetSessionOptions", "GetSessionOptions", "CloseSession",
})
METADATA_COMMANDS = ("CommandGetCatalogs", "CommandGetDbSchemas", "CommandGetTables",
                     "CommandGetTableTypes", "CommandGetSqlInfo", "CommandGetXdbcTypeInfo")
SCHEMA_CACHE = 512
UNSUPPORTED = "this server is read-only SQL over experiment runs; {} is not supported"


def _name(message: Message) -> str:
    return message.DESCRIPTOR.name


def sql_command(payload: bytes) -> Message | None:
    """The Flight SQL message in a descriptor command, ticket or action body; None for our own
    JSON (or anything else that is not a Flight SQL `Any`)."""
    try:
        return fsql.unpack(payload)
    except fsql.UnknownCommand as exc:
        raise pa.ArrowNotImplementedError(
            f"Flight SQL command {excerpt(str(exc))} is not supported") from None
    except fsql.MalformedCommand as exc:
        raise InvalidArgument(f"malformed Flight SQL command: {excerpt(str(exc), 200)}") from None


class SqlService:
    def __init__(self, catalog: Catalog, seal: TicketSeal, sizing: BatchSizing, pool: Executor,
                 limits: Limits, version: str, live_tables: LiveTables | None = None,
                 metrics: Metrics | None = None) -> None:
        self.catalog = catalog
        self.metrics = metrics
        self.live_tables = live_tables
        self.seal = seal
        self.sizing = sizing
        self.read_pool = pool
        self.databases = DatabasePool(limits)
        self.version = version
        self._schemas: OrderedDict[tuple, pa.Schema] = OrderedDict()
        self._lock = threading.Lock()

    def close(self) -> None:
        self.databases.close()

    # -- planning: GetFlightInfo / GetSchema -------------------------------------------------

    def flight_info(self, who: Identity, command: Message,
                    descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        schema, ticket = self._plan(who, command)
        endpoint = flight.FlightEndpoint(fsql.pack(ticket), [])
        return flight.FlightInfo(schema, descriptor, [endpoint], -1, -1, ordered=True)

    def schema(self, who: Identity, command: Message) -> pa.Schema:
        return self._plan(who, command)[0]

    def _plan(self, who: Identity, command: Message) -> tuple[pa.Schema, Message]:
        name = _name(command)
        if name == "CommandStatementQuery":
            statement = Statement(command.query, who.subject, who.issuer)
        elif name == "CommandPreparedStatementQuery":
            statement = handles.open_statement(command.prepared_statement_handle, self.seal, who)
        elif name in METADATA_COMMANDS:
            return self._metadata(who, command).schema, command  # the ticket is the command
        else:
            raise pa.ArrowNotImplementedError(UNSUPPORTED.format(name))
        schema = self._result_schema(who, statement)
        ticket = fsql.TicketStatementQuery(statement_handle=handles.seal(statement, self.seal))
        return schema, ticket

    def _result_schema(self, who: Identity, statement: Statement) -> pa.Schema:
        with self._session(who, statement.query, lambda: False) as session:
            return self._schema(session, statement.query, statement.rows()[0])

    def _schema(self, session: Session, query: str, params: list[object]) -> pa.Schema:
        """Remembered per query, parameter types and experiment files: drivers plan the same
        query several times (prepare, then GetFlightInfo), and BI tools repeat queries."""
        key = (query, tuple(type(p).__name__ for p in params), session.key)
        with self._lock:
            schema = self._schemas.get(key)
        if schema is None:
            schema = session.schema(query, params)
            with self._lock:
                self._schemas[key] = schema
                if len(self._schemas) > SCHEMA_CACHE:
                    self._schemas.popitem(last=False)
        return schema

    # -- results: DoGet ----------------------------------------------------------------------

    def do_get(self, who: Identity, ticket: Message, is_cancelled: Callable[[], bool],
               ) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
        """The result's schema and its batches, produced as they are asked for."""
        name = _name(ticket)
        if name in METADATA_COMMANDS:
            table = self._metadata(who, ticket)
            return table.schema, iter(table.to_batches())
        if name != "TicketStatementQuery":
            raise pa.ArrowNotImplementedError(UNSUPPORTED.format(name))
        statement = handles.open_statement(ticket.statement_handle, self.seal, who)
        return self._stream(who, statement, is_cancelled)

    def _stream(self, who: Identity, statement: Statement, is_cancelled: Callable[[], bool],
                ) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
        rows = statement.rows()
        started = time.perf_counter()
        session = self._session(who, statement.query, is_cancelled)
        try:
            schema, first = self._results(session, statement.query, rows[0], is_cancelled)
        except BaseException as exc:
            session.close()
            self._observe(started, exc)
            raise

        def batches() -> Iterator[pa.RecordBatch]:
            ended: BaseException | None = None
            try:
                yield from first
                for params in rows[1:]:  # one result per parameter row, one after another
                    yield from self._results(session, statement.query, params, is_cancelled)[1]
            except BaseException as exc:  # GeneratorExit too: the client went away
                ended = exc
                raise
            finally:
                session.close()
                self._observe(started, ended)

        stream = batches()
        # A generator dropped before its first batch never runs its `finally`: close then too.
        weakref.finalize(stream, session.close)
        return schema, stream

    def _observe(self, started: float, ended: BaseException | None) -> None:
        """A query's time, and why it stopped early if it did, for the metrics."""
        if self.metrics is None:
            return
        cancelled = None
        if isinstance(ended, flight.FlightTimedOutError):
            cancelled = "timeout"
        elif isinstance(ended, flight.FlightCancelledError | GeneratorExit):
            cancelled = "client"
        self.metrics.sql_query(time.perf_counter() - started, cancelled)

    def _results(self, session: Session, query: str, params: list[object],
                 is_cancelled: Callable[[], bool]) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
        """A plain selection of events streams from the sources; the rest runs in DuckDB."""
        selection = direct.recognise(self.databases.parse(query).tree, params)
        if selection is not None:
            schema = self._schema(session, query, params)  # also: DuckDB's checks and errors
            sources = session.sources(selection.schema_name)
            batches = None if sources is None else direct.stream(selection, sources, schema)
            if batches is not None:
                log.debug("plain selection, streamed from the sources: %s", query)
                return schema, batches
        return session.batches(query, params, is_cancelled)

    def _session(self, who: Identity, query: str, is_cancelled: Callable[[], bool]) -> Session:
        context = ReadContext(self.sizing, self.read_pool, is_cancelled)
        return open_session(self.catalog, self.databases, query, lambda e: who.may(e, "read"),
                            context, self.live_tables)

    # -- prepared statements: DoAction / DoPut -----------------------------------------------

    def do_action(self, who: Identity, action: flight.Action) -> Iterator[bytes]:
        command = sql_command(action.body.to_pybytes())
        if action.type == CREATE_PREPARED and command is not None \
                and _name(command) == "ActionCreatePreparedStatementRequest":
            return iter([fsql.pack(self._prepare(who, command.query))])
        if action.type == CLOSE_PREPARED and command is not None \
                and _name(command) == "ActionClosePreparedStatementRequest":
            handles.open_statement(command.prepared_statement_handle, self.seal, who)
            return iter([])  # stateless: nothing to free
        raise pa.ArrowNotImplementedError(UNSUPPORTED.format(f"the action {action.type}"))

    def _prepare(self, who: Identity, query: str) -> Message:
        statement = Statement(query, who.subject, who.issuer)
        count = self._parameter_count(query)
        schema = b""
        if count == 0:  # with parameters the result types may depend on their values
            schema = self._result_schema(who, statement).serialize().to_pybytes()
        return fsql.ActionCreatePreparedStatementResult(
            prepared_statement_handle=handles.seal(statement, self.seal), dataset_schema=schema)

    def _parameter_count(self, query: str) -> int:
        return self.databases.parse(query).parameters  # also refuses anything but one SELECT

    def do_put(self, who: Identity, command: Message, reader: flight.MetadataRecordBatchReader,
               writer: flight.FlightMetadataWriter) -> None:
        name = _name(command)
        if name != "CommandPreparedStatementQuery":
            raise pa.ArrowNotImplementedError(UNSUPPORTED.format(name))
        statement = handles.open_statement(command.prepared_statement_handle, self.seal, who)
        parameters = handles.read_parameters(reader)
        bound = handles.with_parameters(statement, parameters,
                                        self._parameter_count(statement.query))
        result = fsql.DoPutPreparedStatementResult(
            prepared_statement_handle=handles.seal(bound, self.seal))
        writer.write(pa.py_buffer(result.SerializeToString()))

    # -- catalog commands --------------------------------------------------------------------

    def _metadata(self, who: Identity, command: Message) -> pa.Table:
        name = _name(command)
        readable = [e for e in self.catalog.scan() if who.may(e, "read")]
        if name == "CommandGetCatalogs":
            return metadata.catalogs()
        if name == "CommandGetDbSchemas":
            return metadata.db_schemas(readable, _optional(command, "db_schema_filter_pattern"))
        if name == "CommandGetTables":
            schema_pattern = _optional(command, "db_schema_filter_pattern")
            table_pattern = _optional(command, "table_name_filter_pattern")
            live = {e: self._live_tables(e) for e in readable}
            schemas = None
            if command.include_schema:
                match = metadata.Like(schema_pattern)
                schemas = self._table_schemas(who, [e for e in readable if match.fullmatch(e)],
                                              live)
            return metadata.tables(readable, schema_pattern, table_pattern,
                                   list(command.table_types), schemas, live)
        if name == "CommandGetTableTypes":
            return metadata.table_types()
        if name == "CommandGetSqlInfo":
            return metadata.sql_info(list(command.info), self.version)
        if name == "CommandGetXdbcTypeInfo":
            return metadata.xdbc_type_info(_optional(command, "data_type"))
        raise pa.ArrowNotImplementedError(UNSUPPORTED.format(name))

    def _live_tables(self, experiment: str) -> list[str]:
        if self.live_tables is None:
            return []
        return [LIVE_PREFIX + name for name in sorted(self.live_tables(experiment))]

    def _table_schemas(self, who: Identity, experiments: list[str],
                       live: dict[str, list[str]]) -> dict[str, pa.Schema]:
        schemas = {}
        for experiment in experiments:
            for table in [*TABLES, *live.get(experiment, [])]:
                query = f"SELECT * FROM {quote(experiment)}.{quote(table)}"
                with self._session(who, query, lambda: False) as session:
                    schemas[f"{experiment}.{table}"] = session.schema(query)
        return schemas


def _optional(message: Message, field: str) -> object | None:
    return getattr(message, field) if message.HasField(field) else None
