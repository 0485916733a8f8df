"""A finished live stream written as an LCLS2 run file reads back as the same table."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pytest

from flight_server.errors import InvalidArgument
from flight_server.live.run_writer import check_schema, write_run
from flight_server.sources import describe
from flight_server.sources.layouts import LCLS2_EPOCH
from schemas import metadata as md

T0 = 1_700_000_000_123_456_789  # Unix ns
FRAME = [1, 32, 32]
UNITS = {md.UNITS: b"mJ"}


def pack(unix_ns: np.ndarray) -> np.ndarray:
    return ((unix_ns // 10**9 - LCLS2_EPOCH) << 32) | (unix_ns % 10**9)


def full_batch(n: int, seed: int = 0) -> pa.RecordBatch:
    """n events of every storable kind, with nulls, empty lists and the derived columns."""
    rng = np.random.default_rng(seed)
    ns = T0 + np.arange(n, dtype=np.int64) * 8_333_333
    every_4th = np.arange(n) % 4 == 1
    frames = rng.integers(0, 60_000, size=(n, *FRAME), dtype=np.uint16)
    counts = rng.integers(0, 4, size=n)
    counts[::3] = 0  # empty lists
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    ragged = pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(rng.random(offsets[-1], dtype=np.float32)))
    arrays = {
        md.RUN_COLUMN: pa.array(np.full(n, 99, dtype=np.int32)),  # derived: not stored
        md.TIME_COLUMN: pa.array(ns, pa.timestamp("ns", tz="UTC")),  # derived from timestamp
        "timestamp": pa.array(pack(ns)),
        "gmd/energy": pa.array(rng.random(n), mask=every_4th),
        "evr/code_40": pa.array(rng.integers(0, 2, n).astype(np.int32), mask=every_4th),
        "ebeam/charge": pa.array(rng.integers(-5, 5, n).astype(np.int64), mask=~every_4th),
        "small/i8": pa.array(rng.integers(-128, 127, n).astype(np.int8)),
        "small/u16": pa.array(rng.integers(0, 60_000, n).astype(np.uint16)),
        "small/u64": pa.array(rng.integers(0, 2**62, n).astype(np.uint64)),
        "small/f16": pa.array(rng.random(n).astype(np.float16), mask=every_4th),
        "tof/waveform": pa.FixedSizeListArray.from_arrays(
            pa.array(rng.random(n * 16).astype(np.float32)), 16),
        "pnccd/image": pa.FixedShapeTensorArray.from_numpy_ndarray(frames),
        "peaks/var_x": ragged,
        "var_hits": pa.array([list(range(c)) for c in counts], pa.list_(pa.uint8())),
        # A step's lists (peaks' x, y, intensity) are not named var_: they keep their names.
        "img/peaks/intensity": pa.array([[float(i)] * c for i, c in enumerate(counts)],
                                        pa.list_(pa.float32())),
    }
    fields = [pa.field(k, a.type) for k, a in arrays.items()]
    fields[3] = fields[3].with_metadata(UNITS)
    fields[-3] = fields[-3].with_metadata({md.UNITS: b"pixel"})
    return pa.RecordBatch.from_arrays(list(arrays.values()), schema=pa.schema(fields))


def read_all(path: Path) -> tuple:
    run = describe(path, "live", 7)
    with run.reader() as reader:
        return run, reader.read(run.resolve(None), 0, run.num_events)


def test_round_trip_every_kind(tmp_path: Path) -> None:
    whole = full_batch(40)
    # Slices with non-zero offsets, an empty batch, and a batch that is not a slice.
    batches = [whole.slice(0, 11), whole.slice(11, 0), whole.slice(11, 17), whole.slice(28),
               full_batch(5, seed=1)]
    expected = pa.Table.from_batches(batches).combine_chunks()
    path = tmp_path / "r0007.h5"
    n = write_run(path, whole.schema, ((b, T0 + i) for i, b in enumerate(batches)))

    assert n == 45
    run, got = read_all(path)
    assert run.layout.name == "lcls2-smalldata"
    assert run.num_events == 45
    assert set(got.schema.names) == set(whole.schema.names)
    for name in whole.schema.names:
        if name == md.RUN_COLUMN:
            continue
        assert got.schema.field(name).type == whole.schema.field(name).type, name  # not widened
        assert got.column(name).equals(expected.column(name).chunk(0)), name
    assert got.column("gmd/energy").null_count == 11
    assert got.column("ebeam/charge").null_count == 34
    assert got.schema.field("gmd/energy").metadata[md.UNITS] == b"mJ"
    assert got.schema.field("peaks/var_x").metadata[md.UNITS] == b"pixel"
    assert md.UNITS not in (got.schema.field("small/i8").metadata or {})
    assert got.column(md.RUN_COLUMN).to_pylist() == [7] * 45

    with run.reader() as reader:  # an event range in the middle, ragged offsets and all
        part = reader.read(run.resolve(["peaks/var_x", "pnccd/image"]), 9, 30)
    assert part.column("peaks/var_x").equals(expected.column("peaks/var_x").chunk(0)[9:30])
    assert part.column("pnccd/image").equals(expected.column("pnccd/image").chunk(0)[9:30])


def test_datasets_are_chunked_by_about_one_mib(tmp_path: Path) -> None:
    path = tmp_path / "r0001.h5"
    write_run(path, full_batch(3).schema, [(full_batch(3), T0)])
    with h5py.File(path) as f:
        assert f["gmd/energy"].chunks == (131072,)
        assert f["pnccd/image"].chunks == (512, *FRAME)
        assert f["peaks/var_x_len"].dtype == np.int64
        assert f["gmd/energy"].maxshape == (None,)


def test_timestamp_synthesised_from_append_times(tmp_path: Path) -> None:
    schema = pa.schema([pa.field("gmd/energy", pa.float32())])
    sizes, times = [3, 2, 4], [T0, T0 + 1_500_000_001, T0 + 3_000_000_002]
    batches = [pa.record_batch([pa.array(np.ones(k, np.float32))], schema=schema) for k in sizes]
    path = tmp_path / "r0002.h5"
    assert write_run(path, schema, zip(batches, times, strict=True)) == 9

    _, got = read_all(path)
    expected = np.repeat(times, sizes)
    assert got.column(md.TIME_COLUMN).cast(pa.int64()).to_pylist() == expected.tolist()
    assert got.column("timestamp").to_pylist() == pack(expected).tolist()


def test_time_column_packed_when_there_is_no_timestamp(tmp_path: Path) -> None:
    schema = pa.schema([pa.field(md.TIME_COLUMN, pa.timestamp("us", tz="UTC")),
                        pa.field("x", pa.int16())])
    us = [T0 // 1000, None, T0 // 1000 + 7]
    batch = pa.record_batch([pa.array(us, schema.field(0).type), pa.array([1, 2, 3], pa.int16())],
                            schema=schema)
    path = tmp_path / "r0003.h5"
    write_run(path, schema, [(batch, T0 + 42)])

    _, got = read_all(path)
    ns = got.column(md.TIME_COLUMN).cast(pa.int64()).to_pylist()
    assert ns == [us[0] * 1000, T0 + 42, us[2] * 1000]  # a missing time is the append time


def test_zero_events(tmp_path: Path) -> None:
    schema = full_batch(1).schema
    path = tmp_path / "r0004.h5"
    assert write_run(path, schema, []) == 0
    run, got = read_all(path)
    assert run.num_events == 0 and got.num_rows == 0
    assert got.schema.field("pnccd/image").type == schema.field("pnccd/image").type

    assert write_run(path, schema, [(full_batch(2).slice(2), T0)]) == 0


def test_config_is_the_runs_configuration(tmp_path: Path) -> None:
    schema = pa.schema([pa.field("x", pa.float64())])
    batch = pa.record_batch([pa.array([1.0])], schema=schema)
    config = {"gain": 2.5, "mode": "fast", "window": [0, 10], "names": ["a", "b"],
              "det": {"threshold": 3}}
    path = tmp_path / "r0005.h5"
    write_run(path, schema, [(batch, T0)], config=config)
    run, _ = read_all(path)
    assert run.config == {"UserDataCfg/gain": 2.5, "UserDataCfg/mode": "fast",
                          "UserDataCfg/window": [0, 10], "UserDataCfg/names": ["a", "b"],
                          "UserDataCfg/det/threshold": 3}
    assert "x" in run.columns


@pytest.mark.parametrize("config", [{"bad": None}, {"bad": [1, "a"]}, {"a": 1, "a/b": 2},
                                    {"": 1}, {"bad": {"deeper": [[1], [1, 2]]}}])
def test_bad_config_is_refused(tmp_path: Path, config: dict) -> None:
    schema = pa.schema([pa.field("x", pa.float64())])
    with pytest.raises(InvalidArgument, match="configuration"):
        write_run(tmp_path / "r0006.h5", schema, [], config=config)
    assert list(tmp_path.iterdir()) == []


def test_null_arrays_become_fill_values(tmp_path: Path) -> None:
    schema = pa.schema([pa.field("w", pa.list_(pa.float32(), 2)),
                        pa.field("p/var_v", pa.list_(pa.int32()))])
    batch = pa.record_batch([pa.array([[1, 2], None, [5, None]], schema.field(0).type),
                             pa.array([[1], None, [None, 4]], schema.field(1).type)],
                            schema=schema)
    path = tmp_path / "r0008.h5"
    write_run(path, schema, [(batch.slice(1), T0)])
    _, got = read_all(path)
    w = got.column("w").values.to_numpy(zero_copy_only=False)
    assert w.size == 4 and w[2] == 5
    assert np.isnan(w[[0, 1, 3]]).all()  # a missing event, or value, as NaN
    assert got.column("p/var_v").to_pylist() == [[], [-99999, 4]]  # a null list has no entries


# Each refused schema, and words its message must carry besides the column name.
REFUSED = [
    (pa.field("flag", pa.bool_()), "uint8"),
    (pa.field("label", pa.string()), "config"),
    (pa.field("pos", pa.struct([("x", pa.float32())])), "'pos/<field>'"),
    (pa.field("code", pa.dictionary(pa.int8(), pa.string())), "decode"),
    (pa.field("evr/when", pa.timestamp("ns")), "int64"),
    (pa.field("evr/delay", pa.duration("ns")), "int64"),
    (pa.field("p/var_s", pa.list_(pa.string())), "integers or floats"),
    (pa.field("img", pa.list_(pa.list_(pa.uint16(), 4), 4)), "fixed_shape_tensor"),
    (pa.field("empty", pa.list_(pa.float32(), 0)), "at least one"),
    (pa.field("t", pa.fixed_shape_tensor(pa.uint16(), [2, 3], permutation=[1, 0])),
     "permutation"),
    (pa.field(md.TIME_COLUMN, pa.float64()), "timestamp"),
    (pa.field(md.RUN_COLUMN, pa.string()), "run number"),
    (pa.field("timestamp", pa.float64()), "1990"),
    (pa.field("timestamp", pa.int32()), "int64 or uint64"),
]


@pytest.mark.parametrize(("field", "hint"), REFUSED, ids=[str(f.type) for f, _ in REFUSED])
def test_unstorable_columns_are_refused(tmp_path: Path, field: pa.Field, hint: str) -> None:
    schema = pa.schema([pa.field("ok", pa.float64()), field])
    with pytest.raises(InvalidArgument) as err:
        check_schema(schema)
    message = str(err.value)
    assert f"'{field.name}'" in message and str(field.type) in message and hint in message
    assert "accepted" in message
    with pytest.raises(InvalidArgument):
        write_run(tmp_path / "r0009.h5", schema, [])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("names", "hint"), [
    (["a", "a/b"], "/a to be a group"),
    (["a/b/c", "a/b"], "/a/b to be a group"),
    (["timestamp/x"], "/timestamp to be a group"),
    (["p/var_x", "p/var_x_len"], "/p/var_x_len"),
    (["p/var_y_len", "p/var_y"], "/p/var_y_len"),
    (["x", "x"], "['x'] appear more than once"),
    (["timestamp", "timestamp"], "['timestamp'] appear"),
    (["/gmd/energy"], "leading"),
    (["gmd//energy"], "single '/'"),
    (["UserDataCfg/gain"], "config"),
    (["event_time"], "LCLS1"),
])
def test_colliding_names_are_refused(names: list[str], hint: str) -> None:
    types = {"p/var_x": pa.list_(pa.int32()), "p/var_y": pa.list_(pa.int32())}
    schema = pa.schema([pa.field(n, types.get(n, pa.int64())) for n in names])
    with pytest.raises(InvalidArgument, match="rename|path|config") as err:
        check_schema(schema)
    assert hint in str(err.value)


def test_storable_schema_passes() -> None:
    check_schema(full_batch(1).schema)
    check_schema(pa.schema([pa.field("timestamp", pa.uint64()), pa.field("var_x", pa.list_(
        pa.float64()))]))


def test_nulls_without_a_sentinel_are_refused_and_leave_no_file(tmp_path: Path) -> None:
    schema = pa.schema([pa.field("det/adu", pa.uint16())])
    good = pa.record_batch([pa.array([1, 2], pa.uint16())], schema=schema)
    bad = pa.record_batch([pa.array([1, None], pa.uint16())], schema=schema)
    path = tmp_path / "r0010.h5"
    with pytest.raises(InvalidArgument, match=r"'det/adu' \(uint16\) has nulls.*int32"):
        write_run(path, schema, [(good, T0), (bad, T0)])
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_write_leaves_no_file(tmp_path: Path) -> None:
    batch = full_batch(8)

    def stream() -> Iterator[tuple[pa.RecordBatch, int]]:
        yield batch, T0
        raise RuntimeError("log segment unreadable")

    path = tmp_path / "r0011.h5"
    with pytest.raises(RuntimeError, match="unreadable"):
        write_run(path, batch.schema, stream())
    assert list(tmp_path.iterdir()) == []

    other = pa.record_batch([pa.array([1.0])], names=["x"])
    with pytest.raises(InvalidArgument, match="schema"):
        write_run(path, batch.schema, [(batch, T0), (other, T0)])
    assert list(tmp_path.iterdir()) == []
