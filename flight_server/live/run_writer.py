"""Finish a live stream as an HDF5 run file in the LCLS2 smalldata layout.

The inverse of sources/columns.py: every stored column becomes the dataset `describe()` and
`Hdf5Reader` turn back into the same column, so a finished stream is served as an ordinary run.
Column names are dataset paths; nulls are stored as the layout's missing-value sentinels; the
derived `run` and `time` columns are not stored, the reader derives them from the file again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flight_server.errors import InvalidArgument
from flight_server.fsutil import atomic_h5
from flight_server.sources.columns import RAGGED_MARK, Kind
from flight_server.sources.layouts import LCLS1, LCLS2, LCLS2_EPOCH
from schemas import metadata as md

CHUNK_BYTES = 1 << 20  # per-event datasets are chunked like acquisition writers chunk them
RAW_TIME = LCLS2.time_path  # its presence (an integer vector) is what marks the LCLS2 layout
CONFIG_GROUP = LCLS2.config_groups[0]
NS_PER_S = 1_000_000_000
ACCEPTED = (
    "accepted: int8..int64, uint8..uint64 and float16/32/64 scalars; fixed_size_list or "
    "arrow.fixed_shape_tensor of those; list of those"
)


@dataclass(frozen=True)
class _Column:
    index: int  # position in the stream's schema
    name: str  # the column name, which is also the dataset path
    kind: Kind
    dtype: np.dtype
    shape: tuple[int, ...] = ()  # per-event shape of scalar, fixed_size_list and tensor columns
    units: str | None = None


@dataclass(frozen=True)
class _Plan:
    columns: list[_Column]
    raw_time: int | None  # index of a `timestamp` column, written as is
    time: int | None  # else index of a `time` column to pack as the raw time


def check_schema(schema: pa.Schema) -> None:
    """Raise InvalidArgument (naming the column, its type and what would be accepted) if a
    column could not be stored as a run column."""
    _plan(schema)


def write_run(
    path: Path,
    schema: pa.Schema,
    batches: Iterable[tuple[pa.RecordBatch, int]],
    config: dict | None = None,
) -> int:
    """Write the batches (each with its log-append time in Unix ns) to `path` as an LCLS2 run
    and return its event count. The file appears complete or not at all; memory is bounded by
    one batch, since every dataset is resizable and appended to batch by batch."""
    plan = _plan(schema)
    settings = _config_items(config or {}, CONFIG_GROUP)  # refused before anything is written
    with atomic_h5(Path(path)) as f:
        time_type = schema.field(plan.raw_time).type if plan.raw_time is not None else pa.int64()
        raw_time = _create(f, RAW_TIME, _dtype(time_type), (), None)
        datasets = {c.name: _create(f, c.name, c.dtype, c.shape, c.units) for c in plan.columns}
        lengths = {c.name: _create(f, c.name + "_len", np.dtype(np.int64), (), None)
                   for c in plan.columns if c.kind is Kind.RAGGED}
        for name in lengths:
            datasets[name].attrs[RAGGED_MARK] = True
        events = 0
        for i, (batch, append_ns) in enumerate(batches):
            if not batch.schema.equals(schema, check_metadata=False):
                raise InvalidArgument(f"batch {i} does not have the stream's schema: "
                                      f"{batch.schema} is not {schema}")
            _append(raw_time, _raw_times(batch, plan, int(append_ns)))
            for col in plan.columns:
                arr = batch.column(col.index)
                if col.kind is Kind.RAGGED:
                    # A null list has no entries: psana's var_NAME_len is 0 for it.
                    counts = pc.fill_null(pc.list_value_length(arr), 0).to_numpy()
                    _append(lengths[col.name], counts)
                    _append(datasets[col.name], _values(col, arr.flatten()))
                else:
                    _append(datasets[col.name], _fixed(col, arr))
            events += batch.num_rows
        for key, value in settings:
            f.create_dataset(key, data=value)
    return events


def _plan(schema: pa.Schema) -> _Plan:
    twice = sorted({n for n in schema.names if schema.names.count(n) > 1})
    if twice:
        raise InvalidArgument(f"column names {twice} appear more than once; rename all but one")
    columns: list[_Column] = []
    raw_time = time = None
    for i, field in enumerate(schema):
        name, t = field.name, field.type
        if name == md.RUN_COLUMN:
            if not pa.types.is_integer(t):
                raise _refused(field, "'run' is the run number the reader derives; rename it")
        elif name == md.TIME_COLUMN:
            if not pa.types.is_timestamp(t):
                raise _refused(field, "'time' is derived from the raw 'timestamp'; send it as "
                                      "timestamp[ns, tz=UTC] or rename the column")
            time = i
        elif name == RAW_TIME:
            if t not in (pa.int64(), pa.uint64()):
                raise _refused(field, "'timestamp' is the LCLS2 raw time, int64 or uint64 "
                                      "(seconds since 1990-01-01 << 32 | ns); send event times "
                                      "as a 'time' column of timestamp type instead")
            raw_time = i
        else:
            columns.append(_column(i, field))
    # Every dataset the file will hold, by path, with whom it is for: two columns must not share
    # a path, nor may one need a group where another is a dataset.
    owners = {RAW_TIME: "the raw time 'timestamp'"}
    for col in columns:
        paths = [(col.name, f"column '{col.name}'")]
        if col.kind is Kind.RAGGED or col.name.rsplit("/", 1)[-1].startswith("var_"):
            # The reader takes X_len as the per-event lengths of a ragged X.
            paths.append((col.name + "_len", f"the lengths of ragged '{col.name}'"))
        for p, owner in paths:
            if p in owners:
                raise InvalidArgument(f"{owners[p]} and {owner} would both be stored as /{p}; "
                                      "rename one of them")
            owners[p] = owner
    _check_groups(owners)
    return _Plan(columns, raw_time, None if raw_time is not None else time)


def _column(index: int, field: pa.Field) -> _Column:
    name, t = field.name, field.type
    parts = name.split("/")
    if any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise InvalidArgument(f"column name {name!r} is not an HDF5 dataset path: use names "
                              "separated by single '/', without a leading or trailing '/' "
                              "(e.g. 'gmd/energy')")
    if parts[0] == CONFIG_GROUP:
        raise InvalidArgument(f"column '{name}': /{CONFIG_GROUP} holds per-run configuration, "
                              "not events; pass such values as the run's config")
    if name == LCLS1.time_path:
        raise InvalidArgument(f"column '{name}': a top-level /{name} marks the LCLS1 layout, so "
                              "the file would not read as LCLS2; rename it (e.g. 'evr/event_time')")
    meta = field.metadata or {}
    units = meta[md.UNITS].decode() if md.UNITS in meta else None
    if _numeric(t):
        return _Column(index, name, Kind.SCALAR, _dtype(t), (), units)
    if pa.types.is_fixed_size_list(t) and _numeric(t.value_type):
        shape, kind = (t.list_size,), Kind.LIST
    elif isinstance(t, pa.FixedShapeTensorType) and _numeric(t.value_type):
        shape, kind = tuple(t.shape), Kind.TENSOR
        if t.permutation is not None and list(t.permutation) != list(range(len(shape))):
            raise _refused(field, "tensors are stored in row-major order; send it without a "
                                  "permutation")
    elif (pa.types.is_list(t) or pa.types.is_large_list(t)) and _numeric(t.value_type):
        # psana names ragged datasets var_NAME; other names are marked RAGGED_MARK, so that a
        # step's lists (peaks' x, y, intensity) keep their names in the run.
        return _Column(index, name, Kind.RAGGED, _dtype(t.value_type), (), units)
    else:
        raise _refused(field, _hint(field))
    if not shape or 0 in shape:
        raise _refused(field, "a per-event array needs at least one value")
    return _Column(index, name, kind, _dtype(t.value_type), shape, units)


def _hint(field: pa.Field) -> str:
    t = field.type
    if pa.types.is_boolean(t):
        return "cast it to uint8"
    if pa.types.is_dictionary(t):
        return "decode it (cast it to its value type) first"
    if pa.types.is_struct(t):
        return f"send its fields as columns of their own, named '{field.name}/<field>'"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t):
        return "per-run text belongs in the run's config; per-event labels need an integer code"
    if pa.types.is_temporal(t):
        return "cast it to int64 (nanoseconds); only 'time' may be a timestamp"
    if pa.types.is_decimal(t):
        return "cast it to float64"
    if isinstance(t, (pa.ListType, pa.LargeListType, pa.FixedSizeListType)):
        return ("list values must be integers or floats, one level deep "
                "(arrow.fixed_shape_tensor for N-D arrays)")
    return "cast it to one of those"


def _refused(field: pa.Field, hint: str) -> InvalidArgument:
    return InvalidArgument(f"column '{field.name}' of type {field.type} cannot be stored in a run "
                           f"file ({ACCEPTED}): {hint}")


def _check_groups(owners: dict[str, str]) -> None:
    for p, owner in owners.items():
        parts = p.split("/")
        for k in range(1, len(parts)):
            group = "/".join(parts[:k])
            if group in owners:
                raise InvalidArgument(f"{owner} needs /{group} to be a group, but {owners[group]} "
                                      f"is stored there as a dataset; rename one of them")


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _dtype(t: pa.DataType) -> np.dtype:
    return np.dtype(t.to_pandas_dtype())


def check_nulls(batch: pa.RecordBatch) -> None:
    """Refuse a batch with nulls its run file could not mark as missing, when it arrives rather
    than when the stream ends."""
    for field, column in zip(batch.schema, batch.columns, strict=True):
        if column.null_count and pa.types.is_integer(field.type) and \
                np.iinfo(_dtype(field.type)).min > LCLS2.int_sentinel:
            raise InvalidArgument(
                f"column '{field.name}' ({field.type}) has nulls, but an LCLS2 run file marks a "
                f"missing value only as NaN (floats) or {LCLS2.int_sentinel} (int32, int64); "
                "cast the column to one of those types or send no nulls")


def _missing(col: _Column) -> float | int:
    """The LCLS2 sentinel `run.py` serves back as null, where the column's type can hold one."""
    if col.dtype.kind == "f":
        return math.nan
    if np.iinfo(col.dtype).min <= LCLS2.int_sentinel:
        return LCLS2.int_sentinel
    raise InvalidArgument(
        f"column '{col.name}' ({col.dtype}) has nulls, but an LCLS2 run file marks a missing "
        f"value only as NaN (floats) or {LCLS2.int_sentinel} (int32, int64); cast the column to "
        "one of those types or send no nulls"
    )


def _values(col: _Column, arr: pa.Array) -> np.ndarray:
    """A primitive array as numpy: a view of its values buffer (offset honoured) unless nulls
    have to be replaced by the sentinel."""
    if arr.null_count:
        arr = pc.fill_null(arr, pa.scalar(col.dtype.type(_missing(col)), arr.type))
    return arr.to_numpy(zero_copy_only=True)


def _fixed(col: _Column, arr: pa.Array) -> np.ndarray:
    """(events, *shape) values of a scalar, fixed_size_list or tensor column."""
    if col.kind is Kind.SCALAR:
        return _values(col, arr)
    storage = arr.storage if isinstance(arr, pa.ExtensionArray) else arr
    size, n = math.prod(col.shape), len(storage)
    # `.values` ignores the list array's own offset; flatten() would drop null events' slots.
    flat = _values(col, storage.values.slice(storage.offset * size, n * size))
    if storage.null_count:  # a missing event is an array of sentinels, as psana fills it
        flat = flat if flat.flags.writeable else flat.copy()
        flat.reshape(n, size)[storage.is_null().to_numpy(zero_copy_only=False)] = _missing(col)
    return flat.reshape(n, *col.shape)


def _raw_times(batch: pa.RecordBatch, plan: _Plan, append_ns: int) -> np.ndarray:
    """The batch's LCLS2 raw times: the `timestamp` column as is, else the `time` column packed,
    else the append time; missing times are the append time."""
    if plan.raw_time is not None:
        arr = batch.column(plan.raw_time)
        return pc.fill_null(arr, pa.scalar(_pack(append_ns), arr.type)).to_numpy()
    if plan.time is not None:
        arr = batch.column(plan.time)
        ns = pc.cast(arr, pa.timestamp("ns", arr.type.tz)).cast(pa.int64())
        return _pack(pc.fill_null(ns, append_ns).to_numpy())
    return _pack(np.full(batch.num_rows, append_ns, dtype=np.int64))


def _pack(unix_ns: Any) -> Any:
    return ((unix_ns // NS_PER_S - LCLS2_EPOCH) << 32) | (unix_ns % NS_PER_S)


def _create(f: h5py.File, path: str, dtype: np.dtype, shape: tuple[int, ...],
            units: str | None) -> h5py.Dataset:
    """An empty, resizable dataset chunked along the event axis (ragged values: along values)."""
    chunk = max(1, CHUNK_BYTES // (dtype.itemsize * math.prod(shape)))
    ds = f.create_dataset(path, shape=(0, *shape), maxshape=(None, *shape),
                          chunks=(chunk, *shape), dtype=dtype)
    if units is not None:
        ds.attrs["units"] = units
    return ds


def _append(ds: h5py.Dataset, values: np.ndarray) -> None:
    start = ds.shape[0]
    if len(values):
        ds.resize(start + len(values), axis=0)
        ds[start:] = values


def _config_items(config: dict, prefix: str) -> list[tuple[str, Any]]:
    """Configuration as (dataset path, value) pairs, nested dicts as groups."""
    items: list[tuple[str, Any]] = []
    for key, value in config.items():
        path = f"{prefix}/{key}"
        if not isinstance(key, str) or any(p in ("", ".", "..") for p in key.split("/")):
            raise InvalidArgument(f"configuration key {key!r} under /{prefix} is not a dataset "
                                  "name: use non-empty names separated by single '/'")
        if isinstance(value, dict):
            items += _config_items(value, path)
        else:
            items.append((path, _config_value(path, value)))
    if prefix == CONFIG_GROUP:
        _check_groups({p: f"configuration /{p}" for p, _ in items})
    return items


def _config_value(path: str, value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return np.array(value, dtype=h5py.string_dtype())
    try:
        arr = np.asarray(value)
    except (ValueError, OverflowError):
        arr = None
    if arr is None or arr.dtype.kind not in "biuf":
        raise InvalidArgument(f"configuration /{path} = {value!r:.80}: accepted values are "
                              "numbers, strings, lists of numbers or of strings, and dicts of "
                              "those")
    return arr
