"""Archived runs over Flight: plan a request into endpoints (GetFlightInfo, GetSchema), stream a
sealed ticket's events (DoGet), list runs (ListFlights, the `experiments` action).

Tickets are sealed and not capabilities: DoGet opens the seal, then checks again that the caller
may read the experiment and that the run still has the events the ticket names.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Executor

import pyarrow as pa
import pyarrow.flight as flight

from flight_server.archive import planning
from flight_server.catalog import Catalog
from flight_server.errors import InvalidArgument, NotFound, Unsupported
from flight_server.processing import transform
from flight_server.security.middleware import CallRecord
from flight_server.security.policy import Identity, authorize
from flight_server.security.tickets import TicketSeal
from flight_server.sources.streaming import BatchSizing, stream_batches
from schemas import RequestError, Ticket, digest, parse_request, resume

log = logging.getLogger(__name__)

ACTIONS = {
    "experiments": "JSON list of {experiment, runs} for every experiment the caller may read",
    digest.ACTION: "a request (as GetFlightInfo takes it) -> JSON {sha256, events}: "
                   "the content digest of what DoGet of its endpoints returns, in order "
                   "(schemas/digest.py); a mirror compares it with what it received",
}


class ArchiveService:
    def __init__(self, catalog: Catalog, seal: TicketSeal, sizing: BatchSizing,
                 pool: Executor, partition_bytes: int) -> None:
        self.catalog = catalog
        self.seal = seal
        self.sizing = sizing
        self.read_pool = pool
        self.partition_bytes = partition_bytes
        # a cluster: the nodes that should serve each partition of a plan, in order (None:
        # this server)
        self.locate: Callable[[list[str]], list[list[str]]] | None = None

    @staticmethod
    def _may_read(call: CallRecord, experiment: str, run: int | None = None) -> None:
        call.experiment, call.run = experiment, run
        authorize(call.identity, experiment, "read")

    # -- planning ----------------------------------------------------------------------------

    def plan(self, call: CallRecord, descriptor: flight.FlightDescriptor) -> planning.Plan:
        request = planning.request_from_descriptor(descriptor)
        self._may_read(call, request.experiment,
                       request.runs[0] if len(request.runs) == 1 else None)
        return planning.plan(request, self.catalog, self.partition_bytes,
                             lambda e: call.identity.may(e, "read"), self.sizing.event_budget)

    def flight_info(self, plan: planning.Plan, descriptor: flight.FlightDescriptor,
                    schema: pa.Schema | None = None) -> flight.FlightInfo:
        """`schema`: the plan's, with what only the server knows added (compression)."""
        tickets = [p.ticket for p in plan.partitions]
        endpoints = [flight.FlightEndpoint(self.seal.seal(t), where)
                     for t, where in zip(tickets, self._locations(tickets), strict=True)]
        return flight.FlightInfo(plan.schema if schema is None else schema, descriptor,
                                 endpoints, plan.total_records, plan.total_bytes, ordered=True)

    def _locations(self, tickets: list[Ticket]) -> list[list[str]]:
        if self.locate is None:
            return [[] for _ in tickets]
        # the partitions, not the request: the same events go to the same node's page cache
        return self.locate([f"{t.experiment}/{t.run}/{t.source or ''}/{t.table or ''}/"
                            f"{t.start}:{t.stop}:{t.step}" for t in tickets])

    def flight_infos(self, identity: Identity, pattern: str) -> list[flight.FlightInfo]:
        """Every run of every readable experiment whose name matches the glob, and the other
        forms of the runs that have one (path [experiment, run, source])."""
        found = self.catalog.scan()
        infos = []
        for experiment in found:
            if not fnmatch.fnmatchcase(experiment, pattern):
                continue
            if not identity.may(experiment, "read"):
                continue
            sources = self.catalog.sources(experiment)
            for number in sorted(found[experiment]):
                for source in (None, *sources.get(number, {})):
                    path = (experiment, str(number)) + ((source,) if source else ())
                    descriptor = flight.FlightDescriptor.for_path(*path)
                    request = planning.request_from_descriptor(descriptor)
                    try:
                        plan = planning.plan(request, self.catalog, self.partition_bytes)
                        infos.append(self.flight_info(plan, descriptor))
                    except (flight.FlightInternalError, NotFound, Unsupported) as exc:
                        # unreadable, gone, or xtc2 on a server without psana
                        log.warning("list_flights: skipping %s: %s", "/".join(path), exc)
        return infos

    def experiments(self, identity: Identity) -> list[dict]:
        found = self.catalog.scan()
        return [{"experiment": e, "runs": sorted(r)} for e, r in found.items()
                if identity.may(e, "read")]

    # -- data --------------------------------------------------------------------------------

    def open_ticket(self, raw: bytes) -> Ticket:
        """A ticket this server sealed, or a resume ticket: a sealed one, from the event where
        a broken-off DoGet stopped (schemas/resume.py)."""
        try:
            resumed = resume.parse_resume(raw)
        except RequestError as exc:
            raise InvalidArgument(str(exc)) from None
        if resumed is None:
            return self.seal.open(raw)
        sealed, at = resumed
        ticket = self.seal.open(sealed)
        on_grid = (at - ticket.start) % ticket.step == 0 or at == ticket.stop
        if not ticket.start <= at <= ticket.stop or not on_grid:
            raise InvalidArgument(
                f"cannot resume from event {at}: the ticket's events are range({ticket.start}, "
                f"{ticket.stop}, {ticket.step}); resume from the 'next' its last batch carried")
        return dataclasses.replace(ticket, start=at)

    def do_get(self, call: CallRecord, ticket: Ticket, is_cancelled: Callable[[], bool]
               ) -> tuple[pa.Schema, Iterator[tuple[pa.RecordBatch, bytes]]]:
        """The schema and batches of a ticket the caller may (still) read, each batch with its
        app_metadata: the event a resumed DoGet starts from after it (schemas/resume.py)."""
        self._may_read(call, ticket.experiment, ticket.run)
        return self._batches(call, ticket, is_cancelled)

    def digest(self, call: CallRecord, body: bytes, is_cancelled: Callable[[], bool]
               ) -> digest.RunDigest:
        """The digest of everything DoGet of the request's endpoints would send, read again
        now: equal to a mirror's only if the run did not change while it was copied."""
        try:
            request = parse_request(body)
        except RequestError as exc:
            raise InvalidArgument(f"the body of {digest.ACTION}: {exc}") from None
        self._may_read(call, request.experiment,
                       request.runs[0] if len(request.runs) == 1 else None)
        plan = planning.plan(request, self.catalog, self.partition_bytes,
                             lambda e: call.identity.may(e, "read"), self.sizing.event_budget)
        summed = digest.Digest(plan.schema)
        for partition in plan.partitions:
            _, batches = self._batches(call, partition.ticket, is_cancelled)
            for batch, _ in batches:
                summed.update(batch)
        return summed.result()

    def _batches(self, call: CallRecord, ticket: Ticket, is_cancelled: Callable[[], bool]
                 ) -> tuple[pa.Schema, Iterator[tuple[pa.RecordBatch, bytes]]]:
        run = self.catalog.run(ticket.experiment, ticket.run,
                               lambda e: call.identity.may(e, "read"), ticket.table,
                               ticket.source)
        columns = run.resolve(ticket.columns)
        if ticket.stop > run.num_events:
            raise InvalidArgument(f"ticket range [{ticket.start}:{ticket.stop}] is beyond the "
                                  f"{run.num_events} events of {run.describe()}; plan again "
                                  "with GetFlightInfo")
        shaped = transform.build(run, columns, ticket.filter, ticket.processing,
                                 self.sizing.event_budget)
        if shaped is None:  # the common case: batches go out exactly as read
            batches = stream_batches(run, columns, ticket.start, ticket.stop, ticket.step,
                                     self.sizing, self.read_pool, is_cancelled)
            return run.schema(columns), ((b, _progress(ticket, end)) for b, end in batches)
        batches = stream_batches(run, shaped.read, ticket.start, ticket.stop, ticket.step,
                                 self.sizing, self.read_pool, is_cancelled, shaped.apply,
                                 shaped.work_per_event)
        # a filter can empty a batch: it is not sent, and a resume reads its range again
        return shaped.schema, ((b, _progress(ticket, end)) for b, end in batches if b.num_rows)


def _progress(ticket: Ticket, end: int) -> bytes:
    """The app_metadata of a batch that covered the ticket's events below `end`: the first
    event of the ticket's range(start, stop, step) at or after it."""
    ahead = -(-(end - ticket.start) // ticket.step)  # ceiling division
    return resume.progress(min(ticket.start + ahead * ticket.step, ticket.stop))
