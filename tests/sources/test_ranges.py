"""Event-range arithmetic (flight_server.sources.ranges) on its own: chunk alignment, bytes per
event, piece sizes, and `split`, whose pieces concatenate to exactly the range that was cut."""

from __future__ import annotations

import itertools
from pathlib import Path

import pyarrow as pa
import pytest

from flight_server.catalog import Catalog
from flight_server.generator import generate_lcls2_run
from flight_server.sources.columns import Column, Kind
from flight_server.sources.ranges import (
    MAX_ALIGN,
    chunk_alignment,
    count,
    event_bytes,
    ramp,
    span_for,
    split,
)


def column(chunk_events: int = 1, event_bytes: float = 8.0, name: str = "c") -> Column:
    return Column(name, Kind.SCALAR, pa.field(name, pa.float64()), path=name,
                  event_bytes=event_bytes, chunk_events=chunk_events)


def chunks(*chunk_events: int) -> list[Column]:
    return [column(n, name=f"c{i}") for i, n in enumerate(chunk_events)]


def pieces(start: int, stop: int, step: int, spans) -> list[list[int]]:
    """The events of each piece split() yields."""
    return [list(range(lo, hi, step)) for lo, hi in split(start, stop, step, spans)]


# -- chunk_alignment ---------------------------------------------------------------------------


@pytest.mark.parametrize(("chunk_events", "align"), [
    ((), 1),  # no columns: any cut will do
    ((1,), 1),  # contiguous
    ((5,), 5),
    ((5, 5, 1), 5),
    ((4, 6), 12),  # the least common multiple keeps both columns' chunks whole
    ((2, 3, 5), 30),
    ((0, 8), 8),  # a chunk length of 0 counts as 1
    ((512, 1024), 1024),
    ((4096,), MAX_ALIGN),  # bounded
    ((512, 768), 768),  # lcm 1536 is past the bound: the largest chunk instead
    ((1000, 999), 1000),
    ((7, 1000, 999), 1000),
])
def test_chunk_alignment(chunk_events: tuple[int, ...], align: int) -> None:
    assert chunk_alignment(chunks(*chunk_events)) == align


def test_chunk_alignment_is_never_past_the_bound() -> None:
    for combo in itertools.combinations([1, 3, 5, 7, 64, 100, 333, 1000, 1024, 5000], 3):
        align = chunk_alignment(chunks(*combo))
        assert 1 <= align <= MAX_ALIGN, combo


def test_chunk_alignment_of_a_generated_run(tmp_path: Path) -> None:
    generate_lcls2_run(tmp_path / "exp" / "exp_Run0001.h5", 1, n_events=30, chunk_events=6,
                       frame_shape=(16, 16), tof_samples=32)
    run = Catalog(tmp_path).run("exp", 1)
    chunked = {c.chunk_events for c in run.columns.values()}
    assert chunked == {1, 6}  # derived and ragged columns are per event, the rest 6 a chunk
    assert chunk_alignment(run.columns.values()) == 6
    assert event_bytes(run.columns.values()) == sum(c.event_bytes for c in run.columns.values())


# -- event_bytes and count ---------------------------------------------------------------------


def test_event_bytes_sums_the_columns_and_is_at_least_one() -> None:
    assert event_bytes([column(event_bytes=2.5), column(event_bytes=4.0)]) == 6.5
    assert event_bytes([column(event_bytes=8.125)]) == 8.125
    assert event_bytes([]) == 1.0  # never a division by zero in span_for
    assert event_bytes([column(event_bytes=0.0)]) == 1.0
    assert event_bytes([column(event_bytes=0.25), column(event_bytes=0.25)]) == 1.0


@pytest.mark.parametrize(("start", "stop", "step", "n"), [
    (0, 10, 1, 10),
    (0, 10, 3, 4),  # 0 3 6 9
    (1, 10, 3, 3),  # 1 4 7
    (5, 5, 1, 0),
    (7, 3, 1, 0),  # reversed: empty, as range() is
    (3, 4, 100, 1),
    (100, 1_000_000, 7, len(range(100, 1_000_000, 7))),
])
def test_count_is_the_length_of_the_range(start: int, stop: int, step: int, n: int) -> None:
    assert count(start, stop, step) == n


# -- span_for ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "per_event", "step", "align", "span"), [
    (1000, 10.0, 1, 1, 100),
    (1000, 10.0, 3, 1, 300),  # raw events: every third one is sent
    (1000, 10.0, 1, 7, 98),  # 100 events, to the nearest number of 7-event chunks
    (1000, 10.0, 1, 40, 80),  # 2.5 chunks: to the even number, 2
    (1000, 10.0, 1, 60, 120),  # 1.67 chunks -> 2
    (5, 10.0, 1, 8, 8),  # less than an event's worth: one event, then one whole chunk
    (5, 10.0, 1, 1, 1),
    (0, 1.0, 4, 1, 4),
    (10**9, 2712.375, 2, 5, 737360),
])
def test_span_for(target: int, per_event: float, step: int, align: int, span: int) -> None:
    assert span_for(target, per_event, step, align) == span


def test_span_for_is_whole_chunks_nearest_the_target() -> None:
    for target, per_event, step, align in itertools.product(
            [1, 100, 4096, 10**6], [1.0, 3.5, 2048.0], [1, 2, 7], [1, 5, 64, 1024]):
        span = span_for(target, per_event, step, align)
        assert span >= align and span % align == 0
        records = max(int(target // per_event), 1)
        if records * step >= align:
            assert abs(span - records * step) <= align / 2, (target, per_event, step, align)
        else:
            assert span == align  # at least one whole chunk


# -- split -------------------------------------------------------------------------------------


def test_split_cuts_at_absolute_multiples_of_the_span() -> None:
    assert list(split(0, 20, 1, [5])) == [(0, 5), (5, 10), (10, 15), (15, 20)]
    assert list(split(0, 22, 1, [5])) == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 22)]
    # a range that does not start at 0 is still cut at multiples of 5, not at 3 + 5k
    assert list(split(3, 22, 1, [5])) == [(3, 5), (5, 10), (10, 15), (15, 20), (20, 22)]
    assert list(split(12, 14, 1, [5])) == [(12, 14)]
    assert list(split(0, 5, 1, [100])) == [(0, 5)]


def test_split_with_a_step() -> None:
    # range(3, 30, 4) = 3 7 11 15 19 23 27, cut at 10 and 20
    assert list(split(3, 30, 4, [10])) == [(3, 10), (11, 20), (23, 30)]
    assert pieces(3, 30, 4, [10]) == [[3, 7], [11, 15, 19], [23, 27]]
    # a step longer than the span: one event a piece, each piece starting on the step lattice
    assert list(split(0, 20, 7, [5])) == [(0, 5), (7, 10), (14, 15)]
    assert pieces(0, 20, 7, [5]) == [[0], [7], [14]]
    assert pieces(1, 100, 25, [10]) == [[1], [26], [51], [76]]


def test_split_uses_successive_spans_then_keeps_the_last() -> None:
    assert list(split(0, 20, 1, [2, 4])) == [(0, 2), (2, 4), (4, 8), (8, 12), (12, 16), (16, 20)]
    assert list(split(0, 30, 1, iter([3, 6, 12]))) == [(0, 3), (3, 6), (6, 12), (12, 24),
                                                       (24, 30)]


@pytest.mark.parametrize(("start", "stop", "step"), [(0, 0, 1), (5, 5, 3), (10, 3, 1), (9, 9, 7)])
def test_split_of_an_empty_range_is_nothing(start: int, stop: int, step: int) -> None:
    assert list(split(start, stop, step, [4])) == []


def test_split_pieces_concatenate_to_the_range() -> None:
    """The invariant every reader relies on: no event lost, none twice, order kept; each piece
    non-empty, on the step lattice, and within one span window."""
    for start, stop, step, span in itertools.product(
            [0, 1, 3, 7, 10, 64], [0, 1, 9, 10, 11, 64, 65, 100, 257],
            [1, 2, 3, 5, 10, 64, 300], [1, 2, 3, 5, 8, 10, 64, 100]):
        cut = list(split(start, stop, step, [span]))
        events = [e for lo, hi in cut for e in range(lo, hi, step)]
        assert events == list(range(start, stop, step)), (start, stop, step, span)
        for lo, hi in cut:
            assert count(lo, hi, step) > 0
            assert (lo - start) % step == 0
            assert lo // span == (hi - 1) // span  # whole chunks: no window read twice
            assert hi == stop or hi % span == 0


def test_split_with_ramped_spans_concatenates_to_the_range() -> None:
    for start, stop, step, align in itertools.product([0, 5, 13], [0, 200, 1001, 5000],
                                                      [1, 3, 40], [1, 5, 64]):
        spans = list(ramp(64, 4096, 8.0, step, align))
        cut = list(split(start, stop, step, spans))
        events = [e for lo, hi in cut for e in range(lo, hi, step)]
        assert events == list(range(start, stop, step)), (start, stop, step, align)
        for _, hi in cut[1:-1]:  # only the first piece may end inside a chunk
            assert hi % align == 0, (start, stop, step, align)


def test_ramp_doubles_from_the_first_size_to_the_target() -> None:
    assert list(ramp(1000, 8000, 10.0, 1, 5)) == [100, 200, 400, 800]
    assert list(ramp(1000, 8000, 10.0, 2, 1)) == [200, 400, 800, 1600]
    assert list(ramp(8000, 1000, 10.0, 1, 1)) == [100]  # a first size past the target: one span
    spans = list(ramp(1000, 10**6, 7.0, 1, 64))
    assert spans[0] == 142  # the first may end inside a chunk
    assert all(s % 64 == 0 for s in spans[1:]) and spans == sorted(spans)
    assert spans[-1] == span_for(10**6, 7.0, 1, 64)

