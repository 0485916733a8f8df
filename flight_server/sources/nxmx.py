"""NeXus/NXmx series (DECTRIS Eiger, Jungfrau through the same writers): one run per master
file, one row per frame in image-number order across its data files.

The master's `/entry/data/data_NNNNNN` external links name the data files; they are opened
directly, and only when they resolve inside the experiment's tree (a link is never followed by
HDF5 itself, so a crafted master cannot make the server open another experiment's file). The
frame column keeps the data files' path (`entry/data/data`), dtype and shape.

Frames are read as stored chunks (a `pread` at the offset HDF5's chunk index gives) and
decompressed here, with the dataset's own filter options, on the read pool: bitshuffle-LZ4
(32008) and LZ4 (32004) release the GIL, so batches decompress on every core while earlier ones
are on the wire. Any other filter goes through HDF5's pipeline (hdf5plugin registers the
facility filters); a filter nobody registered is a clear error when the run is described.

Per-frame datasets of the master (goniometer angles) are columns too; the other datasets are
per-run: small ones inlined in `lclstream.config`, and all numeric ones (the pixel mask, the
geometry) served as the run's one-row table "config". The beam and detector geometry a
crystallographer needs first is also in the schema metadata key `nxmx`, with units.
"""

from __future__ import annotations

import bisect
import datetime as dt
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers the facility filters with HDF5 for the fallback path)
import numpy as np
import pyarrow as pa

from flight_server.buffers import allocate
from flight_server.errors import RunUnreadable
from flight_server.sources import chunk_codecs
from flight_server.sources.columns import Column, Kind, dataset_column, run_column
from flight_server.sources.hdf5 import (
    config_value,
    dataset_units,
    describing,
    native_dtype,
    walk_links,
)
from flight_server.sources.hdf5_reader import pread_exactly, read_slab, wrap_fixed
from flight_server.sources.layouts import Layout
from flight_server.sources.run import Reader, Run
from schemas import metadata as md

NXMX = Layout(name="nxmx", event_count_path="entry/data/data", time_path=None,
              time_epoch_unix=0)
FRAMES = "entry/data/data"  # the frame column: the dataset path in every data file
CONFIG_TABLE = "config"
FRAME_UNITS = "counts"  # detector counts: photons, for a photon-counting Eiger

# Geometry users look for first, as NXmx names it: (metadata key, paths under /entry tried
# in order; older DECTRIS firmware keeps the wavelength under the monochromator).
GEOMETRY = (
    ("wavelength", ("instrument/beam/incident_wavelength",
                    "instrument/monochromator/wavelength",
                    "instrument/beam/wavelength")),
    ("detector_distance", ("instrument/detector/detector_distance",)),
    ("beam_center_x", ("instrument/detector/beam_center_x",)),
    ("beam_center_y", ("instrument/detector/beam_center_y",)),
    ("x_pixel_size", ("instrument/detector/x_pixel_size",)),
    ("y_pixel_size", ("instrument/detector/y_pixel_size",)),
    ("count_time", ("instrument/detector/count_time",)),
    ("frame_time", ("instrument/detector/frame_time",)),
    ("sensor_material", ("instrument/detector/sensor_material",)),
    ("sensor_thickness", ("instrument/detector/sensor_thickness",)),
    ("description", ("instrument/detector/description",)),
    ("pixel_mask", ("instrument/detector/pixel_mask",
                    "instrument/detector/detectorSpecific/pixel_mask")),
)


@dataclass(frozen=True)
class Segment:
    """The frames one data file holds: run frames [first, first + count)."""

    path: Path
    dataset: str
    first: int
    count: int
    chunk_frames: int  # frames per chunk (whole frames), 0 when chunks cut frames
    decoder: str  # "raw" | "bitshuffle-lz4" | "bitshuffle-zstd" | "lz4" | "hdf5"


@dataclass
class NxmxRun(Run):
    frame_shape: tuple[int, ...] = ()
    stored_dtype: np.dtype | None = None  # as in the files (the column's is native-endian)
    segments: list[Segment] = field(default_factory=list)
    per_frame: list[str] = field(default_factory=list)  # master datasets read per frame
    per_run: list[str] = field(default_factory=list)  # numeric master datasets without one
    geometry: dict[str, Any] = field(default_factory=dict)  # schema metadata `nxmx`
    _starts: list[int] = field(default_factory=list, repr=False)
    _chunks: dict[int, chunk_codecs.ChunkTable] = field(default_factory=dict, repr=False)
    _chunks_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _config_table: Run | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._starts = [s.first for s in self.segments]

    def reader(self) -> NxmxReader:
        return NxmxReader(self)

    def schema_metadata(self) -> dict[bytes, bytes]:
        return super().schema_metadata() | {
            md.NXMX: json.dumps(self.geometry, separators=(",", ":")).encode()}

    def tables(self) -> list[str]:
        return [CONFIG_TABLE] if self.per_run else []

    def _table(self, name: str) -> Run | None:
        if name != CONFIG_TABLE or not self.per_run:
            return None
        if self._config_table is None:
            self._config_table = _describe_config(self)
        return self._config_table

    def segment(self, frame: int) -> tuple[int, Segment]:
        i = bisect.bisect_right(self._starts, frame) - 1
        return i, self.segments[i]

    def chunk_index(self, i: int) -> chunk_codecs.ChunkTable:
        """Where segment i's chunks are and how to decode them, read from HDF5's chunk index
        once per run."""
        with self._chunks_lock:
            index = self._chunks.get(i)
            if index is None:
                index = self._chunks[i] = _read_chunk_index(self, self.segments[i])
            return index


def describe(path: Path, experiment: str, number: int, within: Path) -> NxmxRun:
    with describing(path, experiment, number,
                    "the master file is truncated, corrupted or not NXmx"):
        with h5py.File(path, "r", locking=False) as master:
            return _describe(master, path, experiment, number, Path(within))


def _describe(master: h5py.File, path: Path, experiment: str, number: int,
              within: Path) -> NxmxRun:
    where = f"run {number} of experiment '{experiment}' ({path.name})"
    data = master.get("entry/data")
    if not isinstance(data, h5py.Group):
        raise RunUnreadable(f"{where} has no /entry/data group: not an NXmx master file")
    segments, shape, stored = _segments(master, data, path, within, where)
    frames = sum(s.count for s in segments)

    datasets, _ = walk_links(master)  # never follows external links
    per_frame, per_run, config = [], [], {}
    for p, ds in datasets.items():
        if p.startswith("entry/data/"):
            continue
        if ds.ndim >= 1 and ds.shape[0] == frames and frames > 1 and ds.dtype.kind in "biuf":
            per_frame.append(p)
            continue
        config[p] = config_value(ds)
        if ds.dtype.kind in "biuf":
            per_run.append(p)

    frame_dtype = native_dtype(stored)
    columns = [run_column(), dataset_column(FRAMES, FRAMES, frame_dtype, shape,
                                            segments[0].chunk_frames or 1, FRAME_UNITS, None)]
    for p in per_frame:
        ds = datasets[p]
        columns.append(dataset_column(p, p, native_dtype(ds.dtype), tuple(ds.shape[1:]), 1,
                                      dataset_units(ds), None))
    start_ns, end_ns = _times(master, frames)
    return NxmxRun(experiment, number, path, NXMX, frames, {c.name: c for c in columns}, {},
                   config, start_ns, end_ns, frame_shape=shape, stored_dtype=stored,
                   segments=segments, per_frame=per_frame, per_run=per_run,
                   geometry=_geometry(master))


def _segments(master: h5py.File, data: h5py.Group, path: Path, within: Path,
              where: str) -> tuple[list[Segment], tuple[int, ...], np.dtype]:
    """The data files in image-number order, each checked: inside the experiment's tree,
    present, and holding frames of one shape and type."""
    found = []
    for name in sorted(data):
        if not name.startswith("data"):
            continue
        link = data.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            file = _inside(path.parent / link.filename, within, where, name)
            dataset = link.path.lstrip("/")
        elif isinstance(link, h5py.HardLink) and isinstance(data.get(name), h5py.Dataset):
            file, dataset = path, f"entry/data/{name}"  # frames in the master itself
        else:
            continue
        if not file.exists():
            raise RunUnreadable(f"{where}: data file {file.name} (linked as /entry/data/{name}) "
                                "is missing")
        try:
            with h5py.File(file, "r", locking=False) as f:
                ds = f.get(dataset)
                if not isinstance(ds, h5py.Dataset) or ds.ndim < 3:
                    raise RunUnreadable(f"{where}: {file.name} has no frame dataset /{dataset}")
                low = int(ds.attrs.get("image_nr_low", 0))
                found.append((low, len(found), file, dataset, ds.shape, ds.dtype, ds.chunks,
                              _decoder(ds, file, where)))
        except OSError as exc:
            raise RunUnreadable(f"{where}: data file {file.name} cannot be read: it is truncated "
                                f"or corrupted ({exc})") from None
    if not found:
        raise RunUnreadable(f"{where}: /entry/data links no frames (expected data_000001 ...)")
    found.sort(key=lambda s: (s[0], s[1]))  # image number, then link order
    shape, stored = found[0][4][1:], found[0][5]
    segments, first = [], 0
    for _, _, file, dataset, ds_shape, dtype, chunks, decoder in found:
        if ds_shape[1:] != shape or dtype != stored:
            raise RunUnreadable(f"{where}: {file.name} holds {dtype} frames of {ds_shape[1:]}, "
                                f"but {found[0][2].name} holds {stored} frames of {shape}")
        whole = chunks is not None and tuple(chunks[1:]) == tuple(shape)
        segments.append(Segment(file, dataset, first, ds_shape[0], chunks[0] if whole else 0,
                                decoder if whole else "hdf5"))
        first += ds_shape[0]
    return segments, tuple(int(v) for v in shape), stored


def _inside(file: Path, within: Path, where: str, name: str) -> Path:
    resolved = Path(os.path.realpath(file))
    if not resolved.is_relative_to(Path(os.path.realpath(within))):
        raise RunUnreadable(f"{where}: /entry/data/{name} links to {file.name} outside the "
                            "experiment's directory; such links are refused, never followed")
    return resolved


def _decoder(ds: h5py.Dataset, file: Path, where: str) -> str:
    """How this server decodes the dataset's chunks, checking HDF5 could decode them too."""
    pipeline = chunk_codecs.filters(ds)
    missing = chunk_codecs.unavailable_filter(pipeline)
    if missing:
        raise RunUnreadable(
            f"{where}: {file.name} is compressed with {missing}, which no installed plugin "
            "provides (hdf5plugin registers bitshuffle, LZ4, zstd, Blosc)")
    if not ds.chunks:
        return "hdf5"
    if not pipeline:
        return "raw"
    return chunk_codecs.decoder(pipeline) or "hdf5"


def _read_chunk_index(run: NxmxRun, seg: Segment) -> chunk_codecs.ChunkTable:
    try:
        with h5py.File(seg.path, "r", locking=False) as f:
            return chunk_codecs.chunk_table(f[seg.dataset], seg.decoder)
    except OSError as exc:
        raise RunUnreadable(f"run {run.number} of experiment '{run.experiment}': data file "
                            f"{seg.path.name} cannot be read ({exc})") from None


def _geometry(master: h5py.File) -> dict[str, Any]:
    """{name: {"value", "units", "path"}} of the geometry NXmx defines, where the file has it;
    arrays (the pixel mask) by shape and dtype, fetched from the "config" table."""
    found: dict[str, Any] = {}
    for key, paths in GEOMETRY:
        for rel in paths:
            ds = master.get(f"entry/{rel}")
            if isinstance(ds, h5py.Dataset):
                entry = {"value": config_value(ds), "path": f"entry/{rel}"}
                units = dataset_units(ds)
                if units:
                    entry["units"] = units
                found[key] = entry
                break
    return found


def _times(master: h5py.File, frames: int) -> tuple[int | None, int | None]:
    """Start (DECTRIS's data_collection_date) and end (start + frames x frame_time)."""
    ds = master.get("entry/instrument/detector/detectorSpecific/data_collection_date")
    if not isinstance(ds, h5py.Dataset):
        return None, None
    raw = ds[()]
    try:
        start = dt.datetime.fromisoformat(raw.decode() if isinstance(raw, bytes) else str(raw))
    except ValueError:
        return None, None
    if start.tzinfo is None:
        start = start.replace(tzinfo=dt.UTC)
    start_ns = int(start.timestamp()) * 1_000_000_000 + start.microsecond * 1000
    frame_time = master.get("entry/instrument/detector/frame_time")
    step = float(frame_time[()]) if isinstance(frame_time, h5py.Dataset) else 0.0
    return start_ns, start_ns + int(max(frames - 1, 0) * step * 1e9)


class NxmxReader(Reader):
    """One stream over a series: data files opened as plain descriptors for `pread`, the master
    through h5py for per-frame datasets."""

    def __init__(self, run: NxmxRun) -> None:
        self.run = run
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        self._master: h5py.File | None = None
        self._closed = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            if self._master is not None:
                self._master.close()
                self._master = None

    def read(self, columns: list[Column], start: int, stop: int, step: int = 1
             ) -> pa.RecordBatch:
        n = len(range(start, stop, step))
        arrays = []
        for col in columns:
            if col.kind is Kind.RUN:
                arrays.append(pa.array(np.full(n, self.run.number, dtype=np.int32)))
            elif col.name == FRAMES:
                arrays.append(wrap_fixed(col, self._frames(col, start, stop, step, n), n))
            else:
                arrays.append(wrap_fixed(col, self._per_frame(col, start, step, n), n))
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema([c.field for c in columns]))

    # -- frames -------------------------------------------------------------------------------

    def _frames(self, col: Column, start: int, stop: int, step: int, n: int) -> np.ndarray:
        out = allocate((n, *col.shape), col.dtype)
        frame = start
        k = 0
        while k < n:
            i, seg = self.run.segment(frame)
            local = frame - seg.first
            take = min(n - k, len(range(local, seg.count, step)))
            dest = out[k : k + take]
            try:
                if seg.decoder == "hdf5":
                    self._via_hdf5(seg, dest, local, step)
                else:
                    self._via_chunks(i, seg, dest, local, step)
            except OSError as exc:
                raise self._unreadable(seg, exc) from None
            k += take
            frame += take * step
        return out

    def _via_chunks(self, i: int, seg: Segment, dest: np.ndarray, local: int, step: int) -> None:
        """Frames local, local+step, ... of a segment, each from its stored chunk."""
        chunk_codecs.read_events(self._fd(i, seg), self.run.chunk_index(i), dest, local, step,
                                 pread_exactly)

    def _via_hdf5(self, seg: Segment, dest: np.ndarray, local: int, step: int) -> None:
        with h5py.File(seg.path, "r", locking=False) as f:
            ds = f[seg.dataset]
            if ds.dtype == dest.dtype:
                read_slab(ds, dest, local, step)
            else:
                dest[...] = ds[local : local + len(dest) * step : step]

    def _fd(self, i: int, seg: Segment) -> int:
        with self._lock:
            if self._closed:
                raise OSError("the stream was closed")
            fd = self._fds.get(i)
            if fd is None:
                fd = self._fds[i] = os.open(seg.path, os.O_RDONLY)
            return fd

    # -- per-frame master datasets -------------------------------------------------------------

    def _per_frame(self, col: Column, start: int, step: int, n: int) -> np.ndarray:
        out = allocate((n, *col.shape), col.dtype)
        if n:
            try:
                read_slab(self._master_file()[col.path], out, start, step)
            except OSError as exc:
                raise RunUnreadable(f"{self.run.describe()} ({self.run.path.name}): /{col.path} "
                                    f"cannot be read ({exc})") from None
        return out

    def _master_file(self) -> h5py.File:
        with self._lock:
            if self._master is None:
                self._master = h5py.File(self.run.path, "r", locking=False)
            return self._master

    def _unreadable(self, seg: Segment, exc: Exception) -> RunUnreadable:
        return RunUnreadable(f"{self.run.describe()}: data file {seg.path.name} cannot be read: "
                             f"it is truncated or corrupted ({exc})")


# -- the "config" table: one row of the master's per-run numeric datasets --------------------


@dataclass
class ConfigTable(Run):
    master: Path | None = None

    def reader(self) -> ConfigReader:
        return ConfigReader(self)


def _describe_config(run: NxmxRun) -> ConfigTable:
    columns = [run_column()]
    with h5py.File(run.path, "r", locking=False) as f:
        for p in run.per_run:
            ds = f[p]
            columns.append(dataset_column(p, p, native_dtype(ds.dtype), tuple(ds.shape), 1,
                                          dataset_units(ds), None))
    return ConfigTable(run.experiment, run.number, run.path, NXMX, 1,
                       {c.name: c for c in columns}, {}, {}, run.start_ns, run.end_ns,
                       table_name=CONFIG_TABLE, master=run.path)


class ConfigReader(Reader):
    def __init__(self, run: ConfigTable) -> None:
        self.run = run

    def close(self) -> None:
        pass

    def read(self, columns: list[Column], start: int, stop: int, step: int = 1
             ) -> pa.RecordBatch:
        n = len(range(start, stop, step))
        arrays = []
        with h5py.File(self.run.path, "r", locking=False) as f:
            for col in columns:
                if col.kind is Kind.RUN:
                    arrays.append(pa.array(np.full(n, self.run.number, dtype=np.int32)))
                    continue
                out = allocate((n, *col.shape), col.dtype)
                if n:
                    out[0] = f[col.path][()]
                arrays.append(wrap_fixed(col, out, n))
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema([c.field for c in columns]))
