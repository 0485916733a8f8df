"""The Flight RPC surface: decode, delegate, return a stream. All logic lives elsewhere."""

from __future__ import annotations

import fnmatch
import functools
import importlib.metadata
import json
import logging
import sys
import traceback
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.flight as flight
from google.protobuf.message import Message

from flight_server import requests, security, shaping
from flight_server.auth import MIDDLEWARE_KEY, CallRecord, authorize, bind_to_certificate
from flight_server.catalog import Catalog
from flight_server.config import Settings
from flight_server.errors import InvalidArgument, NotFound
from flight_server.live.service import ACTIONS as LIVE_ACTIONS
from flight_server.live.service import LiveService, subscription_of
from flight_server.sql.databases import Limits
from flight_server.sql.service import ACTIONS as SQL_ACTIONS
from flight_server.sql.service import UNSUPPORTED_ACTIONS, SqlService, sql_command
from flight_server.streaming import BatchSizing, stream_batches

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

ACTIONS = {
    "experiments": "JSON list of {experiment, runs} for every experiment the caller may read",
    "whoami": "JSON {subject, issuer, grants, expires, certificate}: who the server takes you for",
}


def _internal(exc: BaseException) -> flight.FlightInternalError:
    incident = uuid.uuid4().hex[:12]
    # An explicit limit: sys.tracebacklimit is 0 in the server (see LclstreamServer).
    log.error("internal error %s:\n%s", incident,
              "".join(traceback.format_exception(exc, limit=64)))
    return flight.FlightInternalError(f"internal server error (incident {incident} in the log)")


def _expected(exc: BaseException) -> bool:
    return isinstance(exc, pa.ArrowException | flight.FlightError)


MAX_MESSAGE_CHARS = 2000  # gRPC drops a status whose message passes its ~16 KiB header limit,
# and the client would see RESOURCE_EXHAUSTED "Stream removed" instead of the real error


def _bounded(exc: BaseException) -> BaseException:
    """The error itself, or one of the same class whose message is cut to MAX_MESSAGE_CHARS."""
    text = str(exc)
    if len(text) <= MAX_MESSAGE_CHARS:
        return exc
    short = f"{text[:MAX_MESSAGE_CHARS]}... (message cut: {len(text)} characters)"
    try:
        return type(exc)(short)
    except Exception:  # an exception class with another signature
        return flight.FlightServerError(short)


def rpc(method: F) -> F:
    """Let typed errors through with their status; turn anything else into INTERNAL, logged."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except Exception as exc:
            if _expected(exc):
                raise _bounded(exc) from None  # the call's audit line records it
            raise _internal(exc) from None

    return wrapper  # type: ignore[return-value]


def _guard_stream(batches: Iterator[pa.RecordBatch | tuple[pa.RecordBatch, bytes]],
                  call: CallRecord) -> Iterator[pa.RecordBatch | tuple[pa.RecordBatch, bytes]]:
    try:
        for batch in batches:  # a live stream's come with their delivery metadata
            call.bytes_sent += (batch[0] if isinstance(batch, tuple) else batch).nbytes
            yield batch
    except Exception as exc:
        if _expected(exc):
            log.info("do_get failed mid-stream: %s", str(exc)[:MAX_MESSAGE_CHARS])
            raise _bounded(exc) from None
        raise _internal(exc) from None


class LclstreamServer(flight.FlightServerBase):
    def __init__(self, settings: Settings, catalog: Catalog | None = None, **kwargs: Any) -> None:
        # pyarrow appends the Python traceback of any server exception to the message the client
        # sees; with tracebacklimit 0 only "Type: message" is appended. Our own logging passes an
        # explicit limit and keeps full tracebacks.
        sys.tracebacklimit = 0
        # Every service is ready before the port is bound (pyarrow listens from the base
        # class's __init__ on): until then a client gets UNAVAILABLE, as for a server not yet
        # started, and resumes; never an answer from a half-built server. Recovering large
        # live streams can take a while.
        self.settings = settings
        self.security = security.build(settings)
        self.catalog = catalog or Catalog(settings.data)
        self.sizing = BatchSizing(settings.batch_bytes, settings.first_batch_bytes,
                                  settings.prefetch, settings.request_memory)
        self.read_pool = ThreadPoolExecutor(settings.read_threads, thread_name_prefix="read")
        limits = Limits(settings.sql_timeout, settings.sql_memory_limit, settings.sql_threads,
                        spill_limit=settings.sql_spill_limit,
                        spill_root=settings.state_path() / "sql-spill")
        self.sql = SqlService(self.catalog, self.security.seal, self.sizing, self.read_pool,
                              limits, _version())
        self.live = LiveService(settings.data, settings.live(), self.catalog,
                                self.security.seal, self.sizing)
        try:
            super().__init__(settings.location(),
                             middleware={MIDDLEWARE_KEY: self.security.middleware},
                             **{**self.security.server_options, **kwargs})
        except BaseException:  # the port is taken, say: release what was built
            self._close_services()
            raise

    def shutdown(self) -> None:
        self.live.stop()  # live calls end (clients resume elsewhere), else gRPC waits for them
        super().shutdown()
        self._close_services()

    def _close_services(self) -> None:
        self.live.close()
        self.sql.close()
        self.read_pool.shutdown(wait=True, cancel_futures=True)
        self.catalog.close()
        self.security.close()

    # -- who is calling ----------------------------------------------------------------------

    def _call(self, context: flight.ServerCallContext) -> CallRecord:
        """The call's record, completed with what only the RPC context knows (peer, cert)."""
        call: CallRecord = context.get_middleware(MIDDLEWARE_KEY)
        call.peer = context.peer()
        call.certificate = context.peer_identity().decode("utf-8", "replace")
        if self.settings.bind_token_to_certificate:
            bind_to_certificate(call.identity, call.certificate)
        return call

    @staticmethod
    def _may_read(call: CallRecord, experiment: str, run: int | None = None) -> None:
        call.experiment, call.run = experiment, run
        authorize(call.identity, experiment, "read")

    # -- planning ----------------------------------------------------------------------------

    def _flight_info(self, plan: requests.Plan,
                     descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        endpoints = [flight.FlightEndpoint(self.security.seal.seal(p.ticket), [])
                     for p in plan.partitions]
        return flight.FlightInfo(plan.schema, descriptor, endpoints, plan.total_records,
                                 plan.total_bytes, ordered=True)

    def _plan(self, context: flight.ServerCallContext,
              descriptor: flight.FlightDescriptor) -> requests.Plan:
        call = self._call(context)
        request = requests.request_from_descriptor(descriptor)
        self._may_read(call, request.experiment,
                       request.runs[0] if len(request.runs) == 1 else None)
        return requests.plan(request, self.catalog, self.settings.partition_bytes,
                             lambda e: call.identity.may(e, "read"), self.sizing.event_budget)

    @rpc
    def list_flights(self, context: flight.ServerCallContext,
                     criteria: bytes) -> Iterator[flight.FlightInfo]:
        call = self._call(context)
        try:
            pattern = criteria.decode().strip() if criteria else "*"
        except UnicodeDecodeError:
            raise InvalidArgument("ListFlights criteria must be an experiment name or glob "
                                  "in UTF-8, e.g. 'tmox*'") from None
        found = self.catalog.scan()
        infos = []
        for experiment in found:
            if not fnmatch.fnmatchcase(experiment, pattern):
                continue
            if not call.identity.may(experiment, "read"):
                continue
            for number in sorted(found[experiment]):
                descriptor = flight.FlightDescriptor.for_path(experiment, str(number))
                request = requests.request_from_descriptor(descriptor)
                try:
                    plan = requests.plan(request, self.catalog, self.settings.partition_bytes)
                    infos.append(self._flight_info(plan, descriptor))
                except (flight.FlightInternalError, NotFound) as exc:  # unreadable, or gone
                    log.warning("list_flights: skipping %s run %d: %s", experiment, number, exc)
        infos += self.live.flight_infos(call.identity,
                                        lambda e: fnmatch.fnmatchcase(e, pattern))
        return iter(infos)

    @staticmethod
    def _sql(descriptor: flight.FlightDescriptor) -> Message | None:
        if descriptor.descriptor_type != flight.DescriptorType.CMD:
            return None
        return sql_command(descriptor.command)

    @rpc
    def get_flight_info(self, context: flight.ServerCallContext,
                        descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        if (command := self._sql(descriptor)) is not None:
            return self.sql.flight_info(self._call(context).identity, command, descriptor)
        if (sub := subscription_of(descriptor)) is not None:
            return self.live.flight_info(self._call(context), sub, descriptor)
        return self._flight_info(self._plan(context, descriptor), descriptor)

    @rpc
    def get_schema(self, context: flight.ServerCallContext,
                   descriptor: flight.FlightDescriptor) -> flight.SchemaResult:
        if (command := self._sql(descriptor)) is not None:
            return flight.SchemaResult(self.sql.schema(self._call(context).identity, command))
        if (sub := subscription_of(descriptor)) is not None:
            return flight.SchemaResult(self.live.schema(self._call(context), sub))
        return flight.SchemaResult(self._plan(context, descriptor).schema)

    # -- data --------------------------------------------------------------------------------

    @rpc
    def do_get(self, context: flight.ServerCallContext,
               ticket: flight.Ticket) -> flight.FlightDataStream:
        call = self._call(context)
        if (command := sql_command(ticket.ticket)) is not None:
            schema, batches = self.sql.do_get(call.identity, command, context.is_cancelled)
            return flight.GeneratorStream(schema, _guard_stream(batches, call))
        if (sub := self.live.ticket(ticket.ticket)) is not None:
            schema, deliveries = self.live.do_get(call, sub, context.is_cancelled)
            return flight.GeneratorStream(schema, _guard_stream(deliveries, call))
        t = self.security.seal.open(ticket.ticket)
        self._may_read(call, t.experiment, t.run)
        run = self.catalog.run(t.experiment, t.run, lambda e: call.identity.may(e, "read"))
        columns = run.resolve(t.columns)
        if t.stop > run.num_events:
            raise InvalidArgument(f"ticket range [{t.start}:{t.stop}] is beyond run {t.run}'s "
                                  f"{run.num_events} events; plan again with GetFlightInfo")
        shaped = shaping.build(run, columns, t.filter, t.processing, self.sizing.event_budget)
        if shaped is None:  # the common case: batches go out exactly as read
            batches = stream_batches(run, columns, t.start, t.stop, t.step, self.sizing,
                                     self.read_pool, context.is_cancelled)
            return flight.GeneratorStream(run.schema(columns), _guard_stream(batches, call))
        batches = stream_batches(run, shaped.read, t.start, t.stop, t.step, self.sizing,
                                 self.read_pool, context.is_cancelled, shaped.apply,
                                 shaped.work_per_event)
        kept = (b for b in batches if b.num_rows)  # a filter can empty a batch
        return flight.GeneratorStream(shaped.schema, _guard_stream(kept, call))

    # -- actions -----------------------------------------------------------------------------

    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return [*ACTIONS.items(), *LIVE_ACTIONS.items(), *SQL_ACTIONS.items()]

    @rpc
    def do_put(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor,
               reader: flight.MetadataRecordBatchReader,
               writer: flight.FlightMetadataWriter) -> None:
        call = self._call(context)
        if (command := self._sql(descriptor)) is not None:
            return self.sql.do_put(call.identity, command, reader, writer)
        if (sub := subscription_of(descriptor)) is not None and \
                descriptor.descriptor_type == flight.DescriptorType.PATH:
            return self.live.do_put(call, sub, reader, writer)
        raise pa.ArrowNotImplementedError(
            "DoPut takes a live stream's path [experiment, 'live', stream], or Flight SQL "
            "prepared-statement parameters")

    @rpc
    def do_action(self, context: flight.ServerCallContext,
                  action: flight.Action) -> Iterator[bytes]:
        call = self._call(context)
        if action.type in SQL_ACTIONS:
            return self.sql.do_action(call.identity, action)
        if action.type in LIVE_ACTIONS:
            return self.live.do_action(call, action)
        if action.type in UNSUPPORTED_ACTIONS:
            raise pa.ArrowNotImplementedError(f"the action {action.type} is not supported")
        if action.type == "experiments":
            found = self.catalog.scan()
            body = [{"experiment": e, "runs": sorted(r)} for e, r in found.items()
                    if call.identity.may(e, "read")]
            return iter([json.dumps(body).encode()])
        if action.type == "whoami":
            who = call.identity
            body = {"subject": who.subject, "issuer": who.issuer, "grants": who.grants.to_claim(),
                    "expires": who.expires, "certificate": call.certificate or None}
            return iter([json.dumps(body).encode()])
        raise InvalidArgument(f"unknown action '{action.type}'; actions: "
                              f"{', '.join([*ACTIONS, *LIVE_ACTIONS, *SQL_ACTIONS])}")


def _version() -> str:
    try:
        return importlib.metadata.version("lclstream-flight")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
