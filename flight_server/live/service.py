"""The Flight surface of live streams: DoPut to produce, DoGet to subscribe, the actions
`commit`, `end_run` and `streams`, and live entries in ListFlights.

Producers need the `write` grant on the experiment, consumers `read`. Tickets are the
subscription itself, sealed; the plain JSON subscription is accepted as a ticket too, because
a subscription plans nothing that a client could tamper with and DoGet checks rights anyway.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from flight_server.catalog import Catalog, check_experiment_name
from flight_server.config import LiveSettings
from flight_server.errors import InvalidArgument, NotFound
from flight_server.live import run_writer
from flight_server.live.registry import LiveStreams, check_stream_name
from flight_server.live.stream import AckSession, Stream, schema_difference
from flight_server.processing import transform
from flight_server.security.client_data import validated
from flight_server.security.middleware import CallRecord
from flight_server.security.policy import Identity, authorize
from flight_server.security.tickets import TicketSeal
from flight_server.sources.columns import Column, Kind
from flight_server.sources.streaming import BatchSizing
from schemas import RequestError
from schemas import metadata as md
from schemas.json_input import excerpt
from schemas.live import (
    LIVE_SEGMENT,
    Delivery,
    ProducerMeta,
    Subscription,
    decode_object,
    is_subscription,
    parse_subscription,
)

log = logging.getLogger(__name__)

ACTIONS = {
    "commit": "JSON {experiment, stream, group, member, offset}: a group member has processed "
              "everything it received up to offset",
    "end_run": "JSON {experiment, stream[, run][, config]}: end a live stream; it becomes a run "
               "of its experiment (needs write)",
    "streams": "JSON list of live streams: events, rate, bytes on disk, consumer group lag",
}


MAX_RUN = 2**31 - 1  # as in the request schema


def _request_error(exc: RequestError) -> InvalidArgument:
    return InvalidArgument(str(exc))


def subscription_of(descriptor: flight.FlightDescriptor) -> Subscription | None:
    """The subscription a descriptor names: a path [experiment, "live", stream] or a JSON
    command with a `stream`; None for anything else."""
    if descriptor.descriptor_type == flight.DescriptorType.PATH:
        parts = [p.decode("utf-8", "replace") if isinstance(p, bytes) else p
                 for p in descriptor.path or []]
        if len(parts) == 3 and parts[1] == LIVE_SEGMENT:
            return Subscription(parts[0], parts[2])
        return None
    if descriptor.descriptor_type == flight.DescriptorType.CMD and is_subscription(
            descriptor.command):
        try:
            return parse_subscription(descriptor.command)
        except RequestError as exc:
            raise _request_error(exc) from None
    return None


class StreamColumns:
    """A stream's schema seen as a run's columns, so that filters and processing steps are
    built by the same `transform.build` as for archived runs."""

    def __init__(self, schema: pa.Schema) -> None:
        self._schema = schema
        self.columns = {f.name: Column(f.name, Kind.SCALAR, f) for f in schema}

    def schema(self, columns: list[Column] | None = None) -> pa.Schema:
        fields = self._schema if columns is None else [c.field for c in columns]
        return pa.schema(fields, metadata=self._schema.metadata)

    def resolve(self, names: tuple[str, ...] | None) -> list[Column]:
        if names is None:
            return list(self.columns.values())
        missing = [n for n in names if n not in self.columns]
        if missing:
            raise NotFound(f"the stream has no column {', '.join(map(repr, missing))}. "
                           f"Columns: {', '.join(self.columns)}")
        return [self.columns[n] for n in names]


class LiveService:
    def __init__(self, data: Path, settings: LiveSettings, catalog: Catalog,
                 seal: TicketSeal, sizing: BatchSizing | None = None,
                 owner: Callable[[str, str], str | None] | None = None) -> None:
        self.streams = LiveStreams(data, settings, owner)
        self.catalog = catalog
        self.seal = seal
        self.sizing = sizing or BatchSizing()
        self._end_lock = threading.Lock()  # two streams ending at once must not pick one number
        # Set by the jobs service: may this producer (a job's worker) store into this stream?
        self.admit_job: Callable[[Identity, Subscription, str | None, int | None], None] | None \
            = None

    def stop(self) -> None:
        """The server is stopping: sync every stream, and end every live call."""
        self.streams.stop()

    def close(self) -> None:
        self.streams.close()

    # -- producing ---------------------------------------------------------------------------

    def do_put(self, call: CallRecord, sub: Subscription,
               reader: flight.MetadataRecordBatchReader,
               writer: flight.FlightMetadataWriter,
               is_cancelled: Callable[[], bool] = lambda: False) -> None:
        check_experiment_name(sub.experiment)
        call.experiment = sub.experiment
        authorize(call.identity, sub.experiment, "write")
        run_writer.check_schema(reader.schema)
        session = AckSession(writer, is_cancelled)
        stream = self.streams.attach(sub.experiment, sub.stream, reader.schema, session)
        try:
            while True:
                try:
                    chunk = reader.read_chunk()
                except StopIteration:
                    return
                stream.check_running()  # unstored, so unacknowledged: the producer resends
                try:
                    raw = chunk.app_metadata
                    meta = ProducerMeta.decode(raw.to_pybytes() if raw is not None else None)
                except RequestError as exc:
                    raise _request_error(exc) from None
                if meta.retention:
                    stream.set_retention(meta.retention)
                if meta.dropped is not None:
                    stream.note_dropped(meta.producer or "anonymous", meta.dropped)
                if chunk.data is not None:
                    call.received(chunk.data.nbytes)
                    batch = validated(chunk.data, "the batch")
                    run_writer.check_nulls(batch)
                    stream.append(batch, meta.producer, meta.seq, session,
                                  self._admission(call.identity, sub, meta.producer, meta.seq))
        finally:
            stream.detach(session)
            self.streams.discard_unused(stream)

    def _admission(self, identity: Identity, sub: Subscription, producer: str | None,
                   seq: int | None) -> Callable[[], None] | None:
        """The check a job's producer passes for each batch (None: no jobs service)."""
        if self.admit_job is None:
            return None
        gate = self.admit_job
        return lambda: gate(identity, sub, producer, seq)

    # -- what the jobs service asks of streams -----------------------------------------------

    def check_into(self, experiment: str, name: str, schema: pa.Schema) -> None:
        """Refuse a job whose results the stream could not take: it has ended, or holds
        another schema, or the results have a column a run cannot store."""
        check_experiment_name(experiment)
        check_stream_name(name)
        run_writer.check_schema(schema)
        stream = self.streams.find(experiment, name)
        if stream is None:
            return
        if stream.ended:
            raise InvalidArgument(f"stream '{name}' of '{experiment}' ended as run "
                                  f"{stream.ended['run']}; name a new stream for the job")
        if stream.schema is not None and not stream.schema.equals(schema):
            raise InvalidArgument(
                f"the job's results do not fit stream '{name}' of '{experiment}': "
                f"{schema_difference(stream.schema, schema)}. Name a new stream, or ask for "
                "the columns and processing the stream holds")

    def claim(self, experiment: str, name: str) -> str | None:
        """A job starts on the node that owns its stream: None if that is this one (claimed
        now if no living node owns it), else the owner's location."""
        return self.streams.claim(experiment, name)

    def last_seq(self, experiment: str, name: str, producers: Callable[[str], bool]
                 ) -> int | None:
        stream = self.streams.find(experiment, name)
        return None if stream is None else stream.last_seq(producers)

    def fence(self, experiment: str, name: str) -> None:
        """Once this returns, a producer that `admit_job` now refuses stores nothing more."""
        stream = self.streams.find(experiment, name)
        if stream is not None:
            stream.fence()

    def census(self) -> list[dict[str, Any]]:
        """Every stream as the `streams` action describes it, with what its producers stored
        since the server started (`ingested_events`, `ingested_bytes`): for the metrics."""
        return [{**s.describe(), "ingested_events": s.ingested_events,
                 "ingested_bytes": s.ingested_bytes} for s in self.streams.streams()]

    def sql_tables(self, experiment: str) -> dict[str, tuple[int, Callable[[], pa.Table]]]:
        """The experiment's streams that have not ended, each with its bytes and a snapshot of
        its events (an ended stream is a run, in `events` already). The caller checks read
        rights."""
        return {s.name: (s.log.nbytes, s.snapshot) for s in self.streams.streams()
                if s.experiment == experiment and s.schema is not None and not s.ended}

    def has_events(self, experiment: str, name: str) -> bool:
        stream = self.streams.find(experiment, name)
        return stream is not None and stream.schema is not None and stream.log.end > 0

    # -- consuming ---------------------------------------------------------------------------

    def _readable(self, call: CallRecord, sub: Subscription) -> Stream:
        check_experiment_name(sub.experiment)
        call.experiment = sub.experiment
        authorize(call.identity, sub.experiment, "read")
        stream = self.streams.get(sub.experiment, sub.stream)
        if stream.schema is None:
            raise NotFound(f"stream '{sub.stream}' has no events yet")
        return stream

    def _shaped(self, stream: Stream, sub: Subscription) -> tuple[pa.Schema, Transform | None]:
        columns = StreamColumns(stream.schema)
        requested = columns.resolve(sub.columns)
        shaped = transform.build(columns, requested, sub.filter, sub.processing,
                               self.sizing.event_budget)
        meta = {**(stream.schema.metadata or {}), md.EXPERIMENT: stream.experiment.encode(),
                md.STREAM: stream.name.encode(),
                md.LIVE: b"false" if stream.ended else b"true"}
        if shaped is None:
            names = [c.name for c in requested]
            project = None if sub.columns is None else Transform(lambda b: b.select(names))
            return columns.schema(requested).with_metadata(meta), project
        read = [c.name for c in shaped.read]
        # A producer's batch is as large as it chose: processed in pieces of about batch_bytes
        # of work, so that a step that makes more than it reads stays within the budget.
        rows = max(1, int(self.sizing.batch_bytes // max(shaped.work_per_event, 1.0)))
        return (shaped.schema.with_metadata(meta),
                Transform(lambda b: shaped.apply(b.select(read)), rows))

    def flight_info(self, call: CallRecord, sub: Subscription,
                    descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        stream = self._readable(call, sub)
        schema, _ = self._shaped(stream, sub)
        ticket = self.seal.sign(sub.encode())
        events = -1 if sub.filter else stream.log.end - stream.log.start
        return flight.FlightInfo(schema, descriptor, [flight.FlightEndpoint(ticket, [])],
                                 events, stream.log.nbytes, ordered=True)

    def schema(self, call: CallRecord, sub: Subscription) -> pa.Schema:
        return self._shaped(self._readable(call, sub), sub)[0]

    def ticket(self, raw: bytes) -> Subscription | None:
        """The subscription in a DoGet ticket, or None when it is not a live ticket."""
        if raw[:1] == b"{" and is_subscription(raw):
            body = raw
        else:
            body, sep, _ = raw.rpartition(b".")
            if not sep or not is_subscription(body):
                return None
            body = self.seal.verify(raw)
        try:
            return parse_subscription(body)
        except RequestError as exc:
            raise _request_error(exc) from None

    def do_get(self, call: CallRecord, sub: Subscription, is_cancelled: Callable[[], bool]
               ) -> tuple[pa.Schema, Iterator[tuple[pa.RecordBatch, bytes]]]:
        stream = self._readable(call, sub)
        schema, transform = self._shaped(stream, sub)
        if sub.group is not None:
            batches = stream.member(stream.group(sub.group, sub), sub.member, is_cancelled)
        else:
            batches = stream.tail(stream.resolve(sub), is_cancelled)
        return schema, _deliveries(batches, transform)

    # -- actions -----------------------------------------------------------------------------

    def do_action(self, call: CallRecord, action: flight.Action) -> Iterator[bytes]:
        identity, body = call.identity, _json_body(action)
        if action.type == "streams":
            pattern = body.get("experiment", "*")
            if not isinstance(pattern, str) or len(pattern) > 256:
                raise InvalidArgument("'experiment' is an experiment name or glob (a string of "
                                      "at most 256 characters), e.g. 'tmox*'")
            found = [s.describe() for s in self.streams.streams()
                     if fnmatch.fnmatchcase(s.experiment, pattern)
                     and identity.may(s.experiment, "read")]
            return iter([json.dumps(found).encode()])
        experiment, name = _named(body, "experiment"), _named(body, "stream")
        check_experiment_name(experiment)
        call.experiment = experiment
        if action.type == "commit":
            authorize(identity, experiment, "read")
            return iter([json.dumps(self._commit(experiment, name, body)).encode()])
        authorize(identity, experiment, "write")
        return iter([json.dumps(self._end_run(experiment, name, body)).encode()])

    def _end_run(self, experiment: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        number = body.get("run")
        if number is not None and (not isinstance(number, int) or isinstance(number, bool)
                                   or not 0 <= number <= MAX_RUN):
            raise InvalidArgument(f"'run' must be an integer from 0 to {MAX_RUN}, "
                                  f"got {excerpt(number)}")
        config = body.get("config")
        if config is not None and not isinstance(config, dict):
            raise InvalidArgument("'config' must be a JSON object of per-run settings")
        return self.end_stream(experiment, name, number, config)

    def _commit(self, experiment: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        stream = self.streams.get(experiment, name)
        group_name, member = _named(body, "group"), _named(body, "member")
        offset = body.get("offset")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise InvalidArgument("commit needs 'offset': the `next` offset of the last batch "
                                  "processed (an integer >= 0)")
        with stream.cond:
            group = stream.groups.get(group_name)
            if group is None:
                raise NotFound(f"stream '{name}' has no consumer group '{group_name}'")
            events = group.commit(member, offset)
            return {"group": group_name, "committed_events": events,
                    "watermark": group.watermark()}

    def end_stream(self, experiment: str, name: str, number: int | None = None,
                   config: dict[str, Any] | None = None) -> dict[str, Any]:
        """End the stream: it becomes run `number` (default: the next free one) of its
        experiment. Ending a stream that has ended answers with the run it became."""
        stream = self.streams.get(experiment, name)
        done = stream.begin_ending()
        if done is not None:
            return {"experiment": experiment, "stream": name, **done}
        ended = None
        try:
            stream.sync()
            with self._end_lock:
                number = self._run_number(experiment, number)
                path = stream.directory / f"{experiment}_Run{number:04d}.h5"
                with stream.cond:
                    entries = list(stream.log.entries)
                events = run_writer.write_run(
                    path, stream.schema, ((stream.batch_at(e), e.time_ns) for e in entries),
                    config)
                ended = {"run": number, "events": events,
                         "first_offset": entries[0].offset if entries else 0}
                stream.finish_ending(ended)
                self.catalog.scan_experiment(experiment)
        finally:
            if ended is None:
                stream.finish_ending(None)
        log.info("live stream %s/%s ended as run %d (%d events)", experiment, name, number,
                 events)
        return {"experiment": experiment, "stream": name, **ended}

    def _run_number(self, experiment: str, wanted: int | None) -> int:
        taken = set(self.catalog.scan_experiment(experiment))
        taken |= {s.ended["run"] for s in self.streams.streams()
                  if s.experiment == experiment and s.ended}
        if wanted is None:
            return max(taken, default=0) + 1
        if wanted in taken:
            raise InvalidArgument(f"experiment '{experiment}' already has run {wanted}; omit "
                                  f"'run' to take the next free number ({max(taken) + 1})")
        return wanted

    # -- listing -----------------------------------------------------------------------------

    def flight_infos(self, identity: Identity, matches: Callable[[str], bool]
                     ) -> list[flight.FlightInfo]:
        infos = []
        for stream in self.streams.streams():
            if stream.ended or stream.schema is None or not matches(stream.experiment):
                continue
            if not identity.may(stream.experiment, "read"):
                continue
            sub = Subscription(stream.experiment, stream.name)
            descriptor = flight.FlightDescriptor.for_path(stream.experiment, LIVE_SEGMENT,
                                                          stream.name)
            schema, _ = self._shaped(stream, sub)
            endpoint = flight.FlightEndpoint(self.seal.sign(sub.encode()), [])
            infos.append(flight.FlightInfo(schema, descriptor, [endpoint],
                                           stream.log.end - stream.log.start,
                                           stream.log.nbytes, ordered=True))
        return infos


@dataclass(frozen=True)
class Transform:
    """What a subscription does to each stored batch, `rows` events at a time at most."""

    apply: Callable[[pa.RecordBatch], pa.RecordBatch]
    rows: int | None = None


def _deliveries(batches: Iterator[tuple[pa.RecordBatch, tuple[int, int]]],
                transform: Transform | None) -> Iterator[tuple[pa.RecordBatch, bytes]]:
    for batch, (start, stop) in batches:
        if transform is None:
            yield batch, Delivery(start, stop).encode()
            continue
        rows = transform.rows or batch.num_rows or 1
        for at in range(0, max(batch.num_rows, 1), rows):
            piece = batch.slice(at, rows)
            yield transform.apply(piece), Delivery(start + at,
                                                   min(start + at + rows, stop)).encode()


def _json_body(action: flight.Action) -> dict[str, Any]:
    raw = action.body.to_pybytes() if action.body is not None else b""
    try:
        return decode_object(raw, f"the body of action '{action.type}'")
    except RequestError as exc:
        raise _request_error(exc) from None


def _named(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"'{key}' is required (a non-empty string)")
    return value
