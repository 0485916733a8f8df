"""Mirror jobs: what their Dask tasks do to copy another site's runs, or follow one of its live
streams, into a local stream, as any producer does (tasks.Target).

Runs: `copy` reads the source's endpoints in order, resuming a broken-off DoGet where it
stopped, and sends each batch with `seq` = the job ordinal just past its last source event
(as `tasks` does for local jobs), so a restarted job resumes after what the stream holds.
`verify` then asks the source for the digest of the same request, read again there, and
compares it with the digest of what the local stream holds: a source that changed while it was
copied, or a copy that differs, fails the job before the stream becomes a run.

Live streams: `follow` joins a consumer group of the job's own at the source and sends each
batch with `seq` = the source offset just past it. The group is committed only up to what the
local stream has acknowledged, so after either server is killed the group delivers again what
was not yet stored, and what was stored is recognised by its offset and skipped: every event
once. Batches must be stored in the source's order; a delivery that skips ahead (a member of an
earlier attempt still holds the batches before it) is given back, and asked for again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.flight as flight

from clients.client import EndpointReader
from clients.credentials import BearerToken
from clients.live import Producer, Subscription, action
from flight_server.jobs.tasks import Target, Written, connect_target
from flight_server.sources import ranges
from schemas import Request, parse_ticket
from schemas.digest import ACTION as DIGEST
from schemas.digest import Digest, RunDigest
from schemas.live import Subscription as LiveRequest

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 30.0  # planning at the source: an unreachable one fails the job this soon
PATIENCE_S = 120.0  # a source restarting or a link down: how long a transfer keeps retrying
COMMIT_EVERY_S = 1.0  # a follower commits its group at the source at most this often
REDELIVERY_WAIT_S = 1.0  # after giving back a delivery that skipped ahead


class MirrorFailed(RuntimeError):
    """The copy is not what the source holds (the job fails; retrying would not help)."""


@dataclass(frozen=True)
class Source:
    """The other site's server, and the credentials the job was given for it."""

    location: str
    token: str | None
    tls_roots: bytes | None

    def connect(self) -> flight.FlightClient:
        options: dict = {}
        if self.token:
            options["middleware"] = [BearerToken(self.token)]
        if self.tls_roots:
            options["tls_root_certs"] = self.tls_roots
        return flight.connect(self.location, **options)


@dataclass(frozen=True)
class Endpoint:
    """One endpoint of the source's plan: its sealed ticket and the events it covers."""

    ticket: bytes
    start: int
    stop: int
    step: int

    @property
    def records(self) -> int:
        return ranges.count(self.start, self.stop, self.step)


def _options() -> flight.FlightCallOptions:
    return flight.FlightCallOptions(timeout=CALL_TIMEOUT_S)


def plan(source: Source, request: Request) -> tuple[pa.Schema, list[Endpoint]]:
    """The source's plan for the request (GetFlightInfo there): its schema and endpoints."""
    with source.connect() as remote:
        info = remote.get_flight_info(flight.FlightDescriptor.for_command(request.encode()),
                                      _options())
    endpoints = []
    for endpoint in info.endpoints:
        raw = endpoint.ticket.ticket
        # A sealed ticket is its v1 JSON, a '.', and the source's MAC (schemas/request.py):
        # the events it covers are readable, not alterable.
        ticket = parse_ticket(raw.rpartition(b".")[0])
        endpoints.append(Endpoint(raw, ticket.start, ticket.stop, ticket.step))
    return info.schema, endpoints


def stream_schema(source: Source, request: LiveRequest) -> pa.Schema:
    """The schema of the live stream the mirror follows (GetSchema at the source)."""
    with source.connect() as remote:
        descriptor = flight.FlightDescriptor.for_command(request.encode())
        return remote.get_schema(descriptor, _options()).schema


# -- runs ---------------------------------------------------------------------------------------

def copy(source: Source, endpoints: list[Endpoint], done: int, target: Target) -> Written:
    """Every source event from job ordinal `done` on, into the target stream."""
    events = nbytes = 0
    total = sum(e.records for e in endpoints)
    started = time.monotonic()
    with source.connect() as remote, connect_target(target) as local:
        producer = Producer(local, target.experiment, target.stream,
                            producer_id=target.producer, reconnect_for=30.0)
        for seq, batch in _batches(remote, endpoints, done):
            producer.send(batch, seq=seq)
            events += batch.num_rows
            nbytes += batch.nbytes
        producer.close()  # every batch acknowledged: durable in the stream
    log.info("mirror into %s/%s: copied %d events (%d bytes) in %.1f s", target.experiment,
             target.stream, events, nbytes, time.monotonic() - started)
    return Written(total, events, nbytes)


def _batches(remote: flight.FlightClient, endpoints: list[Endpoint], done: int
             ) -> Iterator[tuple[int, pa.RecordBatch]]:
    ordinal = 0
    for endpoint in endpoints:
        if ordinal + endpoint.records > done:
            skip = max(0, done - ordinal)
            start_from = endpoint.start + skip * endpoint.step if skip else None
            reader = EndpointReader(remote, flight.Ticket(endpoint.ticket), True, PATIENCE_S,
                                    start_from)
            for batch in reader:
                # resumable there: the ticket's events below next_event are all here
                yield ordinal + ranges.count(endpoint.start, reader.next_event,
                                             endpoint.step), batch
        ordinal += endpoint.records


def verify(source: Source, request: Request, target: Target, copied: Written) -> Written:
    """Compare the source's digest of the request, read again there now, with the digest of
    what the target stream holds; MirrorFailed when they differ."""
    started = time.monotonic()
    with ThreadPoolExecutor(1) as there:  # both sites read at once
        asked = there.submit(source_digest, source, request)
        ours = local_digest(target)
        theirs = asked.result()
    if ours != theirs:
        raise MirrorFailed(
            f"the copy differs from the source: the source's digest of the request is "
            f"{theirs.sha256[:16]}… over {theirs.events} events, the stream holds "
            f"{ours.sha256[:16]}… over {ours.events} events; the source run changed while it "
            "was copied, or the stream holds events from elsewhere. The stream was not made "
            "a run")
    log.info("mirror into %s/%s verified in %.1f s: %s over %d events", target.experiment,
             target.stream, time.monotonic() - started, ours.sha256, ours.events)
    return Written(copied.ordinal, 0, 0)


def source_digest(source: Source, request: Request) -> RunDigest:
    """The source's digest of the request, read again there now."""
    with source.connect() as remote:
        return RunDigest.from_json(action(remote, DIGEST, request.to_json()))


def local_digest(target: Target) -> RunDigest:
    """The digest of every batch the target stream holds, in order."""
    with connect_target(target) as local:
        listed = action(local, "streams", {"experiment": target.experiment})
        described = next(s for s in listed if s["stream"] == target.stream)
        end = described["events"]
        subscription = Subscription(local, target.experiment, target.stream, from_="earliest")
        try:
            summed: Digest | None = None
            if end > described["first_offset"]:
                for batch in subscription:
                    if summed is None:
                        summed = Digest(subscription.schema)
                    summed.update(batch)
                    if subscription.next >= end:
                        break
            if summed is None:
                descriptor = flight.FlightDescriptor.for_path(target.experiment, "live",
                                                              target.stream)
                summed = Digest(local.get_schema(descriptor).schema)
            return summed.result()
        finally:
            subscription.close()


# -- live streams -------------------------------------------------------------------------------

def group_name(job_id: str) -> str:
    """The job's consumer group at the source (and its one member)."""
    return f"mirror-{job_id}"


def follow(source: Source, request: LiveRequest, done: int, target: Target,
           job_id: str) -> Written:
    """Follow the source stream from offset `done` until it ends (it became a run there), or
    until the job stops running here."""
    follower = _Follower(source, request, done, target, job_id)
    return follower.run()


class _Follower:
    def __init__(self, source: Source, request: LiveRequest, done: int, target: Target,
                 job_id: str) -> None:
        self.source, self.request, self.target, self.job_id = source, request, target, job_id
        self.expected = done  # the source offset below which everything is here (or empty)
        self.started = done > 0
        # deliveries (stored, or skipped as stored before) not yet committed at the source
        self.uncommitted = False
        self.events = self.bytes = 0
        self.stopped = threading.Event()
        self.subscription: Subscription | None = None
        self.producer: Producer | None = None
        self._commit_lock = threading.Lock()

    def run(self) -> Written:
        with self.source.connect() as remote, connect_target(self.target) as local:
            self.producer = Producer(local, self.target.experiment, self.target.stream,
                                     producer_id=self.target.producer, reconnect_for=30.0)
            watch = threading.Thread(target=self._watch, args=(local,), daemon=True,
                                     name=f"mirror-{self.job_id}-watch")
            watch.start()
            try:
                while not self.stopped.is_set():
                    if self._pass(remote):
                        break  # the source stream ended
                    if not self.stopped.is_set():
                        time.sleep(REDELIVERY_WAIT_S)
                self.producer.close()
            finally:
                self.stopped.set()
                watch.join()
        return Written(self.expected, self.events, self.bytes)

    def _pass(self, remote: flight.FlightClient) -> bool:
        """One subscription; True when the source stream ended, False when a delivery skipped
        ahead and was given back (or the job stopped)."""
        group = group_name(self.job_id)
        sub = Subscription(remote, self.request.experiment, self.request.stream,
                           from_="earliest", group=group, member=group,
                           columns=self.request.columns, filter=self.request.filter,
                           processing=self.request.processing, reconnect_for=PATIENCE_S,
                           skip_empty=False, compression=_compression(self.request))
        self.subscription = sub
        try:
            for batch in sub:
                if sub.next <= self.expected:
                    # stored before (a redelivery after a restart or a dropped connection):
                    # given to this member again, so committed again
                    self.uncommitted = True
                    continue
                if sub.offset > self.expected and self.started:
                    log.info("mirror %s: offset %d came before %d; giving it back",
                             self.job_id, sub.offset, self.expected)
                    return False
                if batch.num_rows:
                    self.producer.send(batch, seq=sub.next)
                    self.events += batch.num_rows
                    self.bytes += batch.nbytes
                self.expected, self.started = sub.next, True
                self.uncommitted = True
            if self.stopped.is_set():
                return False
            self._commit(sub)
            return True
        finally:
            sub.close()

    def _commit(self, sub: Subscription) -> None:
        """Commit at the source what the local stream has acknowledged, no more."""
        with self._commit_lock:
            if not self.uncommitted:
                return
            self.uncommitted = False
            upto = self.expected  # before the flush: everything below it was sent
            try:
                self.producer.flush()
                sub.commit(upto)
            except BaseException:
                self.uncommitted = True
                raise

    def _watch(self, local: flight.FlightClient) -> None:
        """Every second: commit what is stored; stop following once the job no longer runs
        here (cancelled, failed, or started again by a restarted server), since an idle
        source would otherwise hold the task forever."""
        attempt = int(self.target.producer.rpartition("-")[2])
        while not self.stopped.wait(COMMIT_EVERY_S):
            sub = self.subscription
            if sub is not None:
                try:
                    self._commit(sub)
                except Exception as exc:  # the next round, or the end of the stream, commits
                    log.info("mirror %s: committing at the source: %s", self.job_id, exc)
            try:
                status = action(local, "job", {"job": self.job_id})
            except flight.FlightError as exc:
                log.debug("mirror %s: asking about the job: %s", self.job_id, exc)
                continue  # the server restarting: its producer's answer decides
            if status["state"] != "running" or status.get("attempt") != attempt:
                log.info("mirror %s: the job is %s here; stopping", self.job_id,
                         status["state"])
                self.stopped.set()
                if self.subscription is not None:
                    self.subscription.close()


def _compression(request: LiveRequest) -> str | None:
    if request.compression is None:
        return None
    if request.compression_level is None:
        return request.compression
    return f"{request.compression}:{request.compression_level}"
