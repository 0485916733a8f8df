"""A request's filter and processing steps, as one transform applied to each batch of a run.

The columns read are the requested ones plus what the filter and the steps need (a normalize
step's divisor); the filter runs first, so the steps only touch the events kept; the batches
sent carry the requested columns as the steps left them, and the columns the steps made. A
request with neither is not shaped at all: its batches go out exactly as read.

A transform needs only the columns of what it shapes (`Columns`): an archived run and a live
stream's schema both have them, so both are shaped by `build`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from flight_server.errors import InvalidArgument
from flight_server.processing import Pipeline, build_pipeline, filters

RAGGED_GUESS = 64.0  # bytes per event of a list column a step makes: offsets and a few values


class Column(Protocol):
    """A column as a transform sees it (`sources.columns.Column` is one)."""

    name: str
    field: pa.Field
    event_bytes: float  # bytes one event of it costs


class Columns(Protocol):
    """What is shaped: an archived run (`sources.Run`) or a live stream's columns."""

    @property
    def columns(self) -> Mapping[str, Column]: ...

    def schema(self, columns: Sequence[Column] | None = None) -> pa.Schema: ...


@dataclass(frozen=True)
class Shaping:
    read: list[Column]  # what to read from the source
    schema: pa.Schema  # what is sent: the requested columns after the steps
    predicate: pc.Expression | None
    pipeline: Pipeline | None
    work_per_event: float  # bytes read and made per event: what a batch of n events holds

    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if self.predicate is not None:
            batch = batch.filter(self.predicate)
        if self.pipeline is not None:
            batch = self.pipeline.apply(batch)
        return batch.select(self.schema.names)


def build(run: Columns, requested: list[Column], filter_text: str | None,
          steps: tuple[dict[str, Any], ...] | None, event_budget: int | None = None
          ) -> Shaping | None:
    """The shaping of `requested` columns of `run`, or None when the request asks for none.
    A request whose processing needs more than `event_budget` bytes for one event (a pad to
    8192 x 8192 asked for in 200 bytes) is refused before anything is read or allocated."""
    if filter_text is None and not steps:
        return None
    everything = run.schema()
    predicate, needed = None, {c.name for c in requested}
    if filter_text is not None:
        parsed = filters.parse_filter(filter_text, everything)
        predicate = parsed.expression
        needed |= set(parsed.columns)
    if steps:
        # Built once against every column to learn what the steps read, then again against
        # exactly the columns read, which is the schema the batches will have.
        wide = build_pipeline(list(steps), everything)
        needed |= {name for step in wide.steps for name in step.inputs()}
        made = set(wide.schema.names) - set(everything.names)  # e.g. `peaks` -> `C/n_peaks`
        untouched = {step.column for step in wide.steps} - {c.name for c in requested} - made
        if untouched:
            raise InvalidArgument(f"processing applies to {', '.join(sorted(untouched))}, which "
                                  "the request's columns leave out; add it to `columns`")
    # The requested columns first, in the request's order (the order they are sent in), then
    # what only the filter or the steps need.
    asked = {c.name for c in requested}
    read = requested + [c for c in run.columns.values() if c.name in needed - asked]
    pipeline = build_pipeline(list(steps), run.schema(read)) if steps else None
    after = pipeline.schema if pipeline is not None else run.schema(read)
    # Sent: the requested columns as the steps left them (a step may consume one, as `peaks`
    # does a frame) and the columns the steps made; not what was read only for the filter.
    was_read = {c.name for c in read}
    sent = [f for f in after if f.name in asked or f.name not in was_read]
    schema = pa.schema(sent, metadata=everything.metadata)
    read_bytes = sum(c.event_bytes for c in read)
    work = read_bytes + (made_bytes(pipeline) if pipeline is not None else 0.0)
    if event_budget is not None and work > event_budget:
        raise InvalidArgument(
            f"this request needs {_mib(work)} per event to read and process (the steps make "
            f"{_mib(work - read_bytes)}), more than the server allows for one "
            f"event ({_mib(event_budget)}, from its request_memory setting); crop, bin or pad "
            "to a smaller size, or cast to a narrower type")
    return Shaping(read, schema, predicate, pipeline, work)


def made_bytes(pipeline: Pipeline) -> float:
    """Bytes per event the steps allocate: every field a step adds or changes, at its fixed
    size (RAGGED_GUESS for a list, whose size is not known before it is made)."""
    total, current = 0.0, pipeline.input_schema
    for step in pipeline.steps:
        after = step.output_schema(current)
        before = {f.name: f for f in current}
        total += sum(_fixed_bytes(f.type) or RAGGED_GUESS for f in after
                     if f.name not in before or not before[f.name].equals(f))
        current = after
    return total


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def event_bytes(shaping: Shaping, requested: list[Column]) -> float:
    """Bytes per sent event, for the plan's size estimate: the steps' output where its type has
    a fixed size, else the column's own estimate; a ragged list a step made (hit times, peak
    positions) cannot be known before it is made, and counts as RAGGED_GUESS."""
    by_name = {c.name: c.event_bytes for c in requested}
    return sum(_fixed_bytes(field.type) or by_name.get(field.name, RAGGED_GUESS)
               for field in shaping.schema)


def _fixed_bytes(kind: pa.DataType) -> float:
    if isinstance(kind, pa.BaseExtensionType):
        return _fixed_bytes(kind.storage_type)
    if pa.types.is_fixed_size_list(kind):
        return kind.list_size * _fixed_bytes(kind.value_type)
    if pa.types.is_boolean(kind):
        return 0.125
    try:
        return kind.bit_width / 8
    except ValueError:  # variable-size
        return 0.0
