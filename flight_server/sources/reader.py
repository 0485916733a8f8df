"""Read an event slice of a run into a RecordBatch without copying what HDF5 hands over.

Each column is read with `read_direct` into a fresh numpy buffer that Arrow wraps as-is
(`pa.py_buffer`), so the only copy of the data on the server is the one HDF5 makes out of the
file. The buffer lives exactly as long as the batch: when gRPC has written it, it is freed.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa

from flight_server.errors import RunUnreadable
from flight_server.sources.columns import TIME_TYPE, Column, Kind
from flight_server.sources.run import Run, raw_time_to_ns


class RunReader:
    """An open handle on one run file; one per stream, closed when the stream ends."""

    def __init__(self, run: Run) -> None:
        self.run = run
        try:
            self._file = h5py.File(run.path, "r", locking=False)
        except OSError as exc:
            raise self._unreadable(exc) from None

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RunReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, columns: list[Column], start: int, stop: int, step: int = 1) -> pa.RecordBatch:
        """Events range(start, stop, step) of the given columns as one RecordBatch."""
        n = len(range(start, stop, step))
        raw_time: dict[str, np.ndarray] = {}  # the raw time dataset, read once per batch
        arrays = []
        try:
            for col in columns:
                arrays.append(self._read_column(col, start, stop, step, n, raw_time))
        except OSError as exc:
            raise self._unreadable(exc) from None
        schema = pa.schema([c.field for c in columns])
        return pa.RecordBatch.from_arrays(arrays, schema=schema)

    def _read_column(self, col: Column, start: int, stop: int, step: int, n: int,
                     raw_time: dict[str, np.ndarray]) -> pa.Array:
        if col.kind is Kind.RUN:
            return pa.array(np.full(n, self.run.number, dtype=np.int32))
        if col.kind is Kind.TIME:
            ns = raw_time_to_ns(self._raw_time(col.path, start, stop, step, n, raw_time),
                                self.run.layout.time_epoch_unix)
            return pa.Array.from_buffers(TIME_TYPE, n, [None, pa.py_buffer(ns)])
        if col.kind is Kind.RAGGED:
            return self._read_ragged(col, start, stop, step)
        if col.path == self.run.layout.time_path and col.path in raw_time:
            values = raw_time[col.path]
        else:
            values = self._read_fixed(col, start, stop, step, n)
            if col.path == self.run.layout.time_path:
                raw_time[col.path] = values
        return _wrap_fixed(col, values, n)

    def _raw_time(self, path: str, start: int, stop: int, step: int, n: int,
                  cache: dict[str, np.ndarray]) -> np.ndarray:
        if path not in cache:
            buf = np.empty(n, dtype=np.int64)
            if n:
                self._file[path].read_direct(buf, np.s_[start:stop:step])
            cache[path] = buf
        return cache[path]

    def _read_fixed(self, col: Column, start: int, stop: int, step: int, n: int) -> np.ndarray:
        buf = np.empty((n, *col.shape), dtype=col.dtype)
        if n:
            self._file[col.path].read_direct(buf, np.s_[start:stop:step])
        return buf

    def _read_ragged(self, col: Column, start: int, stop: int, step: int) -> pa.Array:
        offsets = self.run.ragged_offsets(self._file, col)
        lo, hi = int(offsets[start]), int(offsets[stop])
        if hi - lo >= 2**31:
            raise RunUnreadable(f"/{col.path}: over 2**31 ragged values in one batch; ask for "
                                "fewer events per request")
        values = np.empty(hi - lo, dtype=col.dtype)
        if hi > lo:
            self._file[col.path].read_direct(values, np.s_[lo:hi])
        value_type = col.field.type.value_type
        arr = pa.ListArray.from_buffers(
            col.field.type,
            stop - start,
            [None, pa.py_buffer((offsets[start : stop + 1] - lo).astype(np.int32))],
            children=[pa.Array.from_buffers(value_type, hi - lo, [None, pa.py_buffer(values)])],
        )
        if step != 1:
            arr = arr.take(pa.array(np.arange(0, stop - start, step)))
        return arr

    def _unreadable(self, exc: Exception) -> RunUnreadable:
        name = Path(self.run.path).name
        return RunUnreadable(
            f"run {self.run.number} of experiment '{self.run.experiment}' ({name}) cannot be "
            f"read: the file is truncated or corrupted ({exc})"
        )


def _wrap_fixed(col: Column, values: np.ndarray, n: int) -> pa.Array:
    """Wrap a numpy buffer as the column's Arrow type, zero-copy (booleans are bit-packed)."""
    value_type = col.field.type.storage_type if col.kind is Kind.TENSOR else col.field.type
    if col.kind is Kind.SCALAR:
        if col.dtype.kind == "b":
            return pa.array(values, type=pa.bool_())
        validity, nulls = None, 0
        if col.sentinel is not None:
            present = ~np.isnan(values) if col.dtype.kind == "f" else values != col.sentinel
            nulls = n - int(np.count_nonzero(present))
            if nulls:
                validity = pa.py_buffer(np.packbits(present, bitorder="little"))
        return pa.Array.from_buffers(value_type, n, [validity, pa.py_buffer(values)], nulls)
    leaf_type = value_type.value_type
    flat = values.reshape(-1)
    if col.dtype.kind == "b":
        leaf = pa.array(flat, type=pa.bool_())
    else:
        leaf = pa.Array.from_buffers(leaf_type, flat.size, [None, pa.py_buffer(flat)])
    storage = pa.FixedSizeListArray.from_arrays(leaf, value_type.list_size)
    if col.kind is Kind.TENSOR:
        return pa.ExtensionArray.from_storage(col.field.type, storage)
    return storage
