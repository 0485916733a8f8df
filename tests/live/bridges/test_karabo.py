"""karabo-bridge 2.2 decoding, on messages made by European XFEL's own software (karabo_bridge's
serializer, its ServerInThread and its detector simulator; extra-data's serve_data), every value
compared with what karabo_bridge's `deserialize` (what its `Client.next()` returns) makes of the
same message, and a served run's columns with the euxfel source's for the same files."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import extra_data as ed
import h5py
import msgpack
import numpy as np
import pyarrow as pa
import pytest
import zmq
from extra_data.export import serve_data
from extra_data.tests.mockdata import write_file
from extra_data.tests.mockdata.gauge import Gauge
from extra_data.tests.mockdata.xgm import XGM
from karabo_bridge import ServerInThread, deserialize, serialize
from karabo_bridge.server import SimServerInThread

from flight_server.live.bridges.formats import BadMessage
from flight_server.live.bridges.karabo import KaraboBridge
from flight_server.live.run_writer import check_schema
from flight_server.sources import describe
from tests.live.bridges.messages import (
    KARABO_DETECTOR,
    KARABO_MOTOR,
    karabo_message,
    karabo_train,
)

pack = msgpack.Packer(use_bin_type=True).pack


def cell(batch: pa.RecordBatch, name: str) -> Any:
    """Row 0 of a column: numpy for fixed-size lists and tensors, Python otherwise."""
    col = batch.column(name)
    if isinstance(col.type, pa.FixedShapeTensorType):
        return col.to_numpy_ndarray()[0]
    if isinstance(col.type, pa.FixedSizeListType):
        return col.values.to_numpy(zero_copy_only=False)
    return col[0].as_py()


def flat(values: dict, prefix: str = "") -> dict[str, Any]:
    """A source's values by column key: nested maps as '.'-paths, without the repeated
    `metadata`, and a CONTROL key sent as K.value + K.timestamp (from files) as K."""
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            if not (prefix == "" and k == "metadata"):
                out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    if not prefix:
        for k in [k for k in out if k.endswith(".value")]:
            stem = k.removesuffix(".value")
            if stem + ".timestamp" in out and stem not in out:
                out[stem] = out.pop(k)
                del out[stem + ".timestamp"]
    return out


def assert_as_deserialized(batch: pa.RecordBatch, parts: list) -> None:
    """Every key of every source that karabo_bridge's deserialize finds is a column holding
    the same value, numpy dtype and shape kept; nothing else but trainId and time."""
    data, meta = deserialize(parts)
    expected_names = {"trainId", "time"}
    for source, values in data.items():
        for key, value in flat(values).items():
            name = f"{source}/{key}"
            expected_names.add(name)
            got = cell(batch, name)
            assert batch.schema.field(name).metadata[b"detector"] == source.encode()
            if isinstance(value, np.ndarray):
                assert got.dtype == value.dtype.newbyteorder("="), name
                assert got.shape == value.shape, name
                np.testing.assert_array_equal(got, value, err_msg=name)
            else:
                assert got == value and type(got) is type(value), name
    assert set(batch.schema.names) == expected_names
    tids = {m["timestamp.tid"] for m in meta.values()}
    assert cell(batch, "trainId") == max(tids)


@pytest.fixture
def endpoint(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/karabo"


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def receive(ctx: zmq.Context, endpoint: str, fmt: KaraboBridge, n: int
            ) -> list[tuple[list[zmq.Frame], Any]]:
    """n messages through a plain ZMQ socket of the format's type, as the bridge receives."""
    sock = ctx.socket(getattr(zmq, fmt.socket_type))
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    if fmt.socket_type == "SUB":
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    got = []
    for _ in range(n):
        request = fmt.request()
        if request is not None:
            sock.send(request)
        frames = sock.recv_multipart(copy=False)
        got.append((frames, fmt.decode([f.buffer for f in frames])))
    sock.close()
    return got


# -- messages from karabo_bridge's serializer --------------------------------------------------


def test_serializer_messages_decode_to_what_deserialize_returns() -> None:
    fmt = KaraboBridge()
    for tid in (10_000_000_000, 10_000_000_001):
        parts = karabo_message(tid)
        batch = fmt.decode(parts).batch
        assert batch.num_rows == 1
        assert_as_deserialized(batch, parts)
    schema = batch.schema
    assert schema.field("trainId").type == pa.uint64()
    assert schema.field("time").type == pa.timestamp("ns", tz="UTC")
    frame = schema.field(f"{KARABO_DETECTOR}/image.data").type
    assert isinstance(frame, pa.FixedShapeTensorType)
    assert (frame.value_type, frame.shape) == (pa.uint16(), [64, 128, 16])
    assert schema.field(f"{KARABO_DETECTOR}/image.cellId").type == pa.list_(pa.uint16(), 16)
    assert schema.field(f"{KARABO_DETECTOR}/image.passport").type == pa.list_(pa.string())
    assert schema.field(f"{KARABO_DETECTOR}/header.pulseCount").type == pa.int64()
    assert schema.field(f"{KARABO_MOTOR}/actualPosition").type == pa.float64()
    assert schema.field(f"{KARABO_MOTOR}/state").type == pa.string()
    assert schema.field(f"{KARABO_MOTOR}/isMoving").type == pa.bool_()
    assert cell(batch, f"{KARABO_MOTOR}/nested.speed") == 3.25
    # timestamp.sec '1585926035', timestamp.frac '709842200000000000' (attoseconds)
    assert batch.column("time").cast(pa.int64())[0].as_py() == 1585926035_709842200
    assert fmt.skipped == {}


def test_karabo_bridge_own_test_data() -> None:
    """The data and metadata of karabo_bridge's own test suite (tests/conftest.py)."""
    data = {
        "source1": {
            "parameter.1.value": 123, "parameter.2.value": 1.23, "list.of.int": [1, 2, 3],
            "string.param": "True", "boolean": False,
            "metadata": {"timestamp.tid": 9876543210, "timestamp": 12345678},
        },
        "XMPL/DET/MOD0": {
            "image.data": np.random.default_rng(1).integers(255, size=(2, 3, 4), dtype=np.uint8),
            "something.else": ["a", "bc", "d"],
        },
    }
    metadata = {
        "source1": {"source": "source1", "timestamp": 1585926035.7098422,
                    "timestamp.sec": "1585926035", "timestamp.frac": "709842200000000000",
                    "timestamp.tid": 1000000},
        "XMPL/DET/MOD0": {"source": "XMPL/DET/MOD0", "timestamp": 1585926036.9098422,
                          "timestamp.sec": "1585926036", "timestamp.frac": "909842200000000000",
                          "timestamp.tid": 1000010},
    }
    parts = serialize(data, metadata)
    batch = KaraboBridge().decode(parts).batch
    assert_as_deserialized(batch, parts)
    # Sources of different trains (approximate matching): the newest train, and its time.
    assert cell(batch, "trainId") == 1000010
    assert batch.column("time").cast(pa.int64())[0].as_py() == 1585926036_909842200
    # Without the metadata argument the serializer takes each source's 'metadata' entry.
    parts = serialize({"source1": data["source1"]})
    batch = KaraboBridge().decode(parts).batch
    assert cell(batch, "trainId") == 9876543210
    assert batch.column("time").cast(pa.int64())[0].as_py() == 12345678 * 10**9
    assert "source1/metadata.timestamp.tid" not in batch.schema.names


def test_numeric_trains_are_what_a_live_stream_stores() -> None:
    """Text and booleans aside (a live stream refuses them: the bridge must leave them out),
    the columns are ones a stream stores and finishes as a run."""
    batch = KaraboBridge().decode(karabo_message(8, numbers_only=True)).batch
    check_schema(batch.schema)
    assert f"{KARABO_DETECTOR}/image.data" in batch.schema.names


def test_arrays_are_wrapped_without_a_copy() -> None:
    parts = karabo_message(5)
    batch = KaraboBridge().decode(parts).batch
    frame = np.asarray(parts[[i for i, p in enumerate(parts) if isinstance(p, memoryview)
                              and p.nbytes == 64 * 128 * 16 * 2][0]])
    values = batch.column(f"{KARABO_DETECTOR}/image.data").storage.values
    assert values.buffers()[1].address == frame.ctypes.data


def test_dtypes_kept_and_unservable_keys_skipped_once(caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    data = {"SRC/A": {
        "big": np.arange(6, dtype=">f4").reshape(2, 3),  # not native: values kept, native order
        "half": np.ones(3, dtype=np.float16),
        "flags": np.array([True, False, True]),
        "zero_d": np.array(7, dtype=np.int8),
        "word": np.array("hello"),
        "words": np.array([b"ab", b"c"]),
        "objects": np.array(["a", None], dtype=object),
        "complex": np.ones(2, dtype=np.complex64),
        "empty_array": np.zeros((0, 3), dtype=np.uint8),
        "empty": [],
        "nothing": None,
        "mixed": [1, "a"],
        "unsigned": 2**63 + 5,
        "raw": b"\x00\x01",
    }}
    meta = {"SRC/A": {"timestamp.tid": 42}}
    parts = serialize(data, meta)
    fmt = KaraboBridge()
    with caplog.at_level(logging.WARNING, logger="flight_server.live.bridges.karabo"):
        batch = fmt.decode(parts).batch
        fmt.decode(parts)
    assert set(fmt.skipped) == {f"SRC/A/{k}" for k in (
        "objects", "complex", "empty_array", "empty", "nothing", "mixed")}
    assert sum("is not served" in r.message for r in caplog.records) == len(fmt.skipped)
    np.testing.assert_array_equal(cell(batch, "SRC/A/big"), data["SRC/A"]["big"])
    assert batch.schema.field("SRC/A/big").type.value_type == pa.float32()
    assert batch.schema.field("SRC/A/half").type == pa.list_(pa.float16(), 3)
    assert cell(batch, "SRC/A/flags").tolist() == [True, False, True]
    assert batch.schema.field("SRC/A/zero_d").type == pa.int8()
    assert cell(batch, "SRC/A/zero_d") == 7
    assert cell(batch, "SRC/A/word") == "hello"
    assert cell(batch, "SRC/A/words") == ["ab", "c"]
    assert batch.schema.field("SRC/A/unsigned").type == pa.uint64()
    assert cell(batch, "SRC/A/unsigned") == 2**63 + 5
    assert cell(batch, "SRC/A/raw") == b"\x00\x01"
    assert batch.column("time").null_count == 1


# -- karabo_bridge's servers over ZMQ ----------------------------------------------------------


def test_simulator_trains_over_req(ctx: zmq.Context, endpoint: str) -> None:
    """karabo_bridge's own simulator (what `karabo-bridge-server-sim` runs), REP socket: the
    bridge asks with b"next" and gets AGIPD module trains (uint16 raw frames, 8 MiB each)."""
    fmt = KaraboBridge()
    assert fmt.socket_type == "REQ" and fmt.request() == b"next"
    with SimServerInThread(endpoint, sock="REP", detector="AGIPDModule", raw=True,
                           debug=False):
        got = receive(ctx, endpoint, fmt, 3)
    schemas = set()
    for frames, decoded in got:
        assert_as_deserialized(decoded.batch, frames)
        schemas.add(decoded.batch.schema)
        name = "SPB_DET_AGIPD1M-1/DET/0CH0:xtdf/image.data"
        frame = decoded.batch.schema.field(name).type
        assert (frame.value_type, frame.shape) == (pa.uint16(), [128, 512, 64])
        # The frame's values are the ZMQ frame's memory (no copy).
        address = decoded.batch.column(name).storage.values.buffers()[1].address
        assert any(np.frombuffer(f.buffer, np.uint8).ctypes.data == address for f in frames)
    assert len(schemas) == 1  # trains of one source decode to one schema
    tids = [cell(d.batch, "trainId") for _, d in got]
    assert tids == list(range(tids[0], tids[0] + 3))
    assert fmt.skipped == {}


def test_fed_trains_over_push(ctx: zmq.Context, endpoint: str) -> None:
    """karabo_bridge's ServerInThread on a PUSH socket (as extra-data's serve_files can): the
    bridge PULLs and sends nothing; every value is what was fed."""
    fmt = KaraboBridge("PULL")
    assert fmt.request() is None
    trains = [karabo_train(100 + i) for i in range(3)]
    with ServerInThread(endpoint, sock="PUSH") as server:
        for data, meta in trains:
            server.feed(data, meta)
        got = receive(ctx, endpoint, fmt, 3)
    for (frames, decoded), (data, _) in zip(got, trains, strict=True):
        assert_as_deserialized(decoded.batch, frames)
        for source, values in data.items():
            for key, value in flat(values).items():
                got_value = cell(decoded.batch, f"{source}/{key}")
                if isinstance(value, np.ndarray):
                    np.testing.assert_array_equal(got_value, value)
                else:
                    assert got_value == value
    assert [cell(d.batch, "trainId") for _, d in got] == [100, 101, 102]


def test_files_served_by_extra_data_match_the_archive(ctx: zmq.Context, endpoint: str,
                                                     tmp_path: Path) -> None:
    """A run streamed by extra-data's own `serve_data` (what `karabo-bridge-serve-files`
    runs): every train's columns have the names the euxfel source gives the archived run, and
    the same values (a CONTROL value arrives as a Python number: float32 as float64, its dtype
    is not on the wire, so values are compared in the archive's type)."""
    run_dir = tmp_path / "p900001" / "raw" / "r0003"
    run_dir.mkdir(parents=True)
    write_file(str(run_dir / "RAW-R0003-DA01-S00000.h5"),
               [XGM("SA1_XTD2_XGM/DOOCS/MAIN"), Gauge("SA3_XTD10_VAC/GAUGE/G30520C")],
               ntrains=4, firsttrain=10000, chunksize=4, format_version="1.0")
    with h5py.File(run_dir / "RAW-R0003-DA01-S00000.h5", "r+") as f:  # distinct values
        rng = np.random.default_rng(0)
        f.visititems(lambda name, obj: obj.__setitem__(
            ..., rng.integers(1, 100, obj.shape).astype(obj.dtype))
            if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "iuf"
            and name.startswith(("CONTROL/", "INSTRUMENT/")) else None)
    run = describe(run_dir, "p900001", 3, kind="euxfel", within=tmp_path / "p900001")
    columns = [c for c in run.columns.values() if c.name not in ("run", "time")]
    with run.reader() as reader:
        archived = reader.read(columns, 0, 4)
    run.retire()  # its files closed: HDF5 refuses extra-data's locking open of a file held
    fmt = KaraboBridge()  # open without locking
    server = threading.Thread(target=serve_data, daemon=True,
                              args=(ed.RunDirectory(str(run_dir)), endpoint))
    server.start()
    got = receive(ctx, endpoint, fmt, 4)
    server.join(10)
    assert set(got[0][1].batch.schema.names) == set(run.columns) - {"run"}
    for row, (frames, decoded) in enumerate(got):
        assert_as_deserialized(decoded.batch, frames)
        for col in columns:
            live = decoded.batch.column(col.name)
            expected = archived.column(col.name)[row : row + 1]
            assert live.cast(expected.type).equals(expected), col.name
    assert fmt.skipped == {}


# -- bad messages ------------------------------------------------------------------------------


def header(source: str = "S", content: str = "msgpack", **more: Any) -> bytes:
    return pack({"source": source, "content": content, **more})


def good() -> list:
    return serialize({"S": {"x": 1, "a": np.arange(4, dtype=np.uint16)}},
                     {"S": {"timestamp.tid": 7}})


@pytest.mark.parametrize(("parts", "reason"), [
    ([], "empty message"),
    ([b"\xc1\x00", b"\x80"], "part 0 (a header) is not msgpack"),
    ([pack({"a": 1}) + b"junk", b"\x80"], "not msgpack"),
    ([pack({"S": {"x": 1}})], "protocol 1.0"),
    ([b"Error: bad request b'more'"], "the server answered"),
    ([pack([1, 2]), b"\x80"], "should be a header"),
    ([pack({"content": "msgpack"}), b"\x80"], "no 'source'"),
    ([header(metadata={"timestamp.tid": 1})], "truncated"),
    (good()[:3], "truncated"),
    ([header(metadata={"timestamp.tid": 1}), pack({"x": 1})[:-1]], "is not msgpack"),
    ([header(metadata={"timestamp.tid": 1}), pack([1])], "not a map"),
    ([header(metadata=[1]), pack({})], "not a map"),
    ([header(), pack({"x": 1})], "no source's metadata has timestamp.tid"),
    ([header(metadata={"timestamp.tid": "7"}), pack({})], "not a train ID"),
    ([header(metadata={"timestamp.tid": -1}), pack({})], "not a train ID"),
    ([header(content="array", path="a", dtype="u2", shape=[2]), b"\0" * 4],
     "whose data part has not come before it"),
    ([header(content="pickle"), b""], "announces content 'pickle'"),
    ([*good()[:2], *good()[:2]], "two data parts"),
    ([*good()[:3], b"\0" * 7], "holds 7 bytes, but its header says uint16 of shape (4,): 8"),
    ([*good()[:2], header(content="array", path="a", dtype="<f8", shape=[2, 2]), b"\0" * 16],
     "holds 16 bytes, but its header says float64 of shape (2, 2): 32"),
    ([*good()[:2], header(content="array", path="a", dtype="u2", shape=[-1]), b""],
     "has shape [-1]"),
    ([*good()[:2], header(content="array", dtype="u2", shape=[1]), b"\0\0"], "no 'path'"),
    ([*good()[:2], header(content="array", path="a", dtype="u1", shape=[1] * 70), b"\0"],
     "expected a list of sizes"),
])
def test_bad_messages(parts: list, reason: str) -> None:
    with pytest.raises(BadMessage, match=re.escape(reason)):
        KaraboBridge().decode(parts)


def test_a_good_message_after_bad_ones_decodes() -> None:
    fmt = KaraboBridge()
    with pytest.raises(BadMessage):
        fmt.decode(good()[:3])
    batch = fmt.decode(good()).batch
    assert cell(batch, "trainId") == 7 and cell(batch, "S/a").tolist() == [0, 1, 2, 3]
    assert cell(batch, "S/x") == 1


def test_an_unknown_dtype_is_skipped_not_fatal() -> None:
    fmt = KaraboBridge()
    parts = [*good(), header(content="array", path="weird", dtype="no such dtype", shape=[1]),
             b"\0"]
    batch = fmt.decode(parts).batch
    assert "S/weird" in fmt.skipped and "S/weird" not in batch.schema.names
    assert cell(batch, "S/x") == 1


def test_socket_types() -> None:
    assert KaraboBridge("SUB").request() is None
    with pytest.raises(ValueError, match="REQ, SUB or PULL"):
        KaraboBridge("PUSH")


def test_damaged_messages_are_bad_messages() -> None:
    """Random damage to parts, or parts lost: each message decodes or is a BadMessage."""
    base = [bytes(p) for p in karabo_message(3, frame_shape=(4, 8, 2))]
    rng = np.random.default_rng(5)
    fmt = KaraboBridge()
    for _ in range(1000):
        parts = list(base)
        i = int(rng.integers(len(parts)))
        damaged = bytearray(parts[i])
        for at in rng.integers(0, max(len(damaged), 1), rng.integers(1, 4)):
            if damaged:
                damaged[at] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            damaged = damaged[: int(rng.integers(0, len(damaged) + 1))]
        parts[i] = bytes(damaged)
        if rng.random() < 0.1:
            parts = parts[: int(rng.integers(0, len(parts) + 1))]
        try:
            fmt.decode(parts)
        except BadMessage:
            pass
