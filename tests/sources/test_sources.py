"""The three file layouts become tables exactly as DESIGN.md's data model says."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pytest

from flight_server.errors import RunUnreadable
from flight_server.sources import describe
from schemas import metadata as md
from tests.helpers import CXI_EXP, LCLS1_EXP, LCLS2_EXP, open_h5

LCLS2_EPOCH_NS = 631_152_000 * 10**9


def lcls2_path(root: Path, run: int = 7) -> Path:
    return root / LCLS2_EXP / "hdf5" / "smalldata" / f"{LCLS2_EXP}_Run{run:04d}.h5"


def read_all(run, names=None, start=0, stop=None, step=1) -> pa.RecordBatch:
    cols = run.resolve(names)
    with run.reader() as reader:
        return reader.read(cols, start, run.num_events if stop is None else stop, step)


def test_lcls2_types_follow_the_data(data_root: Path) -> None:
    run = describe(lcls2_path(data_root), LCLS2_EXP, 7)
    s = run.schema()
    assert run.layout.name == "lcls2-smalldata" and run.num_events == 120
    assert s.field("gmd/energy").type == pa.float64()
    assert s.field("evr/code_40").type == pa.int64()
    assert s.field("timestamp").type == pa.int64()
    assert s.field("time").type == pa.timestamp("ns", tz="UTC")
    assert s.field("run").type == pa.int32()
    assert s.field("tof/waveforms").type == pa.fixed_shape_tensor(pa.float32(), [2, 1024])
    # uint16 detector frames stay uint16
    assert s.field("pnccd/image").type == pa.fixed_shape_tensor(pa.uint16(), [1, 128, 128])
    assert s.field("peaks/var_x").type == pa.list_(pa.float32())
    # the _len datasets are folded into list offsets, not columns; config is metadata
    assert not any(n.endswith("_len") for n in s.names)
    assert not any(n.startswith("UserDataCfg") for n in s.names)
    assert "UserDataCfg/tof/window_ns" in run.config


def test_lcls2_values_equal_h5py(data_root: Path) -> None:
    path = lcls2_path(data_root)
    run = describe(path, LCLS2_EXP, 7)
    batch = read_all(run)
    with open_h5(path) as f:
        img = batch.column("pnccd/image").to_numpy_ndarray()
        np.testing.assert_array_equal(img, f["pnccd/image"][()])
        assert img.dtype == np.uint16
        wf = batch.column("tof/waveforms").to_numpy_ndarray()
        np.testing.assert_array_equal(wf, f["tof/waveforms"][()])
        raw = f["timestamp"][()]
        expected = LCLS2_EPOCH_NS + (raw >> 32) * 10**9 + (raw & 0xFFFFFFFF)
        got = batch.column("time").cast(pa.int64()).to_numpy()
        np.testing.assert_array_equal(got, expected)
        # ragged: list i holds var_x[offset_i : offset_i + len_i]
        lens, flat = f["peaks/var_x_len"][()], f["peaks/var_x"][()]
        offsets = np.concatenate([[0], np.cumsum(lens)])
        lists = batch.column("peaks/var_x").to_pylist()
        assert lens.sum() > 0, "the test run should contain Bragg peaks"
        for i in range(run.num_events):
            np.testing.assert_array_equal(lists[i], flat[offsets[i] : offsets[i + 1]])


def test_lcls2_missing_values_are_nulls(data_root: Path) -> None:
    path = lcls2_path(data_root)
    run = describe(path, LCLS2_EXP, 7)
    batch = read_all(run, ["gmd/energy", "evr/code_40"])
    with open_h5(path) as f:
        energy, code = f["gmd/energy"][()], f["evr/code_40"][()]
    assert np.isnan(energy).any() and (code == -99999).any(), "generator should write sentinels"
    got_energy = batch.column("gmd/energy")
    assert got_energy.null_count == int(np.isnan(energy).sum())
    np.testing.assert_array_equal(got_energy.is_null().to_numpy(zero_copy_only=False),
                                  np.isnan(energy))
    got_code = batch.column("evr/code_40")
    assert got_code.null_count == int((code == -99999).sum())
    present = code != -99999
    np.testing.assert_array_equal(got_code.drop_null().to_numpy(), code[present])
    assert run.columns["evr/code_40"].field.metadata[md.FILL_VALUE] == b"-99999"


def test_strided_slices_match_h5py(data_root: Path) -> None:
    path = lcls2_path(data_root)
    run = describe(path, LCLS2_EXP, 7)
    batch = read_all(run, ["pnccd/image", "peaks/var_y", "time"], start=3, stop=97, step=7)
    with open_h5(path) as f:
        np.testing.assert_array_equal(batch.column("pnccd/image").to_numpy_ndarray(),
                                      f["pnccd/image"][3:97:7])
        lens, flat = f["peaks/var_y_len"][()], f["peaks/var_y"][()]
    offsets = np.concatenate([[0], np.cumsum(lens)])
    expected = [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(3, 97, 7)]
    assert batch.column("peaks/var_y").to_pylist() == expected  # float32 -> same Python floats


def test_field_and_schema_metadata(data_root: Path) -> None:
    run = describe(lcls2_path(data_root), LCLS2_EXP, 7)
    field = run.columns["gmd/energy"].field
    assert field.metadata[md.HDF5_PATH] == b"/gmd/energy"
    assert field.metadata[md.UNITS] == b"mJ"
    assert field.metadata[md.DETECTOR] == b"gmd"
    meta = run.schema().metadata
    assert meta[md.EXPERIMENT] == LCLS2_EXP.encode()
    assert meta[md.RUN] == b"7" and meta[md.EVENTS] == b"120"
    assert meta[md.LAYOUT] == b"lcls2-smalldata"
    assert meta[md.START_TIME].startswith(b"20") and meta[md.END_TIME] > meta[md.START_TIME]


def test_lcls1_layout(data_root: Path) -> None:
    path = data_root / LCLS1_EXP / "r0003.h5"
    run = describe(path, LCLS1_EXP, 3)
    assert run.layout.name == "lcls1-smalldata"
    s = run.schema()
    for name in ["event_time", "fiducials", "ebeam/photon_energy", "gas_detector/f_11_ENRC",
                 "evr/code_140", "time"]:
        assert name in s.names
    assert not any(n.startswith("UserDataCfg") for n in s.names)
    assert "UserDataCfg/jungfrau1M/ROI_0" in run.config
    batch = read_all(run, ["event_time", "time", "jungfrau1M/ROI_0_area"])
    raw = batch.column("event_time").to_numpy()
    unix_ns = (raw >> 32) * 10**9 + (raw & 0xFFFFFFFF)
    np.testing.assert_array_equal(batch.column("time").cast(pa.int64()).to_numpy(), unix_ns)
    with open_h5(path) as f:
        np.testing.assert_array_equal(batch.column("jungfrau1M/ROI_0_area").to_numpy_ndarray(),
                                      f["jungfrau1M/ROI_0_area"][()])
        assert f["ebeam/photon_energy"].dtype == np.float64


def test_cxi_layout_soft_link_and_peak_tables(data_root: Path) -> None:
    path = data_root / CXI_EXP / "cxi" / "run_12.cxi"
    run = describe(path, CXI_EXP, 12)
    assert run.layout.name == "cxi" and run.num_events == 40
    s = run.schema()
    # the soft link's name is the column; the link target is an alias, not a second copy
    assert "entry_1/data_1/data" in s.names
    assert "entry_1/instrument_1/detector_1/data" not in s.names
    assert s.field("entry_1/data_1/data").metadata[md.HDF5_PATH] == (
        b"/entry_1/instrument_1/detector_1/data")
    [alias] = run.resolve(["/entry_1/instrument_1/detector_1/data"])
    assert alias.name == "entry_1/data_1/data"
    assert s.field("entry_1/result_1/peakXPosRaw").type.list_size > 0
    batch = read_all(run, ["entry_1/data_1/data", "entry_1/result_1/nPeaks", "time"])
    with open_h5(path) as f:
        np.testing.assert_array_equal(batch.column(0).to_numpy_ndarray(),
                                      f["entry_1/instrument_1/detector_1/data"][()])
        np.testing.assert_array_equal(batch.column(1).to_numpy(), f["entry_1/result_1/nPeaks"])
    assert "entry_1/instrument_1/detector_1/distance" in run.config


def test_layout_is_detected_by_content_not_name(data_root: Path, tmp_path: Path) -> None:
    disguised = tmp_path / "run_5.h5"  # a CXI file with an .h5 name
    shutil.copy(data_root / CXI_EXP / "cxi" / "run_12.cxi", disguised)
    assert describe(disguised, "x", 5).layout.name == "cxi"


def test_unknown_layout_and_corrupt_files_are_clear_errors(tmp_path: Path,
                                                           data_root: Path) -> None:
    plain = tmp_path / "run_1.h5"
    with h5py.File(plain, "w") as f:
        f["something"] = np.arange(3)
    with pytest.raises(RunUnreadable, match="no known layout"):
        describe(plain, "x", 1)
    truncated = tmp_path / "run_2.h5"
    truncated.write_bytes(lcls2_path(data_root).read_bytes()[:2000])
    with pytest.raises(RunUnreadable, match="truncated, corrupted or not HDF5"):
        describe(truncated, "x", 2)


def test_inconsistent_ragged_lengths_are_reported(tmp_path: Path, data_root: Path) -> None:
    bad = tmp_path / "run_3.h5"
    shutil.copy(lcls2_path(data_root), bad)
    with h5py.File(bad, "r+") as f:
        lens = f["peaks/var_x_len"][()]
        lens[0] += 1000
        f["peaks/var_x_len"][...] = lens
    run = describe(bad, "x", 3)
    with pytest.raises(RunUnreadable, match="inconsistent"):
        read_all(run, ["peaks/var_x"])


def test_raw_chunk_path_matches_h5py(tmp_path: Path) -> None:
    path = tmp_path / "run_9.h5"
    n, frame = 11, (256, 256)  # 4-event chunks of 512 KiB; the last chunk is partial
    rng = np.random.default_rng(0)
    data = rng.integers(0, 2**16, size=(n, *frame), dtype=np.uint16)
    with h5py.File(path, "w") as f:
        f["timestamp"] = np.arange(n, dtype=np.int64) << 32
        f.create_dataset("epix/image", data=data, chunks=(4, *frame))
        f.create_dataset("epix/zipped", data=data, chunks=(4, *frame), compression="gzip")
        f.create_dataset("epix/bigendian", data=data.astype(">u2"), chunks=(4, *frame))
        f.create_dataset("epix/tiles", data=data, chunks=(4, 128, 128))
    run = describe(path, "x", 9)
    assert run.columns["epix/image"].whole_chunks
    for name in ["epix/zipped", "epix/bigendian", "epix/tiles"]:
        assert not run.columns[name].whole_chunks, name  # these need HDF5's own path
    for start, stop in [(0, 11), (1, 10), (4, 8), (3, 5), (8, 11), (5, 6)]:
        batch = read_all(run, ["epix/image", "epix/zipped", "epix/bigendian", "epix/tiles"],
                         start=start, stop=stop)
        for col in batch.columns:
            np.testing.assert_array_equal(col.to_numpy_ndarray(), data[start:stop])


@pytest.mark.parametrize("chunk_events", [1, 3])
def test_bitshuffle_and_lz4_datasets_are_decoded_and_checked(tmp_path: Path,
                                                             chunk_events: int) -> None:
    """Smalldata compressed with bitshuffle-LZ4 or LZ4 is decoded by the server's checked
    decoders: the same values as HDF5 with hdf5plugin, and a damaged chunk is an error naming
    the run (HDF5's own filters would read past the chunk)."""
    import hdf5plugin

    rng = np.random.default_rng(3)
    n = 10
    frames = rng.poisson(2.0, (n, 16, 24)).astype(np.uint16)
    energy = rng.random(n).astype(np.float32)
    path = tmp_path / "r0005.h5"
    with h5py.File(path, "w") as f:
        f["timestamp"] = np.arange(n, dtype=np.int64) << 32
        f.create_dataset("pnccd/image", data=frames, chunks=(chunk_events, 16, 24),
                         **hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
        f.create_dataset("gmd/energy", data=energy, chunks=(chunk_events,), **hdf5plugin.LZ4())
    run = describe(path, "x", 5)
    image, gmd = run.resolve(["pnccd/image", "gmd/energy"])
    assert (image.codec, gmd.codec) == ("bitshuffle-lz4", "lz4")
    with run.reader() as reader:
        for start, stop, step in [(0, n, 1), (1, 9, 2), (7, 8, 1)]:
            batch = reader.read([image, gmd], start, stop, step)
            np.testing.assert_array_equal(batch.column(0).to_numpy_ndarray(),
                                          frames[start:stop:step])
            np.testing.assert_array_equal(batch.column(1).to_numpy(), energy[start:stop:step])
    run.retire()
    with h5py.File(path) as f:
        info = f["pnccd/image"].id.get_chunk_info(1)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + 12)  # the first block's stored size, past the header
        f.write(b"\x7f\xff\xff\xff")
    damaged = describe(path, "x", 5)
    with damaged.reader() as reader, pytest.raises(RunUnreadable, match="run 5"):
        reader.read(damaged.resolve(["pnccd/image"]), 0, n)
    damaged.retire()
