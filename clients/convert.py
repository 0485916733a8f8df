"""Arrow -> Polars, Pandas and NumPy, without copying where the formats allow it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def is_tensor(dtype: pa.DataType) -> bool:
    return isinstance(dtype, pa.FixedShapeTensorType)


def tensor_as_nested_lists(arr: pa.Array) -> pa.Array:
    """fixed_shape_tensor (flat storage) -> nested fixed_size_list, same buffers.

    Polars maps nested fixed-size lists to its multi-dimensional Array dtype, so a detector frame
    arrives as Array(UInt16, shape=(1, 128, 128)) rather than an opaque extension column.
    """
    storage = arr.storage
    size = storage.type.list_size
    # the slice's own slots, those under null events included (`flatten` would drop them)
    values = storage.values.slice(storage.offset * size, len(storage) * size)
    shape = arr.type.shape
    nested: pa.Array = values
    for size in reversed(shape):
        nested = pa.FixedSizeListArray.from_arrays(nested, size)
    if storage.null_count:
        validity = pa.array(storage.is_valid().to_numpy(zero_copy_only=False)).buffers()[1]
        nested = pa.FixedSizeListArray.from_buffers(
            nested.type, len(storage), [validity], children=[nested.values],
            null_count=storage.null_count,
        )
    return nested


def _chunked_map(col: pa.ChunkedArray, fn) -> pa.ChunkedArray:
    chunks = [fn(c) for c in col.chunks]
    if chunks:
        return pa.chunked_array(chunks)
    return pa.chunked_array([], type=fn(pa.array([], type=col.type)).type)


def for_dataframes(table: pa.Table) -> pa.Table:
    """Replace tensor columns by nested fixed-size lists (zero-copy), keep everything else."""
    for i, field in enumerate(table.schema):
        if is_tensor(field.type):
            col = _chunked_map(table.column(i), tensor_as_nested_lists)
            table = table.set_column(i, field.with_type(col.type), col)
    return table


def to_polars(table: pa.Table):
    """A Polars DataFrame; tensors become multi-dimensional Array columns."""
    import polars as pl

    return pl.from_arrow(for_dataframes(table), rechunk=False)


def to_pandas(table: pa.Table):
    """A Pandas DataFrame; each tensor cell is an ndarray of the tensor's shape (a view into one
    array per column, not a nest of 1-D object arrays)."""
    tensors = [i for i, f in enumerate(table.schema) if is_tensor(f.type)]
    plain = table.drop_columns([table.schema.field(i).name for i in tensors])
    frame = plain.to_pandas()
    for i in tensors:
        arr = column_to_numpy(table.column(i))
        frame.insert(i, table.schema.field(i).name, list(arr) if len(arr) else [])
    return frame


def array_to_numpy(arr: pa.Array) -> np.ndarray:
    """One chunk -> ndarray of shape (events, *per-event shape), zero-copy when there are no
    nulls. A tensor or fixed-size-list chunk with null events (a detector that missed a shot)
    becomes a masked array whose null events are masked whole; scalars with nulls get
    pyarrow's NaN semantics."""
    if is_tensor(arr.type):
        shape, lists = list(arr.type.shape), arr.storage
    elif pa.types.is_fixed_size_list(arr.type):
        shape, lists = [arr.type.list_size], arr
    else:
        return arr.to_numpy(zero_copy_only=False)
    # `.values` keeps the slots under null events (`flatten` would drop them), so every event
    # has its place; only the slice's own slots are taken.
    flat = lists.values.slice(lists.offset * lists.type.list_size,
                              len(lists) * lists.type.list_size)
    while pa.types.is_fixed_size_list(flat.type):  # nested lists: down to the leaf values
        shape = [*shape, flat.type.list_size]
        flat = flat.values.slice(flat.offset * flat.type.list_size,
                                 len(flat) * flat.type.list_size)
    values = flat.to_numpy(zero_copy_only=flat.null_count == 0).reshape(len(arr), *shape)
    if not arr.null_count:
        return values
    missing = arr.is_null().to_numpy(zero_copy_only=False)
    mask = np.broadcast_to(missing.reshape(-1, *[1] * len(shape)), values.shape)
    return np.ma.masked_array(values, mask=mask)


def column_to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A whole column as one ndarray (events, *shape).

    A single chunk is returned without copying; several chunks (several batches on the wire) are
    joined with exactly one copy, which is unavoidable for one contiguous array. Iterate over
    `Client.stream()` and call `array_to_numpy` per batch to stay copy-free.
    """
    if isinstance(col, pa.Array):
        return array_to_numpy(col)
    chunks = [array_to_numpy(c) for c in col.chunks]
    if len(chunks) == 1:
        return chunks[0]
    if not chunks:
        return array_to_numpy(pa.array([], type=col.type))
    if any(isinstance(c, np.ma.MaskedArray) for c in chunks):
        return np.ma.concatenate(chunks)
    return np.concatenate(chunks)
