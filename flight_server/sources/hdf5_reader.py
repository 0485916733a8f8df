"""Read an event slice of a run into a RecordBatch without copying what HDF5 hands over.

Each column is read with `read_direct` into a fresh numpy buffer that Arrow wraps as-is
(`pa.py_buffer`), so the only copy of the data on the server is the one HDF5 makes out of the
file. The buffer lives exactly as long as the batch: when gRPC has written it, it is freed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import pyarrow as pa
from h5py import h5s

from flight_server.buffers import allocate
from flight_server.errors import RunUnreadable
from flight_server.sources import chunk_codecs
from flight_server.sources.columns import TIME_TYPE, Column, Kind
from flight_server.sources.layouts import raw_time_to_ns
from flight_server.sources.run import Reader

if TYPE_CHECKING:
    from flight_server.sources.hdf5 import Hdf5Run


class Hdf5Reader(Reader):
    """Reads one stream's batches through the run's shared file handle; close when done."""

    def __init__(self, run: Hdf5Run) -> None:
        self.run = run
        try:
            run.acquire()
        except OSError as exc:
            raise self._unreadable(exc) from None
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.run.release()

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
        return wrap_fixed(col, values, n)

    def _raw_time(self, path: str, start: int, stop: int, step: int, n: int,
                  cache: dict[str, np.ndarray]) -> np.ndarray:
        if path not in cache:
            buf = allocate((n,), np.dtype(np.int64))
            if n:
                read_slab(self.run.dataset(path), buf, start, step)
            cache[path] = buf
        return cache[path]

    def _read_fixed(self, col: Column, start: int, stop: int, step: int, n: int) -> np.ndarray:
        buf = allocate((n, *col.shape), col.dtype)
        if not n:
            return buf
        if col.codec is not None:
            chunk_codecs.read_events(self.run.fd, self.run.chunk_table(col), buf, start, step,
                                     pread_exactly)
        elif col.whole_chunks and step == 1:
            self._pread_events(col, start, stop, buf)
        else:
            read_slab(self.run.dataset(col.path), buf, start, step)
        return buf

    def _pread_events(self, col: Column, start: int, stop: int, buf: np.ndarray) -> None:
        """Copy events straight from the file into `buf`: in an uncompressed chunk spanning whole
        events, events are stored contiguously in C order, so any event range of a chunk is one
        byte range. One syscall per chunk, no HDF5 selection machinery, and the GIL is released
        while the kernel copies (the read-ahead overlaps with sending for real)."""
        offsets = self.run.chunk_offsets(col)
        c, event_bytes = col.chunk_events, col.stored_event_bytes
        out = buf.reshape(-1).view(np.uint8)
        lo = start
        while lo < stop:
            chunk = lo // c
            hi = min((chunk + 1) * c, stop)
            dest = out[(lo - start) * event_bytes : (hi - start) * event_bytes]
            pread_exactly(self.run.fd, dest, int(offsets[chunk]) + (lo - chunk * c) * event_bytes)
            lo = hi

    def _read_ragged(self, col: Column, start: int, stop: int, step: int) -> pa.Array:
        offsets = self.run.ragged_offsets(col)
        lo, hi = int(offsets[start]), int(offsets[stop])
        if hi - lo >= 2**31:
            raise RunUnreadable(f"/{col.path}: over 2**31 ragged values in one batch; ask for "
                                "fewer events per request")
        values = allocate((hi - lo,), col.dtype)
        if hi > lo:
            read_slab(self.run.dataset(col.path), values, lo, 1)
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


def read_slab(ds: h5py.Dataset, buf: np.ndarray, start: int, step: int) -> None:
    """Events start, start+step, ... (as many as `buf` holds) into `buf`, through h5py's
    low-level API: half the per-call cost of Dataset.read_direct, which matters for the many
    small reads of a small first batch."""
    file_space = ds.id.get_space()
    rest = buf.shape[1:]
    file_space.select_hyperslab((start, *(0,) * len(rest)), buf.shape,
                                (step, *(1,) * len(rest)))
    ds.id.read(h5s.create_simple(buf.shape), file_space, buf)


def pread_exactly(fd: int, dest: np.ndarray, offset: int) -> None:
    view = memoryview(dest)
    while len(view):
        got = os.preadv(fd, [view], offset)
        if got == 0:
            raise OSError(f"unexpected end of file at byte {offset}")
        view, offset = view[got:], offset + got


def wrap_fixed(col: Column, values: np.ndarray, n: int) -> pa.Array:
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


def with_nulls(arr: pa.Array, present: np.ndarray) -> pa.Array:
    """The same values with a validity bitmap: null where `present` is False."""
    nulls = len(present) - int(np.count_nonzero(present))
    if not nulls:
        return arr
    validity = pa.py_buffer(np.packbits(present, bitorder="little"))
    storage = arr.storage if isinstance(arr, pa.ExtensionArray) else arr
    if isinstance(storage.type, pa.FixedSizeListType):
        out = pa.Array.from_buffers(storage.type, len(storage), [validity], null_count=nulls,
                                    children=[storage.values])
    else:
        out = pa.Array.from_buffers(storage.type, len(storage),
                                    [validity, storage.buffers()[1]], null_count=nulls)
    if isinstance(arr, pa.ExtensionArray):
        return pa.ExtensionArray.from_storage(arr.type, out)
    return out
