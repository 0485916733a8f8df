"""European XFEL run directories (the files extra-data reads): one row per train.

A run is `<proposal>/raw/r<RUN:04d>/`, its sequence files (`RAW-R0238-DA01-S00000.h5`) merged as
extra-data's `open_run(..., data='all')` merges raw and `proc/r<RUN:04d>/`: a source that proc
has (under its own or its legacy name) is read from proc only, and the trains are those of proc's
files, plus all of raw's where any raw source is kept.

- The main table has one row per train of the run (the union of every file's INDEX/trainId,
  sorted, as `run.train_ids`): `trainId`, `time` (INDEX/timestamp, format >= 1.0), every CONTROL
  key and every INSTRUMENT key whose index group has at most one entry per train, named
  `<source>/<key>` with extra-data's Karabo key (`SA1_XTD2_XGM/DOOCS/MAIN/pulseEnergy.photonFlux`).
  A train a source did not record (count 0, or absent from its files) is null.
- A source with more entries per train in some index group (AGIPD, LPD, DSSC frames) has a table
  of its own, named by the source: one row per entry in train then entry order, the values of
  `run[source, key].ndarray()`, and the train each entry belongs to.
- RUN values (per-run) are the run's config, keyed `<source>/<key>` as `run.get_run_value`.

Describing reads only INDEX (every file's trainId, timestamps and first/count), METADATA, and
for each source the keys, RUN values and one probe dataset per index group; data is read when a
stream asks for it, through file handles the run's streams share (a bounded number open).
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
from h5py import h5a, h5d, h5g, h5o, h5s

from flight_server.buffers import allocate
from flight_server.errors import NotFound, RunUnreadable
from flight_server.sources.columns import (
    TIME_TYPE,
    Column,
    Kind,
    dataset_column,
    run_column,
)
from flight_server.sources.hdf5 import CONFIG_MAX_ELEMENTS, native_dtype
from flight_server.sources.hdf5_reader import read_slab, with_nulls, wrap_fixed
from flight_server.sources.layouts import Layout
from flight_server.sources.run import Reader, Run
from schemas import metadata as md

EUXFEL = Layout(name="euxfel", event_count_path="INDEX/trainId", time_path=None,
                time_epoch_unix=0)
# A run directory's files (the catalog finds run directories by them).
SEQUENCE_FILE = re.compile(r"^([A-Z]+)-R(\d{4,})-(.+)-S(\d{5})\.h5$")
TRAIN_ID = "trainId"
TRAIN_ID_PATH = "INDEX/trainId"
TIMESTAMP_PATH = "INDEX/timestamp"
CONTROL, INSTRUMENT = "CONTROL", "INSTRUMENT"
MAX_OPEN_FILES = 32  # per run while streams read it: a run of thousands of files keeps 32 open
IDLE_OPEN_FILES = 4  # per run between streams (the catalog keeps up to 128 runs described)
STRING_EVENT_BYTES = 4.0 + 16.0  # an offset and a guess at a short Karabo string


# -- what describing finds -------------------------------------------------------------------


@dataclass
class _Index:
    """One (source, index group) in one file: entries of train i are [first[i], +count[i]).
    None stands for the regular case (first[i] == i, count[i] == 1) to keep big runs small."""

    first: np.ndarray | None
    count: np.ndarray | None
    extent: int  # entries the datasets must hold
    max_count: int
    total: int

    def firsts(self, n: int) -> np.ndarray:
        return np.arange(n, dtype=np.int64) if self.first is None else self.first

    def counts(self, n: int) -> np.ndarray:
        return np.ones(n, dtype=np.int64) if self.count is None else self.count


@dataclass
class _File:
    no: int
    path: Path
    shown: str  # "raw/r0238/RAW-R0238-DA01-S00000.h5": how messages name it
    train_ids: np.ndarray  # uint64, increasing
    timestamps: np.ndarray | None  # uint64 ns since the Unix epoch, 0 = unknown
    index: dict[tuple[str, str], _Index] = field(default_factory=dict)
    pos: np.ndarray | None = None  # each train's row in the main table


@dataclass(frozen=True)
class _Key:
    name: str  # Karabo name, '.'-separated
    path: str  # dataset path in every file of the source, without the leading slash
    group: str  # index group ('' for CONTROL)
    dtype: np.dtype
    shape: tuple[int, ...]
    units: str | None
    string: bool = False
    skip: str | None = None  # why it is not served


@dataclass
class _Source:
    name: str
    section: str
    keys: dict[str, _Key] = field(default_factory=dict)
    run_values: dict[str, Any] = field(default_factory=dict)
    files: list[int] = field(default_factory=list)
    groups: set[str] = field(default_factory=set)
    lo: np.ndarray | None = None  # first and last main-table row of each of its files
    hi: np.ndarray | None = None


@dataclass
class _Scan:
    """One data directory (raw or proc) as its files' INDEX and METADATA describe it."""

    files: list[_File] = field(default_factory=list)
    sources: dict[str, _Source] = field(default_factory=dict)
    legacy: dict[str, str] = field(default_factory=dict)  # legacy source name -> canonical
    metadata: dict[str, Any] | None = None


# -- the run ---------------------------------------------------------------------------------


class _Handles:
    """The run's open sequence files, shared by its streams and tables (h5py serialises access).

    At most `limit` files stay open while streams read the run and `IDLE_OPEN_FILES` between
    them (reopening a file costs about a millisecond; a file descriptor per sequence file of
    every cached run would exhaust the process's); a file is pinned while a read uses one of its
    datasets, so closing the least recently used one never pulls a dataset from under a thread.
    """

    def __init__(self, files: list[_File], limit: int = MAX_OPEN_FILES) -> None:
        self.files = files
        self.limit = limit
        self._lock = threading.Lock()
        self._open: OrderedDict[int, h5py.File] = OrderedDict()
        self._datasets: dict[int, dict[str, h5py.Dataset]] = {}  # of the open files
        self._pins: Counter[int] = Counter()
        self._users = 0
        self._retired = False
        self.checked: set[tuple[int, str]] = set()  # (file, dataset) whose shape was checked

    def acquire(self) -> None:
        with self._lock:
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            self._trim()

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            self._trim()

    @property
    def open_files(self) -> int:
        return len(self._open)

    @contextmanager
    def dataset(self, no: int, path: str) -> Iterator[h5py.Dataset]:
        """A dataset of file `no`, the file opened (or kept open) while the caller reads it."""
        with self._lock:
            f = self._open.get(no)
            if f is None:
                f = self._open[no] = h5py.File(self.files[no].path, "r", locking=False)
            else:
                self._open.move_to_end(no)
            self._pins[no] += 1
            try:
                known = self._datasets.setdefault(no, {})
                ds = known.get(path)
                if ds is None:
                    ds = f.get(path)
                    if not isinstance(ds, h5py.Dataset):
                        raise KeyError(f"it has no dataset /{path}")
                    known[path] = ds
            except BaseException:
                self._unpin(no)
                raise
        try:
            yield ds
        finally:
            with self._lock:
                self._unpin(no)

    def _unpin(self, no: int) -> None:
        self._pins[no] -= 1
        if not self._pins[no]:
            del self._pins[no]
        self._trim()

    def _trim(self) -> None:
        if self._users:
            cap = self.limit
        else:
            cap = 0 if self._retired else min(self.limit, IDLE_OPEN_FILES)
        excess = len(self._open) - cap
        for no in list(self._open):
            if excess <= 0:
                break
            if no in self._pins:
                continue
            self._datasets.pop(no, None)
            self._open.pop(no).close()
            excess -= 1


@dataclass
class _Store:
    """What the main table and the per-source tables of one run share."""

    where: str  # "run 238 of experiment 'p002012'"
    files: list[_File]
    train_ids: np.ndarray  # uint64, the main table's rows
    times: np.ndarray | None  # int64 ns per train, 0 = unknown
    sources: dict[str, _Source]
    handles: _Handles


class _TrainRows:
    """The main table's rows: one per train."""

    def __init__(self, store: _Store) -> None:
        self.store = store

    def train_ids(self, start: int, stop: int, step: int) -> np.ndarray:
        return self.store.train_ids[start:stop:step]

    def train_rows(self, start: int, stop: int, step: int) -> np.ndarray:
        return np.arange(start, stop, step)

    def locate(self, source: str, group: str, start: int, stop: int, step: int
               ) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(file, batch rows, dataset entries) of each file holding some of these trains."""
        src = self.store.sources[source]
        found = []
        near = np.flatnonzero((src.lo < stop) & (src.hi >= start))
        for i in near:
            f = self.store.files[src.files[i]]
            lo, hi = np.searchsorted(f.pos, [start, stop])
            idx = np.arange(lo, hi)
            rows = f.pos[lo:hi]
            if step > 1:
                on = (rows - start) % step == 0
                idx, rows = idx[on], rows[on]
            ix = f.index[(source, group)]
            if ix.count is not None:
                has = ix.count[idx] > 0
                idx, rows = idx[has], rows[has]
            if len(idx):
                entries = idx if ix.first is None else ix.first[idx]
                found.append((f.no, (rows - start) // step, entries))
        return found


class _EntryRows:
    """A per-source table's rows: one per entry of its index group, in train then entry order."""

    def __init__(self, store: _Store, source: str, groups: list[str]) -> None:
        self.store = store
        src = store.sources[source]
        rows_group = groups[0]
        files, pos, counts = [], [], []
        firsts: dict[str, list[np.ndarray]] = {g: [] for g in groups}
        for no in src.files:
            f = store.files[no]
            n = len(f.train_ids)
            count = f.index[(source, rows_group)].counts(n)
            has = np.flatnonzero(count > 0)
            files.append(np.full(len(has), no, dtype=np.int32))
            pos.append(f.pos[has])
            counts.append(count[has])
            for g in groups:
                firsts[g].append(f.index[(source, g)].firsts(n)[has])
        pos_all = np.concatenate(pos) if pos else np.zeros(0, np.int64)
        order = np.argsort(pos_all, kind="stable")  # train order; files in name order
        self.file = np.concatenate(files)[order] if files else np.zeros(0, np.int32)
        self.pos = pos_all[order]
        count_all = np.concatenate(counts)[order] if counts else np.zeros(0, np.int64)
        self.first = {g: (np.concatenate(v)[order] if v else np.zeros(0, np.int64))
                      for g, v in firsts.items()}
        self.cum = np.zeros(len(count_all) + 1, dtype=np.int64)
        np.cumsum(count_all, out=self.cum[1:])

    @property
    def num_rows(self) -> int:
        return int(self.cum[-1])

    def _trains(self, start: int, stop: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(start, stop, step, dtype=np.int64)
        return rows, np.searchsorted(self.cum, rows, side="right") - 1

    def train_ids(self, start: int, stop: int, step: int) -> np.ndarray:
        return self.store.train_ids[self.train_rows(start, stop, step)]

    def train_rows(self, start: int, stop: int, step: int) -> np.ndarray:
        _, t = self._trains(start, stop, step)
        return self.pos[t]

    def locate(self, source: str, group: str, start: int, stop: int, step: int
               ) -> list[tuple[int, np.ndarray, np.ndarray]]:
        rows, t = self._trains(start, stop, step)
        if not len(rows):
            return []
        entries = self.first[group][t] + (rows - self.cum[t])
        files = self.file[t]
        cuts = np.flatnonzero(files[1:] != files[:-1]) + 1
        bounds = [0, *cuts.tolist(), len(rows)]
        k = np.arange(len(rows))
        return [(int(files[a]), k[a:b], entries[a:b]) for a, b in zip(bounds, bounds[1:],
                                                                       strict=False)]


@dataclass
class EuxfelRun(Run):
    """A European XFEL run (main table), or one source's per-entry table of it."""

    store: _Store | None = field(default=None, repr=False)
    rows: _TrainRows | _EntryRows | None = field(default=None, repr=False)
    where_read: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)
    table_groups: dict[str, list[str]] = field(default_factory=dict, repr=False)
    legacy: dict[str, str] = field(default_factory=dict, repr=False)
    _tables: dict[str, EuxfelRun] = field(default_factory=dict, repr=False)
    _tables_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reader(self) -> EuxfelReader:
        return EuxfelReader(self)

    def retire(self) -> None:
        if self.table_name is None:
            self.store.handles.retire()

    def tables(self) -> list[str]:
        return list(self.table_groups)

    def _table(self, name: str) -> Run | None:
        name = self.legacy.get(name, name)
        groups = self.table_groups.get(name)
        if groups is None:
            return None
        with self._tables_lock:
            table = self._tables.get(name)
            if table is None:
                table = self._tables[name] = _describe_table(self, name, groups)
            return table


# -- describing ------------------------------------------------------------------------------


def describe(path: Path, experiment: str, number: int, within: Path) -> EuxfelRun:
    """Describe the run directory `path` (raw/rNNNN, merged with proc/rNNNN where there is
    one); any failure is a RunUnreadable naming the file and what is wrong with it."""
    where = f"run {number} of experiment '{experiment}'"
    try:
        return _describe(Path(path), experiment, number, Path(within), where)
    except (RunUnreadable, NotFound):
        raise
    except FileNotFoundError:
        raise NotFound(f"{where} is no longer on disk") from None
    except OSError as exc:
        raise RunUnreadable(f"{where}: {path.parent.name}/{path.name} cannot be listed "
                            f"({exc.strerror or exc})") from None


def run_dirs(path: Path, within: Path) -> list[Path]:
    """raw/rNNNN and, where there is one inside the experiment's tree, proc/rNNNN."""
    proc = path.parent.parent / "proc" / path.name
    if path.parent.name != "raw" or not proc.is_dir():
        return [path]
    if not Path(os.path.realpath(proc)).is_relative_to(Path(os.path.realpath(within))):
        return [path]  # a link out of the experiment: never followed
    return [path, proc]


def _describe(path: Path, experiment: str, number: int, within: Path, where: str
              ) -> EuxfelRun:
    scans = []
    for d in run_dirs(path, within):
        scans.append(_scan_dir(d, within, where, first_no=sum(len(s.files) for s in scans)))
    raw, proc = scans[0], scans[1] if len(scans) > 1 else None
    sources, legacy, contributing = dict(raw.sources), dict(raw.legacy), list(raw.files)
    if proc is not None:
        replaced = set(proc.sources) | set(proc.legacy)
        kept = {n: s for n, s in raw.sources.items() if n not in replaced}
        contributing = list(proc.files) + (list(raw.files) if kept else [])
        sources = {**kept, **proc.sources}
        legacy = {n: c for n, c in raw.legacy.items() if c in kept} | proc.legacy
    files = [f for s in scans for f in s.files]

    tids = [f.train_ids for f in contributing]
    train_ids = np.unique(np.concatenate(tids)) if tids else np.zeros(0, np.uint64)
    times = None
    if any(f.timestamps is not None for f in contributing):
        times = np.zeros(len(train_ids), dtype=np.int64)
    for f in contributing:
        f.pos = np.searchsorted(train_ids, f.train_ids).astype(np.int64)
        if f.timestamps is not None:
            unset = times[f.pos] == 0
            times[f.pos[unset]] = f.timestamps[unset].astype(np.int64)
    for src in sources.values():
        src.files = [no for no in src.files if files[no].pos is not None
                     and len(files[no].train_ids)]
        for no in src.files:  # a group some other file of the source has: no entries here
            n = len(files[no].train_ids)
            for group in src.groups:
                files[no].index.setdefault((src.name, group), _Index(
                    np.zeros(n, np.int64), np.zeros(n, np.int64), 0, 0, 0))
        src.lo = np.array([files[no].pos[0] for no in src.files], dtype=np.int64)
        src.hi = np.array([files[no].pos[-1] for no in src.files], dtype=np.int64)

    store = _Store(where, files, train_ids, times, sources, _Handles(files))
    num = len(train_ids)
    columns: list[Column] = [run_column(), _train_id_column(
        b"the train ID (INDEX/trainId of the files, as extra-data's run.train_ids)")]
    start_ns = end_ns = None
    if times is not None:
        known = times[times > 0]
        columns.append(_time_column(len(known) < num))
        if len(known):
            start_ns, end_ns = int(known.min()), int(known.max())

    where_read: dict[str, tuple[str, str]] = {}
    table_groups: dict[str, list[str]] = {}
    config: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    data_columns = []
    gaps: dict[tuple[str, str], bool] = {}
    for name in sorted(sources):
        src = sources[name]
        for key, value in src.run_values.items():
            config[f"{name}/{key}"] = value
        multi = _multi_entry_groups(store, src)
        if multi:
            table_groups[name] = multi[0]
        for key in src.keys.values():
            col_name = f"{name}/{key.name}"
            if key.skip:
                skipped[col_name] = key.skip
            elif key.group not in src.groups:
                skipped[col_name] = f"no INDEX group '{key.group}' for it"
            elif any(key.group in groups for groups in multi):
                continue  # in the source's table, or left out with a note there
            else:
                if (name, key.group) not in gaps:
                    gaps[(name, key.group)] = _has_gaps(store, src, key.group)
                data_columns.append(_key_column(col_name, key, name, gaps[(name, key.group)]))
                where_read[col_name] = (name, key.group)
    columns += data_columns
    if skipped:
        config["skipped"] = skipped
    metadata = next((s.metadata for s in scans if s.metadata is not None), None)
    if metadata is not None:
        config["METADATA"] = metadata
    aliases = _aliases(columns, sources, legacy)
    return EuxfelRun(experiment, number, path, EUXFEL, num, {c.name: c for c in columns},
                     aliases, config, start_ns, end_ns, store=store, rows=_TrainRows(store),
                     where_read=where_read, table_groups=table_groups, legacy=legacy)


def _scan_dir(d: Path, within: Path, where: str, first_no: int) -> _Scan:
    names = sorted(e.name for e in os.scandir(d) if SEQUENCE_FILE.match(e.name))
    _check_sequences(d, names, where)
    scan = _Scan()
    inside = Path(os.path.realpath(within))
    for name in names:
        p = d / name
        shown = f"{d.parent.name}/{d.name}/{name}"
        if not Path(os.path.realpath(p)).is_relative_to(inside):
            raise RunUnreadable(f"{where}: {shown} links outside the experiment's directory; "
                                "such links are refused, never followed")
        try:
            with h5py.File(p, "r", locking=False) as f:
                _scan_file(f, scan, first_no + len(scan.files), p, shown, where)
        except RunUnreadable:
            raise
        except FileNotFoundError:
            raise NotFound(f"{where}: {shown} is no longer on disk") from None
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise RunUnreadable(f"{where}: {shown} cannot be read: the file is truncated, "
                                f"corrupted or not a European XFEL file ({exc})") from None
    return scan


def _check_sequences(d: Path, names: list[str], where: str) -> None:
    """Sequence files number from S00000 without gaps per aggregator: a missing one would leave
    its trains silently absent, so it is an error."""
    seqs: dict[tuple[str, str, str], set[int]] = {}
    for name in names:
        prefix, run, aggregator, seq = SEQUENCE_FILE.match(name).groups()
        seqs.setdefault((prefix, run, aggregator), set()).add(int(seq))
    for (prefix, run, aggregator), found in seqs.items():
        missing = sorted(set(range(max(found) + 1)) - found)
        if missing:
            lost = f"{prefix}-R{run}-{aggregator}-S{missing[0]:05d}.h5"
            raise RunUnreadable(
                f"{where}: sequence file {lost} is missing from {d.parent.name}/{d.name} "
                f"({len(missing)} of {aggregator}'s sequence files missing; found "
                f"{', '.join(f'S{s:05d}' for s in sorted(found))}), so its trains would be "
                "silently absent"
            )


def _scan_file(f: h5py.File, scan: _Scan, no: int, path: Path, shown: str, where: str) -> None:
    here = f"{where}: {shown}"
    tid = _vector(f, TRAIN_ID_PATH, np.uint64)
    if tid is None:
        raise RunUnreadable(f"{here} has no /{TRAIN_ID_PATH}: not a European XFEL file")
    n = int(np.count_nonzero(tid))
    if np.any(tid[n:]):
        raise RunUnreadable(f"{here}: /{TRAIN_ID_PATH} holds train ID 0 between real ones; "
                            "its index is inconsistent")
    tid = tid[:n]
    if n > 1 and not np.all(tid[1:] > tid[:-1]):
        bad = int(np.flatnonzero(tid[1:] <= tid[:-1])[0])
        raise RunUnreadable(f"{here}: /{TRAIN_ID_PATH} is not increasing (train {tid[bad]} at "
                            f"{bad} is followed by {tid[bad + 1]}); its index is inconsistent")
    timestamps = _vector(f, TIMESTAMP_PATH, np.uint64, n)
    if timestamps is not None:
        if len(timestamps) < n:
            raise RunUnreadable(f"{here}: /{TIMESTAMP_PATH} holds {len(timestamps)} entries "
                                f"for {n} trains; its index is inconsistent")
    file = _File(no, path, shown, tid, timestamps)
    scan.files.append(file)
    version = _format_version(f)
    if scan.metadata is None:
        scan.metadata = _metadata(f, version)

    for section, source in _data_sources(f, version, here):
        if section == INSTRUMENT:
            link = f.get(f"{INSTRUMENT}/{source}", getlink=True)
            if isinstance(link, h5py.SoftLink):
                scan.legacy[source] = link.path.lstrip("/").partition("/")[2]
                continue
        src = scan.sources.get(source)
        if src is None:
            src = scan.sources[source] = _Source(source, section)
            _read_keys(f, src)
            if section == CONTROL:
                src.run_values = _run_values(f, source)
        elif src.section != section:
            raise RunUnreadable(f"{here}: source {source} is {section} data here but "
                                f"{src.section} data in another file")
        groups = _read_index(f, file, src, n, here)
        if groups is None:
            continue
        src.files.append(no)
        src.groups |= groups


def _vector(f: h5py.File, path: str, dtype: type, n: int | None = None) -> np.ndarray | None:
    """The first n entries (None: all) of a 1-D dataset, None where there is none. Through h5py's
    low-level API, a quarter of the high-level one's cost, which adds up over the INDEX of a run
    of hundreds of files."""
    try:
        ds = h5d.open(f.id, path.encode())
    except (KeyError, ValueError, TypeError):
        return None
    space = ds.get_space()
    if len(space.shape) != 1:
        raise ValueError(f"/{path} has shape {space.shape}, expected one dimension")
    take = space.shape[0] if n is None else min(n, space.shape[0])
    out = np.empty(take, dtype=dtype)
    if take:
        space.select_hyperslab((0,), (take,))
        ds.read(h5s.create_simple((take,)), space, out)
    return out


def _format_version(f: h5py.File) -> str:
    ds = f.get("METADATA/dataFormatVersion")
    if not isinstance(ds, h5py.Dataset):
        return "0.5"  # the first version had no number
    value = ds[0]
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _metadata(f: h5py.File, version: str) -> dict[str, Any]:
    """METADATA as extra-data's `run_metadata()` gives it (from the first file)."""
    found: dict[str, Any] = {"dataFormatVersion": version}
    group = f.get("METADATA")
    if version != "0.5" and isinstance(group, h5py.Group):
        for k, ds in group.items():
            if isinstance(ds, h5py.Dataset) and ds.shape and ds.size:
                found[k] = _json_value(ds[0])
    return found


def _data_sources(f: h5py.File, version: str, here: str) -> list[tuple[str, str]]:
    """(section, source) of METADATA's data sources, an INSTRUMENT source once per channel."""
    path = "METADATA/dataSourceId" if version == "0.5" else "METADATA/dataSources/dataSourceId"
    ds = f.get(path)
    if not isinstance(ds, h5py.Dataset):
        raise RunUnreadable(f"{here} has no /{path}: not a European XFEL file")
    found: dict[tuple[str, str], None] = {}
    for raw in ds[()]:
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        if not text:
            continue  # padding
        section, _, h5_source = text.partition("/")
        if section == INSTRUMENT:
            device, _, channel_group = h5_source.partition(":")
            found[(INSTRUMENT, f"{device}:{channel_group.partition('/')[0]}")] = None
        elif section == CONTROL:
            found[(CONTROL, h5_source)] = None
    return list(found)


def _read_index(f: h5py.File, file: _File, src: _Source, n: int, here: str) -> set[str] | None:
    """Read the source's index groups in this file into `file.index`, checked; None when the
    file has no INDEX for it (a CONTROL source with RUN values only)."""
    top = f.get(f"INDEX/{src.name}")
    if not isinstance(top, h5py.Group):
        if src.section == CONTROL and not src.keys:
            return None
        raise RunUnreadable(f"{here} lists source {src.name} but has no INDEX/{src.name}")
    groups = {""} if src.section == CONTROL else {g for g in top if isinstance(top[g], h5py.Group)}
    for group in groups:
        label = f"INDEX/{src.name}" + (f"/{group}" if group else "")
        first = _vector(f, f"{label}/first", np.int64, n)
        count = _vector(f, f"{label}/count", np.int64, n)
        if count is None and first is not None:  # the oldest format: first, last, status
            last = _vector(f, f"{label}/last", np.int64, n)
            status = _vector(f, f"{label}/status", np.int64, n)
            if last is not None and status is not None:
                count = (last - first + 1) * (status[:len(last)] != 0)[:len(first)]
        if first is None or count is None:
            raise RunUnreadable(f"{here}: {label} has no first and count (or last and status)")
        if len(first) < n or len(count) < n:
            raise RunUnreadable(f"{here}: {label} holds {min(len(first), len(count))} entries "
                                f"for {n} trains; its index is inconsistent")
        if (count < 0).any() or (first < 0).any():
            raise RunUnreadable(f"{here}: {label} has negative entries; its index is "
                                "inconsistent")
        has = count > 0
        extent = int((first[has] + count[has]).max()) if has.any() else 0
        regular = bool(np.all(count == 1) and np.array_equal(first, np.arange(n)))
        file.index[(src.name, group)] = _Index(
            None if regular else first, None if regular else count, extent,
            int(count.max()) if n else 0, int(count.sum()))
        _probe(f, src, group, extent, label, here)
    return groups


def _probe(f: h5py.File, src: _Source, group: str, extent: int, label: str, here: str) -> None:
    """Check one dataset of the group holds what the index points at (a truncated file or a
    wrong index), so that such a run fails when described rather than mid-stream."""
    key = next((k for k in src.keys.values() if k.group == group and not k.skip), None)
    if key is None:
        return
    try:
        ds = h5d.open(f.id, key.path.encode())
    except (KeyError, ValueError, TypeError):
        raise RunUnreadable(f"{here} has no dataset /{key.path} (source {src.name}, key "
                            f"{key.name}, found in its other files)") from None
    if not ds.shape or ds.shape[0] < extent:
        raise RunUnreadable(f"{here}: {label} points at entry {extent - 1} but /{key.path} "
                            f"holds {ds.shape[0] if ds.shape else 0}; the file is truncated "
                            "or its index is inconsistent")


def _read_keys(f: h5py.File, src: _Source) -> None:
    """The source's keys from the first file that has it (as extra-data: the files of a run
    share a source's keys)."""
    top = f.get(f"{src.section}/{src.name}")
    if not isinstance(top, h5py.Group):
        return
    prefix = f"{src.section}/{src.name}/"
    for name in _dataset_names(top):
        parts = name.split("/")
        parent = None
        if src.section == CONTROL:
            if parts[-1] != "value" or len(parts) < 2:
                continue  # the key's timestamp, or not a Karabo key
            key, group = ".".join(parts[:-1]), ""
            parent = h5py.Group(h5g.open(top.id, "/".join(parts[:-1]).encode()))
        else:
            key, group = ".".join(parts), parts[0]
        if key not in src.keys:
            ds = h5py.Dataset(h5d.open(top.id, name.encode()))
            src.keys[key] = _key(key, prefix + name, group, ds, parent)


def _dataset_names(group: h5py.Group) -> list[str]:
    """Paths of the datasets under `group`, from HDF5's object headers without opening each
    object (h5py's visititems opens every group and dataset, which was most of the time spent
    describing a run of a few thousand keys)."""
    names: list[str] = []

    def visit(name: bytes, info: Any) -> None:
        if info.type == h5o.TYPE_DATASET:
            names.append(name.decode())

    h5o.visit(group.id, visit, info=True)
    return names


def _key(name: str, path: str, group: str, ds: h5py.Dataset, parent: h5py.Group | None
         ) -> _Key:
    dims, stored = ds.id.shape, ds.id.dtype
    shape = tuple(int(s) for s in dims[1:])
    units = _units(ds, parent)
    if not dims:
        return _Key(name, path, group, stored, (), units, skip="a scalar dataset: no entries")
    if h5py.check_string_dtype(stored) is not None or stored.kind == "S":
        skip = None if not shape else "per-train arrays of strings are not served"
        return _Key(name, path, group, np.dtype(object), (), units, string=True, skip=skip)
    dtype = native_dtype(stored)
    if dtype.kind not in "biuf":
        return _Key(name, path, group, dtype, shape, units,
                    skip=f"{stored} values are not served as a column")
    if 0 in shape:
        return _Key(name, path, group, dtype, shape, units, skip=f"empty entries {shape}")
    return _Key(name, path, group, dtype, shape, units)


def _units(ds: h5py.Dataset, parent: h5py.Group | None) -> str | None:
    """`units` where the dataset has one, else Karabo's unitSymbol with its metric prefix, as
    extra-data's `KeyData.units` (CONTROL keys keep theirs on the key's group)."""
    objs = [o for o in (parent, ds) if o is not None]
    for obj in objs:
        for name in (b"units", b"unit"):
            if h5a.exists(obj.id, name):
                return _text(obj.attrs[name.decode()]) or None
    for obj in objs:
        if h5a.exists(obj.id, b"unitSymbol"):
            symbol = _text(obj.attrs["unitSymbol"])
            prefix = _text(obj.attrs["metricPrefixSymbol"]) \
                if h5a.exists(obj.id, b"metricPrefixSymbol") else ""
            if symbol:
                return ("μ" if prefix == "u" else prefix) + symbol
    return None


def _text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.ravel()[0] if value.size else ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _run_values(f: h5py.File, source: str) -> dict[str, Any]:
    """RUN values by Karabo key, as `run.get_run_value(source, key)` reads them (entry 0)."""
    group = f.get(f"RUN/{source}")
    values: dict[str, Any] = {}
    if not isinstance(group, h5py.Group):
        return values

    for name in _dataset_names(group):
        if not name.endswith("/value"):
            continue
        dsid = h5d.open(group.id, name.encode())
        dims, dtype = dsid.shape, dsid.dtype
        if not dims:
            continue
        key = name[: -len("/value")].replace("/", ".")
        entry = dims[1:]
        if int(np.prod(entry)) > CONFIG_MAX_ELEMENTS or dtype.kind not in "biufSOU" \
                or dims[0] == 0:
            values[key] = {"shape": list(entry), "dtype": str(dtype)}
        elif dtype.kind in "biuf":  # entry 0 through the low-level API: thousands of keys
            first = np.empty(entry, dtype=native_dtype(dtype))
            space = dsid.get_space()
            space.select_hyperslab((0,) * len(dims), (1, *entry))
            dsid.read(h5s.create_simple((1, *entry)), space, first.reshape(1, *entry))
            values[key] = _json_value(first if entry else first[()])
        else:
            values[key] = _json_value(h5py.Dataset(dsid)[0])
    return values


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "SO":
            return [_json_value(v) for v in value.tolist()]
        return value.tolist()
    if isinstance(value, np.generic):
        return _json_value(value.item())
    return value


def _multi_entry_groups(store: _Store, src: _Source) -> list[list[str]]:
    """The source's index groups with more than one entry in some train, as
    [table groups, *left-out groups]: the group with the most entries gives the table its rows,
    and groups whose counts equal it in every file share them; the others are left out."""
    stats: dict[str, tuple[int, int]] = {}
    for group in src.groups:
        ixs = [store.files[no].index[(src.name, group)] for no in src.files]
        most = max((ix.max_count for ix in ixs), default=0)
        if most > 1:
            stats[group] = (sum(ix.total for ix in ixs), most)
    if not stats:
        return []
    ordered = sorted(stats, key=lambda g: (-stats[g][0], g))
    rows = ordered[0]
    same = [rows]
    left = []
    for g in ordered[1:]:
        equal = all(np.array_equal(
            store.files[no].index[(src.name, g)].counts(len(store.files[no].train_ids)),
            store.files[no].index[(src.name, rows)].counts(len(store.files[no].train_ids)))
            for no in src.files)
        (same if equal else left).append(g)
    return [same, *([g] for g in left)]


def _has_gaps(store: _Store, src: _Source, group: str) -> bool:
    """Whether some train of the run has no entry of this group (its column has nulls)."""
    seen = np.zeros(len(store.train_ids), dtype=bool)
    for no in src.files:
        f = store.files[no]
        ix = f.index[(src.name, group)]
        seen[f.pos if ix.count is None else f.pos[ix.count > 0]] = True
    return not bool(seen.all())


def _key_column(name: str, key: _Key, source: str, nullable: bool) -> Column:
    meta = {md.HDF5_PATH: ("/" + key.path).encode(), md.DETECTOR: source.encode()}
    if key.units:
        meta[md.UNITS] = key.units.encode()
    if key.string:
        return Column(name, Kind.SCALAR, pa.field(name, pa.string(), metadata=meta), key.path,
                      key.dtype, (), STRING_EVENT_BYTES + (0.125 if nullable else 0.0))
    col = dataset_column(name, key.path, key.dtype, key.shape, 1, key.units, None)
    return dataclasses.replace(col, field=col.field.with_metadata(meta),
                               event_bytes=col.event_bytes + (0.125 if nullable else 0.0))


def _train_id_column(derived: bytes) -> Column:
    meta = {md.HDF5_PATH: ("/" + TRAIN_ID_PATH).encode(), md.DERIVED: derived}
    return Column(TRAIN_ID, Kind.SCALAR, pa.field(TRAIN_ID, pa.uint64(), metadata=meta),
                  TRAIN_ID_PATH, np.dtype(np.uint64), (), 8.0)


def _time_column(nullable: bool) -> Column:
    meta = {md.DERIVED: f"/{TIMESTAMP_PATH}: nanoseconds since the Unix epoch (null where no "
                        "file records the train's time)".encode(),
            md.HDF5_PATH: ("/" + TIMESTAMP_PATH).encode()}
    return Column(md.TIME_COLUMN, Kind.TIME, pa.field(md.TIME_COLUMN, TIME_TYPE, metadata=meta),
                  TIMESTAMP_PATH, np.dtype(np.int64), (), 8.0 + (0.125 if nullable else 0.0))


def _aliases(columns: list[Column], sources: dict[str, _Source], legacy: dict[str, str]
             ) -> dict[str, str]:
    """Other names extra-data accepts for a column: `<key>.value` of a CONTROL key, and a
    source's legacy name (corrected AGIPD data under its raw source name)."""
    aliases: dict[str, str] = {}
    by_source: dict[str, list[str]] = {}
    for col in columns:
        meta = col.field.metadata or {}
        source = meta.get(md.DETECTOR, b"").decode()
        if source in sources:
            by_source.setdefault(source, []).append(col.name)
            if sources[source].section == CONTROL:
                aliases[f"{col.name}.value"] = col.name
    for old, new in legacy.items():
        for name in by_source.get(new, []):
            key = name[len(new) + 1:]
            aliases[f"{old}/{key}"] = name
            if sources[new].section == CONTROL:
                aliases[f"{old}/{key}.value"] = name
    return aliases


def _describe_table(run: EuxfelRun, name: str, groups: list[str]) -> EuxfelRun:
    """One source's per-entry table (described when first asked for: it reads nothing)."""
    store = run.store
    src = store.sources[name]
    rows = _EntryRows(store, name, groups)
    columns: list[Column] = [run_column(), _train_id_column(
        f"the train of each entry (INDEX/{name}/{groups[0]}/first, count)".encode())]
    if store.times is not None:
        columns.append(_time_column(bool((store.times[rows.pos] == 0).any())))
    where_read = {}
    for key in src.keys.values():
        if key.group in groups and not key.skip:
            col_name = f"{name}/{key.name}"
            columns.append(_key_column(col_name, key, name, False))
            where_read[col_name] = (name, key.group)
    others = sorted({k.group for k in src.keys.values()} & src.groups - set(groups))
    left_out = [g for g in others if any(
        store.files[no].index[(name, g)].max_count > 1 for no in src.files)]
    config: dict[str, Any] = {}
    if left_out:
        config["note"] = (f"keys of {', '.join(left_out)} are left out: their entries per "
                          f"train differ from {groups[0]}'s, whose entries are this table's rows")
    skipped = {f"{name}/{k.name}": k.skip for k in src.keys.values()
               if k.group in groups and k.skip}
    if skipped:
        config["skipped"] = skipped
    legacy = {old: new for old, new in run.legacy.items() if new == name}
    aliases = _aliases(columns, {name: src}, legacy)
    return EuxfelRun(run.experiment, run.number, run.path, EUXFEL, rows.num_rows,
                     {c.name: c for c in columns}, aliases, config, run.start_ns, run.end_ns,
                     table_name=name, store=store, rows=rows, where_read=where_read)


# -- reading ---------------------------------------------------------------------------------


class EuxfelReader(Reader):
    """One stream's reads of a run or table, through the run's shared file handles."""

    def __init__(self, run: EuxfelRun) -> None:
        self.run = run
        self._handles = run.store.handles
        self._handles.acquire()
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._handles.release()

    def read(self, columns: list[Column], start: int, stop: int, step: int = 1
             ) -> pa.RecordBatch:
        """Rows range(start, stop, step) of the given columns as one RecordBatch."""
        n = len(range(start, stop, step))
        located: dict[tuple[str, str], list[tuple[int, np.ndarray, np.ndarray]]] = {}
        arrays = [self._column(col, start, stop, step, n, located) for col in columns]
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema([c.field for c in columns]))

    def _column(self, col: Column, start: int, stop: int, step: int, n: int,
                located: dict) -> pa.Array:
        run, rows = self.run, self.run.rows
        if col.kind is Kind.RUN:
            return pa.array(np.full(n, run.number, dtype=np.int32))
        if col.kind is Kind.TIME:
            ns = allocate((n,), np.int64)
            ns[:] = run.store.times[rows.train_rows(start, stop, step)]
            return with_nulls(pa.Array.from_buffers(TIME_TYPE, n, [None, pa.py_buffer(ns)]),
                               ns != 0)
        if col.path == TRAIN_ID_PATH:
            ids = allocate((n,), np.uint64)
            ids[:] = rows.train_ids(start, stop, step)
            return pa.Array.from_buffers(pa.uint64(), n, [None, pa.py_buffer(ids)])
        source, group = run.where_read[col.name]
        pieces = located.get((source, group))
        if pieces is None:
            pieces = located[(source, group)] = rows.locate(source, group, start, stop, step)
        if col.dtype.kind in "OS":
            return self._strings(col, pieces, n)
        values = allocate((n, *col.shape), col.dtype)
        present = np.zeros(n, dtype=bool)
        for no, k, e in pieces:
            with self._dataset(no, col, source, group) as ds:
                try:
                    _gather(ds, values, k, e)
                except OSError as exc:
                    raise self._unreadable(no, col, exc) from None
            present[k] = True
        if present.all():
            return wrap_fixed(col, values, n)
        values[~present] = 0  # deterministic bytes under the nulls
        return with_nulls(wrap_fixed(col, values, n), present)

    def _strings(self, col: Column, pieces: list, n: int) -> pa.Array:
        texts: list[str | None] = [None] * n
        for no, k, e in pieces:
            with self._dataset(no, col, *self.run.where_read[col.name]) as ds:
                try:
                    for k0, dk, e0, de, m in _runs(k, e):
                        got = ds[e0 : e0 + (m - 1) * de + 1 : de]
                        for j, v in enumerate(got):
                            texts[k0 + j * dk] = v.decode("utf-8", "replace") \
                                if isinstance(v, bytes) else str(v)
                except OSError as exc:
                    raise self._unreadable(no, col, exc) from None
        return pa.array(texts, type=pa.string())

    @contextmanager
    def _dataset(self, no: int, col: Column, source: str, group: str
                 ) -> Iterator[h5py.Dataset]:
        handles, f = self._handles, self.run.store.files[no]
        try:
            with handles.dataset(no, col.path) as ds:
                if (no, col.path) not in handles.checked:
                    _check(ds, col, f, f.index[(source, group)].extent, self.run.store.where)
                    handles.checked.add((no, col.path))
                yield ds
        except KeyError as exc:
            raise RunUnreadable(f"{self.run.store.where}: {f.shown} cannot be read for column "
                                f"'{col.name}': {exc.args[0] if exc.args else exc}") from None
        except OSError as exc:
            raise self._unreadable(no, col, exc) from None

    def _unreadable(self, no: int, col: Column, exc: Exception) -> RunUnreadable:
        f = self.run.store.files[no]
        return RunUnreadable(f"{self.run.store.where}: {f.shown} cannot be read (/{col.path}): "
                             f"the file is truncated or corrupted ({exc})")


def _check(ds: h5py.Dataset, col: Column, f: _File, extent: int, where: str) -> None:
    """A dataset read for the first time holds entries of the column's shape and type, and as
    many as the index points at."""
    here = f"{where}: {f.shown}: /{col.path}"
    if not ds.shape or ds.shape[0] < extent:
        raise RunUnreadable(f"{here} holds {ds.shape[0] if ds.shape else 0} entries but the "
                            f"index points at entry {extent - 1}; the file is truncated or its "
                            "index is inconsistent")
    if col.dtype.kind in "OS":
        if h5py.check_string_dtype(ds.dtype) is None and ds.dtype.kind != "S":
            raise RunUnreadable(f"{here} holds {ds.dtype}, where other files hold strings")
    elif tuple(ds.shape[1:]) != col.shape or native_dtype(ds.dtype) != col.dtype:
        raise RunUnreadable(f"{here} holds {ds.dtype} entries of {tuple(ds.shape[1:])}, where "
                            f"other files hold {col.dtype} entries of {col.shape}")


def _runs(k: np.ndarray, e: np.ndarray) -> Iterator[tuple[int, int, int, int, int]]:
    """Split (row, entry) pairs into runs in which both advance by a constant (k0, dk, e0, de,
    count): each run is one strided HDF5 read, so a source recorded every train (or every
    other train) is read in one call per file rather than one per train."""
    m = len(k)
    if m == 0:
        return
    if m == 1:
        yield int(k[0]), 1, int(e[0]), 1, 1
        return
    dk, de = np.diff(k), np.diff(e)
    if de[0] > 0 and (dk == dk[0]).all() and (de == de[0]).all():
        yield int(k[0]), int(dk[0]), int(e[0]), int(de[0]), m
        return
    starts = np.concatenate([[0], np.flatnonzero((dk[1:] != dk[:-1]) | (de[1:] != de[:-1])) + 1])
    ends = np.concatenate([starts[1:], [m - 1]])  # diffs [starts[r], ends[r]) are constant
    i = 0
    while i < m:
        if i == m - 1 or de[i] <= 0:
            yield int(k[i]), 1, int(e[i]), 1, 1
            i += 1
            continue
        j = int(ends[np.searchsorted(starts, i, side="right") - 1])
        yield int(k[i]), int(dk[i]), int(e[i]), int(de[i]), j - i + 1
        i = j + 1


def _gather(ds: h5py.Dataset, out: np.ndarray, k: np.ndarray, e: np.ndarray) -> None:
    """out[k[i]] = ds[e[i]] for all i, in as few strided reads as the pattern allows."""
    for k0, dk, e0, de, m in _runs(k, e):
        if dk == 1:
            read_slab(ds, out[k0 : k0 + m], e0, de)
        else:
            tmp = np.empty((m, *out.shape[1:]), dtype=out.dtype)
            read_slab(ds, tmp, e0, de)
            out[k0 : k0 + (m - 1) * dk + 1 : dk] = tmp
