"""cast: change the value type of an array column, the one way its type changes on request
(halving a float32 frame to float16 or bfloat16 for a network that trains in it, say).

`{"step": "cast", "column": C, "to": T}` with T one of TARGETS. What each conversion does:

- to a float type: IEEE rounding to nearest; values beyond the type's range become inf.
- to bfloat16: Arrow has no bfloat16, so the column holds the uint16 bit patterns (the top half
  of the float32) and its field says `lclstream.dtype: bfloat16`; a client reinterprets them
  (`torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)`, `a.view(ml_dtypes.bfloat16)`).
  Values go through float32 and are rounded to nearest, ties to even; NaN stays NaN. A
  bfloat16 column casts back to any type, and roi and pad keep it bfloat16.
- float to integer: rounded to nearest (ties to even), then saturated to the type's range;
  NaN becomes 0.
- integer to a narrower integer range: saturated (300 to uint8 is 255), never wrapped.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from flight_server.buffers import allocate
from flight_server.processing.base import (
    BFLOAT16,
    DTYPE,
    ArrayLayout,
    Params,
    Step,
    bfloat16_bits,
    bfloat16_values,
    null_events,
    processed_field,
)

TARGETS = ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64",
           "uint8", "uint16", "uint32", "uint64")


class Cast(Step):
    name = "cast"

    def __init__(self, column: str, input_field: pa.Field, output_field: pa.Field,
                 layout: ArrayLayout, out_layout: ArrayLayout, mode: str) -> None:
        super().__init__(column, input_field, output_field)
        self.layout, self.out_layout, self.mode = layout, out_layout, mode

    @classmethod
    def from_params(cls, params: dict, schema: pa.Schema) -> Cast:
        p = Params(cls.name, params, ("column", "to"))
        _, field, layout = p.array_column(schema, bfloat16=True)
        to = p.string("to", TARGETS)
        source = layout.logical_type
        bf16 = to == "bfloat16"
        dtype = np.dtype(np.uint16 if bf16 else to)
        out_layout = layout.with_(value_type=pa.from_numpy_dtype(dtype), bfloat16=bf16)
        if to == source:
            mode, detail = "same", " (unchanged)"
        elif bf16:
            mode, detail = "bfloat16", " (stored as uint16 bit patterns, rounded to nearest even)"
        elif dtype.kind == "f":
            mode, detail = "float", ""
        elif source == "bfloat16" or layout.dtype.kind == "f":
            mode, detail = "round", " (rounded to nearest even, saturating; NaN -> 0)"
        elif _narrower(layout.dtype, dtype):
            mode, detail = "clip", " (saturating)"
        else:
            mode, detail = "int", ""
        meta = {DTYPE: BFLOAT16} if bf16 else {}
        out = processed_field(field, out_layout.arrow_type(), f"cast {source}->{to}{detail}",
                              meta, drop_meta=(DTYPE,))
        return cls(field.name, field, out, layout, out_layout, mode)

    def transform(self, column: pa.Array, batch: pa.RecordBatch) -> pa.Array:
        if self.mode == "same":
            return column
        values = self.layout.view(column)
        if self.layout.bfloat16:
            values = bfloat16_values(values)
        out = allocate(values.shape, self.out_layout.dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            if self.mode == "bfloat16":
                bfloat16_bits(values, out=out)
            elif self.mode == "round":
                rounded = np.rint(values, dtype=np.float64)
                nan = np.isnan(rounded)
                np.clip(rounded, *_float_bounds(out.dtype), out=rounded)
                rounded[nan] = 0
                np.copyto(out, rounded, casting="unsafe")
            elif self.mode == "clip":
                lo, hi = _int_bounds(values.dtype, out.dtype)
                np.copyto(out, np.clip(values, lo, hi), casting="unsafe")
            else:
                np.copyto(out, values, casting="unsafe")
        return self.out_layout.build(out, null_events(column))


def _narrower(source: np.dtype, target: np.dtype) -> bool:
    s, t = np.iinfo(source), np.iinfo(target)
    return t.min > s.min or t.max < s.max


def _int_bounds(source: np.dtype, target: np.dtype) -> tuple[np.generic, np.generic]:
    s, t = np.iinfo(source), np.iinfo(target)
    return source.type(max(s.min, t.min)), source.type(min(s.max, t.max))


def _float_bounds(target: np.dtype) -> tuple[float, float]:
    """The target's range as float64 values that convert back without overflowing (the largest
    int64 is not a float64; the float64 next below it is)."""
    t = np.iinfo(target)
    hi = float(t.max)
    if hi > t.max:
        hi = float(np.nextafter(hi, 0.0))
    return float(t.min), hi
