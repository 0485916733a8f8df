"""Stream an event range of a run as RecordBatches, reading ahead while batches are on the wire.

Reads run on a pool shared by all streams: each stream keeps at most `prefetch` reads in flight
and submits the next one only as a batch leaves, so memory is bounded by (prefetch + 2) batches
per stream whatever the run size, and a request starts no thread of its own. The stream stops
early when the client cancels or goes away; pending reads are dropped and the file is closed
either way.
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import pyarrow as pa

from flight_server.sources import ranges
from flight_server.sources.columns import Column
from flight_server.sources.run import Reader, Run

log = logging.getLogger(__name__)


Transform = Callable[[pa.RecordBatch], pa.RecordBatch]


@dataclass(frozen=True)
class BatchSizing:
    batch_bytes: int = 4 * 1024 * 1024
    first_batch_bytes: int = 1024 * 1024
    prefetch: int = 2
    request_memory: int = 512 * 1024 * 1024  # one stream's batches in flight, at most

    @property
    def event_budget(self) -> int:
        """The most bytes one event may take to read and process: a stream holds up to
        prefetch + 2 batches (reading, queued, sending), each of at least one event."""
        return self.request_memory // (self.prefetch + 2)


def batch_ranges(columns: list[Column], start: int, stop: int, step: int,
                 sizing: BatchSizing, work_per_event: float = 0.0) -> list[tuple[int, int]]:
    """Event ranges of about `batch_bytes` each, counting per event what is read or, when
    processing makes more than it reads (pad, cast to a wider type), `work_per_event`."""
    align = ranges.chunk_alignment(columns)
    per_event = max(ranges.event_bytes(columns), work_per_event)
    if work_per_event and align * per_event > sizing.event_budget:
        align = 1  # whole chunks would make batches past the budget: cut them instead
    spans = ranges.ramp(sizing.first_batch_bytes, sizing.batch_bytes, per_event, step, align)
    return list(ranges.split(start, stop, step, spans))


def stream_batches(run: Run, columns: list[Column], start: int, stop: int, step: int,
                   sizing: BatchSizing, pool: Executor,
                   is_cancelled: Callable[[], bool] = lambda: False,
                   transform: Transform | None = None,
                   work_per_event: float = 0.0) -> Iterator[tuple[pa.RecordBatch, int]]:
    """The batches of range(start, stop, step), each with the end of the range it covers (where
    a resumed stream starts again). The file is opened now, so a run that cannot be read fails
    the DoGet call itself rather than a stream already promised to the client. `transform` (a
    request's filter and processing) runs on the pool with the read, so batches are processed
    on several cores and while earlier ones are on the wire."""
    pieces = batch_ranges(columns, start, stop, step, sizing, work_per_event)
    reader = run.reader()
    read = reader.read if transform is None else _then(reader.read, transform)
    batches = _read_ahead(reader, read, columns, pieces, step, sizing.prefetch, pool,
                          is_cancelled)
    # A generator dropped before its first batch never runs its `finally`: release then too.
    weakref.finalize(batches, reader.close)
    return batches


def _then(read: Callable[..., pa.RecordBatch],
          transform: Transform) -> Callable[..., pa.RecordBatch]:
    def read_and_transform(*args: object) -> pa.RecordBatch:
        return transform(read(*args))

    return read_and_transform


def _read_ahead(reader: Reader, read: Callable[..., pa.RecordBatch], columns: list[Column],
                pieces: list[tuple[int, int]], step: int, prefetch: int, pool: Executor,
                is_cancelled: Callable[[], bool]) -> Iterator[tuple[pa.RecordBatch, int]]:
    todo = iter(pieces)
    pending: deque[Future] = deque()

    def top_up(limit: int) -> None:
        while len(pending) < limit:
            piece = next(todo, None)
            if piece is None:
                return
            pending.append((pool.submit(read, columns, piece[0], piece[1], step), piece[1]))

    try:
        first = next(todo, None)
        if first is None:
            return
        # The first batch is read right here: a hand-off to the pool and back costs more than
        # reading a small first batch, and nothing is on the wire yet to overlap with. Reading
        # ahead starts once it has left, so it does not compete with the first send for CPU.
        yield read(columns, first[0], first[1], step), first[1]
        top_up(max(prefetch, 1))
        while pending:
            future, end = pending.popleft()
            batch = future.result()
            if is_cancelled():
                log.info("client cancelled run %d of %s", reader.run.number,
                         reader.run.experiment)
                return
            top_up(max(prefetch, 1))
            yield batch, end
    finally:
        for future, _ in pending:
            future.cancel()
        for future, _ in pending:  # a read already running must finish before the file closes
            if not future.cancelled():
                future.exception()
        reader.close()
