"""Stream an event range of a run as RecordBatches, reading ahead while batches are on the wire.

A reader thread fills a bounded queue; the Flight stream drains it. Memory is bounded by
(prefetch + 2) batches per stream whatever the run size. The stream stops early when the client
cancels or goes away, and the reader thread and file handle are released either way.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa

from flight_server import ranges
from flight_server.sources import Run, RunReader
from flight_server.sources.columns import Column

log = logging.getLogger(__name__)

_END = object()


@dataclass(frozen=True)
class BatchSizing:
    batch_bytes: int = 16 * 1024 * 1024
    first_batch_bytes: int = 1024 * 1024
    prefetch: int = 2


def batch_ranges(columns: list[Column], start: int, stop: int, step: int,
                 sizing: BatchSizing) -> list[tuple[int, int]]:
    align = ranges.chunk_alignment(columns)
    per_event = ranges.event_bytes(columns)
    spans = ranges.ramp(sizing.first_batch_bytes, sizing.batch_bytes, per_event, step, align)
    return list(ranges.split(start, stop, step, spans))


def stream_batches(run: Run, columns: list[Column], start: int, stop: int, step: int,
                   sizing: BatchSizing,
                   is_cancelled: Callable[[], bool] = lambda: False) -> Iterator[pa.RecordBatch]:
    """The batches of range(start, stop, step). The file is opened now, so a run that cannot be
    read fails the DoGet call itself rather than a stream already promised to the client."""
    pieces = batch_ranges(columns, start, stop, step, sizing)
    reader = RunReader(run)
    return _read_ahead(reader, columns, pieces, step, sizing.prefetch, is_cancelled)


def _read_ahead(reader: RunReader, columns: list[Column], pieces: list[tuple[int, int]],
                step: int, prefetch: int,
                is_cancelled: Callable[[], bool]) -> Iterator[pa.RecordBatch]:
    run = reader.run
    out: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
    stopping = threading.Event()

    def put(item: object) -> bool:
        while not stopping.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read_ahead() -> None:
        try:
            for lo, hi in pieces:
                if stopping.is_set() or not put(reader.read(columns, lo, hi, step)):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, which raises it to the client
            put(exc)

    worker = threading.Thread(target=read_ahead, name=f"read-ahead run {run.number}",
                              daemon=True)
    worker.start()
    try:
        while True:
            item = out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            if is_cancelled():
                log.info("client cancelled run %d of %s", run.number, run.experiment)
                return
            yield item
    finally:
        stopping.set()
        while not out.empty():
            out.get_nowait()
        worker.join()
        reader.close()
