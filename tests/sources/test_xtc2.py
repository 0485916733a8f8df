"""Raw LCLS-II runs (xtc2, written by psana's own dgramCreate): every served value equals what
psana's DataSource returns for the same files, through the source and through a real server;
the run's other form beside its smalldata HDF5 file; bad input fails clearly and alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from clients import Client, connect
from flight_server.catalog import Catalog
from flight_server.errors import NotFound, RunUnreadable, Unsupported
from flight_server.generator import generate_lcls2_run
from flight_server.generator.xtc2 import generate_xtc2_run, run_files
from flight_server.server import LclstreamServer
from flight_server.sources import xtc2
from schemas import metadata as md
from tests.helpers import raw_client, run_cli, start_server

EXP = "mfx2026"
BOTH, RAW, CHUNKED, TRUNCATED, GAP = 7, 8, 9, 10, 11  # run numbers
SHAPE = (48, 64)
SAMPLES = 96


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("xtc2")
    xtc = root / EXP / "xtc"
    kw = {"frame_shape": SHAPE, "waveform_samples": SAMPLES}
    generate_xtc2_run(xtc, EXP, BOTH, 60, seed=1, **kw)
    generate_lcls2_run(root / EXP / "hdf5" / "smalldata" / f"{EXP}_Run{BOTH:04d}.h5", BOTH,
                       n_events=60, seed=1, frame_shape=SHAPE)
    generate_xtc2_run(xtc, EXP, RAW, 300, seed=2, **kw)
    generate_xtc2_run(xtc, EXP, CHUNKED, 130, seed=3, chunk_events=50, **kw)
    generate_xtc2_run(xtc, EXP, GAP, 130, seed=3, chunk_events=50, **kw)
    run_files(xtc, EXP, GAP, 0, 1).unlink()  # stream s000 lacks its chunk c001
    generate_xtc2_run(xtc, EXP, TRUNCATED, 40, seed=4, **kw)
    first = run_files(xtc, EXP, TRUNCATED, 0)
    with open(first, "r+b") as f:  # a copy that stopped half-way through an event
        f.truncate(first.stat().st_size - 3000)
    return root


@pytest.fixture(scope="module")
def srv(root: Path) -> Iterator[LclstreamServer]:
    srv = start_server(root, batch_bytes=64 * 1024, first_batch_bytes=16 * 1024,
                       partition_bytes=512 * 1024)
    yield srv
    srv.shutdown()


@pytest.fixture
def client(srv: LclstreamServer) -> Iterator[Client]:
    with connect(f"grpc://127.0.0.1:{srv.port}") as c:
        yield c


def psana_events(xtc_dir: Path, experiment: str, run: int) -> Iterator[tuple[object, dict]]:
    """Each event of a run as psana's DataSource (exp/run/dir, as at the facility) yields it,
    with the run's detectors."""
    from psana import DataSource
    from psana.psexp.ds_base import DataSourceBase

    # psana first asks the LCLS logbook for the run's files; off site that request fails.
    # Answering "no entry" is psana's own fallback for runs the logbook does not list: it
    # then finds the stream and smalldata files on disk.
    saved = DataSourceBase._get_file_info_from_db
    DataSourceBase._get_file_info_from_db = lambda self, runnum: {}
    try:
        ds = DataSource(exp=experiment, run=run, dir=str(xtc_dir), skip_calib_load="all")
        psana_run = next(ds.runs())
    finally:
        DataSourceBase._get_file_info_from_db = saved
    dets = {name: psana_run.Detector(name)
            for name in ("pnccd", "hexanode", "gmd", "sample_x", "shutter_open")}
    for evt in psana_run.events():
        yield evt, dets


def psana_value(dets: dict, evt: object, column: str) -> object:
    """What a psana user gets for a column's call (None: the detector missed the event)."""
    parts = column.split("/")
    if parts[0] == "epics":
        return dets[parts[1]](evt)
    iface = getattr(dets[parts[0]], parts[1])
    if iface._segments(evt) is None:
        return None
    return getattr(iface, parts[2])(evt)


def column_values(table: pa.Table | pa.RecordBatch, name: str) -> list:
    """A column's values as numpy arrays (tensors and lists) or Python scalars, None for nulls."""
    col = table.column(name)
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    storage = col.storage if isinstance(col, pa.ExtensionArray) else col
    if isinstance(storage.type, pa.FixedSizeListType):
        shape = col.type.shape if isinstance(col, pa.ExtensionArray) else [storage.type.list_size]
        flat = storage.values.to_numpy(zero_copy_only=False).reshape(len(storage), *shape)
        return [flat[i] if storage[i].is_valid else None for i in range(len(storage))]
    return col.to_pylist()


def assert_equals_psana(table: pa.Table | pa.RecordBatch, xtc_dir: Path, run: int) -> None:
    names = [n for n in table.column_names if "/" in n]
    got = {n: column_values(table, n) for n in names}
    stamps = column_values(table, "timestamp")
    count = 0
    for i, (evt, dets) in enumerate(psana_events(xtc_dir, EXP, run)):
        assert stamps[i] == evt.timestamp, i
        for name in names:
            ref, value = psana_value(dets, evt, name), got[name][i]
            if ref is None:
                assert value is None, (name, i)
            elif isinstance(ref, np.ndarray):
                assert value.dtype == ref.dtype and np.array_equal(value, ref), (name, i)
            else:
                assert value == ref, (name, i, value, ref)
        count += 1
    assert count == table.num_rows


# -- values --------------------------------------------------------------------------------------


def test_every_value_equals_psanas_through_the_source(root: Path) -> None:
    xtc = root / EXP / "xtc"
    run = xtc2.describe(run_files(xtc, EXP, RAW, 0), EXP, RAW, root / EXP)
    try:
        with run.reader() as reader:
            batch = reader.read(run.resolve(None), 0, run.num_events)
    finally:
        run.retire()
    assert batch.num_rows == 300
    assert_equals_psana(batch, xtc, RAW)


def test_every_value_equals_psanas_through_a_server(client: Client, root: Path) -> None:
    info = client.plan(EXP, RAW)
    assert len(info.endpoints) > 3  # split by event ranges, read in parallel
    table = client.read(EXP, RAW, parallel=4)
    assert_equals_psana(table, root / EXP / "xtc", RAW)


def test_schema_follows_psanas_interfaces(client: Client) -> None:
    schema = client.schema(EXP, RAW)
    types = {f.name: f.type for f in schema}
    calib = types["pnccd/raw/calib"]
    assert isinstance(calib, pa.FixedShapeTensorType) and calib.value_type == pa.uint16()
    assert list(calib.shape) == list(SHAPE)
    # hexanode_raw_0_0_1 returns channels 2..6 of the 8 stored: the interface's value is served
    waves = types["hexanode/raw/waveforms"]
    assert waves.value_type == pa.int16() and list(waves.shape) == [5, SAMPLES]
    assert list(types["hexanode/raw/times"].shape) == [5, SAMPLES]
    assert types["gmd/raw/xpos"] == pa.float32()  # stored float32: not widened to psana's float
    assert types["gmd/raw/energy"] == pa.float64()
    assert types["epics/shutter_open"] == pa.int32() and types["epics/sample_x"] == pa.float64()
    assert types["timestamp"] == pa.uint64() and types["time"] == pa.timestamp("ns", tz="UTC")
    assert not [n for n in types if n.endswith("/config")]  # configuration is not per event
    field = schema.field("pnccd/raw/calib")
    assert field.metadata[xtc2.PSANA_CALL] == b"run.Detector('pnccd').raw.calib(evt)"
    assert schema.field("epics/sample_x").metadata[b"epics.pv"] == b"MFX:USR:MMS:17.RBV"

    meta = schema.metadata
    assert meta[md.LAYOUT] == b"lcls2-xtc2" and meta[md.EVENTS] == b"300"
    config = json.loads(meta[md.CONFIG])
    assert config["runinfo"] == {"expt": EXP, "runnum": RAW}
    assert set(config["detectors"]) == {"pnccd", "hexanode", "gmd"}
    assert config["detectors"]["pnccd"]["dettype"] == "pnccd"
    assert config["epics"] == {"sample_x": "MFX:USR:MMS:17.RBV",
                               "shutter_open": "MFX:SHT:01:OPEN"}
    assert len(config["streams"]) == 3


def test_events_a_detector_missed_are_null(client: Client) -> None:
    table = client.read(EXP, RAW, ["pnccd/raw/calib", "gmd/raw/energy", "hexanode/raw/times"])
    assert table.column("pnccd/raw/calib").null_count == 15  # 5% of the frames dropped
    assert table.column("gmd/raw/energy").null_count == 3  # 1% of the shots
    assert table.column("hexanode/raw/times").null_count == 0


def test_time_is_the_raw_stamp_as_utc(client: Client) -> None:
    table = client.read(EXP, RAW, ["timestamp", "time"], events=slice(0, 5))
    raw = np.array(table.column("timestamp").to_pylist(), dtype=np.int64)
    ns = ((raw >> 32) + 631_152_000) * 1_000_000_000 + (raw & 0xFFFFFFFF)
    assert table.column("time").cast(pa.int64()).to_pylist() == ns.tolist()


def test_slices_partitions_filters_and_processing_work_on_xtc2_columns(client: Client) -> None:
    whole = client.read(EXP, RAW, ["gmd/raw/energy", "pnccd/raw/calib"])
    part = client.read(EXP, RAW, ["gmd/raw/energy", "pnccd/raw/calib"],
                       events=slice(17, 250, 3))
    assert part.equals(whole.take(list(range(17, 250, 3))))

    kept = client.read(EXP, RAW, ["gmd/raw/energy"], filter="gmd/raw/energy > 1.5")
    energy = np.array([v for v in whole.column("gmd/raw/energy").to_pylist() if v is not None])
    assert kept.num_rows == int((energy > 1.5).sum()) > 0

    steps = [{"step": "peaks", "column": "pnccd/raw/calib", "snr": 6, "min_pixels": 2}]
    peaks = client.read(EXP, RAW, ["pnccd/raw/calib"], processing=steps)
    found = peaks.column("pnccd/raw/calib/n_peaks").to_numpy(zero_copy_only=False)
    assert np.nansum(found) > 0  # the generated frames' Bragg spots are found


def test_a_chunked_run_reads_like_the_same_run_unchunked(root: Path, tmp_path: Path) -> None:
    xtc = tmp_path / EXP / "xtc"
    generate_xtc2_run(xtc, EXP, CHUNKED, 130, seed=3, frame_shape=SHAPE,
                      waveform_samples=SAMPLES)
    whole = Catalog(tmp_path).run(EXP, CHUNKED)
    chunked = Catalog(root).run(EXP, CHUNKED)
    assert len(chunked.streams[0].files.chunks) == 3
    cols = [c.name for c in whole.columns.values()]
    with whole.reader() as a, chunked.reader() as b:
        assert a.read(whole.resolve(cols), 0, 130).equals(b.read(chunked.resolve(cols), 0, 130))


# -- the run's forms ---------------------------------------------------------------------------


def test_the_hdf5_run_stays_the_default_and_xtc2_is_its_source(client: Client,
                                                                 srv: LclstreamServer) -> None:
    assert client.schema(EXP, BOTH).metadata[md.LAYOUT] == b"lcls2-smalldata"
    raw = client.schema(EXP, BOTH, source="xtc2")
    assert raw.metadata[md.LAYOUT] == b"lcls2-xtc2" and "pnccd/raw/calib" in raw.names
    flight_client = raw_client(srv.port)
    info = flight_client.get_flight_info(flight.FlightDescriptor.for_path(EXP, str(BOTH),
                                                                          "xtc2"))
    assert info.schema.metadata[md.LAYOUT] == b"lcls2-xtc2"
    first = flight_client.do_get(info.endpoints[0].ticket).read_all()
    assert first.column_names == raw.names
    # a run whose only form is xtc2 takes the field too
    assert client.schema(EXP, RAW, source="xtc2").metadata[md.LAYOUT] == b"lcls2-xtc2"

    runs = client.runs(EXP)
    both = runs.filter(runs["run"] == BOTH)
    assert both["layout"].to_list() == ["lcls2-smalldata", "lcls2-xtc2"]
    assert both["source"].to_list() == [None, "xtc2"]
    assert runs.filter(runs["run"] == RAW)["layout"].to_list() == ["lcls2-xtc2"]
    assert TRUNCATED not in runs["run"].to_list()  # listed only while readable


def test_bad_columns_and_sources_are_refused_clearly(client: Client, root: Path) -> None:
    with pytest.raises(pa.ArrowKeyError, match="Did you mean 'pnccd/raw/calib'"):
        client.read(EXP, RAW, ["pnccd/raw/calibb"])
    with pytest.raises(pa.ArrowKeyError, match="Did you mean 'gmd/raw/energy'"):
        client.read(EXP, RAW, ["gmd/energy"])
    with pytest.raises(pa.ArrowInvalid, match="source"):
        client.read(EXP, RAW, source="xtc3")
    hdf5_only = root / EXP / "hdf5" / "smalldata" / f"{EXP}_Run0012.h5"
    generate_lcls2_run(hdf5_only, 12, n_events=10, seed=12)
    try:
        with pytest.raises(pa.ArrowKeyError, match="has no xtc2 files"):
            client.read(EXP, 12, source="xtc2")
    finally:
        hdf5_only.unlink()


def test_a_truncated_file_fails_its_run_alone(client: Client) -> None:
    with pytest.raises(flight.FlightInternalError, match="truncated"):
        client.read(EXP, TRUNCATED)
    assert client.read(EXP, RAW, ["gmd/raw/energy"]).num_rows == 300  # others still serve


def test_a_missing_chunk_is_named(client: Client) -> None:
    with pytest.raises(flight.FlightInternalError, match="lacks chunk file.*c001"):
        client.read(EXP, GAP)


def test_a_file_that_is_not_xtc2_is_refused(tmp_path: Path) -> None:
    xtc = tmp_path / EXP / "xtc"
    xtc.mkdir(parents=True)
    (xtc / f"{EXP}-r0003-s000-c000.xtc2").write_bytes(b"HDF5 or anything else" * 100)
    with pytest.raises(RunUnreadable, match="not an xtc2|corrupted|truncated"):
        Catalog(tmp_path).run(EXP, 3)


def test_cancelled_streams_free_the_runs_files(srv: LclstreamServer, root: Path) -> None:
    c = raw_client(srv.port)
    info = c.get_flight_info(flight.FlightDescriptor.for_path(EXP, str(RAW)))
    reader = c.do_get(info.endpoints[0].ticket)
    reader.read_chunk()
    reader.cancel()
    run = srv.catalog.run(EXP, RAW, source="xtc2")
    deadline = time.monotonic() + 10
    while run._users and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run._users == 0
    run.retire()  # what the catalog does when the files change: descriptors close
    assert run._fds == []
    c.close()


def test_lclstream_get_takes_the_source(srv: LclstreamServer, tmp_path: Path) -> None:
    out = tmp_path / "raw.parquet"
    run_cli("get", EXP, str(BOTH), "--source", "xtc2", "-c", "gmd/raw/energy", "-o", str(out),
            "-q", "--server", f"grpc://127.0.0.1:{srv.port}")
    assert pl.read_parquet(out).columns == ["gmd/raw/energy"]


# -- without psana -------------------------------------------------------------------------------


def test_without_psana_hdf5_serves_and_xtc2_says_why(root: Path, monkeypatch) -> None:
    imported = getattr(xtc2.psana, "modules", None)
    if imported is not None:
        del xtc2.psana.modules  # imported again below, with psana hidden from the import system
    monkeypatch.setitem(sys.modules, "psana", None)
    try:
        with pytest.raises(Unsupported, match="psana is not installed"):
            Catalog(root).run(EXP, RAW)
        fresh = start_server(root)
        try:
            with connect(f"grpc://127.0.0.1:{fresh.port}") as c:
                assert c.read(EXP, BOTH, ["gmd/energy"]).num_rows == 60
                with pytest.raises(pa.ArrowNotImplementedError, match="pip install"):
                    c.read(EXP, RAW)
                assert c.runs(EXP)["layout"].to_list() == ["lcls2-smalldata"]
        finally:
            fresh.shutdown()
    finally:
        xtc2.psana.modules = imported  # psana is importable again for the tests that follow
        if imported is None:
            del xtc2.psana.modules


def test_unknown_run_lists_the_runs(root: Path) -> None:
    with pytest.raises(NotFound, match="no run 99"):
        Catalog(root).run(EXP, 99, source="xtc2")


def test_smalldata_and_temporary_files_are_not_runs(root: Path, tmp_path: Path) -> None:
    shutil.copytree(root / EXP / "xtc", tmp_path / EXP / "xtc",
                    ignore=shutil.ignore_patterns(f"*r00{TRUNCATED}*", f"*r00{GAP}*"))
    (tmp_path / EXP / "xtc" / f".{EXP}-r0030-s000-c000.xtc2.abc.tmp").write_bytes(b"x")
    runs = Catalog(tmp_path).scan()[EXP]
    assert sorted(runs) == [BOTH, RAW, CHUNKED]
    assert {f.kind for f in runs.values()} == {"xtc2"}


def test_the_hdf5_run_beside_is_the_raw_runs_reduction(client: Client) -> None:
    """The generator draws the same shots for both forms of a run, as a smalldata file is made
    from its raw run: same time stamps, pulse energies (missing alike) and pnccd frames."""
    cols = ["time", "gmd/energy", "pnccd/image"]
    small = client.read(EXP, BOTH, cols)
    raw = client.read(EXP, BOTH, ["time", "gmd/raw/energy", "pnccd/raw/calib"], source="xtc2")
    assert raw.column("time").equals(small.column("time"))
    energy = np.array(small.column("gmd/energy").to_pylist(), dtype=float)
    raw_energy = np.array([np.nan if v is None else v
                           for v in raw.column("gmd/raw/energy").to_pylist()])
    np.testing.assert_array_equal(raw_energy, energy)
    frames = column_values(raw, "pnccd/raw/calib")
    images = column_values(small, "pnccd/image")
    kept = [i for i, f in enumerate(frames) if f is not None]
    assert len(kept) == 57  # the 3 frames the pnccd dropped are null in the raw run
    for i in kept:
        np.testing.assert_array_equal(frames[i], images[i][0])


def test_calibration_database_out_of_reach_serves_without_constants(root: Path) -> None:
    """psana_calibration asks the LCLS calibration database; where it cannot be reached (as
    here), each detector gets no constants, with a warning, and the run serves as without."""
    plain = Catalog(root).run(EXP, BOTH, source="xtc2")
    calibrated = Catalog(root, psana_calibration=True).run(EXP, BOTH, source="xtc2")
    assert list(calibrated.columns) == list(plain.columns)
    cols = ["pnccd/raw/calib", "gmd/raw/energy"]
    with plain.reader() as a, calibrated.reader() as b:
        assert a.read(plain.resolve(cols), 0, 60).equals(b.read(calibrated.resolve(cols), 0, 60))


def test_corrupt_events_fail_their_run_and_never_the_server(root: Path) -> None:
    """psana abort()s its process on some corrupt Xtc structures; the server checks every
    datagram before psana parses it. Dozens of corruptions of one event, each read in full in
    a process of its own: each is an error of that run, or (bytes of values) a read."""
    cases = 36
    proc = subprocess.run(
        [sys.executable, "-m", "tests.sources.xtc2_corruption",
         str(run_files(root / EXP / "xtc", EXP, RAW, 0)), str(cases)],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    outcomes = [json.loads(line)["outcome"] for line in proc.stdout.splitlines()]
    assert len(outcomes) == cases
    assert all(o == "ok" or o.startswith("RunUnreadable") for o in outcomes), outcomes
    assert sum(o != "ok" for o in outcomes) >= cases // 4
    assert any("the file is corrupted" in o for o in outcomes)


def test_sql_reads_xtc2_runs_like_any_other(client: Client) -> None:
    """A run whose only form is raw is part of its experiment's `events` table."""
    got = client.sql(f'SELECT count(*) AS n, count("gmd/raw/energy") AS seen, '
                     f'avg("gmd/raw/energy") AS mean FROM {EXP}.events WHERE run = {RAW}')
    energy = client.read(EXP, RAW, ["gmd/raw/energy"]).column(0)
    values = np.array([v for v in energy.to_pylist() if v is not None])
    assert got.column("n").to_pylist() == [300]
    assert got.column("seen").to_pylist() == [len(values)]
    assert got.column("mean").to_pylist()[0] == pytest.approx(values.mean())
