"""roi: crop every event's array to a rectangle, so only the region of interest of a detector
frame (or the window of a waveform) crosses the network.

`{"step": "roi", "column": C, "y": [start, stop], "x": [start, stop]}` crops the last two axes of
a tensor column (`y` the second-to-last, `x` the last; either may be left out to keep that axis
whole). A 1-D column (fixed_size_list) takes only `x`. Ranges are half-open, like Python slices.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from flight_server.buffers import allocate
from flight_server.processing.base import (
    ArrayLayout,
    Params,
    Step,
    null_events,
    processed_field,
)

AXES = {"y": "the frame's height", "x": "the frame's width"}


class Roi(Step):
    name = "roi"

    def __init__(self, column: str, input_field: pa.Field, output_field: pa.Field,
                 layout: ArrayLayout, out_layout: ArrayLayout, window: tuple[slice, ...]) -> None:
        super().__init__(column, input_field, output_field)
        self.layout, self.out_layout, self.window = layout, out_layout, window

    @classmethod
    def from_params(cls, params: dict, schema: pa.Schema) -> Roi:
        p = Params(cls.name, params, ("column",), {"y": None, "x": None})
        _, field, layout = p.array_column(schema, bools=True, bfloat16=True)
        if "y" not in p and "x" not in p:
            raise p.error("x", "or 'y' is needed: give the [start, stop] range to keep")
        if layout.ndim == 1:
            if "y" in p:
                raise p.error("y", f"does not apply to a 1-D column ({field.type}); crop it "
                              "with 'x'")
            start, stop = p.interval("x", layout.shape[0], "the array's length")
            ranges = {"x": (start, stop)}
        else:
            ranges = {}
            for axis, size in zip(("y", "x"), layout.shape[-2:], strict=True):
                ranges[axis] = p.interval(axis, size, AXES[axis]) if axis in p else (0, size)
        window = tuple(slice(a, b) for a, b in ranges.values())
        shape = (*layout.shape[: layout.ndim - len(window)], *(b - a for a, b in ranges.values()))
        out_layout = layout.with_(shape=shape)
        note = "roi " + " ".join(f"{axis}=[{a},{b}]" for axis, (a, b) in ranges.items())
        return cls(field.name, field, processed_field(field, out_layout.arrow_type(), note),
                   layout, out_layout, window)

    def transform(self, column: pa.Array, batch: pa.RecordBatch) -> pa.Array:
        values = self.layout.view(column)
        out = allocate((len(column), *self.out_layout.shape), values.dtype)
        np.copyto(out, values[(..., *self.window)])
        return self.out_layout.build(out, null_events(column))
