"""DECTRIS Stream V2 decoding: real messages (made as a DCU makes them, dectris_messages.py) in,
rows equal to what was encoded out; every malformed message refused with its reason."""

from __future__ import annotations

import datetime as dt
import json
import struct

import cbor2
import numpy as np
import pyarrow as pa
import pytest

from flight_server.live.bridges.dectris import METADATA_KEY, Stream2
from flight_server.live.bridges.formats import BadMessage, Decoded, Format
from flight_server.live.run_writer import check_schema
from schemas import metadata as md
from tests.live.bridges.dectris_messages import (
    CHANNELS,
    SERIES_DATE,
    TIME_BASE,
    encode,
    end_message,
    image_message,
    multi_dim,
    series_frames,
    start_message,
    stream2_messages,
)

SHAPE = (40, 56)


def tensor_values(batch: pa.RecordBatch, name: str) -> np.ndarray:
    return batch.column(name).to_numpy_ndarray()


def frame(dtype: str = "uint16", shape: tuple[int, int] = SHAPE, seed: int = 1) -> np.ndarray:
    return series_frames(1, shape, dtype, ("c",), seed)["c"][0]


def decode_all(messages: list[bytes]) -> tuple[Stream2, list[Decoded]]:
    fmt = Stream2()
    return fmt, [fmt.decode([m]) for m in messages]


@pytest.mark.parametrize("compression", ["bslz4", "lz4", None])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32"])
def test_series_decodes_to_the_encoded_values(dtype: str, compression: str | None) -> None:
    n = 3
    messages = stream2_messages(n, SHAPE, dtype, compression)
    frames = series_frames(n, SHAPE, dtype)
    _, decoded = decode_all(messages)
    start, images, end = decoded[0], decoded[1:-1], decoded[-1]
    assert start.batch is None and not start.end and METADATA_KEY in start.metadata
    assert end == Decoded(end=True)
    table = pa.Table.from_batches([d.batch for d in images])  # one schema for the series
    assert table.column_names == ["time", "series_id", "image_id", "start_time", "stop_time",
                                  "real_time", "data/threshold_1", "data/threshold_2"]
    for name in CHANNELS:
        t = table.schema.field(f"data/{name}").type
        assert isinstance(t, pa.FixedShapeTensorType)
        assert t.value_type == pa.from_numpy_dtype(np.dtype(dtype))  # never widened
        assert list(t.shape) == list(SHAPE)  # [size_y, size_x]
        got = table.column(f"data/{name}").combine_chunks().to_numpy_ndarray()
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, frames[name])
    assert table.column("series_id").to_pylist() == [1] * n
    assert table.column("image_id").to_pylist() == list(range(n))
    assert table.schema.field("series_id").type == pa.uint64()
    check_schema(table.schema)  # a live stream can store these rows in its run file


def test_times_are_exact_nanoseconds_and_time_is_series_date_plus_start() -> None:
    _, decoded = decode_all(stream2_messages(3, SHAPE, "uint16", "bslz4"))
    batch = pa.Table.from_batches([d.batch for d in decoded[1:-1]])
    frame_ticks, real_ticks = 1_000_000, 999_990  # 0.02 s and 0.0199998 s at 50 MHz
    ns_per_tick = 1_000_000_000 // TIME_BASE
    starts = [i * frame_ticks * ns_per_tick for i in range(3)]
    assert batch.column("start_time").to_pylist() == starts
    assert batch.column("stop_time").to_pylist() == [s + real_ticks * ns_per_tick
                                                     for s in starts]
    assert batch.column("real_time").to_pylist() == [real_ticks * ns_per_tick] * 3
    assert batch.schema.field("real_time").metadata[md.UNITS] == b"ns"
    assert batch.schema.field("time").type == pa.timestamp("ns", tz="UTC")
    base = (SERIES_DATE - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
    assert batch.column("time").cast(pa.int64()).to_pylist() == [base * 1000 + s for s in starts]


def test_rational_on_a_time_base_not_dividing_a_gigahertz_rounds_to_the_nanosecond() -> None:
    msg = image_message(0, {"c": frame()})
    msg["real_time"] = [2, 3]  # 0.666666666.. s
    batch = Stream2().decode([encode(msg)]).batch
    assert batch.column("real_time").to_pylist() == [666_666_667]


def test_start_message_becomes_json_metadata_with_arrays_summarised() -> None:
    fmt = Stream2()
    decoded = fmt.decode([encode(start_message(SHAPE, "uint32", compression="lz4"))])
    assert decoded.batch is None and set(decoded.metadata) == {METADATA_KEY}
    text = decoded.metadata[METADATA_KEY]
    assert len(text) < 4096  # masks and flatfields are described, not inlined
    start = json.loads(text)
    assert start["series_id"] == 1
    assert start["image_size_x"] == SHAPE[1] and start["image_size_y"] == SHAPE[0]
    assert start["image_dtype"] == "uint32"
    assert start["incident_wavelength"] == 1.0 and start["incident_energy"] == 12_398.4
    assert start["beam_center_x"] == SHAPE[1] / 2 + 0.25
    assert start["pixel_size_x"] == 75e-6 and start["detector_translation"] == [0.01, -0.02, 0.15]
    assert start["goniometer"]["omega"] == {"increment": 0.1, "start": 10.0}
    assert start["threshold_energy"] == {"threshold_1": 6000.0, "threshold_2": 8000.0}
    assert start["channels"] == list(CHANNELS)
    assert start["user_data"] == {"sample": "lysozyme", "pulse_ids": [1, 2, 3]}
    assert start["arm_date"] == "2023-02-10T15:49:05.031000+01:00"
    assert start["pixel_mask"]["threshold_1"] == {
        "shape": list(SHAPE), "dtype": "uint32", "compression": "lz4",
        "stored_bytes": start["pixel_mask"]["threshold_1"]["stored_bytes"],
        "bytes": SHAPE[0] * SHAPE[1] * 4}
    assert start["flatfield"]["threshold_2"]["dtype"] == "float32"
    assert start["countrate_correction_lookup_table"]["bytes"] == 4096
    assert start["units"]["incident_wavelength"] == "angstrom"
    assert "type" not in start


def test_format_protocol_and_zero_copy_frames() -> None:
    fmt: Format = Stream2()
    assert (fmt.name, fmt.socket_type, fmt.request()) == ("dectris-stream2", "PULL", None)
    data = frame("uint16")
    message = encode(image_message(7, {"c": data}, compression=None))
    batch = fmt.decode([memoryview(message)]).batch  # a zero-copy ZMQ frame's buffer
    np.testing.assert_array_equal(tensor_values(batch, "data/c")[0], data)
    assert batch.column("image_id").to_pylist() == [7]


def test_big_endian_typed_arrays_are_served_native() -> None:
    data = frame("uint32")
    for compression in (None, "bslz4", "lz4"):
        msg = image_message(0, {"c": data.astype(">u4")}, compression)
        assert msg["data"]["c"].value[1].tag == 66  # uint32 big-endian
        batch = Stream2().decode([encode(msg)]).batch
        assert batch.schema.field("data/c").type.value_type == pa.uint32()
        np.testing.assert_array_equal(tensor_values(batch, "data/c")[0], data)


def test_an_image_without_its_start_describes_itself() -> None:
    # A PULL client gets every other message when two are connected, or connects mid-series.
    fmt = Stream2()
    data = frame("uint32", (8, 12))
    batch = fmt.decode([encode(image_message(5, {"c": data}, series_id=9))]).batch
    np.testing.assert_array_equal(tensor_values(batch, "data/c")[0], data)
    # and one of another series than the announced one is not held to that start
    fmt.decode([encode(start_message(SHAPE, "uint16", channels=("c",)))])
    batch = fmt.decode([encode(image_message(0, {"c": data}, series_id=2,
                                             series_unique_id="other"))]).batch
    assert batch.schema.field("data/c").type.value_type == pa.uint32()


def test_the_format_goes_on_after_a_bad_message() -> None:
    messages = stream2_messages(2, SHAPE, "uint16", "bslz4")
    fmt = Stream2()
    fmt.decode([messages[0]])
    with pytest.raises(BadMessage):
        fmt.decode([messages[1][: len(messages[1]) // 2]])
    assert fmt.decode([messages[2]]).batch.column("image_id").to_pylist() == [1]


def with_start(image: dict, start: dict | None = None) -> BadMessage:
    """The BadMessage decoding `image` raises after `start` (default: the series' start)."""
    fmt = Stream2()
    fmt.decode([encode(start or start_message(SHAPE, "uint16"))])
    with pytest.raises(BadMessage) as info:
        fmt.decode([encode(image)])
    return info.value


def two_channels(dtype: str = "uint16", shape: tuple[int, int] = SHAPE) -> dict:
    return {c: frame(dtype, shape) for c in CHANNELS}


def bad(message: bytes | dict, match: str, parts: int = 1) -> None:
    raw = encode(message) if isinstance(message, dict) else message
    with pytest.raises(BadMessage, match=match):
        Stream2().decode([raw] * parts)


def test_not_cbor_truncated_and_not_a_map() -> None:
    image = encode(image_message(0, {"c": frame()}))
    bad(b"hello, detector", "self-described CBOR tag 55799")
    bad(b"", "self-described CBOR tag 55799")
    bad(b"\xd9\xd9\xf7\xff\x00", "not valid CBOR")
    bad(image[: len(image) - 100], "truncated CBOR")
    bad(image[:5], "truncated CBOR")
    bad(image, "one ZMQ frame, got 2", parts=2)
    bad(encode([1, 2, 3]), "is a CBOR map, got an array")


def test_message_type_missing_or_unknown() -> None:
    bad({"series_id": 1}, 'no "type"')
    bad({"type": "status", "state": "idle"}, "unknown message type 'status'")


def test_image_fields_missing_or_malformed() -> None:
    msg = image_message(0, {"c": frame()})
    del msg["image_id"]
    bad(msg, "image_id is missing, not an unsigned integer")
    msg = image_message(0, {"c": frame()})
    msg["series_id"] = -1
    bad(msg, "series_id is an integer -1")
    msg = image_message(0, {"c": frame()})
    msg["real_time"] = [1, 0]
    bad(msg, "real_time .* is not a rational")
    msg = image_message(0, {"c": frame()})
    msg["data"] = {}
    bad(msg, '"data" is a map, not a map of channel name')
    msg = image_message(0, {"c": frame()})
    msg["data"]["c"] = frame().tobytes()
    bad(msg, "channel 'c' is a byte string, not a multi-dimensional array")
    msg = image_message(0, {"c": frame()})
    msg["data"]["a/b"] = msg["data"]["c"]
    bad(msg, "channel name 'a/b' cannot name a column")


def test_image_contradicting_its_own_dimensions() -> None:
    data = frame()
    for compression, match in ((None, "bytes of data, but 40 x 57 uint16 values are"),
                               ("bslz4", "decompresses to 4480 bytes, but .* make 4560"),
                               ("lz4", "decompresses to 4480 bytes, but .* make 4560")):
        msg = image_message(0, {"c": data}, compression)
        msg["data"]["c"].value[0] = [SHAPE[0], SHAPE[1] + 1]
        bad(msg, match)
    msg = image_message(0, {"c": data})
    msg["data"]["c"].value[0] = [SHAPE[0] * SHAPE[1]]
    bad(msg, r"dimensions \[2240\] are not \[size_y, size_x\]")
    msg = image_message(0, {"c": data})
    msg["data"]["c"] = cbor2.CBORTag(1040, msg["data"]["c"].value)
    bad(msg, "column-major array")


def test_image_contradicting_its_start() -> None:
    err = with_start(image_message(0, two_channels("uint32")))
    assert "holds uint32 values, its start announced image_dtype uint16" in str(err)
    err = with_start(image_message(0, two_channels("uint16", (SHAPE[0], SHAPE[1] - 8))))
    assert "is 40 x 48 (y x), its start announced image_size_y x image_size_x = 40 x 56" \
        in str(err)
    err = with_start(image_message(0, {"threshold_1": frame()}))
    assert "has channels ['threshold_1'], its start announced ['threshold_1', 'threshold_2']" \
        in str(err)


def test_unknown_compression_and_corrupt_compressed_data() -> None:
    msg = image_message(0, {"c": frame()}, "bslz4")
    msg["data"]["c"].value[1].value.value[0] = "zstd"
    bad(msg, "unknown compression algorithm 'zstd'")
    for compression, match in (("bslz4", "bitshuffle"), ("lz4", "LZ4")):
        msg = image_message(0, {"c": frame()}, compression)
        tag = msg["data"]["c"].value[1].value
        stored = bytearray(tag.value[2])
        struct.pack_into(">I", stored, 12, 10**6)  # the first block claims more than is there
        tag.value[2] = bytes(stored)
        bad(msg, match)
        msg = image_message(0, {"c": frame()}, compression)
        msg["data"]["c"].value[1].value.value[2] = b"\x00" * 5
        bad(msg, "no 12-byte header")
    # a header claiming 512 MiB from a few bytes is refused before anything is allocated
    msg = image_message(0, {"c": frame()}, "bslz4")
    msg["data"]["c"].value[0] = [16384, 16384]
    tag = msg["data"]["c"].value[1].value
    tag.value[2] = struct.pack(">QI", 16384 * 16384 * 2, 8192) + tag.value[2][12:]
    bad(msg, "cannot hold 536870912 bytes")


def test_typed_arrays_that_are_not_supported() -> None:
    for tag, match in ((83, r"tag 83 \(float128, big-endian\) is not supported"),
                       (87, r"tag 87 \(float128, little-endian\) is not supported"),
                       (76, r"tag 76 \(reserved\) is not supported")):
        msg = image_message(0, {"c": frame()}, None)
        msg["data"]["c"].value[1] = cbor2.CBORTag(tag, b"\x00" * 16 * SHAPE[0] * SHAPE[1])
        bad(msg, match)
    msg = image_message(0, {"c": frame()}, None)
    msg["data"]["c"].value[1] = frame().reshape(-1).tolist()
    bad(msg, "plain CBOR array of 2240 items, not a typed array")
    msg = image_message(0, {"c": frame()}, None)
    msg["data"]["c"].value[1] = cbor2.CBORTag(99, b"\x00")
    bad(msg, "tag 99 is not a typed array tag")


def test_start_messages_that_cannot_be_used() -> None:
    msg = start_message(SHAPE, "uint16")
    msg["image_dtype"] = "uint12"
    bad(msg, "image_dtype 'uint12'")
    msg = start_message(SHAPE, "uint16")
    del msg["series_id"]
    bad(msg, "start message: series_id is missing")
    msg = start_message(SHAPE, "uint16")
    msg["channels"] = "threshold_1"
    bad(msg, "channels is text, not a list of channel names")


def test_end_forgets_the_series() -> None:
    fmt = Stream2()
    fmt.decode([encode(start_message(SHAPE, "uint16"))])
    assert fmt.decode([encode(end_message())]).end
    # after the end, an image of the same numbers is no longer held to that start
    batch = fmt.decode([encode(image_message(0, two_channels("uint32")))]).batch
    assert batch.schema.field("data/threshold_1").type.value_type == pa.uint32()


def test_multi_dim_helper_matches_dectris_layout() -> None:
    tag = multi_dim(np.zeros((2, 3), np.uint16), "bslz4")
    assert tag.tag == 40 and tag.value[0] == [2, 3]
    assert tag.value[1].tag == 69 and tag.value[1].value.tag == 56500
    assert tag.value[1].value.value[:2] == ["bslz4", 2]
