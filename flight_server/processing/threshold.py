"""threshold: set values below a level to a fill value (zero by default), the usual way to drop
a detector's noise floor before binning or peak finding. The column keeps its type.

`{"step": "threshold", "column": C, "below": v, "value": 0}`. The comparison is exact whatever
the column's type (`below` is not rounded to it first), so on an integer column a fractional
`below` of 10.5 replaces 10 and keeps 11. `value` must fit the column's type. NaN is never
below anything and stays NaN.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from flight_server.buffers import allocate
from flight_server.processing.base import (
    ArrayLayout,
    Params,
    Step,
    fill_scalar,
    null_events,
    processed_field,
    shown,
)


class Threshold(Step):
    name = "threshold"

    def __init__(self, column: str, input_field: pa.Field, output_field: pa.Field,
                 layout: ArrayLayout, below: float | int, value: np.ndarray) -> None:
        super().__init__(column, input_field, output_field)
        self.layout, self.below, self.value = layout, below, value

    @classmethod
    def from_params(cls, params: dict, schema: pa.Schema) -> Threshold:
        p = Params(cls.name, params, ("column", "below"), {"value": 0})
        _, field, layout = p.array_column(schema)
        below = p.number("below")
        value = fill_scalar(p, "value", layout)
        note = f"threshold below {shown(below)} -> {shown(p.raw('value'))}"
        return cls(field.name, field, processed_field(field, field.type, note), layout, below,
                   value)

    def transform(self, column: pa.Array, batch: pa.RecordBatch) -> pa.Array:
        values = self.layout.view(column)
        out = allocate(values.shape, values.dtype)
        np.copyto(out, values)
        below = self._below_mask(values)
        if below is not None:
            np.copyto(out, self.value, where=below)
        return self.layout.build(out, null_events(column))

    def _below_mask(self, values: np.ndarray) -> np.ndarray | bool | None:
        """Where values < below, compared exactly: None when nothing can be below."""
        if values.dtype.kind == "f":
            # The nearest value of the column's type, nudged up when it lies below `below`:
            # no value of that type lies strictly between the two, so the test is exact.
            with np.errstate(over="ignore"):
                level = values.dtype.type(self.below)
            if float(level) < self.below:
                level = np.nextafter(level, values.dtype.type(np.inf))
            return np.less(values, level)
        if math.isinf(self.below):
            return self.below > 0 or None
        level = math.ceil(self.below)  # for integers, x < 10.5 is x < 11
        info = np.iinfo(values.dtype)
        if level > info.max:
            return True
        if level <= info.min:
            return None
        return np.less(values, values.dtype.type(level))
