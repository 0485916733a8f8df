"""tof_integrate: reduce each ion time-of-flight trace to a few numbers, the baseline-subtracted
yield in each window (one per ion species, say), so a client gets kilobytes of yields instead of
whole digitizer traces.

`{"step": "tof_integrate", "column": C, "baseline": [start, stop], "windows": {NAME: [start,
stop], ...}, "keep": false}`. Per event and channel, the mean of the baseline samples is
subtracted and each window's samples are summed; ranges are half-open sample ranges on the last
axis, like Python slices. C is a 1-D column (fixed_size_list, one channel) or a tensor
[channels, samples]. Each window becomes a new column `C/NAME`, placed where C was: a scalar
when the trace has one channel, a fixed_size_list[channels] (one yield per channel) when it has
several. Values are float32 for a float32 trace and float64 otherwise; the sums are done in
float64. Units are the trace's times samples ("V*sample"). A null event has null yields. C
itself is dropped from the output unless `"keep": true`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from flight_server.buffers import allocate
from flight_server.processing.base import (
    DTYPE,
    ArrayLayout,
    Params,
    Step,
    is_int,
    null_events,
    processed_field,
    shown,
)
from schemas import metadata as md

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}")


def flag(params: Params, name: str) -> bool:
    """A true/false parameter; 0 and 1 are refused so that a typo is not read as a choice."""
    value = params.raw(name)
    if not isinstance(value, bool):
        raise params.error(name, f"must be true or false; got {shown(value)}")
    return value


def trace_column(params: Params, schema: pa.Schema) -> tuple[pa.Field, ArrayLayout, int, int]:
    """The waveform column a TOF step reads, with its channel count and trace length."""
    _, field, layout = params.array_column(schema)
    if layout.ndim == 1:
        return field, layout, 1, layout.shape[0]
    if layout.ndim == 2:
        return field, layout, layout.shape[0], layout.shape[1]
    raise params.error("column", f"{shown(field.name)} has per-event shape {list(layout.shape)}; "
                       f"{params.step} takes a 1-D (fixed_size_list) trace or a 2-D tensor "
                       "[channels, samples] of traces")


def traces(layout: ArrayLayout, column: pa.Array) -> np.ndarray:
    """(events, channels, samples) view of a trace column."""
    values = layout.view(column)
    return values.reshape(len(column), 1, -1) if layout.ndim == 1 else values


def new_field(params: Params, param: str, schema: pa.Schema, source: pa.Field, suffix: str,
              arrow_type: pa.DataType, note: str, units: bytes | None) -> pa.Field:
    """A new column `SOURCE/suffix` derived from `source`: its metadata (detector, dataset
    path, processing history) carried over, the fill value and units replaced."""
    name = f"{source.name}/{suffix}"
    if schema.get_field_index(name) >= 0:
        which = suffix if param == "windows" else source.name
        raise params.error(param, f"{shown(which)} would make a column {shown(name)}, which "
                           "the input already has")
    meta = {md.UNITS: units} if units else {}
    field = processed_field(source, arrow_type, note, meta,
                            drop_meta=(DTYPE, md.FILL_VALUE, md.UNITS))
    return field.with_name(name)


def scalar_array(values: np.ndarray, arrow_type: pa.DataType,
                 null: np.ndarray | None) -> pa.Array:
    """Wrap a 1-D numpy array (in Arrow's pool) as an Arrow array without a copy."""
    validity = None
    if null is not None and null.any():
        validity = pa.array(~null, type=pa.bool_()).buffers()[1]
    return pa.Array.from_buffers(arrow_type, len(values), [validity, pa.py_buffer(values)])


class NewColumnsStep(Step):
    """A step that derives new columns from its column (rather than transforming it in place):
    they take the column's place in the schema, after it when `keep` says to keep it."""

    def __init__(self, column: str, input_field: pa.Field, fields: Sequence[pa.Field],
                 keep: bool) -> None:
        super().__init__(column, input_field, fields[0])
        self.fields, self.keep = tuple(fields), keep

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        index = self._index(schema)
        kept = [schema.field(index)] if self.keep else []
        fields = list(schema)
        fields[index:index + 1] = [*kept, *self.fields]
        return pa.schema(fields, metadata=schema.metadata)

    @staticmethod
    def _splice(batch: pa.RecordBatch, index: int, keep: bool,
                new: Sequence[pa.Array]) -> list[pa.Array]:
        columns = list(batch.columns)
        columns[index:index + 1] = [*(columns[index:index + 1] if keep else []), *new]
        return columns

    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The batch with the new columns in place of (or after) the step's column; other
        columns are passed as they are."""
        index = self._index(batch.schema)
        new = self.compute(batch.column(index))
        return pa.RecordBatch.from_arrays(self._splice(batch, index, self.keep, new),
                                          schema=self.output_schema(batch.schema))

    def transform(self, column: pa.Array, batch: pa.RecordBatch) -> pa.Array:
        """The first new column (`apply` gives them all)."""
        return self.compute(column)[0]

    def compute(self, column: pa.Array) -> list[pa.Array]:
        """The new columns, in the order of `fields`."""
        raise NotImplementedError


class TofIntegrate(NewColumnsStep):
    name = "tof_integrate"

    def __init__(self, column: str, input_field: pa.Field, fields: Sequence[pa.Field],
                 keep: bool, layout: ArrayLayout, baseline: tuple[int, int],
                 windows: Sequence[tuple[int, int]], out_dtype: np.dtype) -> None:
        super().__init__(column, input_field, fields, keep)
        self.layout, self.baseline, self.windows = layout, baseline, tuple(windows)
        self.out_dtype = out_dtype

    @classmethod
    def from_params(cls, params: dict, schema: pa.Schema) -> TofIntegrate:
        p = Params(cls.name, params, ("column", "baseline", "windows"), {"keep": False})
        field, layout, channels, samples = trace_column(p, schema)
        length = f"the trace has {samples} samples"
        baseline = p.interval("baseline", samples, length)
        windows = _windows(p, samples, length)
        keep = flag(p, "keep")
        out_dtype = np.dtype(np.float32 if layout.dtype == np.float32 else np.float64)
        value_type = pa.from_numpy_dtype(out_dtype)
        if channels == 1:
            arrow_type, shape = value_type, "a scalar (one channel)"
        else:
            arrow_type = pa.list_(pa.field("item", value_type), channels)
            shape = f"one value per channel [{channels}]"
        units = (field.metadata or {}).get(md.UNITS)
        fields = [
            new_field(p, "windows", schema, field, name, arrow_type,
                      f"tof_integrate of {field.name}: sum of samples [{a},{b}) after "
                      f"subtracting the mean of samples [{baseline[0]},{baseline[1]}), "
                      f"{out_dtype}, {shape}", units and units + b"*sample")
            for name, (a, b) in windows.items()]
        return cls(field.name, field, fields, keep, layout, baseline, list(windows.values()),
                   out_dtype)

    def compute(self, column: pa.Array) -> list[pa.Array]:
        values = traces(self.layout, column)
        null = null_events(column)
        base = values[..., slice(*self.baseline)].mean(axis=-1, dtype=np.float64)
        out = []
        for a, b in self.windows:
            total = values[..., a:b].sum(axis=-1, dtype=np.float64)
            total -= (b - a) * base
            if values.shape[1] == 1:
                result = allocate((len(column),), self.out_dtype)
                np.copyto(result, total[:, 0], casting="same_kind")
                out.append(scalar_array(result, self.fields[0].type, null))
            else:
                result = allocate(total.shape, self.out_dtype)
                np.copyto(result, total, casting="same_kind")
                layout = ArrayLayout(False, self.fields[0].type.value_type, (total.shape[1],))
                out.append(layout.build(result, null))
        return out


def _windows(p: Params, samples: int, length: str) -> dict[str, tuple[int, int]]:
    """The named windows, checked: valid, distinct names; ranges within the trace."""
    value = p.raw("windows")
    if not isinstance(value, Mapping) or not value:
        raise p.error("windows", "must be a non-empty object of NAME: [start, stop] sample "
                      f"ranges; got {shown(value)}")
    windows: dict[str, tuple[int, int]] = {}
    seen: dict[str, str] = {}
    for name, bounds in value.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise p.error("windows", f"name {shown(name)} is not valid: 1 to 64 letters, digits, "
                          "'_', '.', '+' or '-', not starting with a punctuation mark")
        if name.lower() in seen:
            raise p.error("windows", f"names {shown(seen[name.lower()])} and {shown(name)} "
                          "differ only in case; give each window a distinct name")
        seen[name.lower()] = name
        if (not isinstance(bounds, list | tuple) or len(bounds) != 2
                or not all(map(is_int, bounds)) or not 0 <= bounds[0] < bounds[1] <= samples):
            raise p.error("windows", f"{shown(name)} must be [start, stop] with 0 <= start < "
                          f"stop <= {samples} ({length}); got {shown(bounds)}")
        windows[name] = (int(bounds[0]), int(bounds[1]))
    return windows

