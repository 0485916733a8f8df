"""Turn a Flight descriptor into a validated plan: schema, partitions, sizes.

A request names runs of one experiment; each run becomes one or more partitions (event ranges
cut at chunk boundaries, each about `partition_bytes`), and each partition one FlightEndpoint
with a ticket, so clients can fetch partitions in parallel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.flight as flight

from flight_server import compression
from flight_server.catalog import SOURCES, Catalog, Visible, everyone
from flight_server.errors import InvalidArgument
from flight_server.processing import transform
from flight_server.sources import Run, ranges
from flight_server.sources.columns import Column
from schemas import Request, RequestError, Ticket, parse_request
from schemas import metadata as md
from schemas.json_input import excerpt
from schemas.request import EventSlice

MAX_RUN_DIGITS = 10  # run numbers are at most 2**31 - 1, as in the request schema


@dataclass(frozen=True)
class Partition:
    ticket: Ticket
    records: int
    bytes: int


@dataclass(frozen=True)
class Plan:
    request: Request
    schema: pa.Schema
    partitions: list[Partition]

    @property
    def total_records(self) -> int:
        if self.request.filter is not None:
            return -1  # unknown until the filter has run
        return sum(p.records for p in self.partitions)

    @property
    def total_bytes(self) -> int:
        return sum(p.bytes for p in self.partitions)


def request_from_descriptor(descriptor: flight.FlightDescriptor) -> Request:
    if descriptor.descriptor_type == flight.DescriptorType.PATH:
        parts = descriptor.path or []
        try:
            texts = [p.decode() if isinstance(p, bytes) else p for p in parts]
        except UnicodeDecodeError:
            raise InvalidArgument("path descriptor is not UTF-8") from None
        if (len(texts) not in (2, 3) or not texts[1].isdigit() or not texts[1].isascii()
                or len(texts[1]) > MAX_RUN_DIGITS or (len(texts) == 3 and not texts[2])):
            raise InvalidArgument(
                f"path descriptor must be [experiment, run], [experiment, run, table] or "
                f"[experiment, run, source] with run a decimal number of at most "
                f"{MAX_RUN_DIGITS} digits, e.g. ['tmox42619', '7'] or ['tmox42619', '7', "
                f"'xtc2']; got {excerpt(texts)}"
            )
        third = texts[2] if len(texts) == 3 else None
        if third in SOURCES:  # a source name is never a table name: no run has such a table
            return Request(experiment=texts[0], runs=(int(texts[1]),), source=third)
        return Request(experiment=texts[0], runs=(int(texts[1]),), table=third)
    if descriptor.descriptor_type == flight.DescriptorType.CMD:
        try:
            return parse_request(descriptor.command)
        except RequestError as exc:
            raise InvalidArgument(str(exc)) from None
    raise InvalidArgument("descriptor must be a path [experiment, run] or a v1 JSON command")


def check_range(run: Run, events: EventSlice) -> tuple[int, int, int]:
    """Concrete (start, stop, step) of a slice within a run.

    `stop` past the end is clamped, as Python, NumPy and h5py slices are, so one slice can be
    applied to runs of different lengths; a `start` past the end is an error, since it can only
    be a mistake.
    """
    n = run.num_events
    if events.start > n:
        raise InvalidArgument(
            f"event start {events.start} is out of range for run {run.number} of "
            f"'{run.experiment}', which has {n} events (valid: 0 <= start <= {n})"
        )
    stop = n if events.stop is None else min(events.stop, n)
    return events.start, stop, events.step


def resolve_columns(runs: list[Run], names: tuple[str, ...] | None) -> list[Column]:
    """The columns every run serves with the same type (all common columns when names is None)."""
    first = runs[0]
    if names is None:
        common = [c for c in first.columns.values() if all(c.name in r.columns for r in runs)]
        names = tuple(c.name for c in common)
    columns = first.resolve(names)
    for run in runs[1:]:
        for col, other in zip(columns, run.resolve([c.name for c in columns]), strict=True):
            if other.field.type != col.field.type:
                raise InvalidArgument(
                    f"column '{col.name}' is {col.field.type} in run {first.number} but "
                    f"{other.field.type} in run {run.number}; request these runs separately"
                )
    if len({c.name for c in columns}) != len(columns):
        raise InvalidArgument("a column is named twice (directly and through a link alias)")
    return columns


def plan(request: Request, catalog: Catalog, partition_bytes: int,
         visible: Visible = everyone, event_budget: int | None = None) -> Plan:
    if request.compression is not None:
        compression.choose(request.compression, request.compression_level)  # fail before DoGet
    elif request.compression_level is not None:
        raise InvalidArgument("compression_level needs a compression: 'zstd' or 'lz4'")
    runs = [catalog.run(request.experiment, number, visible, request.table, request.source)
            for number in request.runs]
    columns = resolve_columns(runs, request.columns)
    names = tuple(c.name for c in columns)
    shaped = [transform.build(run, columns, request.filter, request.processing, event_budget)
              for run in runs]
    per_event = ranges.event_bytes(columns)
    align = ranges.chunk_alignment(columns)
    sent_per_event = per_event if shaped[0] is None else transform.event_bytes(shaped[0], columns)
    partitions = []
    for run in runs:
        start, stop, step = check_range(run, request.events)
        span = ranges.span_for(partition_bytes, per_event, step, align)
        for lo, hi in ranges.split(start, stop, step, iter([span])):
            records = ranges.count(lo, hi, step)
            ticket = Ticket(request.experiment, run.number, names, lo, hi, step,
                            request.filter, request.processing, request.table, request.source,
                            request.compression, request.compression_level)
            partitions.append(Partition(ticket, records, int(records * sent_per_event)))
    fields = [c.field for c in columns] if shaped[0] is None else list(shaped[0].schema)
    return Plan(request, pa.schema(fields, metadata=_metadata(runs)), partitions)


def _metadata(runs: list[Run]) -> dict[bytes, bytes]:
    if len(runs) == 1:
        return runs[0].schema_metadata()
    layouts = sorted({r.layout.name for r in runs})
    table = {} if runs[0].table_name is None else {md.TABLE: runs[0].table_name.encode()}
    return table | {
        md.EXPERIMENT: runs[0].experiment.encode(),
        md.RUNS: json.dumps([r.number for r in runs]).encode(),
        md.LAYOUT: ",".join(layouts).encode(),
        md.EVENTS: str(sum(r.num_events for r in runs)).encode(),
    }
