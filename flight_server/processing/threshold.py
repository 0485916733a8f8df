"""threshold: set values below a level to a fill value (zero by default), the usual way to drop
a detector's noise floor before binning or peak finding; and values above a level, the way to
blank a photon-counting detector's masked and overloaded pixels (an Eiger writes 2**bits - 1
there). The column keeps its type.

`{"step": "threshold", "column": C, "below": v, "above": w, "value": 0}`, with `below`, `above`
or both. The comparisons are exact whatever the column's type (the levels are not rounded to it
first), so on an integer column a fractional `below` of 10.5 replaces 10 and keeps 11. `value`
must fit the column's type. NaN is never below or above anything and stays NaN.
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
                 layout: ArrayLayout, below: float | int | None, value: np.ndarray,
                 above: float | int | None = None) -> None:
        super().__init__(column, input_field, output_field)
        self.layout, self.below, self.above, self.value = layout, below, above, value

    @classmethod
    def from_params(cls, params: dict, schema: pa.Schema) -> Threshold:
        p = Params(cls.name, params, ("column",), {"value": 0, "below": None, "above": None})
        _, field, layout = p.array_column(schema)
        if p.raw("below") is None and p.raw("above") is None:
            raise p.error("below", "give 'below', 'above' or both: the levels outside which "
                                   "values are replaced")
        below = None if p.raw("below") is None else p.number("below")
        above = None if p.raw("above") is None else p.number("above")
        if below is not None and above is not None and above < below:
            raise p.error("above", f"'above' ({shown(above)}) is less than 'below' "
                                   f"({shown(below)}): every value would be replaced")
        value = fill_scalar(p, "value", layout)
        levels = [f"{word} {shown(level)}" for word, level in (("below", below), ("above", above))
                  if level is not None]
        note = f"threshold {' and '.join(levels)} -> {shown(p.raw('value'))}"
        return cls(field.name, field, processed_field(field, field.type, note), layout, below,
                   value, above)

    def transform(self, column: pa.Array, batch: pa.RecordBatch) -> pa.Array:
        values = self.layout.view(column)
        out = allocate(values.shape, values.dtype)
        np.copyto(out, values)
        for mask in (self._below_mask(values), self._above_mask(values)):
            if mask is not None:
                np.copyto(out, self.value, where=mask)
        return self.layout.build(out, null_events(column))

    def _above_mask(self, values: np.ndarray) -> np.ndarray | bool | None:
        """Where values > above, compared exactly: None when nothing can be above. (For floats,
        x > a is -x < -a, and negation is exact.)"""
        if self.above is None:
            return None
        if values.dtype.kind == "f":
            return Threshold._less(-values, -self.above)
        if math.isinf(self.above):
            return self.above < 0 or None
        level = math.floor(self.above)  # for integers, x > 10.5 is x > 10
        info = np.iinfo(values.dtype)
        if level < info.min:
            return True
        if level >= info.max:
            return None
        return np.greater(values, values.dtype.type(level))

    def _below_mask(self, values: np.ndarray) -> np.ndarray | bool | None:
        """Where values < below, compared exactly: None when nothing can be below."""
        if self.below is None:
            return None
        if values.dtype.kind == "f":
            return Threshold._less(values, self.below)
        if math.isinf(self.below):
            return self.below > 0 or None
        level = math.ceil(self.below)  # for integers, x < 10.5 is x < 11
        info = np.iinfo(values.dtype)
        if level > info.max:
            return True
        if level <= info.min:
            return None
        return np.less(values, values.dtype.type(level))

    @staticmethod
    def _less(values: np.ndarray, bound: float) -> np.ndarray:
        """values < bound for a float array, exactly: the nearest value of the array's type,
        nudged up when it lies below `bound` (no value of that type lies strictly between)."""
        with np.errstate(over="ignore"):
            level = values.dtype.type(bound)
        if float(level) < bound:
            level = np.nextafter(level, values.dtype.type(np.inf))
        return np.less(values, level)
