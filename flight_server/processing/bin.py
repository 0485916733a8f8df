"""bin: integer downsampling of the last axes (k×k pixel binning of a frame, k-sample binning of
a waveform), which divides what is sent by the factors' product.

`{"step": "bin", "column": C, "factor": k or [ky, kx], "reduce": "sum" | "mean"}`. A tensor
column is binned on its last two axes (a single k means k×k); a 1-D column takes a single k.
Each factor must divide its axis exactly: a partial bin at the edge would be a different
measurement from the others.

`sum` keeps integers integers and widens them so that no bin can overflow: to the narrowest
type of the same signedness that holds k×max (uint16 with 2×2 -> uint32); 64-bit integers stay
64-bit (a bin of int64 values near the type's limits can wrap). float16 sums as float32, other
floats keep their type. `mean` gives float32 (float64 for float64 columns, which are not
narrowed); it accumulates in float64.
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
    is_int,
    null_events,
    processed_field,
    shown,
)


def sum_dtype(dtype: np.dtype, count: int) -> np.dtype:
    """The narrowest type of dtype's kind, no narrower than dtype, that holds a sum of `count`
    of its values."""
    if dtype.kind == "f":
        return np.dtype(np.float32) if dtype.itemsize < 4 else dtype
    needed = dtype.itemsize * 8 + math.ceil(math.log2(count))
    for bits in (8, 16, 32, 64):
        if bits >= max(needed, dtype.itemsize * 8):
            return np.dtype(f"{dtype.kind}{bits // 8}")
    return np.dtype(f"{dtype.kind}8")


def mean_dtype(dtype: np.dtype) -> np.dtype:
    return dtype if dtype == np.float64 else np.dtype(np.float32)


class Bin(Step):
    name = "bin"

    def __init__(self, column: str, input_field: pa.Field, output_field: pa.Field,
                 layout: ArrayLayout, out_layout: ArrayLayout, factors: tuple[int, ...], reduce: str
                 ) -> None:
        super().__init__(column, input_field, output_field)
        self.layout, self.out_layout = layout, out_layout
        self.factors, self.reduce = factors, reduce

    @classmethod
    def from_params(cls, params: dict, schema: pa.Schema) -> Bin:
        p = Params(cls.name, params, ("column", "factor", "reduce"))
        _, field, layout = p.array_column(schema)
        reduce = p.string("reduce", ("sum", "mean"))
        factors = _factors(p, layout)
        binned = layout.shape[-len(factors):]
        axes = ("the array's length",) if layout.ndim == 1 else ("the frame's height",
                                                                "the frame's width")
        for k, size, what in zip(factors, binned, axes, strict=True):
            if size % k:
                raise p.error("factor", f"must divide {size} ({what}) exactly; "
                              f"got {shown(p.raw('factor'))}")
        shape = (*layout.shape[: layout.ndim - len(factors)],
                 *(size // k for size, k in zip(binned, factors, strict=True)))
        dtype = layout.dtype
        count = math.prod(factors)
        out_dtype = sum_dtype(dtype, count) if reduce == "sum" else mean_dtype(dtype)
        out_layout = layout.with_(value_type=pa.from_numpy_dtype(out_dtype), shape=shape)
        note = f"bin {'x'.join(map(str, factors))} {reduce}"
        if out_dtype != dtype:
            why = " so that no sum can overflow" if reduce == "sum" and dtype.kind != "f" else ""
            note += f" ({dtype}->{out_dtype}{why})"
        return cls(field.name, field, processed_field(field, out_layout.arrow_type(), note),
                   layout, out_layout, factors, reduce)

    def transform(self, column: pa.Array, batch: pa.RecordBatch) -> pa.Array:
        values = self.layout.view(column)
        out = allocate((len(column), *self.out_layout.shape), self.out_layout.dtype)
        if self.reduce == "sum":
            block_sum(values, self.factors, out)
        else:
            # integers sum exactly in their widened type; floats accumulate in float64
            acc_dtype = sum_dtype(values.dtype, math.prod(self.factors))
            acc_dtype = np.dtype(np.float64) if acc_dtype.kind == "f" else acc_dtype
            sums = block_sum(values, self.factors, np.empty(out.shape, acc_dtype))
            np.divide(sums, math.prod(self.factors), out=out, casting="same_kind")
        return self.out_layout.build(out, null_events(column))


def block_sum(values: np.ndarray, factors: tuple[int, ...], out: np.ndarray) -> np.ndarray:
    """Sums of k-blocks along the last len(factors) axes, into `out` (whose type accumulates).
    Axis by axis, as k strided adds: several times faster than numpy's reduction over the small
    axes of a reshaped view, which runs an inner loop of k elements."""
    current = values
    axes = range(values.ndim - len(factors), values.ndim)
    todo = [(axis, k) for axis, k in zip(axes, factors, strict=True) if k > 1]
    for i, (axis, k) in enumerate(reversed(todo)):  # the last axis first: it shrinks the most
        def take(j: int, axis: int = axis, k: int = k) -> tuple[slice, ...]:
            return (slice(None),) * axis + (slice(j, None, k),)

        shape = current.shape[:axis] + (current.shape[axis] // k,) + current.shape[axis + 1:]
        acc = out if i == len(todo) - 1 else np.empty(shape, out.dtype)
        np.copyto(acc, current[take(0)], casting="same_kind")
        for j in range(1, k):
            np.add(acc, current[take(j)], out=acc, casting="same_kind")
        current = acc
    if not todo:
        np.copyto(out, values, casting="same_kind")
    return out


def _factors(p: Params, layout: ArrayLayout) -> tuple[int, ...]:
    """(k,) for a 1-D column, (ky, kx) for a tensor; zero, negative and non-integers refused."""
    value = p.raw("factor")
    if layout.ndim == 1:
        return (p.integer("factor", "a positive integer (the column is 1-D)"),)
    if is_int(value) and value >= 1:
        return int(value), int(value)
    if (isinstance(value, list | tuple) and len(value) == 2
            and all(is_int(k) and k >= 1 for k in value)):
        return int(value[0]), int(value[1])
    raise p.error("factor", "must be a positive integer k (k x k bins) or [ky, kx] of positive "
                  f"integers; got {shown(value)}")
