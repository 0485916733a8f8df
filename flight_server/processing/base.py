"""What every processing step shares: the error type, parameter checking, and zero-copy numpy
views of per-event array columns.

A step is validated once against the schema the client will receive (so a bad request fails
before any data is read), then applied batch by batch. Steps work on per-event arrays only:
`fixed_size_list<T>[n]` (1-D) and `arrow.fixed_shape_tensor` (N-D). Their values are read as a
numpy view of the Arrow buffer, shaped (events, *shape); results are written into buffers from
Arrow's memory pool (`buffers.allocate`, as the reader does, so server RSS levels off) and
wrapped without a copy.
"""

from __future__ import annotations

import json
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from flight_server.errors import InvalidArgument, close_matches

# Field-level metadata keys this package writes.
PROCESSING = b"lclstream.processing"  # what was done to the column, steps joined by "; "
DTYPE = b"lclstream.dtype"  # the logical value type when Arrow has none (b"bfloat16")
BFLOAT16 = b"bfloat16"


class StepError(InvalidArgument):
    """A processing request that cannot be applied as written. A ValueError, and an
    ArrowInvalid so that it reaches a Flight client as INVALID_ARGUMENT with its message."""


def shown(value: object, limit: int = 120) -> str:
    """A parameter value as the client wrote it (JSON), for error messages: cut to about
    `limit` characters, since a value can be as long as the request."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def quoted(names: Iterable[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class Params:
    """A step's parameters, checked for unknown and missing names up front; the typed getters
    raise a StepError that names the step and the parameter."""

    def __init__(self, step: str, params: object, required: Iterable[str],
                 optional: Mapping[str, Any] | None = None) -> None:
        self.step = step
        required = tuple(required)
        optional = dict(optional or {})
        allowed = (*required, *optional)
        if not isinstance(params, Mapping):
            raise StepError(f"{step}: parameters must be an object with {quoted(allowed)}; "
                            f"got {shown(params)}")
        unknown = [k for k in params if k not in allowed]
        if unknown:
            hint = close_matches(str(unknown[0]), allowed) if len(unknown) == 1 else ""
            plural = "s" if len(unknown) > 1 else ""
            raise StepError(f"{step}: unknown parameter{plural} {quoted(map(str, unknown))}; "
                            f"{step} takes {quoted(allowed)}.{hint}")
        missing = [k for k in required if k not in params]
        if missing:
            plural = "s" if len(missing) > 1 else ""
            raise StepError(f"{step}: missing parameter{plural} {quoted(missing)} "
                            f"(required: {quoted(required)})")
        self.values = {**optional, **params}

    def __contains__(self, name: str) -> bool:
        return self.values.get(name) is not None

    def error(self, name: str, message: str) -> StepError:
        return StepError(f"{self.step}: '{name}' {message}")

    def raw(self, name: str) -> Any:
        return self.values[name]

    def string(self, name: str, choices: Iterable[str] | None = None) -> str:
        value = self.values[name]
        choices = tuple(choices) if choices is not None else None
        if choices is not None and value not in choices:
            hint = close_matches(value, choices) if isinstance(value, str) else ""
            raise self.error(name, f"must be one of {quoted(choices)}; got {shown(value)}.{hint}")
        if not isinstance(value, str):
            raise self.error(name, f"must be a string; got {shown(value)}")
        return value

    def integer(self, name: str, what: str = "a positive integer", minimum: int = 1,
                maximum: int = 2**63 - 1) -> int:
        value = self.values[name]
        if not is_int(value) or not minimum <= value <= maximum:
            raise self.error(name, f"must be {what}; got {shown(value)}")
        return int(value)

    def number(self, name: str) -> float | int:
        value = self.values[name]
        if not is_number(value) or math.isnan(value):
            raise self.error(name, f"must be a number; got {shown(value)}")
        if not math.isfinite(value):
            raise self.error(name, f"must be a finite number; got {shown(value)}")
        return int(value) if is_int(value) else float(value)

    def interval(self, name: str, size: int, what: str) -> tuple[int, int]:
        """A [start, stop] index range within an axis of `size`."""
        value = self.values[name]
        if (not isinstance(value, list | tuple) or len(value) != 2 or not all(map(is_int, value))
                or not 0 <= value[0] < value[1] <= size):
            raise self.error(name, f"must be [start, stop] with 0 <= start < stop <= {size} "
                             f"({what}); got {shown(value)}")
        return int(value[0]), int(value[1])

    def column(self, schema: pa.Schema, name: str = "column") -> tuple[int, pa.Field]:
        """The index and field of the column a parameter names."""
        value = self.string(name)
        index = schema.get_field_index(value)
        if index < 0:
            raise self.error(name, f"{shown(value)} is not a column of the input."
                             f"{close_matches(value, schema.names)}")
        return index, schema.field(index)

    def array_column(self, schema: pa.Schema, name: str = "column", *, bools: bool = False,
                     bfloat16: bool = False) -> tuple[int, pa.Field, ArrayLayout]:
        """Like `column`, for a step that works on per-event arrays of numbers (and of booleans
        or bfloat16 bit patterns where the step says it can)."""
        index, field = self.column(schema, name)
        layout = ArrayLayout.of(field)
        if layout is None and isinstance(field.type, pa.FixedShapeTensorType):
            raise self.error(name, f"{shown(field.name)} is a tensor with a permuted layout "
                             f"({field.type}), which {self.step} does not support")
        if layout is None:
            raise self.error(name, f"{shown(field.name)} is a {describe_type(field.type)} "
                             f"column, but {self.step} works on per-event arrays (fixed_size_list "
                             "or fixed_shape_tensor)")
        is_bool = pa.types.is_boolean(layout.value_type)
        if not (layout.numeric or (bools and is_bool)):
            raise self.error(name, f"{shown(field.name)} holds {layout.value_type} values; "
                             f"{self.step} works on numbers")
        if layout.bfloat16 and not bfloat16:
            raise self.error(name, f"{shown(field.name)} holds bfloat16 values (stored as "
                             f"uint16 bit patterns); cast it to float32 before {self.step}")
        return index, field, layout


def describe_type(t: pa.DataType) -> str:
    """A column's kind and type with its article, for error messages."""
    if isinstance(t, pa.FixedShapeTensorType):
        return f"per-event array (fixed_shape_tensor of {t.value_type}, shape {list(t.shape)})"
    if pa.types.is_fixed_size_list(t):
        return f"per-event array ({t})"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"variable-length list ({t})"
    if isinstance(t, pa.BaseExtensionType) or pa.types.is_nested(t):
        return f"{t}"
    return f"scalar ({t})"


@dataclass(frozen=True)
class ArrayLayout:
    """The per-event shape and value type of an array column, and how to build one like it."""

    tensor: bool  # fixed_shape_tensor (else fixed_size_list)
    value_type: pa.DataType
    shape: tuple[int, ...]
    bfloat16: bool = False  # uint16 bit patterns of bfloat16 values (see cast.py)
    dim_names: tuple[str, ...] | None = None
    item_name: str = "item"

    @staticmethod
    def of(field: pa.Field) -> ArrayLayout | None:
        t = field.type
        bf16 = (field.metadata or {}).get(DTYPE) == BFLOAT16
        if isinstance(t, pa.FixedShapeTensorType):
            if t.permutation is not None and list(t.permutation) != sorted(t.permutation):
                return None  # a permuted layout; the server never makes one
            names = tuple(t.dim_names) if t.dim_names else None
            return ArrayLayout(True, t.value_type, tuple(t.shape), bf16, names,
                          t.storage_type.value_field.name)
        if pa.types.is_fixed_size_list(t) and not pa.types.is_nested(t.value_type):
            return ArrayLayout(False, t.value_type, (t.list_size,), bf16, None, t.value_field.name)
        return None

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.value_type.to_pandas_dtype())

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numeric(self) -> bool:
        return pa.types.is_integer(self.value_type) or pa.types.is_floating(self.value_type)

    @property
    def logical_type(self) -> str:
        """The value type as a person would name it ('bfloat16' for the uint16 patterns)."""
        return "bfloat16" if self.bfloat16 else str(self.dtype)

    def with_(self, value_type: pa.DataType | None = None, shape: tuple[int, ...] | None = None,
              bfloat16: bool | None = None) -> ArrayLayout:
        shape = self.shape if shape is None else shape
        names = self.dim_names if self.dim_names and len(self.dim_names) == len(shape) else None
        return ArrayLayout(self.tensor or len(shape) > 1, value_type or self.value_type, shape,
                      self.bfloat16 if bfloat16 is None else bfloat16, names, self.item_name)

    def arrow_type(self) -> pa.DataType:
        item = pa.field(self.item_name, self.value_type)
        if self.tensor:
            return pa.fixed_shape_tensor(self.value_type, list(self.shape),
                                         dim_names=list(self.dim_names) if self.dim_names else None)
        return pa.list_(item, self.shape[0])

    def view(self, column: pa.Array) -> np.ndarray:
        """The column's values as a (events, *shape) numpy array; a view of the Arrow buffer
        (read-only) except for booleans, which Arrow packs into bits. Values under a null event
        are whatever the buffer holds; null values inside an event read as 0."""
        storage = column.storage if isinstance(column, pa.ExtensionArray) else column
        size = int(np.prod(self.shape))
        values = storage.values.slice(storage.offset * size, len(storage) * size)
        if values.null_count:
            values = values.fill_null(False if pa.types.is_boolean(values.type) else 0)
        flat = values.to_numpy(zero_copy_only=False)
        return flat.reshape(len(column), *self.shape)

    def build(self, values: np.ndarray, null: np.ndarray | None) -> pa.Array:
        """Wrap (events, *shape) values, C-contiguous, as this layout's Arrow array without a
        copy; `null` marks null events."""
        flat = values.reshape(-1)
        if pa.types.is_boolean(self.value_type):
            leaf = pa.array(flat, type=pa.bool_())
        else:
            leaf = pa.Array.from_buffers(self.value_type, flat.size, [None, pa.py_buffer(flat)])
        mask = pa.array(null, type=pa.bool_()) if null is not None and null.any() else None
        arrow_type = self.arrow_type()
        storage_type = arrow_type.storage_type if self.tensor else arrow_type
        storage = pa.FixedSizeListArray.from_arrays(leaf, type=storage_type, mask=mask)
        return pa.ExtensionArray.from_storage(arrow_type, storage) if self.tensor else storage


def null_events(column: pa.Array) -> np.ndarray | None:
    """Which events are null, or None when none are (the common case: no work)."""
    if not column.null_count:
        return None
    return column.is_null().to_numpy(zero_copy_only=False)


def processed_field(field: pa.Field, arrow_type: pa.DataType, note: str,
                    set_meta: Mapping[bytes, bytes] | None = None,
                    drop_meta: Iterable[bytes] = (), nullable: bool | None = None) -> pa.Field:
    """The field of a transformed column: same name, other metadata kept, and what was done
    appended to `lclstream.processing` so a chain of steps reads as a history."""
    meta = dict(field.metadata or {})
    for key in drop_meta:
        meta.pop(key, None)
    meta.update(set_meta or {})
    before = meta.get(PROCESSING)
    meta[PROCESSING] = (before + b"; " if before else b"") + note.encode()
    return pa.field(field.name, arrow_type, field.nullable if nullable is None else nullable,
                    metadata=meta)


def bfloat16_bits(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of the values, rounded to nearest, ties to even, from
    float32. float64 goes through float32 first, so a value within float32 rounding of a tie
    can round differently than a direct conversion would. NaN stays a (quiet) NaN; values
    beyond bfloat16's range become inf, as IEEE rounding says."""
    f32 = np.asarray(values, dtype=np.float32)
    bits = f32.view(np.uint32)
    rounded = bits >> 16
    rounded &= 1
    rounded += 0x7FFF
    rounded += bits  # wraps only for NaNs with the top bits set, which are fixed below
    rounded >>= 16
    if out is None:
        out = np.empty(f32.shape, np.uint16)
    np.copyto(out, rounded, casting="unsafe")
    nan = np.isnan(f32)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return out


def bfloat16_values(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def fill_scalar(params: Params, name: str, layout: ArrayLayout) -> np.ndarray:
    """A fill value (pad, threshold) as one element of the column's storage type, refusing one
    the type cannot hold rather than silently wrapping or rounding it."""
    value = params.raw(name)
    dtype = layout.dtype
    if pa.types.is_boolean(layout.value_type):
        if not isinstance(value, numbers.Integral) or value not in (0, 1):
            raise params.error(name, f"must be true, false, 0 or 1 for a boolean column; "
                               f"got {shown(value)}")
        return np.asarray(bool(value))
    value = params.number(name)
    if dtype.kind in "iu" and not layout.bfloat16:
        info = np.iinfo(dtype)
        if not float(value).is_integer() or not info.min <= value <= info.max:
            raise params.error(name, f"must be an integer from {info.min} to {info.max} "
                               f"(the column is {dtype}); got {shown(value)}")
        return np.asarray(int(value), dtype=dtype)
    limit = np.finfo(np.float32 if layout.bfloat16 else dtype).max
    if math.isfinite(value) and abs(value) > float(limit):
        raise params.error(name, f"is beyond the range of {layout.logical_type} (the column's "
                           f"type); got {shown(value)}")
    if layout.bfloat16:
        return bfloat16_bits(np.asarray([value]))[0]
    return np.asarray(value, dtype=dtype)


class Step(ABC):
    """One transformation of one column. Built with `from_params` against the schema it will
    see (all checks happen there), then applied to batches of that schema."""

    name: ClassVar[str]

    def __init__(self, column: str, input_field: pa.Field, output_field: pa.Field) -> None:
        self.column = column
        self.input_field = input_field
        self.output_field = output_field

    @classmethod
    @abstractmethod
    def from_params(cls, params: dict, schema: pa.Schema) -> Step:
        """Check the parameters against the input schema; raise StepError naming the step and
        the parameter when they do not fit."""

    @abstractmethod
    def transform(self, column: pa.Array, batch: pa.RecordBatch) -> pa.Array:
        """The new column from the old one (and, for some steps, other columns of the batch)."""

    def inputs(self) -> set[str]:
        """The columns the step reads: its own, and for some steps another of the event."""
        return {self.column}

    def _index(self, schema: pa.Schema) -> int:
        index = schema.get_field_index(self.column)
        if index < 0 or not schema.field(index).type.equals(self.input_field.type):
            raise StepError(f"{self.name}: the input's column {self.column!r} is not the "
                            f"{self.input_field.type} the step was built for")
        return index

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        """The schema with this column's field replaced; the other fields are unchanged."""
        return schema.set(self._index(schema), self.output_field)

    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The batch with this column transformed; other columns are passed as they are."""
        index = self._index(batch.schema)
        columns = list(batch.columns)
        columns[index] = self.transform(columns[index], batch)
        return pa.RecordBatch.from_arrays(columns, schema=batch.schema.set(index,
                                                                           self.output_field))

    def __repr__(self) -> str:
        note = (self.output_field.metadata or {}).get(PROCESSING, b"").decode()
        return f"<{type(self).__name__} {self.column!r}: {note.rpartition('; ')[2]}>"
