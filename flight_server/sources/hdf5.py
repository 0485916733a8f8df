"""A run in one HDF5 file (LCLS smalldata, CXI) described as one table.

Describing a run opens the file once, walks its links and classifies every dataset; reading is
done by `Hdf5Reader` (hdf5_reader.py) through a handle the run's streams share.
"""

from __future__ import annotations

import os
import posixpath
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from flight_server.errors import NotFound, RunUnreadable
from flight_server.sources import chunk_codecs, layouts
from flight_server.sources.columns import (
    RAGGED_MARK,
    Column,
    dataset_column,
    ragged_column,
    run_column,
    time_column,
)
from flight_server.sources.hdf5_reader import Hdf5Reader
from flight_server.sources.layouts import raw_time_to_ns
from flight_server.sources.run import Reader, Run

CONFIG_MAX_ELEMENTS = 4096  # larger configuration datasets are summarised, not inlined
RAW_CHUNK_MIN = 64 * 1024  # bytes; smaller chunks are read through HDF5's selection path


@dataclass
class Hdf5Run(Run):
    """A run in one HDF5 file (LCLS smalldata, CXI)."""

    _offsets: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _offsets_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _handle: h5py.File | None = field(default=None, repr=False)
    _users: int = field(default=0, repr=False)
    _retired: bool = field(default=False, repr=False)
    _handle_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _datasets: dict[str, h5py.Dataset] = field(default_factory=dict, repr=False)
    _fd: int = field(default=-1, repr=False)
    _chunk_offsets: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _chunk_tables: dict[str, chunk_codecs.ChunkTable] = field(default_factory=dict, repr=False)

    # One HDF5 handle per described run, shared by its streams (h5py serialises access): a
    # fresh handle per request would re-read the chunk index from disk every time, which costs
    # more than the first batch itself.

    def reader(self) -> Reader:
        return Hdf5Reader(self)

    def acquire(self) -> None:
        """Open the run's handle if needed and count one more stream using it."""
        with self._handle_lock:
            if self._handle is None:
                self._handle = h5py.File(self.path, "r", locking=False)
                self._datasets = {}
                self._fd = os.open(self.path, os.O_RDONLY)
            self._users += 1

    def dataset(self, path: str) -> h5py.Dataset:
        """A dataset of the open handle, looked up once (a lookup costs more than a small read)."""
        ds = self._datasets.get(path)
        if ds is None:
            ds = self._datasets[path] = self._handle[path]
        return ds

    @property
    def fd(self) -> int:
        """A plain descriptor on the file, valid between acquire() and release()."""
        return self._fd

    def release(self) -> None:
        with self._handle_lock:
            self._users -= 1
            self._close_if_unused()

    def retire(self) -> None:
        """The catalog no longer serves this description: close once no stream uses it."""
        with self._handle_lock:
            self._retired = True
            self._close_if_unused()

    def _close_if_unused(self) -> None:
        if self._retired and self._users == 0 and self._handle is not None:
            self._handle.close()
            os.close(self._fd)
            self._handle = None
            self._datasets = {}

    def chunk_table(self, col: Column) -> chunk_codecs.ChunkTable:
        """Where a `codec` column's chunks are, read from HDF5's chunk index once per run."""
        with self._offsets_lock:
            table = self._chunk_tables.get(col.name)
            if table is None:
                table = self._chunk_tables[col.name] = chunk_codecs.chunk_table(
                    self.dataset(col.path), col.codec)
            return table

    def chunk_offsets(self, col: Column) -> np.ndarray:
        """File byte offset of each chunk of a `whole_chunks` column, from HDF5's chunk index,
        read once per run and cached."""
        with self._offsets_lock:
            offsets = self._chunk_offsets.get(col.name)
            if offsets is None:
                ds = self.dataset(col.path)
                chunk_bytes = col.chunk_events * col.stored_event_bytes
                offsets = np.full(ds.id.get_num_chunks(), -1, dtype=np.int64)
                for i in range(len(offsets)):
                    info = ds.id.get_chunk_info(i)
                    if info.size != chunk_bytes or info.filter_mask:
                        raise RunUnreadable(f"/{col.path}: chunk {info.chunk_offset} holds "
                                            f"{info.size} bytes, expected {chunk_bytes}")
                    offsets[info.chunk_offset[0] // col.chunk_events] = info.byte_offset
                self._chunk_offsets[col.name] = offsets
            return offsets

    def ragged_offsets(self, col: Column) -> np.ndarray:
        """Cumulative offsets (N+1,) of a ragged column, read once per run and cached."""
        with self._offsets_lock:
            offsets = self._offsets.get(col.name)
            if offsets is None:
                lengths = self.dataset(col.lengths_path)[()]
                offsets = np.zeros(self.num_events + 1, dtype=np.int64)
                np.cumsum(lengths, out=offsets[1:])
                flat_len = self.dataset(col.path).shape[0]
                if (lengths < 0).any() or offsets[-1] != flat_len:
                    raise RunUnreadable(
                        f"run {self.number} of '{self.experiment}': /{col.lengths_path} sums to "
                        f"{offsets[-1]} but /{col.path} holds {flat_len} values; the file is "
                        "inconsistent"
                    )
                self._offsets[col.name] = offsets
            return offsets


def describe(path: Path, experiment: str, number: int, within: Path | None = None) -> Hdf5Run:
    """Open a run file and describe it; any failure is a RunUnreadable naming the file.
    (`within` is for sources whose runs span files; one HDF5 file opens nothing else.)"""
    with describing(path, experiment, number, "the file is truncated, corrupted or not HDF5"):
        with h5py.File(path, "r", locking=False) as f:
            return _describe(f, path, experiment, number)


@contextmanager
def describing(path: Path, experiment: str, number: int, what: str) -> Iterator[None]:
    """What h5py raises while a run is described, as the errors clients get: the file gone is
    NotFound, anything else that is wrong with it a RunUnreadable naming it and `what` could
    be wrong."""
    try:
        yield
    except (RunUnreadable, NotFound):
        raise
    except FileNotFoundError:
        raise NotFound(f"run {number} of experiment '{experiment}' is no longer on disk") from None
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise RunUnreadable(f"run {number} of experiment '{experiment}' ({path.name}) cannot "
                            f"be read: {what} ({exc})") from None


def _describe(f: h5py.File, path: Path, experiment: str, number: int) -> Hdf5Run:
    layout = layouts.detect(f)
    if layout is None:
        raise RunUnreadable(
            f"run {number} of experiment '{experiment}' ({path.name}) has no known layout: "
            "expected LCLS2 smalldata (/timestamp), LCLS1 smalldata (/event_time) or CXI "
            "(/entry_1/data_1/data)"
        )
    num_events = int(f[layout.event_count_path].shape[0])
    datasets, soft_links = walk_links(f)

    ragged = {p for p in datasets if layout.ragged and _is_ragged(p, datasets, num_events)}
    lengths_of_ragged = {f"{p}_len" for p in ragged}
    cols: list[Column] = []
    config: dict[str, Any] = {}
    for p, ds in datasets.items():
        if p in lengths_of_ragged:
            continue  # folded into its ragged column's offsets
        if p in ragged:
            cols.append(ragged_column(p, p, f"{p}_len", native_dtype(ds.dtype), ds.shape[0],
                                      num_events, dataset_units(ds)))
        elif _in_groups(p, layout.config_groups) or ds.ndim == 0 or ds.shape[0] != num_events:
            config[p] = config_value(ds)
        elif ds.dtype.kind not in "biuf":
            config[p] = {"skipped": f"per-event {ds.dtype} data is not served as a column"}
        else:
            cols.append(_fixed_column(p, p, ds, layout))

    # A soft link to an event dataset takes the column's name (CXI's /entry_1/data_1/data is the
    # name users know); the link target stays accepted as an alias.
    aliases: dict[str, str] = {}
    by_path = {c.path: i for i, c in enumerate(cols)}
    for link, target in soft_links.items():
        i = by_path.get(target)
        if i is None or cols[i].name != target:
            if i is not None:
                aliases[link] = cols[i].name
            continue
        aliases[target] = link
        cols[i] = _fixed_column(link, target, datasets[target], layout)

    derived = [run_column()]
    start_ns = end_ns = None
    if layout.time_path in datasets and datasets[layout.time_path].shape == (num_events,):
        derived.append(time_column(layout.time_path, layout.time_epoch_unix))
        if num_events:
            raw = datasets[layout.time_path]
            ends = np.array([raw[0], raw[num_events - 1]])
            start_ns, end_ns = (int(t) for t in raw_time_to_ns(ends, layout.time_epoch_unix))
    time_first = sorted(cols, key=lambda c: c.path != layout.time_path)
    columns = {c.name: c for c in derived + time_first}
    return Hdf5Run(experiment, number, path, layout, num_events, columns, aliases, config,
                   start_ns, end_ns)


def walk_links(f: h5py.File) -> tuple[dict[str, h5py.Dataset], dict[str, str]]:
    """Datasets by hard-link path, and soft links to datasets (link -> target path).

    External links are never followed: they could name files outside the data root.
    """
    datasets: dict[str, h5py.Dataset] = {}
    soft: dict[str, str] = {}

    def visit(name: str, link: h5py.HardLink | h5py.SoftLink | h5py.ExternalLink) -> None:
        if isinstance(link, h5py.HardLink):
            obj = f.get(name)
            if isinstance(obj, h5py.Dataset):
                datasets[name] = obj
        elif isinstance(link, h5py.SoftLink):
            # obj.name would echo the link's own path; the target comes from the link itself,
            # which may be relative to the link's group.
            if isinstance(f.get(name), h5py.Dataset):  # None when dangling
                target = posixpath.join("/" + posixpath.dirname(name), link.path)
                soft[name] = posixpath.normpath(target).lstrip("/")

    f.visititems_links(visit)
    return datasets, soft


def _fixed_column(name: str, path: str, ds: h5py.Dataset, layout: layouts.Layout) -> Column:
    dtype = native_dtype(ds.dtype)
    sentinel = None
    if layout.missing_as_null and ds.ndim == 1 and path != layout.time_path:
        if dtype.kind == "f":
            sentinel = float("nan")
        elif dtype.kind == "i":
            sentinel = layout.int_sentinel
    chunk_events = ds.chunks[0] if ds.chunks else 1
    return dataset_column(name, path, dtype, tuple(ds.shape[1:]), chunk_events, dataset_units(ds),
                          sentinel, _raw_chunks_readable(ds, dtype), _codec(ds))


def _codec(ds: h5py.Dataset) -> str | None:
    """The checked decoder for a dataset compressed with bitshuffle or LZ4 in chunks of whole
    events: HDF5's own filters for them trust the block sizes a chunk stores, so a damaged file
    would make them read past the chunk (and crash the server) where these refuse it."""
    if not ds.chunks or ds.shape[0] == 0 or tuple(ds.chunks[1:]) != tuple(ds.shape[1:]):
        return None
    return chunk_codecs.decoder(chunk_codecs.filters(ds))


def _raw_chunks_readable(ds: h5py.Dataset, dtype: np.dtype) -> bool:
    """Whether a chunk's stored bytes are exactly its events' values, so a batch can copy event
    ranges straight from the file (`Hdf5Reader._pread_events`) instead of going through HDF5's
    type and selection machinery: no filters, native byte order, chunks spanning whole events,
    every chunk written, and chunks large enough that one call per chunk is cheap."""
    if not ds.chunks or ds.shape[0] == 0 or ds.dtype != dtype:
        return False
    c = ds.chunks[0]
    return (
        ds.chunks[1:] == ds.shape[1:]
        and c * ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64)) >= RAW_CHUNK_MIN
        and ds.id.get_create_plist().get_nfilters() == 0
        and ds.id.get_num_chunks() == -(-ds.shape[0] // c)
    )


def _is_ragged(path: str, datasets: dict[str, h5py.Dataset], n: int) -> bool:
    base = path.rsplit("/", 1)[-1]
    ds, lens = datasets[path], datasets.get(f"{path}_len")
    return (
        ds.ndim == 1
        and ds.dtype.kind in "biuf"
        and lens is not None
        and lens.shape == (n,)
        and lens.dtype.kind in "iu"
        and (base.startswith("var_") or bool(ds.attrs.get(RAGGED_MARK, False)))
    )


def _in_groups(path: str, groups: tuple[str, ...]) -> bool:
    return any(path == g or path.startswith(g + "/") for g in groups)


def native_dtype(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("=") if dtype.byteorder not in "=|" else dtype


def dataset_units(ds: h5py.Dataset) -> str | None:
    value = ds.attrs.get("units", ds.attrs.get("unit"))
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def config_value(ds: h5py.Dataset) -> Any:
    if ds.size > CONFIG_MAX_ELEMENTS or ds.dtype.kind not in "biufSUO":
        return {"shape": list(ds.shape), "dtype": str(ds.dtype)}
    value = ds[()]
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "SO":
            return [v.decode(errors="replace") if isinstance(v, bytes) else str(v)
                    for v in value.ravel()]
        return value.tolist()
    return value.item() if isinstance(value, np.generic) else value
