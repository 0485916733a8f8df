"""The reference server: bare Arrow Flight, the ceiling the real server is measured against.

One `FlightServerBase`, without storage, authentication or Python on the data path beyond what
Flight requires, serving the roles its options select (one or both):

- `--file RUN.h5` (throughput, latency): the run is loaded at start-up into memory as the very
  batches the real server would send (same reader, schema, and batch sizes), and served with
  `RecordBatchStream`, which streams a table entirely in C++. GetFlightInfo answers with a single
  endpoint whose ticket is the descriptor's command (`columns_ticket`: all columns, or a JSON
  list of some). Any gap between it and the real server is therefore the cost of reading HDF5
  and of the Python code on the path, not of Arrow Flight itself.
- `--live` (live): live streams kept in memory only. DoPut reads each batch, acks it at once (an
  `Ack`, offset = its index) and keeps only the last RELAY_KEPT; DoGet of a subscription ticket
  (a JSON object) relays the stream's new batches from "latest", with `Delivery` metadata. As an
  ingest reference it is a sink that discards and acks; as a latency reference, an in-memory
  relay from DoPut to DoGet.

    python -m bench.reference_server --file RUN.h5 [--experiment EXP] [--run N] [--port 0]
    python -m bench.reference_server --file SAMPLE_N_master.h5 --kind nxmx --run N
    python -m bench.reference_server --live [--port 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from flight_server.config import Settings
from flight_server.sources import Run, describe
from flight_server.sources.streaming import BatchSizing, batch_ranges
from schemas.live import Ack, Delivery, ProducerMeta, parse_subscription

ALL = b"all"
RELAY_KEPT = 64  # batches kept per live stream for its subscribers


# -- role 1: a run in memory ---------------------------------------------------------------


def load_table(run: Run, sizing: BatchSizing) -> pa.Table:
    """All columns of the run as the server's batch sequence (small first batches included)."""
    columns = list(run.columns.values())
    with run.reader() as reader:
        batches = [reader.read(columns, lo, hi) for lo, hi in
                   batch_ranges(columns, 0, run.num_events, 1, sizing)]
    return pa.Table.from_batches(batches, schema=run.schema(columns))


def columns_ticket(names: list[str] | None) -> bytes:
    """The ticket (and descriptor command) for some columns of the run; None for all."""
    return ALL if names is None else json.dumps(names).encode()


class HeldRun:
    """The run's table, and the column selections of it asked for so far."""

    def __init__(self, run: Run, table: pa.Table, sizing: BatchSizing) -> None:
        self.run = run
        self.table = table
        self.sizing = sizing
        self._views: dict[bytes, pa.Table] = {ALL: table}

    def view(self, ticket: bytes) -> pa.Table:
        """A column selection cut into the batches the real server would send for it; built on
        first use (outside any timed request after warm-up) and kept."""
        table = self._views.get(ticket)
        if table is None:
            names = json.loads(ticket)
            columns = self.run.resolve(names)
            selected = self.table.select(names)
            ranges = batch_ranges(columns, 0, self.run.num_events, 1, self.sizing)
            batches = [b for lo, hi in ranges
                       for b in selected.slice(lo, hi - lo).combine_chunks().to_batches()]
            table = self._views[ticket] = pa.Table.from_batches(batches, selected.schema)
        return table


# -- role 2: live streams in memory --------------------------------------------------------


class Relay:
    """One live stream: its schema (from its first producer), a count of batches and the last
    RELAY_KEPT of them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.schema: pa.Schema | None = None
        self.kept: deque[pa.RecordBatch] = deque(maxlen=RELAY_KEPT)
        self.count = 0


# -- the server ----------------------------------------------------------------------------


class ReferenceServer(flight.FlightServerBase):
    """`held`: the run of `--file`, or None; `live`: whether DoPut and subscriptions are served.
    DoGet tells a subscription ticket (a JSON object) from a run's (`columns_ticket`)."""

    def __init__(self, location: str, held: HeldRun | None = None, live: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(location, **kwargs)
        self.held = held
        self.live = live
        self._lock = threading.Lock()
        self._streams: dict[str, Relay] = {}

    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return []

    def get_flight_info(self, context: flight.ServerCallContext,
                        descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        if self.held is None:
            raise flight.FlightServerError("this reference server holds no run (no --file)")
        ticket = descriptor.command or ALL
        table = self.held.view(ticket)
        endpoint = flight.FlightEndpoint(ticket, [])
        return flight.FlightInfo(table.schema, descriptor, [endpoint], table.num_rows,
                                 table.nbytes)

    def do_get(self, context: flight.ServerCallContext,
               ticket: flight.Ticket) -> flight.FlightDataStream:
        if ticket.ticket.startswith(b"{"):
            return self._subscribe(context, ticket.ticket)
        if self.held is None:
            raise flight.FlightServerError("this reference server holds no run (no --file)")
        return flight.RecordBatchStream(self.held.view(ticket.ticket))

    # live streams

    def _relay(self, name: str) -> Relay:
        if not self.live:
            raise flight.FlightServerError("this reference server serves no live streams "
                                           "(no --live)")
        with self._lock:
            return self._streams.setdefault(name, Relay())

    def do_put(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor,
               reader: flight.MetadataRecordBatchReader,
               writer: flight.FlightMetadataWriter) -> None:
        relay = self._relay(descriptor.path[-1].decode())
        with relay.cond:
            if relay.schema is None:
                relay.schema = reader.schema
                relay.cond.notify_all()
        while True:
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                return
            meta = ProducerMeta.decode(chunk.app_metadata.to_pybytes()
                                       if chunk.app_metadata is not None else None)
            if chunk.data is None:
                continue
            with relay.cond:
                offset = relay.count
                relay.kept.append(chunk.data)
                relay.count += 1
                relay.cond.notify_all()
            writer.write(pa.py_buffer(Ack(meta.seq, offset, chunk.data.num_rows).encode()))

    def _subscribe(self, context: flight.ServerCallContext,
                   ticket: bytes) -> flight.FlightDataStream:
        """New batches of the stream from "latest" (its count now). A subscriber that comes
        before the first producer waits for it: the stream's schema is the producer's."""
        relay = self._relay(parse_subscription(ticket).stream)
        with relay.cond:
            offset = relay.count
            while relay.schema is None and not context.is_cancelled():
                relay.cond.wait(0.25)
            schema = relay.schema
        if schema is None:  # cancelled while waiting
            raise flight.FlightCancelledError("cancelled before the stream had a producer")

        def batches() -> Iterator[tuple[pa.RecordBatch, bytes]]:
            nonlocal offset
            while True:
                with relay.cond:
                    while relay.count <= offset and not context.is_cancelled():
                        relay.cond.wait(0.25)
                    if context.is_cancelled():
                        return
                    first = relay.count - len(relay.kept)
                    offset = max(offset, first)
                    todo = [relay.kept[i - first] for i in range(offset, relay.count)]
                for batch in todo:
                    yield batch, Delivery(offset, offset + 1).encode()
                    offset += 1

        return flight.GeneratorStream(schema, batches())


def main(argv: list[str] | None = None) -> int:
    defaults = Settings()
    p = argparse.ArgumentParser(prog="python -m bench.reference_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", type=Path, help="a run file to hold in memory and serve by DoGet")
    p.add_argument("--experiment", default="bench", help="the experiment of --file's run")
    p.add_argument("--run", type=int, default=1, help="the run number of --file")
    p.add_argument("--kind", choices=["hdf5", "nxmx"], default="hdf5",
                   help="how --file is read: one HDF5 file (default), or an NXmx master file "
                        "and its data files beside it")
    p.add_argument("--live", action="store_true",
                   help="serve live streams: DoPut acked at once, relayed to subscriptions")
    p.add_argument("--host", default=defaults.host)
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--batch-bytes", type=int, default=defaults.batch_bytes)
    p.add_argument("--first-batch-bytes", type=int, default=defaults.first_batch_bytes)
    args = p.parse_args(argv)
    if args.file is None and not args.live:
        p.error("nothing to serve: give --file, --live or both")

    held = None
    roles = []
    if args.file is not None:
        sizing = BatchSizing(args.batch_bytes, args.first_batch_bytes, defaults.prefetch)
        run = describe(args.file, args.experiment, args.run, args.kind)
        table = load_table(run, sizing)
        held = HeldRun(run, table, sizing)
        print(f"loaded {table.num_rows} events, {table.nbytes} bytes in {table.num_columns} "
              f"columns as {len(table.to_batches())} batches", flush=True)
        roles.append(f"{args.file} (in memory)")
    if args.live:
        roles.append("live streams (no storage)")
    server = ReferenceServer(f"grpc://{args.host}:{args.port}", held, args.live)
    print(f"serving {' and '.join(roles)} at grpc://{args.host}:{server.port}", flush=True)
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
