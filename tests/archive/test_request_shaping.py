"""Requests with a `filter` and `processing` steps, end to end against a real server: the plan's
schema is the schema after processing, and the data is what numpy computes from the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from clients import Client
from tests.helpers import CXI_EXP, LCLS2_EXP, open_h5

RUN = 7


@pytest.fixture(scope="module")
def run7(data_root: Path) -> dict[str, np.ndarray]:
    path = data_root / LCLS2_EXP / "hdf5" / "smalldata" / f"{LCLS2_EXP}_Run{RUN:04d}.h5"
    with open_h5(path) as f:
        return {name: f[name][()] for name in ("gmd/energy", "evr/code_40", "pnccd/image")}


def test_filter_keeps_the_events_where_it_holds(client: Client, run7: dict) -> None:
    energy = run7["gmd/energy"]
    cut = float(np.nanmedian(energy))
    condition = f"gmd/energy > {cut} and evr/code_40 in (0, 1)"
    info = client.plan(LCLS2_EXP, RUN, ["gmd/energy", "pnccd/image"], filter=condition)
    assert info.total_records == -1  # unknown until the filter has run
    table = client.read(LCLS2_EXP, RUN, ["pnccd/image", "gmd/energy"], filter=condition)
    assert table.column_names == ["pnccd/image", "gmd/energy"]  # the request's order
    keep = (energy > cut) & np.isin(run7["evr/code_40"], [0, 1])
    np.testing.assert_array_equal(table.column("gmd/energy").to_numpy(), energy[keep])
    frames = table.column("pnccd/image").combine_chunks().to_numpy_ndarray()
    np.testing.assert_array_equal(frames, run7["pnccd/image"][keep])


def test_processing_schema_and_values(client: Client, run7: dict) -> None:
    steps = [{"step": "roi", "column": "pnccd/image", "y": [16, 80], "x": [0, 64]},
             {"step": "bin", "column": "pnccd/image", "factor": 2, "reduce": "sum"},
             {"step": "cast", "column": "pnccd/image", "to": "float32"}]
    whole = client.plan(LCLS2_EXP, RUN, ["pnccd/image"])
    info = client.plan(LCLS2_EXP, RUN, ["pnccd/image"], processing=steps)
    image = info.schema.field("pnccd/image")
    assert image.type.value_type == pa.float32() and image.type.shape[-2:] == [32, 32]
    assert b"roi" in image.metadata[b"lclstream.processing"]
    assert info.total_bytes == whole.total_bytes // 8  # 32x32 float32 against 128x128 uint16
    table = client.read(LCLS2_EXP, RUN, ["pnccd/image"], processing=steps)
    assert table.schema.field("pnccd/image").type == image.type
    crop = run7["pnccd/image"][..., 16:80, 0:64].astype(np.uint64)
    binned = crop.reshape(*crop.shape[:-2], 32, 2, 32, 2).sum(axis=(-3, -1))
    got = table.column("pnccd/image").combine_chunks().to_numpy_ndarray()
    np.testing.assert_array_equal(got, binned.astype(np.float32))


def test_filter_and_normalize_read_columns_they_do_not_send(client: Client, run7: dict) -> None:
    energy = run7["gmd/energy"]
    steps = [{"step": "normalize", "column": "pnccd/image", "by": "gmd/energy"}]
    table = client.read(LCLS2_EXP, RUN, ["pnccd/image"], filter="gmd/energy > 1",
                        processing=steps)
    assert table.column_names == ["pnccd/image"]
    keep = energy > 1
    expected = run7["pnccd/image"][keep] / energy[keep].reshape(-1, 1, 1, 1)
    got = table.column("pnccd/image").combine_chunks().to_numpy_ndarray()
    np.testing.assert_allclose(got, expected.astype(np.float32), rtol=1e-6)


def plan_error(flight_client: flight.FlightClient, **fields) -> Exception:
    doc = {"v": 1, "experiment": LCLS2_EXP, "runs": [RUN], "columns": ["pnccd/image"], **fields}
    descriptor = flight.FlightDescriptor.for_command(json.dumps(doc).encode())
    with pytest.raises(pa.ArrowInvalid) as info:
        flight_client.get_flight_info(descriptor)
    return info.value


@pytest.mark.parametrize("fields, phrases", [
    ({"processing": [{"step": "rotate", "column": "pnccd/image"}]}, ["rotate", "roi"]),
    ({"processing": [{"step": "roi", "column": "pnccd/image", "y": [0, 500]}]}, ["roi", "'y'"]),
    ({"processing": [{"step": "bin", "column": "pnccd/image", "factor": 3, "reduce": "sum"}]},
     ["bin", "factor"]),
    ({"processing": [{"step": "bin", "column": "pnccd/image", "factor": 0, "reduce": "sum"}]},
     ["bin", "factor"]),
    ({"processing": [{"step": "roi", "column": "pnccd/image", "y": "top"}]}, ["roi", "'y'"]),
    ({"processing": [{"step": "cast", "column": "gmd/energy", "to": "float16"}]},
     ["cast", "gmd/energy"]),
    ({"processing": [{"step": "normalize", "column": "pnccd/image", "by": "tof/waveforms"}]},
     ["normalize", "by"]),
    ({"processing": [{"step": "cast", "column": "tof/waveforms", "to": "float16"}]},
     ["tof/waveforms", "columns"]),
    ({"processing": [{"column": "pnccd/image"}]}, ["step"]),
    ({"processing": {"step": "roi"}}, ["processing"]),
    ({"filter": "gmd/energy >> 1"}, ["'>'", "12"]),
    ({"filter": "gmd/energi > 1"}, ["gmd/energi", "Did you mean"]),
    ({"filter": "pnccd/image > 1"}, ["scalar"]),
    ({"filter": "__import__('os').system('x')"}, ["unexpected"]),
    ({"filter": "1; DROP TABLE events"}, ["unexpected"]),
    ({"filter": "x" * 5000}, ["filter"]),
    ({"filter": ""}, ["filter"]),
])
def test_bad_filters_and_steps_are_refused(flight_client: flight.FlightClient, client: Client,
                                           fields: dict, phrases: list[str]) -> None:
    message = str(plan_error(flight_client, **fields))
    for phrase in phrases:
        assert phrase in message, message
    assert client.read(LCLS2_EXP, RUN, ["gmd/energy"]).num_rows == 120  # still serving


def test_peaks_then_hits_sends_only_the_hits(client: Client, data_root: Path) -> None:
    frame = "entry_1/data_1/data"
    steps = [{"step": "peaks", "column": frame, "snr": 5.0, "min_pixels": 2},
             {"step": "hits", "column": f"{frame}/n_peaks", "min": 10}]
    info = client.plan(CXI_EXP, 12, ["time", frame], processing=steps)
    table = client.read(CXI_EXP, 12, ["time", frame], processing=steps)
    assert table.schema.names == info.schema.names == [  # the frame consumed, in its place
        "time", f"{frame}/peaks/x", f"{frame}/peaks/y", f"{frame}/peaks/intensity",
        f"{frame}/n_peaks"]
    assert f"{frame}/peaks/x" in table.schema.names and frame not in table.schema.names
    counts = table.column(f"{frame}/n_peaks").to_numpy()
    assert 0 < len(counts) < 40 and (counts >= 10).all()
    lengths = pa.compute.list_value_length(table.column(f"{frame}/peaks/x")).to_numpy()
    np.testing.assert_array_equal(lengths, counts)
    with open_h5(data_root / CXI_EXP / "cxi" / "run_12.cxi") as f:
        reference = f["entry_1/result_1/nPeaks"][()]
    assert abs(int(counts.sum()) - int(reference[reference >= 10].sum())) \
        < 0.2 * reference[reference >= 10].sum()  # found about as many as the file lists


def test_tof_integrate_windows(client: Client, data_root: Path) -> None:
    steps = [{"step": "tof_integrate", "column": "tof/waveforms", "baseline": [0, 100],
              "windows": {"early": [200, 400], "late": [600, 900]}}]
    table = client.read(LCLS2_EXP, RUN, ["tof/waveforms"], processing=steps)
    assert table.column_names == ["tof/waveforms/early", "tof/waveforms/late"]
    path = data_root / LCLS2_EXP / "hdf5" / "smalldata" / f"{LCLS2_EXP}_Run{RUN:04d}.h5"
    with open_h5(path) as f:
        traces = f["tof/waveforms"][()].astype(np.float64)
    corrected = traces - traces[..., 0:100].mean(axis=-1, keepdims=True)
    early = table.column("tof/waveforms/early").combine_chunks().flatten().to_numpy()
    np.testing.assert_allclose(early.reshape(len(traces), -1),
                               corrected[..., 200:400].sum(axis=-1), rtol=1e-4, atol=1e-3)


def test_threshold_then_pad(client: Client, run7: dict) -> None:
    steps = [{"step": "threshold", "column": "pnccd/image", "below": 200, "value": 0},
             {"step": "pad", "column": "pnccd/image", "height": 144, "width": 120}]
    table = client.read(LCLS2_EXP, RUN, ["pnccd/image"], events=(0, 10), processing=steps)
    frames = run7["pnccd/image"][:10].copy()
    frames[frames < 200] = 0
    expected = np.zeros((10, 1, 144, 120), frames.dtype)
    expected[:, :, 8:136, :] = frames[:, :, :, 4:124]  # padded rows, centre-cropped columns
    got = table.column("pnccd/image").combine_chunks().to_numpy_ndarray()
    np.testing.assert_array_equal(got, expected)
