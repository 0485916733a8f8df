"""European XFEL run directories: every served value equals what extra-data reads from the same
files (written by extra-data's own mock-run generators), directly and through a real server;
bad run directories fail clearly, naming the file."""

from __future__ import annotations

import gc
import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import extra_data as ed
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight
import pytest
from extra_data import by_index
from extra_data.exceptions import PropertyNameError
from extra_data.file_access import file_access_registry
from extra_data.tests import make_examples as mx
from extra_data.tests.mockdata import write_file
from extra_data.tests.mockdata.base import DeviceBase
from extra_data.tests.mockdata.gauge import Gauge
from extra_data.tests.mockdata.gec_camera import GECCamera
from extra_data.tests.mockdata.xgm import XGM

from clients import Client, connect
from flight_server.catalog import Catalog
from flight_server.errors import NotFound, RunUnreadable
from flight_server.server import LclstreamServer
from flight_server.sources import describe
from flight_server.sources.euxfel import IDLE_OPEN_FILES, MAX_OPEN_FILES, EuxfelRun, _runs
from flight_server.sources.run import Run
from schemas import metadata as md
from tests.helpers import admin_token, raw_client, start_server, values

EXP = "p002012"
XGM_SRC = "SA1_XTD2_XGM/DOOCS/MAIN"
FLUX = f"{XGM_SRC}/pulseEnergy.photonFlux"
INTENSITY = f"{XGM_SRC}:output/data.intensityTD"
CAMERA = "FXE_XAD_GEC/CAM/CAMERA:daqOutput"
GAUGE = "SA3_XTD10_VAC/GAUGE/G30520C"
AGIPD0 = "SPB_DET_AGIPD1M-1/DET/0CH0:xtdf"
JF01 = "SPB_IRDA_JF4M/DET/JNGFR01:daqOutput"
BIG = 32 * 1024  # bytes per entry beyond which a key is compared over its first trains only
HUGE = 4 << 20  # beyond which only the sources in WINDOWED are compared, to keep the test fast
WINDOWED = {JF01, AGIPD0, "SPB_DET_AGIPD1M-1/DET/3CH0:xtdf", "FXE_DET_LPD1M-1/DET/1CH0:xtdf",
            "SPB_DET_AGIPD1M-1/CORR/0CH0:output"}
WINDOW = 2  # trains of a big key compared
T0 = 1_700_000_000 * 10**9  # the first mock train's time, ns since the Unix epoch


# -- the mock runs -------------------------------------------------------------------------------


def make_gappy_run(d: Path) -> None:
    """An XGM in two sequence files (trains 10000-10029) and a camera aggregator recording 20 of
    trains 10010-10039: each source misses trains the other has; a gauge recorded nothing."""
    for seq in range(2):
        write_file(str(d / f"RAW-R0003-DA01-S{seq:05d}.h5"), [XGM(XGM_SRC)], ntrains=15,
                   firsttrain=10000 + 15 * seq, chunksize=15, format_version="1.0")
    write_file(str(d / "RAW-R0003-DA02-S00000.h5"),
               [GECCamera(CAMERA.partition(":")[0], nsamples=20), Gauge(GAUGE, no_ctrl_data=True)],
               ntrains=30, firsttrain=10010, chunksize=10, format_version="1.0")


def make_runs(root: Path) -> None:
    top = root / EXP
    runs = [("raw/r0238", lambda d: mx.make_spb_run(d, format_version="1.0")),
            ("proc/r0238", lambda d: mx.make_spb_run(d, raw=False, format_version="1.0")),
            ("raw/r0450", mx.make_fxe_run),  # format 0.5: no INDEX/timestamp
            ("raw/r0012", mx.make_jungfrau_run),
            ("raw/r0001", mx.make_lpd_run_mini_missed_train),
            ("raw/r0002", lambda d: mx.make_reduced_spb_run(
                d, rng=np.random.RandomState(2), format_version="1.0")),
            ("raw/r0003", lambda d: make_gappy_run(Path(d))),
            ("proc/r0142", mx.make_modern_spb_proc_run)]  # proc only; legacy source names
    for seed, (d, make) in enumerate(runs):
        (top / d).mkdir(parents=True)
        make(str(top / d))
        fill(top / d, seed)
    with h5py.File(top / "raw/r0003/RAW-R0003-DA02-S00000.h5", "r+") as f:
        f["INDEX/timestamp"][25] = 0  # train 10035: no file knows its time


def fill(run_dir: Path, seed: int) -> None:
    """Distinct values in every numeric CONTROL/INSTRUMENT dataset (the generators leave most of
    them unwritten, all zeros), so that equal means equal; large entries get a few written."""
    rng = np.random.default_rng(seed)

    def visit(name: str, obj: Any) -> None:
        if (not isinstance(obj, h5py.Dataset) or obj.dtype.kind not in "iuf" or not obj.size
                or not name.startswith(("CONTROL/", "INSTRUMENT/"))
                or name.rsplit("/", 1)[-1] in ("timestamp", "trainId", "pulseId", "cellId")):
            return
        entry = int(np.prod(obj.shape[1:], dtype=np.int64))
        if entry <= 4096:
            obj[...] = rng.integers(1, 120, obj.shape).astype(obj.dtype)
        elif entry * obj.dtype.itemsize <= 2 << 20:
            for i in sorted({1, obj.shape[0] // 2, obj.shape[0] - 1}):
                obj[i] = rng.integers(1, 120, obj.shape[1:]).astype(obj.dtype)
        elif name.startswith(f"INSTRUMENT/{JF01}"):  # a whole JUNGFRAU frame stack, once
            obj[1] = rng.integers(1, 120, obj.shape[1:]).astype(obj.dtype)

    for p in sorted(run_dir.glob("*.h5")):
        with h5py.File(p, "r+") as f:
            f.visititems(visit)
            if "INDEX/timestamp" in f:  # the time server's, as in real files (the generator
                tid = f["INDEX/trainId"][()]  # stamps each file with when it wrote it)
                f["INDEX/timestamp"][...] = np.where(tid > 0, T0 + (tid - 10000) * 100_000_000, 0)


# -- what extra-data reads -----------------------------------------------------------------------


@dataclass
class Reference:
    train_ids: np.ndarray
    times: np.ndarray | None  # ns, 0 for NaT; None when no file has INDEX/timestamp
    main: dict[str, tuple[np.ndarray, Any]] = field(default_factory=dict)  # present, values
    window: dict[str, tuple[np.ndarray, Any]] = field(default_factory=dict)  # first trains
    tables: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # whole
    table_window: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    unreadable: set[str] = field(default_factory=set)  # names extra-data cannot read
    unchecked: set[str] = field(default_factory=set)  # big keys of sources not WINDOWED
    unchecked_tables: dict[str, set[str]] = field(default_factory=dict)
    run_values: dict[str, Any] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)


def reference(dc: Any) -> Reference:
    stamps = dc.train_timestamps()
    times = None if np.isnat(stamps).all() else \
        np.where(np.isnat(stamps), 0, stamps.astype("int64"))
    ref = Reference(np.array(dc.train_ids, dtype=np.uint64), times)
    for src in sorted(dc.all_sources - set(dc.legacy_sources)):  # legacy: canonical's data
        sd = dc[src]
        if sd.is_control:
            try:
                values_ = sd.run_values(inc_timestamps=False)
            except ValueError:
                values_ = {}
            ref.run_values |= {f"{src}/{k}": v for k, v in values_.items()}
        for key in sorted(sd.keys(inc_timestamps=False)):
            name = f"{src}/{key}"
            try:
                kd = dc[src, key]
                counts = kd.data_counts(labelled=False)
            except (PropertyNameError, KeyError):
                ref.unreadable.add(name)  # a '.' inside the HDF5 name: extra-data looks for '/'
                continue
            if kd.units:
                ref.units[name] = kd.units
            entry = kd.dtype.itemsize * int(np.prod(kd.entry_shape))
            big, huge, windowed = entry > BIG, entry > HUGE, src in WINDOWED
            if counts.max(initial=0) <= 1:  # the main table
                if not big:
                    ref.main[name] = (counts > 0, kd.ndarray())
                elif not huge or windowed:
                    ref.window[name] = (counts[:WINDOW] > 0,
                                        kd.select_trains(by_index[:WINDOW]).ndarray())
                else:
                    ref.unchecked.add(name)
                continue
            table = ref.tables.setdefault(src, {})  # the source's table
            table["trainId"] = kd.train_id_coordinates()
            if not big:
                table[name] = kd.ndarray()
            elif windowed:
                ref.table_window.setdefault(src, {})[name] = \
                    kd.select_trains(by_index[:1]).ndarray()
            else:
                ref.unchecked_tables.setdefault(src, set()).add(name)
    return ref


def close_extra_data() -> None:
    """Close every file extra-data opened: HDF5 refuses to open a file the server holds open
    without locking while another handle holds it with locking (extra-data's default)."""
    for fa in list(file_access_registry.values()):
        if fa._file is not None:
            fa._file.close()
        fa.close()
    gc.collect()


@pytest.fixture(scope="module")
def xfel_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("xfel")
    make_runs(root)
    return root


@pytest.fixture(scope="module")
def refs(xfel_root: Path) -> dict[int, Reference]:
    """extra-data's view of every run, read before any test opens the files."""
    top = xfel_root / EXP
    found = {238: reference(ed.open_run(top, 238, data="all", parallelize=False))}
    for number, d in [(450, "raw/r0450"), (12, "raw/r0012"), (1, "raw/r0001"),
                      (2, "raw/r0002"), (3, "raw/r0003"), (142, "proc/r0142")]:
        found[number] = reference(ed.RunDirectory(str(top / d), parallelize=False))
    close_extra_data()
    return found


@pytest.fixture(scope="module")
def catalog(xfel_root: Path, refs: dict[int, Reference]) -> Iterator[Catalog]:
    cat = Catalog(xfel_root)
    yield cat
    cat.close()


def read(run: Run, names: list[str] | None = None, start: int = 0, stop: int | None = None,
         step: int = 1) -> pa.RecordBatch:
    cols = run.resolve(names)
    with run.reader() as reader:
        batch = reader.read(cols, start, run.num_events if stop is None else stop, step)
    batch.validate(full=True)
    return batch


def split(column: pa.Array) -> tuple[np.ndarray, Any]:
    """(present per row, values of the present rows) of a served column."""
    present = column.is_valid().to_numpy(zero_copy_only=False)
    kept = column.filter(pa.array(present))
    if pa.types.is_string(kept.type):
        return present, kept.to_pylist()
    if isinstance(kept.type, pa.FixedSizeListType | pa.FixedShapeTensorType):
        return present, values(kept)
    return present, kept.to_numpy(zero_copy_only=False)


def assert_column(got: pa.Array, present: np.ndarray, expected: Any, name: str) -> None:
    got_present, got_values = split(got)
    np.testing.assert_array_equal(got_present, present, err_msg=f"{name}: nulls differ")
    if isinstance(got_values, list):
        assert got_values == list(expected), name
    else:
        assert got_values.dtype == expected.dtype, name  # the stored type, never widened
        np.testing.assert_array_equal(got_values.reshape(expected.shape), expected,
                                      err_msg=name)


def data_columns(run: Run) -> set[str]:
    return {c.name for c in run.columns.values() if md.DETECTOR in (c.field.metadata or {})}


def table_keys(ref: Reference, source: str | None = None) -> set[str]:
    """Keys of the reference's per-source tables (of one source, or of all)."""
    found: set[str] = set()
    for src, keys in ref.tables.items():
        if source in (None, src):
            found |= {*keys, *ref.table_window.get(src, {}), *ref.unchecked_tables.get(src, ())}
    return found - {"trainId"}


def as_numpy(arr: pa.Array) -> np.ndarray:
    if isinstance(arr.type, pa.FixedShapeTensorType):
        return arr.to_numpy_ndarray()
    if isinstance(arr.type, pa.FixedSizeListType):
        return values(arr)
    return arr.to_numpy(zero_copy_only=False)


# -- the main table ------------------------------------------------------------------------------


@pytest.mark.parametrize("number", [238, 450, 12, 1, 2, 3, 142])
def test_main_table_equals_extra_data(catalog: Catalog, refs: dict[int, Reference],
                                      number: int) -> None:
    ref = refs[number]
    run = catalog.run(EXP, number)
    assert run.layout.name == "euxfel" and run.num_events == len(ref.train_ids)
    assert data_columns(run) == \
        set(ref.main) | set(ref.window) | ref.unreadable | ref.unchecked
    batch = read(run, ["trainId", *ref.main])
    np.testing.assert_array_equal(batch.column("trainId").to_numpy(), ref.train_ids)
    for name, (present, expected) in ref.main.items():
        assert_column(batch.column(name), present, expected, name)
    if ref.window:
        first = read(run, list(ref.window), 0, WINDOW)
        for name, (present, expected) in ref.window.items():
            assert_column(first.column(name), present, expected, name)


def test_missing_trains_are_nulls(catalog: Catalog, refs: dict[int, Reference]) -> None:
    run = catalog.run(EXP, 3)
    batch = read(run, [FLUX, f"{CAMERA}/data.image.bitsPerPixel"])
    flux = batch.column(FLUX)
    assert run.num_events == 40 and flux.null_count == 10  # trains 10030-10039: no XGM file
    assert flux.is_null().to_pylist() == [False] * 30 + [True] * 10
    camera = batch.column(1)
    assert camera.is_null().to_pylist()[:10] == [True] * 10  # before the camera's file
    assert 10 < camera.null_count < 30  # and trains it skipped (count 0)
    # A source that recorded nothing at all (count 0 everywhere) is a column of nulls.
    assert read(run, [f"{GAUGE}/value"]).column(0).null_count == 40
    nodata = read(catalog.run(EXP, 450), ["FXE_XAD_GEC/CAM/CAMERA_NODATA:daqOutput/"
                                          "data.image.pixels"], 0, 5)
    assert nodata.column(0).null_count == 5
    # A detector module that missed a train has a null there.
    lpd = read(catalog.run(EXP, 1), ["FXE_DET_LPD1M-1/DET/1CH0:xtdf/header.pulseCount"])
    assert lpd.column(0).is_null().to_pylist() == [False, False, True, False, False]


@pytest.mark.parametrize("number", [238, 12, 1, 2, 3, 142])
def test_time_is_index_timestamp(catalog: Catalog, refs: dict[int, Reference],
                                 number: int) -> None:
    run, ref = catalog.run(EXP, number), refs[number]
    time = read(run, ["time"]).column("time")
    assert time.type == pa.timestamp("ns", tz="UTC")
    np.testing.assert_array_equal(pc.fill_null(time.cast(pa.int64()), 0).to_numpy(), ref.times)
    assert time.null_count == (1 if number == 3 else 0)  # train 10035 of run 3 has no time
    start = int(ref.times[ref.times > 0].min())
    assert run.start_ns == start and run.end_ns == ref.times.max()
    assert run.schema_metadata()[md.START_TIME].decode().startswith(
        str(np.datetime64(start, "ns"))[:19])


def test_format_0_5_has_no_time(catalog: Catalog, refs: dict[int, Reference]) -> None:
    run = catalog.run(EXP, 450)
    assert refs[450].times is None
    assert "time" not in run.columns and run.start_ns is None
    assert md.START_TIME not in run.schema_metadata()


def test_types_follow_the_data(catalog: Catalog) -> None:
    run = catalog.run(EXP, 238)
    s = run.schema()
    assert s.field(FLUX).type == pa.float32()  # not widened
    assert s.field(f"{XGM_SRC}/pulseEnergy.conversion").type == pa.float64()
    assert s.field(f"{XGM_SRC}/state").type == pa.string()
    assert s.field(INTENSITY).type == pa.list_(pa.float32(), 1000)
    assert s.field("trainId").type == pa.uint64() and s.field("run").type == pa.int32()
    assert s.field(f"{AGIPD0}/detector.data").type == pa.list_(pa.uint8(), 5408)
    jf = catalog.run(EXP, 12).schema()
    adc = jf.field(f"{JF01}/data.adc").type
    assert adc == pa.fixed_shape_tensor(pa.float32(), [16, 512, 1024])
    # Batches are sized by these: a row's bytes on the wire (a JUNGFRAU train: its frame stack).
    assert run.columns[INTENSITY].event_bytes == 4000
    assert catalog.run(EXP, 12).columns[f"{JF01}/data.adc"].event_bytes == 16 * 512 * 1024 * 4
    assert catalog.run(EXP, 3).columns[FLUX].event_bytes == 4.125  # values + validity bit


def test_field_metadata_names_path_source_and_units(catalog: Catalog,
                                                    refs: dict[int, Reference]) -> None:
    run = catalog.run(EXP, 238)
    meta = run.columns[INTENSITY].field.metadata
    assert meta[md.HDF5_PATH] == f"/INSTRUMENT/{XGM_SRC}:output/data/intensityTD".encode()
    assert meta[md.DETECTOR] == f"{XGM_SRC}:output".encode()
    assert meta[md.UNITS].decode() == refs[238].units[INTENSITY] == "μJ"
    flux = run.columns[FLUX].field.metadata
    assert flux[md.HDF5_PATH] == f"/CONTROL/{XGM_SRC}/pulseEnergy/photonFlux/value".encode()
    assert md.UNITS not in flux
    assert {n for n, c in run.columns.items() if md.UNITS in (c.field.metadata or {})} \
        == set(refs[238].units)


def test_run_values_are_the_config(catalog: Catalog, refs: dict[int, Reference]) -> None:
    for number in (238, 12, 3):
        config = json.loads(catalog.run(EXP, number).schema_metadata()[md.CONFIG])
        for key, value in refs[number].run_values.items():
            expected = value.tolist() if isinstance(value, np.ndarray | np.generic) else value
            assert config[key] == expected, key
    config = catalog.run(EXP, 238).config
    assert config[f"{XGM_SRC}/classId"] == "DoocsXGM"
    assert config["METADATA"]["dataFormatVersion"] == "1.0"


def test_event_ranges_with_step(catalog: Catalog) -> None:
    run = catalog.run(EXP, 3)
    names = ["trainId", "time", FLUX, f"{XGM_SRC}/state", INTENSITY,
             f"{CAMERA}/data.image.dims", f"{CAMERA}/data.image.pixels"]
    whole = read(run, names)
    for start, stop, step in [(0, 40, 3), (13, 17, 1), (14, 31, 2), (29, 40, 5), (39, 40, 1),
                              (5, 5, 1)]:
        got = read(run, names, start, stop, step)
        assert got.equals(whole.take(pa.array(np.arange(start, stop, step, dtype=np.int64)))), \
            (start, stop, step)


def test_control_keys_answer_to_extra_data_names(catalog: Catalog) -> None:
    run = catalog.run(EXP, 238)
    assert run.resolve([f"{FLUX}.value"])[0].name == FLUX  # as extra-data's keys() lists it
    with pytest.raises(NotFound, match=f"Did you mean '{FLUX}'"):
        run.resolve([f"{XGM_SRC}/pulseEnergy.photonFlx"])


def test_keys_with_dots_in_hdf5_names(catalog: Catalog, xfel_root: Path,
                                      refs: dict[int, Reference]) -> None:
    """JUNGFRAU's mock control device names a dataset `dataStorage.enable`: extra-data cannot
    read it (it looks for dataStorage/enable); it is served, from the dataset h5py reads."""
    name = "SPB_IRDA_JF4M/DET/CONTROL/dataStorage.enable"
    assert name in refs[12].unreadable
    run = catalog.run(EXP, 12)
    path = run.columns[name].field.metadata[md.HDF5_PATH].decode()
    with h5py.File(xfel_root / EXP / "raw/r0012/RAW-R0012-JNGFRCTRL00-S00000.h5", "r",
                   locking=False) as f:
        expected = f[path][:100]
    np.testing.assert_array_equal(read(run, [name]).column(0).to_numpy(), expected)


# -- raw and proc, and per-source tables -----------------------------------------------------------


def test_raw_and_proc_merge_as_open_run_all(catalog: Catalog, refs: dict[int, Reference]) -> None:
    run = catalog.run(EXP, 238)
    # proc's corrected AGIPD replaces raw's (float32 frames, no gain axis); the XGMs stay raw.
    image = run.table(AGIPD0).columns[f"{AGIPD0}/image.data"]
    assert image.field.type == pa.fixed_shape_tensor(pa.float32(), [512, 128])
    assert run.columns[FLUX].field.metadata[md.HDF5_PATH].startswith(b"/CONTROL/")
    assert set(run.tables()) == set(refs[238].tables)
    dirs = {f.shown.split("/")[0] for f in run.store.files
            if any(f.no in s.files for s in run.store.sources.values())}
    assert dirs == {"raw", "proc"}


@pytest.mark.parametrize("number", [238, 1, 2, 142])
def test_pulse_tables_equal_ndarray(catalog: Catalog, refs: dict[int, Reference],
                                    number: int) -> None:
    run, ref = catalog.run(EXP, number), refs[number]
    assert set(run.tables()) == set(ref.tables)
    assert json.loads(run.schema_metadata()[md.TABLES]) == run.tables()
    for source, expected in ref.tables.items():
        table = catalog.run(EXP, number, table=source)
        assert table is run.table(source) and table.table_name == source
        assert table.num_events == len(expected["trainId"])
        assert data_columns(table) == table_keys(ref, source)
        batch = read(table, list(expected))
        for name, values_ in expected.items():
            got = batch.column(name)
            assert got.null_count == 0
            assert_column(got, np.ones(len(values_), bool), values_, name)
        if "time" in table.columns:
            times = pc.fill_null(read(table, ["time"]).column(0).cast(pa.int64()), 0)
            rows = np.searchsorted(ref.train_ids, expected["trainId"])
            np.testing.assert_array_equal(times.to_numpy(), ref.times[rows])
        for name, values_ in ref.table_window.get(source, {}).items():
            got = read(table, [name], 0, len(values_)).column(0)
            np.testing.assert_array_equal(got.to_numpy_ndarray(), values_, err_msg=name)
        rows = table.num_events
        for start, stop, step in [(0, rows, 7), (rows // 3, rows - 1, 5), (rows - 1, rows, 1)]:
            part = read(table, list(expected), start, stop, step)
            for name, values_ in expected.items():
                want = values_[start:stop:step]
                np.testing.assert_array_equal(as_numpy(part.column(name)).reshape(want.shape),
                                              want, err_msg=name)


def test_frames_of_a_table_window_equal_ndarray(catalog: Catalog,
                                                refs: dict[int, Reference]) -> None:
    """A window of whole frames, stepped, against extra-data's frames of the first trains."""
    ref = refs[2].table_window["SPB_DET_AGIPD1M-1/DET/3CH0:xtdf"]
    name = "SPB_DET_AGIPD1M-1/DET/3CH0:xtdf/image.data"
    frames = ref[name]
    table = catalog.run(EXP, 2).table("SPB_DET_AGIPD1M-1/DET/3CH0:xtdf")
    got = read(table, [name], 1, len(frames), 3).column(0).to_numpy_ndarray()
    np.testing.assert_array_equal(got, frames[1::3])
    assert got.dtype == np.uint16 and frames.any()


def test_legacy_source_names(catalog: Catalog, refs: dict[int, Reference]) -> None:
    """Modern corrected data also answers to its raw source name, as in extra-data."""
    run = catalog.run(EXP, 142)
    canonical = "SPB_DET_AGIPD1M-1/CORR/0CH0:output"
    assert canonical in run.tables() and AGIPD0 not in run.tables()
    assert run.table(AGIPD0) is run.table(canonical)
    legacy = run.table(AGIPD0)
    assert legacy.resolve([f"{AGIPD0}/image.pulseId"])[0].name == f"{canonical}/image.pulseId"
    col = run.resolve([f"{AGIPD0}/header.pulseCount"])[0]
    assert col.name == f"{canonical}/header.pulseCount"
    present, expected = refs[142].main[col.name]
    assert_column(read(run, [col.name]).column(0), present, expected, col.name)


def test_unknown_table_lists_the_tables(catalog: Catalog) -> None:
    run = catalog.run(EXP, 238)
    with pytest.raises(NotFound, match=f"no table 'SPB_DET_AGIPD1M-1/DET/0CH0:xtd'.*{AGIPD0}"):
        run.table("SPB_DET_AGIPD1M-1/DET/0CH0:xtd")


def test_concurrent_reads_share_few_handles(catalog: Catalog) -> None:
    """The read pool reads one run from several threads; a small open-file bound makes them
    evict each other's files all the time, which must never pull a dataset from under one."""
    run = describe(catalog.root / EXP / "raw/r0238", EXP, 238, "euxfel", catalog.root / EXP)
    run.store.handles.limit = 2
    names = [INTENSITY, f"{AGIPD0}/header.pulseCount", "SPB_DET_AGIPD1M-1/DET/7CH0:xtdf/"
             "trailer.status", FLUX]
    table = run.table(AGIPD0)
    expected = read(run, names)
    expected_frames = read(table, [f"{AGIPD0}/image.pulseId"])
    errors: list[Exception] = []

    def work(i: int) -> None:
        try:
            for start in range(i, 60, 4):
                assert read(run, names, start, start + 4).equals(expected.slice(start, 4))
                assert read(table, [f"{AGIPD0}/image.pulseId"], start * 30, start * 30 + 90) \
                    .equals(expected_frames.slice(start * 30, 90))
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert run.store.handles.open_files <= 2
    run.retire()
    assert run.store.handles.open_files == 0


@pytest.mark.parametrize("seed", range(6))
def test_strided_runs_cover_every_row_once(seed: int) -> None:
    """`_runs` turns (row, entry) pairs into strided reads; whatever the pattern (gaps, steps,
    entries out of order), each pair is read exactly once."""
    rng = np.random.default_rng(seed)
    k = np.flatnonzero(rng.random(200) < 0.7)
    e = np.cumsum(rng.choice([1, 1, 1, 2, 3], len(k))) + 5
    if seed % 2:
        e[len(e) // 2:] -= 40  # entries that jump back (a file's index restarting)
    got = [(k0 + j * dk, e0 + j * de) for k0, dk, e0, de, m in _runs(k, e) for j in range(m)]
    assert sorted(got) == sorted(zip(k.tolist(), e.tolist(), strict=True))
    if seed == 0:
        assert len(list(_runs(np.arange(50), np.arange(50) * 2 + 3))) == 1


class Multi(DeviceBase):
    """A detector-like source: 4 entries per train in groups `image` and `aux`."""

    output_channels = ("out/image", "out/aux")
    instrument_keys = [("frame", "u2", (4, 4)), ("cell", "u2", ())]


def test_groups_with_other_counts_are_left_out_with_a_note(tmp_path: Path) -> None:
    d = tmp_path / EXP / "raw" / "r0020"
    d.mkdir(parents=True)
    path = d / "RAW-R0020-DET01-S00000.h5"
    write_file(str(path), [Multi("SPB_TEST/DET/MULTI", nsamples=40)], ntrains=10,
               chunksize=10, format_version="1.0")
    source = "SPB_TEST/DET/MULTI:out"
    with h5py.File(path, "r+") as f:  # a third group with 2 entries per train
        f[f"INDEX/{source}/wave/first"] = np.arange(0, 20, 2, dtype=np.uint64)
        f[f"INDEX/{source}/wave/count"] = np.full(10, 2, dtype=np.uint64)
        f[f"INSTRUMENT/{source}/wave/x"] = np.arange(20, dtype=np.float32)
        for key in ("image/frame", "image/cell", "aux/cell"):
            ds = f[f"INSTRUMENT/{source}/{key}"]
            ds[...] = np.arange(ds.size).reshape(ds.shape) % 60000
    dc = ed.RunDirectory(str(d), parallelize=False)
    expected = {k: dc[source, k].ndarray() for k in ("image.frame", "image.cell", "aux.cell")}
    coords = dc[source, "image.cell"].train_id_coordinates()
    close_extra_data()
    run = describe_small(d)
    assert run.tables() == [source] and not data_columns(run)
    table = run.table(source)
    assert "wave" in table.config["note"] and f"{source}/wave.x" not in table.columns
    batch = read(table)
    np.testing.assert_array_equal(batch.column("trainId").to_numpy(), coords)
    for key, values_ in expected.items():
        np.testing.assert_array_equal(as_numpy(batch.column(f"{source}/{key}")), values_)
    run.retire()


# -- bad run directories -------------------------------------------------------------------------


class Small(DeviceBase):
    """An XGM with two keys: sequence files that cost little to write."""

    control_keys = [("pulseEnergy/photonFlux", "f4", ()), ("beamPosition/ixPos", "f4", ())]
    extra_run_values = [("classId", None, "DoocsXGM"),
                        ("calibration/table", "f4", np.arange(5000, dtype="f4"), (5000,))]
    output_channels = ("output/data",)
    instrument_keys = [("intensityTD", "f4", (100,))]


def small_run(root: Path, number: int, files: int = 3, trains: int = 10) -> Path:
    d = root / EXP / "raw" / f"r{number:04d}"
    d.mkdir(parents=True)
    for seq in range(files):
        write_file(str(d / f"RAW-R{number:04d}-DA01-S{seq:05d}.h5"), [Small(XGM_SRC)],
                   ntrains=trains, firsttrain=10000 + trains * seq, chunksize=trains,
                   format_version="1.0")
    return d


def describe_small(d: Path) -> EuxfelRun:
    return describe(d, EXP, int(d.name[1:]), "euxfel", d.parent.parent)


def test_missing_sequence_file_is_named(tmp_path: Path) -> None:
    d = small_run(tmp_path, 5)
    (d / "RAW-R0005-DA01-S00001.h5").unlink()
    with pytest.raises(RunUnreadable, match="sequence file RAW-R0005-DA01-S00001.h5 is missing"):
        describe_small(d)


def test_file_that_cannot_be_opened_is_named(tmp_path: Path) -> None:
    d = small_run(tmp_path, 6)
    (d / "RAW-R0006-DA01-S00001.h5").write_bytes(b"not HDF5 at all" * 100)
    with pytest.raises(RunUnreadable, match="raw/r0006/RAW-R0006-DA01-S00001.h5 cannot be read"):
        describe_small(d)
    victim = d / "RAW-R0006-DA01-S00001.h5"
    victim.unlink()
    write_file(str(victim), [Small(XGM_SRC)], ntrains=10, firsttrain=10010, chunksize=10,
               format_version="1.0")
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with pytest.raises(RunUnreadable, match="RAW-R0006-DA01-S00001.h5"):
        describe_small(d)


@pytest.mark.parametrize("damage, message", [
    ("count_past_end", "INDEX/SA1_XTD2_XGM/DOOCS/MAIN points at entry 10 but"),
    ("train_ids_not_increasing", "INDEX/trainId is not increasing"),
    ("index_shorter", "INDEX/SA1_XTD2_XGM/DOOCS/MAIN:output/data holds 7 entries for 10 trains"),
    ("zero_train_id_inside", "train ID 0 between real ones"),
])
def test_inconsistent_index_is_named(tmp_path: Path, damage: str, message: str) -> None:
    d = small_run(tmp_path, 7)
    bad = d / "RAW-R0007-DA01-S00002.h5"
    with h5py.File(bad, "r+") as f:
        if damage == "count_past_end":
            f[f"INDEX/{XGM_SRC}/first"][9] = 10  # entry 10 of a 10-entry dataset
        elif damage == "train_ids_not_increasing":
            f["INDEX/trainId"][3:5] = [10024, 10023]
        elif damage == "index_shorter":
            f[f"INDEX/{XGM_SRC}:output/data/count"].resize((7,))
        else:
            f["INDEX/trainId"][4] = 0
    with pytest.raises(RunUnreadable, match=f"RAW-R0007-DA01-S00002.h5.*{message}"):
        describe_small(d)


def test_short_dataset_fails_the_read_naming_the_file(tmp_path: Path) -> None:
    d = small_run(tmp_path, 8)
    with h5py.File(d / "RAW-R0008-DA01-S00001.h5", "r+") as f:
        f[f"CONTROL/{XGM_SRC}/pulseEnergy/photonFlux/value"].resize((6,))  # not the probed key
    run = describe_small(d)
    assert read(run, [f"{XGM_SRC}/beamPosition.ixPos"]).num_rows == 30
    with pytest.raises(RunUnreadable, match="RAW-R0008-DA01-S00001.h5: /CONTROL/.*photonFlux/"
                                            "value holds 6 entries but the index points at "
                                            "entry 9"):
        read(run, [FLUX])
    assert read(run, [FLUX], 0, 10).num_rows == 10  # trains of the other files still read


# -- through a server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xfel_server(xfel_root: Path, refs: dict[int, Reference]) -> Iterator[LclstreamServer]:
    srv = start_server(xfel_root, batch_bytes=256 * 1024, first_batch_bytes=32 * 1024,
                       partition_bytes=1024 * 1024)
    yield srv
    srv.shutdown()


@pytest.fixture
def xfel_client(xfel_server: LclstreamServer) -> Iterator[Client]:
    with connect(f"grpc://127.0.0.1:{xfel_server.port}", admin_token()) as c:
        yield c


def test_served_columns_equal_extra_data(xfel_client: Client,
                                         refs: dict[int, Reference]) -> None:
    ref = refs[3]
    names = [FLUX, f"{XGM_SRC}/state", INTENSITY, f"{CAMERA}/data.image.dims"]
    table = xfel_client.read(EXP, 3, ["trainId", *names])
    np.testing.assert_array_equal(table.column("trainId").to_numpy(), ref.train_ids)
    for name in names:
        present, expected = ref.main[name]
        assert_column(table.column(name).combine_chunks(), present, expected, name)
    runs = xfel_client.runs(EXP)
    assert sorted(runs["run"].to_list()) == [1, 2, 3, 12, 142, 238, 450]
    assert set(runs["layout"].to_list()) == {"euxfel"}


def test_served_pulse_table(xfel_client: Client, xfel_server: LclstreamServer,
                            refs: dict[int, Reference]) -> None:
    expected = refs[238].tables[AGIPD0]
    names = ["trainId", f"{AGIPD0}/image.pulseId", f"{AGIPD0}/image.cellId"]
    table = xfel_client.read(EXP, 238, names, table=AGIPD0)
    for name in names:
        np.testing.assert_array_equal(table.column(name).to_numpy(), expected[name])
    frames = xfel_client.read(EXP, 238, [f"{AGIPD0}/image.data"], (1, 64, 9), table=AGIPD0)
    window = refs[238].table_window[AGIPD0][f"{AGIPD0}/image.data"]
    assert window[1].any()
    np.testing.assert_array_equal(
        frames.column(0).combine_chunks().to_numpy_ndarray(), window[1:64:9])
    with raw_client(xfel_server.port) as raw:
        info = raw.get_flight_info(flight.FlightDescriptor.for_path(EXP, "238", AGIPD0))
        got = raw.do_get(info.endpoints[0].ticket).read_all()
    assert info.schema.metadata[md.TABLE] == AGIPD0.encode()
    assert info.total_records == len(expected["trainId"])
    assert f"{AGIPD0}/image.data" in got.column_names
    with pytest.raises(pa.ArrowKeyError, match="no table"):
        xfel_client.read(EXP, 238, table="SPB_DET_AGIPD1M-1/DET/0CH0")


def test_processing_and_filters_on_detector_frames(xfel_client: Client,
                                                   refs: dict[int, Reference]) -> None:
    """Steps and filters work on a pulse table's frames as on any tensor column."""
    data, cell = f"{AGIPD0}/image.data", f"{AGIPD0}/image.cellId"
    window = refs[238].table_window[AGIPD0][data][:64]
    level = int(np.median(window))
    got = xfel_client.read(EXP, 238, [data], (0, 64), table=AGIPD0, processing=[
        {"step": "threshold", "column": data, "below": level}])
    np.testing.assert_array_equal(got.column(0).combine_chunks().to_numpy_ndarray(),
                                  np.where(window < level, 0, window))
    cells = refs[238].tables[AGIPD0][cell][:64]
    some = xfel_client.read(EXP, 238, [cell], (0, 64), table=AGIPD0, filter=f'"{cell}" < 10')
    np.testing.assert_array_equal(some.column(0).to_numpy(), cells[cells < 10])


def test_filter_on_a_control_key(xfel_client: Client, refs: dict[int, Reference]) -> None:
    present, flux = refs[3].main[FLUX]
    kept = xfel_client.read(EXP, 3, ["trainId", FLUX], filter=f'"{FLUX}" > 60')
    expected_ids = refs[3].train_ids[present][flux > 60]
    np.testing.assert_array_equal(kept.column("trainId").to_numpy(), expected_ids)
    on = xfel_client.read(EXP, 3, ["trainId"], filter=f"\"{XGM_SRC}/state\" = 'ON'")
    state = np.array(refs[3].main[f"{XGM_SRC}/state"][1])
    assert on.num_rows == int((state == "ON").sum()) > 0


def test_sql_sees_the_main_table(xfel_client: Client, refs: dict[int, Reference]) -> None:
    result = xfel_client.sql(f'SELECT "trainId", "{FLUX}" AS flux FROM {EXP}.events '
                             "WHERE run = 3 ORDER BY event")
    present, flux = refs[3].main[FLUX]
    got = result.column("flux")
    np.testing.assert_array_equal(got.is_valid().to_numpy(zero_copy_only=False), present)
    np.testing.assert_array_equal(got.drop_null().to_numpy(), flux)
    mean = xfel_client.sql(f'SELECT avg("{FLUX}") AS m FROM {EXP}.events WHERE run = 3')
    assert mean.column("m")[0].as_py() == pytest.approx(float(flux.mean()))


def test_broken_run_fails_alone(tmp_path: Path) -> None:
    small_run(tmp_path, 9)
    bad = small_run(tmp_path, 10)
    (bad / "RAW-R0010-DA01-S00000.h5").write_bytes(b"garbage" * 64)
    srv = start_server(tmp_path)
    try:
        with connect(f"grpc://127.0.0.1:{srv.port}", admin_token()) as c:
            with pytest.raises(flight.FlightInternalError,
                               match="RAW-R0010-DA01-S00000.h5 cannot be read"):
                c.read(EXP, 10)
            assert c.read(EXP, 9, [FLUX]).num_rows == 30
            with pytest.raises(pa.ArrowKeyError, match=f"Did you mean '{FLUX}'"):
                c.read(EXP, 9, [f"{XGM_SRC}/pulseEnergy.photonflux"])
    finally:
        srv.shutdown()


def test_many_sequence_files(tmp_path: Path) -> None:
    """A run of 100 sequence files is described from its INDEX alone and served from the first
    batch on; its handles stay within the bound and close when the run is retired."""
    d = small_run(tmp_path, 11, files=100, trains=5)
    run = describe_small(d)
    assert run.num_events == 500 and len(run.store.files) == 100
    assert run.config[f"{XGM_SRC}/classId"] == "DoocsXGM"  # small RUN values inline
    assert run.config[f"{XGM_SRC}/calibration.table"] == {"shape": [5000], "dtype": "float32"}
    assert run.store.handles.open_files == 0  # describing keeps nothing open
    names = ["trainId", FLUX, f"{XGM_SRC}:output/data.intensityTD"]
    with run.reader() as reader:
        whole = reader.read(run.resolve(names), 0, run.num_events)
        assert run.store.handles.open_files == MAX_OPEN_FILES < 100
    assert run.store.handles.open_files == IDLE_OPEN_FILES  # between streams
    np.testing.assert_array_equal(whole.column("trainId").to_numpy(), np.arange(10000, 10500))
    run.retire()
    assert run.store.handles.open_files == 0
    srv = start_server(tmp_path)
    try:
        with connect(f"grpc://127.0.0.1:{srv.port}", admin_token()) as c:
            info = c.plan(EXP, 11, [FLUX])
        with raw_client(srv.port) as raw:
            first = raw.do_get(info.endpoints[0].ticket).read_chunk().data
        assert first.num_rows > 0
        assert first.column(0).to_pylist() == whole.column(FLUX).to_pylist()[:first.num_rows]
    finally:
        srv.shutdown()


def test_proc_link_out_of_the_experiment_is_not_followed(tmp_path: Path) -> None:
    d = small_run(tmp_path, 12)
    outside = small_run(tmp_path / "elsewhere", 12)
    (tmp_path / EXP / "proc").mkdir()
    (tmp_path / EXP / "proc" / "r0012").symlink_to(outside, target_is_directory=True)
    run = describe_small(d)
    assert {f.shown.split("/")[0] for f in run.store.files} == {"raw"}
    shutil.rmtree(tmp_path / "elsewhere")
