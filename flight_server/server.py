"""The Flight RPC surface: decode what a call asks for once, dispatch it to the archive, SQL or
live service, and turn what comes back into a stream. All logic lives in the services."""

from __future__ import annotations

import fnmatch
import functools
import importlib.metadata
import json
import logging
import sys
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.flight as flight
from google.protobuf.message import Message

from flight_server import compression
from flight_server.archive.planning import Plan
from flight_server.archive.service import ACTIONS as ARCHIVE_ACTIONS
from flight_server.archive.service import ArchiveService
from flight_server.catalog import Catalog
from flight_server.cluster import placement
from flight_server.cluster.state import ClusterError, ClusterState, Node
from flight_server.cluster.users import UsersTable
from flight_server.config import Settings
from flight_server.errors import InvalidArgument
from flight_server.jobs.service import ACTIONS as JOB_ACTIONS
from flight_server.jobs.service import JobService
from flight_server.live.service import ACTIONS as LIVE_ACTIONS
from flight_server.live.service import LiveService, subscription_of
from flight_server.metrics import Metrics, MetricsServer
from flight_server.security import assembly, delegation, keys
from flight_server.security.middleware import MIDDLEWARE_KEY, CallRecord
from flight_server.security.policy import bind_to_certificate, only_for_jobs
from flight_server.sources import xtc2
from flight_server.sources.streaming import BatchSizing
from flight_server.sql.databases import Limits
from flight_server.sql.service import ACTIONS as SQL_ACTIONS
from flight_server.sql.service import UNSUPPORTED_ACTIONS, SqlService, sql_command
from schemas import Ticket, digest
from schemas import metadata as md
from schemas.json_input import excerpt
from schemas.live import Subscription

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
# what a mirror job's token may do besides producing: read its stream back, ask after its job
MIRROR_READS = frozenset({"do_get", "get_schema", "the action 'streams'", "the action 'job'"})

ACTIONS = {
    "whoami": "JSON {subject, issuer, grants, expires, certificate}: who the server takes you for",
    "health": "JSON {status, version, uptime_s, streams_active, jobs, cluster?}: is the server "
              "serving (a cluster node: its id, the nodes alive, whether the state answers)",
    delegation.ACTION: delegation.DESCRIPTION,
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
            call.sent((batch[0] if isinstance(batch, tuple) else batch).nbytes)
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
        self.compression = compression.parse_setting(settings.compression)  # fails early
        threading.Thread(target=xtc2.preload, name="psana-import", daemon=True).start()
        self.metrics = Metrics(_version())  # a registry of this server's own
        self.metrics_server: MetricsServer | None = None
        self.security = assembly.build(settings)
        self.security.middleware.metrics = self.metrics
        self.catalog = catalog or Catalog(settings.data,
                                          psana_calibration=settings.psana_calibration)
        self.sizing = BatchSizing(settings.batch_bytes, settings.first_batch_bytes,
                                  settings.prefetch, settings.request_memory)
        self.read_pool = ThreadPoolExecutor(settings.read_threads, thread_name_prefix="read")
        limits = Limits(settings.sql_timeout, settings.sql_memory_limit, settings.sql_threads,
                        spill_limit=settings.sql_spill_limit,
                        spill_root=settings.state_path() / "sql-spill")
        self.sql = SqlService(self.catalog, self.security.seal, self.sizing, self.read_pool,
                              limits, _version(), lambda e: self.live.sql_tables(e),
                              self.metrics)
        # a cluster's nodes share the data root: each stream is opened by the node that owns it
        owner = (lambda e, n: self.node.owner(e, n)) if settings.cluster else None
        self.live = LiveService(settings.data, settings.live(), self.catalog,
                                self.security.seal, self.sizing, owner)
        self.archive = ArchiveService(self.catalog, self.security.seal, self.sizing,
                                      self.read_pool, settings.partition_bytes)
        self.node: Node | None = None
        self.jobs: JobService | None = None
        self.metrics.watch_live(self.live.census)
        try:
            self.node = _cluster_node(settings)  # a cluster's: its keys checked before serving
            # (a cluster's job table is in the state the node has just reached)
            self.jobs = JobService(settings, self.catalog, self.live, self.security.minter,
                                   self.sizing)
            self.metrics.watch_jobs(self.jobs.store.counts)
            self.jobs.store.on_final = lambda job: self.metrics.job_finished(
                job.state, job.started, job.created, job.finished)
            if self.node is not None and self.security.middleware.users is not None:
                users = UsersTable(self.node.state)  # password logins: the cluster's users
                users.adopt(settings.users_path())
                self.security.middleware.users = users
            if settings.metrics_port is not None:  # /healthz says "starting" until jobs resume
                tls = (settings.tls_cert, settings.tls_key) if settings.tls_key else None
                self.metrics_server = MetricsServer(self.metrics, settings.host,
                                                    settings.metrics_port, tls)
                log.info("metrics: %s/metrics, health: /healthz",
                         self.metrics_server.url(settings.host))
            super().__init__(settings.location(),
                             middleware={MIDDLEWARE_KEY: self.security.middleware},
                             **{**self.security.server_options, **kwargs})
            own = settings.location().rsplit(":", 1)[0] + f":{self.port}"
            if self.node is not None:
                try:
                    self.node.join(settings.advertise or own)
                except ClusterError:
                    super().shutdown()  # bound already: release the port too
                    raise
                self.archive.locate = self._locate
                self.node.on_fenced = self._fenced
                self.metrics.watch_cluster(lambda: len(self.node.alive()),
                                           lambda: self.node.state_ok)
                # the jobs of every node, this one's included, on the scheduler they share
                self.jobs.start(self.node.location, self.node.id, settings.node_timeout_s)
            else:  # Jobs a restart interrupted resume now: their workers can reach the server.
                self.jobs.start(own)
            self.metrics.serving()
        except BaseException:  # the port is taken, say: release what was built
            self._close_services()
            raise

    def _fenced(self) -> None:
        """The state has been out of reach for long enough that the other nodes may count this
        one dead: let go of its live streams, then of its jobs, before they take them on."""
        self.live.streams.release_all()  # no batch is stored here from now on
        self.jobs.abandon()

    def _locate(self, partitions: list[str]) -> list[list[str]]:
        """The nodes that serve each partition of a plan: first, then a fallback."""
        return placement.spread(partitions, self.node.alive())

    def shutdown(self) -> None:
        if self.node is not None:
            self.node.leave()  # out of every new plan at once
        self.metrics.stopping()  # /healthz answers 503: load balancers send no new calls
        if self.jobs is not None:
            self.jobs.stop()  # running jobs stay running in the table: the next start resumes them
        self.live.stop()  # live calls end (clients resume elsewhere), else gRPC waits for them
        super().shutdown()
        self._close_services()

    def _close_services(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.jobs is not None:
            self.jobs.close()
        self.live.close()
        self.sql.close()
        self.read_pool.shutdown(wait=True, cancel_futures=True)
        self.catalog.close()
        self.security.close()

    # -- who is calling ----------------------------------------------------------------------

    def _call(self, context: flight.ServerCallContext, what: str) -> CallRecord:
        """The call's record, completed with what only the RPC context knows (peer, cert).
        `what` the call does: a job's token may only produce ("do_put")."""
        call: CallRecord = context.get_middleware(MIDDLEWARE_KEY)
        call.peer = context.peer()
        call.certificate = context.peer_identity().decode("utf-8", "replace")
        if self.settings.bind_token_to_certificate and call.identity.job is None:
            # A job's token is this server's own, for its workers, whose certificate TLS has
            # verified already: it names the job, not the certificate's holder.
            bind_to_certificate(call.identity, call.certificate)
        if what != "do_put":
            only_for_jobs(call.identity, what, reads=what in MIRROR_READS)
        return call

    # -- what is asked for: decoded once, here -----------------------------------------------

    def _descriptor(self, descriptor: flight.FlightDescriptor
                    ) -> tuple[str, Message | Subscription | None]:
        """("sql", command) | ("live", subscription) | ("archive", None)."""
        if descriptor.descriptor_type == flight.DescriptorType.CMD and \
                (command := sql_command(descriptor.command)) is not None:
            return "sql", command
        if (sub := subscription_of(descriptor)) is not None:
            return "live", sub
        return "archive", None

    def _ticket(self, raw: bytes) -> tuple[str, Message | Subscription | Ticket]:
        """("sql", command) | ("live", subscription) | ("archive", ticket): a Flight SQL
        ticket is a protobuf Any; ours are JSON, plain or sealed, and a live one names a
        stream."""
        if (command := sql_command(raw)) is not None:
            return "sql", command
        if (sub := self.live.ticket(raw)) is not None:
            return "live", sub
        return "archive", self.archive.open_ticket(raw)

    # -- planning ----------------------------------------------------------------------------

    @rpc
    def list_flights(self, context: flight.ServerCallContext,
                     criteria: bytes) -> Iterator[flight.FlightInfo]:
        call = self._call(context, "list_flights")
        try:
            pattern = criteria.decode().strip() if criteria else "*"
        except UnicodeDecodeError:
            raise InvalidArgument("ListFlights criteria must be an experiment name or glob "
                                  "in UTF-8, e.g. 'tmox*'") from None
        infos = self.archive.flight_infos(call.identity, pattern)
        infos += self.live.flight_infos(call.identity,
                                        lambda e: fnmatch.fnmatchcase(e, pattern))
        return iter(infos)

    @rpc
    def get_flight_info(self, context: flight.ServerCallContext,
                        descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        kind, what = self._descriptor(descriptor)
        call = self._call(context, "get_flight_info")
        if kind == "sql":
            return self.sql.flight_info(call.identity, what, descriptor)
        if kind == "live":
            return self.live.flight_info(call, what, descriptor)
        plan = self.archive.plan(call, descriptor)
        return self.archive.flight_info(plan, descriptor, self._wire_schema(plan, call))

    @rpc
    def get_schema(self, context: flight.ServerCallContext,
                   descriptor: flight.FlightDescriptor) -> flight.SchemaResult:
        kind, what = self._descriptor(descriptor)
        call = self._call(context, "get_schema")
        self.jobs.reads_own_stream(call.identity, kind, what)
        if kind == "sql":
            return flight.SchemaResult(self.sql.schema(call.identity, what))
        if kind == "live":
            return flight.SchemaResult(self.live.schema(call, what))
        plan = self.archive.plan(call, descriptor)
        return flight.SchemaResult(self._wire_schema(plan, call))

    def _wire_schema(self, plan: Plan, call: CallRecord) -> pa.Schema:
        """The plan's schema, its metadata saying what DoGet will compress with for this
        caller (`lclstream.compression`)."""
        wire = compression.resolve(plan.request.compression, plan.request.compression_level,
                                   self.compression, call.peer)
        return plan.schema.with_metadata({**(plan.schema.metadata or {}),
                                          md.COMPRESSION: wire.label.encode()})

    # -- data --------------------------------------------------------------------------------

    @rpc
    def do_get(self, context: flight.ServerCallContext,
               ticket: flight.Ticket) -> flight.FlightDataStream:
        call = self._call(context, "do_get")
        kind, what = self._ticket(ticket.ticket)
        self.jobs.reads_own_stream(call.identity, kind, what)
        if kind == "sql":  # a Flight SQL ticket has no room for options: the server's default
            wire = compression.resolve(None, None, self.compression, call.peer)
            call.streaming(kind)
            schema, batches = self.sql.do_get(call.identity, what, context.is_cancelled)
        else:
            call.streaming(kind)
            wire = compression.resolve(what.compression, what.compression_level,
                                       self.compression, call.peer)
            if kind == "live":
                schema, batches = self.live.do_get(call, what, context.is_cancelled)
            else:
                schema, batches = self.archive.do_get(call, what, context.is_cancelled)
        options = wire.ipc_options()
        if options is None:
            return flight.GeneratorStream(schema, _guard_stream(batches, call))
        if kind == "archive":  # compressed on the call's own thread, off the GIL
            return flight.GeneratorStream(schema, compression.off_the_gil(
                schema, _guard_stream(batches, call), options))
        return flight.GeneratorStream(schema, _guard_stream(batches, call), options=options)

    @rpc
    def do_put(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor,
               reader: flight.MetadataRecordBatchReader,
               writer: flight.FlightMetadataWriter) -> None:
        call = self._call(context, "do_put")
        kind, what = self._descriptor(descriptor)
        if kind == "sql":
            only_for_jobs(call.identity, "Flight SQL")
            return self.sql.do_put(call.identity, what, reader, writer)
        if kind == "live" and descriptor.descriptor_type == flight.DescriptorType.PATH:
            call.streaming(kind)
            return self.live.do_put(call, what, reader, writer, context.is_cancelled)
        raise pa.ArrowNotImplementedError(
            "DoPut takes a live stream's path [experiment, 'live', stream], or Flight SQL "
            "prepared-statement parameters")

    # -- actions -----------------------------------------------------------------------------

    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return [*ACTIONS.items(), *ARCHIVE_ACTIONS.items(), *LIVE_ACTIONS.items(),
                *JOB_ACTIONS.items(), *SQL_ACTIONS.items()]

    @rpc
    def do_action(self, context: flight.ServerCallContext,
                  action: flight.Action) -> Iterator[bytes]:
        record: CallRecord = context.get_middleware(MIDDLEWARE_KEY)
        known = [*ACTIONS, *ARCHIVE_ACTIONS, *LIVE_ACTIONS, *JOB_ACTIONS, *SQL_ACTIONS]
        # counted by type in the metrics; a name the server does not know, as one: bounded
        record.action = action.type if action.type in known or \
            action.type in UNSUPPORTED_ACTIONS else "unknown"
        call = self._call(context, f"the action {excerpt(action.type)}")
        if action.type in JOB_ACTIONS:
            return self.jobs.do_action(call, action)
        if action.type in SQL_ACTIONS:
            return self.sql.do_action(call.identity, action)
        if action.type in LIVE_ACTIONS:
            return self.live.do_action(call, action)
        if action.type in UNSUPPORTED_ACTIONS:
            raise pa.ArrowNotImplementedError(f"the action {action.type} is not supported")
        if action.type == "experiments":
            return iter([json.dumps(self.archive.experiments(call.identity)).encode()])
        if action.type == digest.ACTION:
            body = action.body.to_pybytes() if action.body is not None else b""
            summed = self.archive.digest(call, body, context.is_cancelled)
            return iter([json.dumps(summed.to_json()).encode()])
        if action.type == "health":
            body = self.metrics.health()
            if self.node is not None:
                body["cluster"] = self.node.describe()
            return iter([json.dumps(body).encode()])
        if action.type == "whoami":
            who = call.identity
            body = {"subject": who.subject, "issuer": who.issuer, "grants": who.grants.to_claim(),
                    "expires": who.expires, "certificate": call.certificate or None}
            return iter([json.dumps(body).encode()])
        if action.type == delegation.ACTION:
            body = action.body.to_pybytes() if action.body is not None else b""
            reply = delegation.narrow_token(call, self.security.minter, body)
            return iter([json.dumps(reply).encode()])
        raise InvalidArgument(f"unknown action {excerpt(action.type)}; actions: "
                              f"{', '.join(known)}")


def _cluster_node(settings: Settings) -> Node | None:
    if not settings.cluster:
        return None
    if not settings.state_url:
        raise ValueError("a cluster node needs the shared state: --state-url "
                         "postgresql://USER@HOST:5432/DATABASE (state_url)")
    if not settings.advertise and settings.host in ("0.0.0.0", "::"):
        raise ClusterError(f"a node listening on {settings.host} must say where clients reach "
                           "it: --advertise grpc+tls://HOST:PORT")
    node = Node(ClusterState(settings.state_url), settings.heartbeat_s,
                settings.node_timeout_s)
    node.check_keys(keys.shared_keys(settings.state_path(), settings.token_algorithm,
                                     settings.auth))
    return node


def _version() -> str:
    try:
        return importlib.metadata.version("lclstream-flight")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
