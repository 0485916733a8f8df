"""Event-range arithmetic shared by partition planning and batch sizing.

Ranges are cut at absolute multiples of the HDF5 chunk length along the event axis, so no chunk
is read (and decompressed) by two batches or two partitions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

from flight_server.sources.columns import Column

MAX_ALIGN = 1024  # events; beyond this, chunk alignment costs more than it saves


def chunk_alignment(columns: Iterable[Column]) -> int:
    """Events per cut so that every column's chunks stay whole (lcm, bounded)."""
    align = 1
    for c in columns:
        nxt = math.lcm(align, max(c.chunk_events, 1))
        align = nxt if nxt <= MAX_ALIGN else max(align, c.chunk_events)
    return min(align, MAX_ALIGN)


def event_bytes(columns: Iterable[Column]) -> float:
    return max(sum(c.event_bytes for c in columns), 1.0)


def count(start: int, stop: int, step: int) -> int:
    return len(range(start, stop, step))


def span_for(target_bytes: int, per_event: float, step: int, align: int) -> int:
    """Raw events per piece so a piece carries about target_bytes, rounded to whole chunks
    (to the nearest number of chunks, at least one)."""
    records = max(int(target_bytes // per_event), 1)
    span = records * step
    return max(round(span / align), 1) * align


def split(start: int, stop: int, step: int, spans: Iterable[int]) -> Iterator[tuple[int, int]]:
    """Cut range(start, stop, step) at absolute multiples of successive spans.

    Yields (first, stop) raw-index pairs whose `range(first, stop, step)` concatenate to the
    original range; `first` is always on the original step lattice. Empty pieces are skipped.
    """
    spans = iter(spans)
    lo = start
    span = next(spans)
    while lo < stop:
        hi = min((lo // span + 1) * span, stop)
        first = lo
        if count(first, hi, step):
            yield first, hi
        # next lattice point at or after hi
        lo = start + -(-(hi - start) // step) * step
        span = next(spans, span)


def ramp(first_bytes: int, target_bytes: int, per_event: float, step: int,
         align: int) -> Iterator[int]:
    """Spans growing from first_bytes to target_bytes by doubling: a small first batch keeps
    time-to-first-batch low, large later batches keep throughput high. Only the first batch may
    end inside a chunk (a chunk can be larger than a whole first batch should be); `split` cuts
    the rest at absolute chunk multiples, so alignment is back from the second batch on."""
    size = min(first_bytes, target_bytes)
    yield span_for(size, per_event, step, 1)
    while size < target_bytes:
        size = min(size * 2, target_bytes)
        yield span_for(size, per_event, step, align)
