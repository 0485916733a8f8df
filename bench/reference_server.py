"""A bare in-memory Flight server: the ceiling the real server is measured against.

It loads one run at start-up into memory as the very batches the real server would send (same
reader, schema, and batch sizes), then serves them with `RecordBatchStream`, which streams a table
entirely in C++. Any gap between it and the real server is therefore the cost of reading HDF5 and
of the Python code on the path, not of Arrow Flight itself.

    python -m bench.reference_server --file RUN.h5 --experiment EXP --run N [--port 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from flight_server.config import Settings
from flight_server.sources import Run, RunReader, describe
from flight_server.sources.streaming import BatchSizing, batch_ranges

ALL = b"all"


def load_table(run: Run, sizing: BatchSizing) -> pa.Table:
    """All columns of the run as the server's batch sequence (small first batches included)."""
    columns = list(run.columns.values())
    with RunReader(run) as reader:
        batches = [reader.read(columns, lo, hi) for lo, hi in
                   batch_ranges(columns, 0, run.num_events, 1, sizing)]
    return pa.Table.from_batches(batches, schema=run.schema(columns))


def columns_ticket(names: list[str] | None) -> bytes:
    """The ticket (and descriptor command) for some columns of the run; None for all."""
    return ALL if names is None else json.dumps(names).encode()


class ReferenceServer(flight.FlightServerBase):
    """Serves the table, or a column selection of it, to every DoGet; GetFlightInfo answers
    with a single endpoint whose ticket is the descriptor's command (`columns_ticket`)."""

    def __init__(self, location: str, run: Run, table: pa.Table, sizing: BatchSizing,
                 **kwargs: Any) -> None:
        super().__init__(location, **kwargs)
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

    def get_flight_info(self, context: flight.ServerCallContext,
                        descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        ticket = descriptor.command or ALL
        table = self.view(ticket)
        endpoint = flight.FlightEndpoint(ticket, [])
        return flight.FlightInfo(table.schema, descriptor, [endpoint], table.num_rows,
                                 table.nbytes)

    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return []

    def do_get(self, context: flight.ServerCallContext,
               ticket: flight.Ticket) -> flight.FlightDataStream:
        return flight.RecordBatchStream(self.view(ticket.ticket))


def main(argv: list[str] | None = None) -> int:
    defaults = Settings()
    p = argparse.ArgumentParser(prog="python -m bench.reference_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", type=Path, required=True, help="the run file to hold in memory")
    p.add_argument("--experiment", default="bench")
    p.add_argument("--run", type=int, default=1)
    p.add_argument("--host", default=defaults.host)
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--batch-bytes", type=int, default=defaults.batch_bytes)
    p.add_argument("--first-batch-bytes", type=int, default=defaults.first_batch_bytes)
    args = p.parse_args(argv)

    sizing = BatchSizing(args.batch_bytes, args.first_batch_bytes, defaults.prefetch)
    run = describe(args.file, args.experiment, args.run)
    table = load_table(run, sizing)
    server = ReferenceServer(f"grpc://{args.host}:{args.port}", run, table, sizing)
    print(f"loaded {table.num_rows} events, {table.nbytes} bytes in {table.num_columns} columns "
          f"as {len(table.to_batches())} batches", flush=True)
    print(f"serving {args.file} (in memory) at grpc://{args.host}:{server.port}", flush=True)
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
