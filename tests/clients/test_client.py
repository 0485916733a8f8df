"""The Python client and its Polars / Pandas / NumPy helpers against a real server."""

from __future__ import annotations

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

from clients import array_to_numpy, column_to_numpy
from clients.convert import to_polars
from tests.helpers import CXI_EXP, LCLS1_EXP, LCLS2_EXP, open_h5


def h5(data_root, run=7):
    return open_h5(data_root / LCLS2_EXP / "hdf5" / "smalldata" / f"{LCLS2_EXP}_Run{run:04d}.h5")


def test_experiments_and_runs(client) -> None:
    assert client.experiments() == sorted([LCLS2_EXP, LCLS1_EXP, CXI_EXP])
    runs = client.runs(LCLS2_EXP)
    assert isinstance(runs, pl.DataFrame)
    assert runs["run"].to_list() == [7, 8]
    assert runs["events"].to_list() == [120, 90]
    assert runs.schema["start_time"] == pl.Datetime("us", "UTC")
    assert (runs["end_time"] > runs["start_time"]).all()
    assert (runs["bytes"] > 0).all() and runs["layout"].to_list() == ["lcls2-smalldata"] * 2


def test_read_preserves_order_across_parallel_endpoints(client, data_root) -> None:
    info = client.plan(LCLS2_EXP, [7, 8], ["run", "timestamp", "pnccd/image"])
    assert len(info.endpoints) > 4  # fetched concurrently by read()
    table = client.read(LCLS2_EXP, [7, 8], ["run", "timestamp", "pnccd/image"], parallel=4)
    with h5(data_root, 7) as f7, h5(data_root, 8) as f8:
        expected = np.concatenate([f7["timestamp"][()], f8["timestamp"][()]])
    np.testing.assert_array_equal(table.column("timestamp").to_numpy(), expected)
    assert table.schema.metadata == info.schema.metadata


def test_stream_yields_batches_in_order(client) -> None:
    batches = list(client.stream(LCLS2_EXP, 7, ["timestamp"], events=slice(5, 100, 5)))
    assert len(batches) >= 1
    stamps = pa.concat_arrays([b.column(0) for b in batches]).to_numpy()
    assert len(stamps) == len(range(5, 100, 5)) and (np.diff(stamps) > 0).all()


def test_polars_gets_multidimensional_arrays(client, data_root) -> None:
    df = client.polars(LCLS2_EXP, 7, ["gmd/energy", "pnccd/image", "tof/waveforms",
                                      "peaks/var_x", "time"])
    assert df.schema["pnccd/image"] == pl.Array(pl.UInt16, (1, 128, 128))
    assert df.schema["tof/waveforms"] == pl.Array(pl.Float32, (2, 1024))
    assert df.schema["peaks/var_x"] == pl.List(pl.Float32)
    assert df.schema["time"] == pl.Datetime("ns", "UTC")
    with h5(data_root) as f:
        np.testing.assert_array_equal(df["pnccd/image"].to_numpy(), f["pnccd/image"][()])
        energy = f["gmd/energy"][()]
    # missing pulse energies are nulls, so polars statistics skip them
    assert df["gmd/energy"].null_count() == int(np.isnan(energy).sum()) > 0
    assert df["gmd/energy"].mean() == pytest.approx(np.nanmean(energy))
    # selecting shots by pulse energy
    strong = df.filter(pl.col("gmd/energy") > 1.5)
    assert 0 < strong.height < df.height


def test_pandas(client) -> None:
    df = client.pandas(LCLS1_EXP, 3, ["gas_detector/f_11_ENRC", "jungfrau1M/ROI_0_area", "time"])
    assert isinstance(df, pd.DataFrame) and len(df) == 80
    assert df["jungfrau1M/ROI_0_area"].iloc[0].shape == (32, 32)
    assert str(df["time"].dtype).startswith("datetime64[ns")


def test_numpy_tensor_shape_and_zero_copy(client, data_root) -> None:
    frames = client.numpy(CXI_EXP, 12, "entry_1/data_1/data")
    assert frames.shape == (40, 128, 128) and frames.dtype == np.float32
    # per batch, the ndarray is a view on the received Arrow buffer
    batch = next(iter(client.stream(LCLS2_EXP, 7, ["pnccd/image"])))
    view = array_to_numpy(batch.column(0))
    assert view.shape == (batch.num_rows, 1, 128, 128) and view.dtype == np.uint16
    storage = batch.column(0).storage.flatten()
    assert view.ctypes.data == storage.buffers()[1].address + storage.offset * 2
    # a fixed-size list column (CXI peak table) -> (events, max_peaks)
    peaks = client.numpy(CXI_EXP, 12, "entry_1/result_1/peakXPosRaw")
    assert peaks.ndim == 2 and peaks.shape[0] == 40
    # one-chunk columns are returned as-is, several chunks joined once
    table = client.read(LCLS2_EXP, 7, ["pnccd/image"])
    assert table.column(0).num_chunks > 1
    with h5(data_root) as f:
        np.testing.assert_array_equal(column_to_numpy(table.column(0)), f["pnccd/image"][()])


def test_client_errors_are_clean_and_typed(client) -> None:
    with pytest.raises(KeyError) as info:  # pyarrow's ArrowKeyError is a KeyError
        client.read(LCLS2_EXP, 7, ["gmd/energi"])
    assert "Detail" not in str(info.value) and "Did you mean 'gmd/energy'" in str(info.value)
    with pytest.raises(ValueError, match="out of range"):
        client.read(LCLS2_EXP, 7, events=slice(10_000, None))
    with pytest.raises(TypeError, match="events must be"):
        client.read(LCLS2_EXP, 7, events="0:10")


def test_concurrent_readers_get_correct_data(location, data_root) -> None:
    """Streams share a run's file handle, the read pool and cached offsets: many at once must
    each get exactly their own events."""
    from concurrent.futures import ThreadPoolExecutor

    from clients import connect

    with h5(data_root, 7) as f:
        frames, lens = f["pnccd/image"][()], f["peaks/var_x_len"][()]

    def job(i: int) -> bool:
        start, step = i % 7, 1 + i % 3
        with connect(location) as c:
            t = c.read(LCLS2_EXP, 7, ["pnccd/image", "peaks/var_x"],
                       events=slice(start, None, step), parallel=2)
        got = column_to_numpy(t.column("pnccd/image"))
        sizes = t.column("peaks/var_x").combine_chunks().value_lengths().to_numpy()
        return (np.array_equal(got, frames[start::step])
                and np.array_equal(sizes, lens[start::step]))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(job, range(24)))


def test_null_events_keep_their_place_in_numpy_and_polars() -> None:
    """A detector that missed shots: NumPy gets a masked array with those events masked whole,
    Polars nulls; the other events keep their values and positions, in slices too."""
    frames = np.arange(6 * 2 * 3, dtype=np.uint16).reshape(6, 2, 3)
    present = np.array([True, False, True, True, False, True])
    storage = pa.FixedSizeListArray.from_arrays(pa.array(frames.reshape(-1)), 6)
    storage = pa.FixedSizeListArray.from_buffers(
        storage.type, 6, [pa.array(present).buffers()[1]], children=[storage.values],
        null_count=2)
    tensor = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.uint16(), [2, 3]), storage)
    for arr, rows in ((tensor, slice(None)), (tensor.slice(1, 4), slice(1, 5))):
        got = array_to_numpy(arr)
        assert isinstance(got, np.ma.MaskedArray) and got.dtype == np.uint16
        assert got.mask.any(axis=(1, 2)).tolist() == (~present[rows]).tolist()
        np.testing.assert_array_equal(got[~got.mask.any(axis=(1, 2))],
                                      frames[rows][present[rows]])
        table = pa.table({"f": pa.chunked_array([arr, arr])})
        both = column_to_numpy(table.column("f"))
        assert isinstance(both, np.ma.MaskedArray) and len(both) == 2 * len(arr)
        df = to_polars(table)
        assert df["f"].null_count() == 2 * int((~present[rows]).sum())
        kept = df["f"].drop_nulls().to_numpy()
        np.testing.assert_array_equal(kept[: int(present[rows].sum())],
                                      frames[rows][present[rows]])
