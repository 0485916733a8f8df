"""What a job's Dask tasks do, on the workers: read a share of the source from the data files
(workers run where the data is), filter and process it, and produce it into the job's stream
over Flight, as any producer does, with a token minted for the job alone.

A job's events get an ordinal: their place in the job's source, counted over every partition
in order. A batch is sent with `seq` = the ordinal just past its last source event, so the
stream itself records how far the job got: a retried task's resends are recognised as
duplicates, and a job that a restart interrupted resumes at the highest seq its stream holds.

Results reach the stream in event order: the first task produces as it reads (the first
results are readable at once); each later partition is computed in parallel and written once
the partition before it is written (`write` depends on the previous `write`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight

from clients.credentials import BearerToken
from clients.live import Producer
from flight_server.catalog import Catalog
from flight_server.processing import transform
from flight_server.sources import ranges
from flight_server.sources.streaming import BatchSizing, batch_ranges
from schemas import Ticket


@dataclass(frozen=True)
class Part:
    """One task's share of a job: a ticket's events, and the job ordinal of its first one."""

    data: str  # the data root, as the workers see it
    ticket: Ticket
    ordinal: int
    sizing: BatchSizing


@dataclass(frozen=True)
class Target:
    """Where a job's results go, and the credentials to put them there."""

    location: str
    token: str | None
    tls_roots: bytes | None
    tls_identity: tuple[bytes, bytes] | None  # (certificate, key) for a mutual-TLS server
    experiment: str
    stream: str
    producer: str  # "job-<id>-<attempt>": the server takes batches of the current attempt only


@dataclass(frozen=True)
class Written:
    """What a `write` or `produce` task reports: how far the job got, what it sent."""

    ordinal: int  # the job ordinal just past the partition
    events: int  # result events sent (a filter keeps fewer than it reads)
    bytes: int


_catalogs: dict[str, Catalog] = {}
_catalogs_lock = threading.Lock()


def _catalog(data: str) -> Catalog:
    """One catalog per worker process and data root: its open files serve every task."""
    with _catalogs_lock:
        if data not in _catalogs:
            _catalogs[data] = Catalog(Path(data))
        return _catalogs[data]


def batches(part: Part) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(seq, batch) of the part, read and processed; batches a filter emptied are left out."""
    t = part.ticket
    run = _catalog(part.data).run(t.experiment, t.run, table=t.table, source=t.source)
    columns = run.resolve(t.columns)
    shaped = transform.build(run, columns, t.filter, t.processing, part.sizing.event_budget)
    read = columns if shaped is None else shaped.read
    work = 0.0 if shaped is None else shaped.work_per_event
    reader = run.reader()
    try:
        for lo, hi in batch_ranges(read, t.start, t.stop, t.step, part.sizing, work):
            batch = reader.read(read, lo, hi, t.step)
            if shaped is not None:
                batch = shaped.apply(batch)
            if batch.num_rows:
                yield part.ordinal + ranges.count(t.start, hi, t.step), batch
    finally:
        reader.close()


def _end(part: Part) -> int:
    t = part.ticket
    return part.ordinal + ranges.count(t.start, t.stop, t.step)


def connect_target(target: Target) -> flight.FlightClient:
    options: dict = {}
    if target.token:
        options["middleware"] = [BearerToken(target.token)]
    if target.tls_roots:
        options["tls_root_certs"] = target.tls_roots
    if target.tls_identity:
        options["cert_chain"], options["private_key"] = target.tls_identity
    return flight.connect(target.location, **options)


def _send(target: Target, results: Iterator[tuple[int, pa.RecordBatch]], end: int) -> Written:
    events = nbytes = 0
    with connect_target(target) as client:
        # A refused write (the job was cancelled) fails the task at once; a lost connection is
        # retried for a while, as any producer does.
        producer = Producer(client, target.experiment, target.stream,
                            producer_id=target.producer, reconnect_for=30.0)
        for seq, batch in results:
            producer.send(batch, seq=seq)
            events += batch.num_rows
            nbytes += batch.nbytes
        producer.close()  # every batch acknowledged: durable in the stream
    return Written(end, events, nbytes)


def produce(part: Part, target: Target) -> Written:
    """The first partition: read, process and send batch by batch."""
    return _send(target, batches(part), _end(part))


def compute(part: Part) -> tuple[list[tuple[int, pa.RecordBatch]], int]:
    """A later partition, read and processed ahead of its turn to be written."""
    return list(batches(part)), _end(part)


def write(target: Target, computed: tuple[list[tuple[int, pa.RecordBatch]], int],
          previous: Written) -> Written:
    """Send a computed partition once the one before it is written (`previous`)."""
    results, end = computed
    return _send(target, iter(results), end)
