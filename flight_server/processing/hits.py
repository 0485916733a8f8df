"""hits: keep only the events that are hits, so that misses (most shots of a serial
crystallography run) are never sent.

`{"step": "hits", "column": N, "min": k}` keeps the events whose integer column N is >= k,
typically `C/n_peaks` after a `peaks` step; an event whose N is null is dropped. This step drops
rows: its output batch can be shorter than its input (even empty). Unlike the request's filter,
which runs before the steps on columns of the run, hits can test a column that a step made.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from flight_server.processing.base import (
    Params,
    Step,
    describe_type,
    processed_field,
    shown,
)


class Hits(Step):
    name = "hits"

    def __init__(self, column: str, input_field: pa.Field, output_field: pa.Field,
                 minimum: int) -> None:
        super().__init__(column, input_field, output_field)
        self.minimum = minimum

    @classmethod
    def from_params(cls, params: dict, schema: pa.Schema) -> Hits:
        p = Params(cls.name, params, ("column", "min"))
        _, field = p.column(schema)
        if not pa.types.is_integer(field.type):
            raise p.error("column", f"{shown(field.name)} is a {describe_type(field.type)} "
                          "column, but hits tests an integer scalar column (one count per "
                          "event, such as the n_peaks of a peaks step)")
        minimum = p.integer("min", "an integer", minimum=-(2**63))
        note = f"hits: events with {field.name} >= {minimum} kept"
        return cls(field.name, field, processed_field(field, field.type, note), minimum)

    def transform(self, column: pa.Array, batch: pa.RecordBatch) -> pa.Array:
        return column  # the column is unchanged; apply drops the events

    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The events whose column is >= min (fewer rows than the input, possibly none)."""
        index = self._index(batch.schema)
        kept = batch.filter(pc.greater_equal(batch.column(index), self.minimum),
                            null_selection_behavior="drop")
        return pa.RecordBatch.from_arrays(kept.columns,
                                          schema=batch.schema.set(index, self.output_field))
