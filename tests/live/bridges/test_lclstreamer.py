"""lclstreamer-hdf5 decoding, on messages written the seed's way (h5py on an io.BytesIO, one
dataset per field, events first, one event per chunk, its compression choices): every value
decoded equals what was written, dtypes kept; bad input is a BadMessage that says why."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pytest

from flight_server.live.bridges.formats import BadMessage
from flight_server.live.bridges.lclstreamer import ATTRS_KEY, CONFIG_KEY, LclstreamerHdf5
from flight_server.live.run_writer import check_schema
from tests.live.bridges.messages import COMPRESSIONS, lclstreamer_fields, lclstreamer_message


def column_values(batch: pa.RecordBatch, name: str) -> np.ndarray:
    col = batch.column(name)
    if isinstance(col.type, pa.FixedShapeTensorType):
        return col.to_numpy_ndarray()
    if isinstance(col.type, pa.FixedSizeListType):
        return col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    return np.asarray(col.to_numpy(zero_copy_only=False))


def assert_holds(batch: pa.RecordBatch, fields: dict[str, np.ndarray]) -> None:
    assert batch.schema.names == sorted(fields)  # h5py lists a group's members by name
    for name, values in fields.items():
        got = column_values(batch, name)
        assert got.dtype == values.dtype, name
        assert got.shape == values.shape, name
        np.testing.assert_array_equal(got, values, err_msg=name)
        assert batch.schema.field(name).metadata[b"hdf5.path"] == f"/{name}".encode()


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_every_value_as_written(compression: str | None) -> None:
    fields = lclstreamer_fields(7, seed=3)
    decoded = LclstreamerHdf5().decode([lclstreamer_message(fields, compression)])
    batch = decoded.batch
    assert batch.num_rows == 7
    assert_holds(batch, fields)
    schema = batch.schema
    frame = schema.field("data/data").type
    assert isinstance(frame, pa.FixedShapeTensorType)
    assert (frame.value_type, frame.shape) == (pa.uint16(), [32, 48])  # never widened
    assert schema.field("peaks").type == pa.list_(pa.float32(), 16)
    assert schema.field("data/timestamp").type == pa.float64()
    assert schema.field("fiducial").type == pa.int32()
    assert schema.field("data/data").metadata[b"detector"] == b"data"
    assert decoded.metadata is None  # the seed writes neither scalars nor attributes
    assert not decoded.end
    check_schema(batch.schema)  # what a live stream stores and finishes as a run


def test_the_seeds_own_layouts() -> None:
    """The field paths of the seed's examples (lclstreamer-internal.yaml, -psana2-tmo.yaml):
    /data/random (20, 2) float32, /data/int and /data/float per event (its IntValue and
    FloatValue sources: numpy int_ and float64), //waveform (h5py: /waveform)."""
    fields = {
        "data/random": np.random.default_rng(0).random((10, 20, 2)).astype(np.float32),
        "data/int": np.full(10, 3, dtype=np.int_),
        "data/float": np.full(10, 4.5),
    }
    raw = lclstreamer_message(fields)
    assert_holds(LclstreamerHdf5().decode([raw]).batch, fields)
    with io.BytesIO() as block:
        with h5py.File(block, "w") as fh:
            fh.create_dataset(name="//waveform", data=np.ones((3, 5), np.float64),
                              chunks=(1, 5))
        batch = LclstreamerHdf5().decode([block.getvalue()]).batch
    assert batch.schema.names == ["waveform"]


def test_memoryview_parts_and_zero_events() -> None:
    fields = lclstreamer_fields(4)
    raw = lclstreamer_message(fields)
    assert_holds(LclstreamerHdf5().decode([memoryview(raw)]).batch, fields)
    empty = {k: v[:0] for k, v in fields.items()}
    batch = LclstreamerHdf5().decode([lclstreamer_message(empty)]).batch
    assert batch.num_rows == 0
    assert_holds(batch, empty)


def test_strings_units_scalars_and_attributes() -> None:
    fields = {"run/label": np.array(["a", "bé", "c"], dtype=object),
              "energy": np.array([1.0, 2.0, 3.0], dtype=">f8"),  # big-endian: served native
              "hit": np.array([True, False, True])}
    fmt = LclstreamerHdf5()
    raw = lclstreamer_message(fields, scalars={"config/gain": 4, "config/mode": "high"},
                              attrs={"/": {"source": "exp=tmox1016823,run=44"},
                                     "/energy": {"units": "mJ", "scale": np.arange(3)}})
    decoded = fmt.decode([raw])
    batch = decoded.batch
    assert batch.schema.names == ["energy", "hit", "run/label"]
    assert batch.schema.field("hit").type == pa.bool_()
    assert batch.column("hit").to_pylist() == [True, False, True]
    assert batch.column("run/label").to_pylist() == ["a", "bé", "c"]
    assert batch.schema.field("energy").type == pa.float64()
    assert batch.column("energy").to_pylist() == [1.0, 2.0, 3.0]
    assert batch.schema.field("energy").metadata[b"units"] == b"mJ"
    assert json.loads(decoded.metadata[CONFIG_KEY]) == {"config/gain": 4, "config/mode": "high"}
    assert json.loads(decoded.metadata[ATTRS_KEY]) == {
        "/": {"source": "exp=tmox1016823,run=44"},
        "/energy": {"units": "mJ", "scale": [0, 1, 2]}}
    # The same metadata again is not sent again; a change is.
    assert fmt.decode([raw]).metadata is None
    changed = lclstreamer_message(fields, scalars={"config/gain": 5, "config/mode": "high"})
    assert json.loads(fmt.decode([changed]).metadata[CONFIG_KEY])["config/gain"] == 5


def test_only_scalars_is_metadata_without_rows() -> None:
    with io.BytesIO() as block:
        with h5py.File(block, "w") as fh:
            fh["geometry/distance"] = 0.25
        decoded = LclstreamerHdf5().decode([block.getvalue()])
    assert decoded.batch is None
    assert json.loads(decoded.metadata[CONFIG_KEY]) == {"geometry/distance": 0.25}


def test_unservable_datasets_are_skipped_and_logged_once(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    with io.BytesIO() as block:
        with h5py.File(block, "w") as fh:
            fh["ok"] = np.arange(3, dtype=np.uint8)
            fh["pairs"] = np.zeros(3, dtype=[("a", "<i4"), ("b", "<f4")])
            fh["cplx"] = np.ones(3, dtype=np.complex64)
            fh["labels"] = np.array([[b"a", b"b"]] * 3)
            fh["empty_entries"] = np.zeros((3, 0), np.float32)
            fh["alias"] = h5py.SoftLink("/ok")
            fh["elsewhere"] = h5py.ExternalLink("/etc/hostname", "/x")
        raw = block.getvalue()
    fmt = LclstreamerHdf5()
    with caplog.at_level(logging.WARNING, logger="flight_server.live.bridges.lclstreamer"):
        batch = fmt.decode([raw]).batch
        fmt.decode([raw])
    assert batch.schema.names == ["ok"]
    assert set(fmt.skipped) == {"pairs", "cplx", "labels", "empty_entries", "alias"}
    assert len(caplog.records) == len(fmt.skipped)


# -- bad input ---------------------------------------------------------------------------------


def reason(text: str) -> str:
    return re.escape(text)


def test_not_hdf5() -> None:
    for data in (b"not an hdf5 file", b"", b"\x89HDF"):
        with pytest.raises(BadMessage, match="not an HDF5 file"):
            LclstreamerHdf5().decode([data])
    with pytest.raises(BadMessage, match="2 parts"):
        LclstreamerHdf5().decode([b"a", b"b"])
    with pytest.raises(BadMessage, match="0 parts"):
        LclstreamerHdf5().decode([])


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.99])
def test_truncated_hdf5(keep: float) -> None:
    raw = lclstreamer_message(lclstreamer_fields(5))
    with pytest.raises(BadMessage, match="truncated or corrupted"):
        LclstreamerHdf5().decode([raw[: int(len(raw) * keep)]])


def test_corrupted_chunk() -> None:
    raw = bytearray(lclstreamer_message({"x": np.arange(400, dtype=np.int64).reshape(4, 100)},
                                        "gzip"))
    fmt = LclstreamerHdf5()
    fmt.decode([bytes(raw)])
    raw[-300:-200] = b"\xff" * 100  # inside the compressed chunks
    with pytest.raises(BadMessage, match="truncated or corrupted"):
        fmt.decode([bytes(raw)])


def test_inconsistent_event_counts_name_the_datasets() -> None:
    fields = {"a": np.zeros(5), "b/c": np.zeros((5, 2)), "d": np.zeros(4, np.int8)}
    with pytest.raises(BadMessage, match=reason("4 in /d; 5 in /a, /b/c")):
        LclstreamerHdf5().decode([lclstreamer_message(fields)])


def test_no_datasets() -> None:
    with io.BytesIO() as block:
        with h5py.File(block, "w") as fh:
            fh.create_group("empty")
        with pytest.raises(BadMessage, match="no datasets"):
            LclstreamerHdf5().decode([block.getvalue()])


def test_data_in_other_files_is_refused(tmp_path: Path) -> None:
    """A message cannot make the bridge read files of its host: external raw storage and
    virtual datasets name files; such a message is refused, not followed."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"s3cret!!" * 4)
    with io.BytesIO() as block:
        with h5py.File(block, "w") as fh:
            fh.create_dataset("x", shape=(4,), dtype="<u8", external=[(str(secret), 0, 32)])
        with pytest.raises(BadMessage, match="external storage"):
            LclstreamerHdf5().decode([block.getvalue()])
    source = tmp_path / "source.h5"
    with h5py.File(source, "w") as fh:
        fh["x"] = np.arange(4)
    with io.BytesIO() as block:
        with h5py.File(block, "w") as fh:
            layout = h5py.VirtualLayout(shape=(4,), dtype=np.int64)
            layout[:] = h5py.VirtualSource(str(source), "x", shape=(4,))
            fh.create_virtual_dataset("v", layout)
        with pytest.raises(BadMessage, match="virtual dataset"):
            LclstreamerHdf5().decode([block.getvalue()])


def test_a_good_message_after_bad_ones() -> None:
    fmt = LclstreamerHdf5()
    fields = lclstreamer_fields(3)
    raw = lclstreamer_message(fields)
    for bad in (raw[:100], b"junk"):
        with pytest.raises(BadMessage):
            fmt.decode([bad])
    assert_holds(fmt.decode([raw]).batch, fields)


def test_damaged_bitshuffle_sizes_are_refused_not_trusted() -> None:
    """bitshuffle's HDF5 filter trusts the sizes a chunk stores (its total, each block's): a
    message damaged there made it write past its buffer (a segfault, found by fuzzing). The
    chunks are decoded by the checked decoder instead, and such a message is refused."""
    raw = lclstreamer_message({"frame": np.arange(4 * 1024, dtype=np.uint16).reshape(4, 1024)},
                              "bitshuffle_with_lz4")
    with h5py.File(io.BytesIO(raw), "r") as f:
        found: list = []
        f["frame"].id.chunk_iter(found.append)
    start = found[1].byte_offset  # chunk header: total bytes (u64), block bytes (u32)
    for at, value, why in [(start, (0x260800).to_bytes(8, "big"), "says 2492416 bytes"),
                           (start + 12, (0x7FFFFF00).to_bytes(4, "big"), "claims 2147483392")]:
        damaged = bytearray(raw)
        damaged[at : at + len(value)] = value
        with pytest.raises(BadMessage, match=reason("dataset /frame, chunk at (1, 0)") + ".*"
                           + reason(why)):
            LclstreamerHdf5().decode([bytes(damaged)])


@pytest.mark.parametrize("compression", ["bitshuffle_with_lz4", "gzip", None])
def test_damaged_messages_are_bad_messages(compression: str | None) -> None:
    """Random damage: each message decodes or is a BadMessage, never another error (nor a
    crash of the process)."""
    raw = lclstreamer_message(lclstreamer_fields(3, frame_shape=(16, 16)), compression)
    rng = np.random.default_rng(11)
    fmt = LclstreamerHdf5()
    for _ in range(300):
        damaged = bytearray(raw)
        for at in rng.integers(0, len(raw), rng.integers(1, 8)):
            damaged[at] = int(rng.integers(0, 256))
        if rng.random() < 0.2:
            damaged = damaged[: int(rng.integers(0, len(damaged)))]
        try:
            fmt.decode([bytes(damaged)])
        except BadMessage:
            pass
