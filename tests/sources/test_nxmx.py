"""NXmx series (DECTRIS layout): every served frame equals what h5py + hdf5plugin read, through
the source and through a real server; the bad inputs fail clearly and alone."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.ipc as ipc
import pytest

from clients import Client, connect
from flight_server.catalog import Catalog, nxmx_run_number
from flight_server.errors import NotFound, RunUnreadable
from flight_server.generator.nxmx import generate_nxmx_series
from flight_server.server import LclstreamServer
from flight_server.sources import describe
from flight_server.sources.nxmx import CONFIG_TABLE, FRAMES
from schemas import metadata as md
from tests.helpers import admin_token, raw_client, run_cli, start_server

EXP = "mx2026"
OMEGA = "entry/sample/goniometer/omega"
MASK = "entry/instrument/detector/detectorSpecific/pixel_mask"


def reference_frames(master: Path) -> np.ndarray:
    """Frames as a crystallographer's script reads them: through the master's external links,
    decompressed by HDF5 with hdf5plugin's filters."""
    with h5py.File(master, "r") as f:
        links = sorted(k for k in f["entry/data"] if k.startswith("data_"))
        return np.concatenate([f[f"entry/data/{k}"][()] for k in links])


@pytest.fixture(scope="module")
def mx_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mx")
    eiger = root / EXP / "eiger"
    generate_nxmx_series(eiger, 1, n_frames=23, frames_per_file=10, compression="bslz4")
    generate_nxmx_series(eiger, 2, n_frames=12, frames_per_file=5, compression="lz4",
                         dtype="uint32", frame_shape=(96, 128))
    generate_nxmx_series(eiger, 3, n_frames=7, frames_per_file=100, compression="none")
    return root


@pytest.fixture(scope="module")
def mx_server(mx_root: Path) -> Iterator[LclstreamServer]:
    srv = start_server(mx_root, batch_bytes=256 * 1024, first_batch_bytes=64 * 1024,
                       partition_bytes=1024 * 1024)
    yield srv
    srv.shutdown()


@pytest.fixture
def mx_client(mx_server: LclstreamServer) -> Iterator[Client]:
    with connect(f"grpc://127.0.0.1:{mx_server.port}", admin_token()) as c:
        yield c


def master(root: Path, series: int) -> Path:
    return root / EXP / "eiger" / f"lysozyme_{series}_master.h5"


# -- the source ---------------------------------------------------------------------------------


@pytest.mark.parametrize("series", [1, 2, 3])
def test_frames_equal_hdf5plugin_in_image_order(mx_root: Path, series: int) -> None:
    path = master(mx_root, series)
    run = describe(path, EXP, series, "nxmx", mx_root / EXP)
    ref = reference_frames(path)
    assert run.layout.name == "nxmx" and run.num_events == len(ref)
    col = run.columns[FRAMES]
    assert col.dtype == ref.dtype and col.shape == ref.shape[1:]  # stored type, never widened
    assert run.columns[FRAMES].field.type.value_type == pa.from_numpy_dtype(ref.dtype)
    with run.reader() as reader:
        whole = reader.read([col], 0, run.num_events).column(0).to_numpy_ndarray()
        np.testing.assert_array_equal(whole, ref)
        # Ranges and steps that cross data-file boundaries.
        for start, stop, step in [(3, 22, 4), (9, 11, 1), (0, len(ref), 3), (len(ref) - 1,
                                                                              len(ref), 1)]:
            got = reader.read([col], start, min(stop, len(ref)), step).column(0)
            np.testing.assert_array_equal(got.to_numpy_ndarray(), ref[start:stop:step])


@pytest.mark.parametrize("filters", [{}, dict(hdf5plugin.Bitshuffle(nelems=0, cname="lz4")),
                                     dict(hdf5plugin.LZ4()), {"compression": "gzip"}],
                         ids=["raw", "bitshuffle-lz4", "lz4", "gzip-through-hdf5"])
def test_big_endian_frames_and_several_frames_a_chunk(tmp_path: Path, filters: dict) -> None:
    """Byte order and chunking as HDF5 would apply them: big-endian uint32 values, three frames
    a chunk, a last chunk only partly filled."""
    frames = np.random.default_rng(5).integers(0, 70000, (8, 6, 10)).astype(">u4")
    data = tmp_path / "be_1_data_000001.h5"
    frames[6:] = 7  # the last chunk is never written: it reads as the fill value
    with h5py.File(data, "w") as f:
        ds = f.create_dataset("entry/data/data", shape=frames.shape, dtype=frames.dtype,
                              chunks=(3, 6, 10), fillvalue=7, **filters)
        ds[:6] = frames[:6]
    with h5py.File(tmp_path / "be_1_master.h5", "w") as f:
        f["entry/data/data_000001"] = h5py.ExternalLink(data.name, "/entry/data/data")
    run = describe(tmp_path / "be_1_master.h5", EXP, 1, "nxmx", tmp_path)
    col = run.columns[FRAMES]
    assert col.dtype == np.dtype("=u4") and col.chunk_events == 3
    with run.reader() as reader:
        for start, stop, step in [(0, 8, 1), (1, 8, 3), (4, 6, 1), (7, 8, 1)]:
            got = reader.read([col], start, stop, step).column(0).to_numpy_ndarray()
            np.testing.assert_array_equal(got, frames[start:stop:step])


def test_decoders_follow_the_stored_filters(mx_root: Path) -> None:
    decoders = {s: {seg.decoder for seg in describe(master(mx_root, s), EXP, s, "nxmx",
                                                    mx_root / EXP).segments} for s in (1, 2, 3)}
    assert decoders == {1: {"bitshuffle-lz4"}, 2: {"lz4"}, 3: {"raw"}}


def test_per_frame_angles_and_geometry_with_units(mx_root: Path) -> None:
    path = master(mx_root, 1)
    run = describe(path, EXP, 1, "nxmx", mx_root / EXP)
    with h5py.File(path) as f:
        omega = f[OMEGA][()]
    with run.reader() as reader:
        got = reader.read(run.resolve([OMEGA]), 0, run.num_events).column(0).to_numpy()
    np.testing.assert_array_equal(got, omega)
    assert run.columns[OMEGA].field.metadata[md.UNITS] == b"deg"
    geometry = json.loads(run.schema_metadata()[md.NXMX])
    assert geometry["wavelength"] == {"value": pytest.approx(0.9793), "units": "angstrom",
                                      "path": "entry/instrument/beam/incident_wavelength"}
    for key in ("detector_distance", "beam_center_x", "beam_center_y", "x_pixel_size",
                "y_pixel_size", "count_time", "frame_time", "sensor_material",
                "sensor_thickness", "description"):
        assert key in geometry, key
    assert geometry["detector_distance"]["units"] == "m"
    assert geometry["pixel_mask"]["value"]["shape"] == [256, 256]  # an array: in "config"
    assert run.start_ns is not None and run.end_ns > run.start_ns


def test_run_numbers_from_dectris_names() -> None:
    assert nxmx_run_number("lysozyme_12_master.h5") == 12
    assert nxmx_run_number("insulin_0007_master.h5") == 7
    assert nxmx_run_number("run7_master.h5") == 7
    assert nxmx_run_number("insulin_master.h5") is None  # no number: not served (warned)
    assert nxmx_run_number("lysozyme_12_data_000001.h5") is None


def test_data_files_are_parts_of_their_master_not_runs(mx_root: Path) -> None:
    runs = Catalog(mx_root).scan()[EXP]
    assert sorted(runs) == [1, 2, 3]
    assert {r.kind for r in runs.values()} == {"nxmx"}


# -- through a server ---------------------------------------------------------------------------


def test_served_frames_equal_hdf5plugin(mx_client: Client, mx_root: Path) -> None:
    for series in (1, 2):
        table = mx_client.read(EXP, series, [FRAMES, OMEGA])
        np.testing.assert_array_equal(table.column(FRAMES).combine_chunks().to_numpy_ndarray(),
                                      reference_frames(master(mx_root, series)))
    runs = mx_client.runs(EXP)
    assert runs["layout"].to_list() == ["nxmx"] * 3


def test_pixel_mask_is_the_config_table(mx_client: Client, mx_root: Path) -> None:
    schema = mx_client.schema(EXP, 1)
    assert json.loads(schema.metadata[md.TABLES]) == [CONFIG_TABLE]
    config = mx_client.read(EXP, 1, [MASK], table=CONFIG_TABLE)
    with h5py.File(master(mx_root, 1)) as f:
        mask = f[MASK][()]
    assert config.num_rows == 1
    np.testing.assert_array_equal(config.column(0).combine_chunks().to_numpy_ndarray()[0], mask)



def test_path_descriptor_names_the_table(mx_server: LclstreamServer) -> None:
    with raw_client(mx_server.port) as raw:
        info = raw.get_flight_info(flight.FlightDescriptor.for_path(EXP, "1", CONFIG_TABLE))
        table = raw.do_get(info.endpoints[0].ticket).read_all()
    assert table.num_rows == 1 and MASK in table.column_names
    assert info.schema.metadata[md.TABLE] == CONFIG_TABLE.encode()


def test_cli_gets_a_runs_table(mx_server: LclstreamServer, mx_root: Path,
                               tmp_path: Path) -> None:
    out = tmp_path / "mask.arrow"
    res = run_cli("get", EXP, "1", "--table", CONFIG_TABLE, "-c", MASK, "-o", str(out), "-q",
                  "--server", f"grpc://127.0.0.1:{mx_server.port}")
    assert res.returncode == 0, res.stderr
    with h5py.File(master(mx_root, 1)) as f:
        mask = f[MASK][()]
    table = ipc.open_file(out).read_all()
    np.testing.assert_array_equal(table.column(MASK).combine_chunks().to_numpy_ndarray()[0], mask)


def test_filter_and_peaks_on_eiger_frames(mx_client: Client, mx_root: Path) -> None:
    ref = reference_frames(master(mx_root, 1))
    kept = mx_client.read(EXP, 1, [FRAMES, OMEGA], filter=f'"{OMEGA}" >= 1.0')
    assert kept.num_rows == int(np.count_nonzero(np.arange(len(ref)) * 0.1 >= 1.0 - 1e-9))
    np.testing.assert_array_equal(kept.column(FRAMES).combine_chunks().to_numpy_ndarray(),
                                  ref[-kept.num_rows:])
    peaks = mx_client.read(EXP, 1, [FRAMES], processing=[
        {"step": "peaks", "column": FRAMES, "snr": 6.0}])
    counts = peaks.column(f"{FRAMES}/n_peaks").to_numpy()
    assert len(counts) == len(ref) and counts.sum() > 0  # spots were drawn on most frames


def test_sql_sees_nxmx_frames(mx_client: Client, mx_root: Path) -> None:
    result = mx_client.sql(f'SELECT run, count(*) AS frames, max("{OMEGA}") AS omega '
                           f"FROM {EXP}.events GROUP BY run ORDER BY run")
    assert result.column("frames").to_pylist() == [23, 12, 7]
    pixel = mx_client.sql(f'SELECT "{FRAMES}"[6][8] AS v FROM {EXP}.events '
                          "WHERE run = 3 AND event = 4")
    assert pixel.column("v").to_pylist() == [int(reference_frames(master(mx_root, 3))[4, 5, 7])]


# -- bad input ----------------------------------------------------------------------------------


def copy_series(src_root: Path, dst: Path, series: int) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in (src_root / EXP / "eiger").glob(f"lysozyme_{series}_*"):
        shutil.copy(f, dst / f.name)
    return dst / f"lysozyme_{series}_master.h5"


def test_link_outside_the_experiment_is_refused_never_followed(tmp_path: Path,
                                                               mx_root: Path) -> None:
    outside = copy_series(mx_root, tmp_path / "other_experiment", 3)
    mine = tmp_path / "data" / EXP
    mine.mkdir(parents=True)
    with h5py.File(mine / "thief_9_master.h5", "w") as f:
        f["entry/data/data_000001"] = h5py.ExternalLink(
            os.path.relpath(outside.parent / "lysozyme_3_data_000001.h5", mine),
            "/entry/data/data")
    with pytest.raises(RunUnreadable, match="outside the experiment's directory"):
        Catalog(tmp_path / "data").run(EXP, 9)


def test_missing_and_truncated_data_files_fail_that_run_alone(tmp_path: Path,
                                                              mx_root: Path) -> None:
    top = tmp_path / EXP
    copy_series(mx_root, top, 1)
    copy_series(mx_root, top, 2)
    copy_series(mx_root, top, 3)
    (top / "lysozyme_1_data_000002.h5").unlink()
    second = top / "lysozyme_2_data_000002.h5"
    with open(second, "r+b") as f:
        f.truncate(second.stat().st_size - 4096)  # the last frames' chunks are cut off
    srv = start_server(tmp_path)
    try:
        with connect(f"grpc://127.0.0.1:{srv.port}", admin_token()) as c:
            with pytest.raises(flight.FlightInternalError,
                               match="lysozyme_1_data_000002.h5 .*is missing"):
                c.read(EXP, 1)
            with pytest.raises(flight.FlightInternalError,
                               match="lysozyme_2_data_000002.h5.*truncated or corrupted"):
                c.read(EXP, 2)
            assert c.read(EXP, 3).num_rows == 7  # the others still serve
    finally:
        srv.shutdown()


def test_corrupt_chunk_is_an_error_not_wrong_frames(tmp_path: Path, mx_root: Path) -> None:
    path = copy_series(mx_root, tmp_path / EXP, 1)
    data = tmp_path / EXP / "lysozyme_1_data_000001.h5"
    with h5py.File(data) as f:
        info = f["entry/data/data"].id.get_chunk_info(2)
    with open(data, "r+b") as f:
        f.seek(info.byte_offset + 12)  # past the bitshuffle header: the LZ4 stream itself
        f.write(b"\xff" * 64)
    run = describe(path, EXP, 1, "nxmx", tmp_path / EXP)
    with run.reader() as reader, pytest.raises(RunUnreadable, match="lysozyme_1_data_000001"):
        reader.read([run.columns[FRAMES]], 0, 5)


def test_unregistered_filter_is_named(tmp_path: Path) -> None:
    top = tmp_path / EXP
    top.mkdir()
    data = top / "odd_4_data_000001.h5"
    with h5py.File(data, "w") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((1, 8, 8))
        dcpl.set_filter(32099, h5py.h5z.FLAG_OPTIONAL, (1,))  # no plugin provides it
        space = h5py.h5s.create_simple((2, 8, 8))
        f.create_group("entry/data")
        h5py.h5d.create(f["entry/data"].id, b"data", h5py.h5t.NATIVE_UINT16, space, dcpl=dcpl)
    with h5py.File(top / "odd_4_master.h5", "w") as f:
        f["entry/data/data_000001"] = h5py.ExternalLink(data.name, "/entry/data/data")
    with pytest.raises(RunUnreadable, match="HDF5 filter 32099"):
        describe(top / "odd_4_master.h5", EXP, 4, "nxmx", top)


def test_unknown_column_and_table_list_close_matches(mx_client: Client) -> None:
    with pytest.raises(pa.ArrowKeyError, match="Did you mean 'entry/data/data'"):
        mx_client.read(EXP, 1, ["entry/data/dat"])
    with pytest.raises(pa.ArrowKeyError, match="no table 'conf'"):
        mx_client.read(EXP, 1, table="conf")
    with pytest.raises(NotFound):
        Catalog(Path("/nonexistent")).run(EXP, 1)
