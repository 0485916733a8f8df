"""DECTRIS Stream V2: what a DECTRIS detector (SIMPLON API 1.8, stream `format` = `cbor`) pushes
on its ZMQ PUSH socket (port 31001), one image per row.

The protocol (github.com/dectris/documentation, stream_v2/README.md, the example decoders
stream_v2/examples/{client.py,stream2.c} and cbor/dectris-compression-tag.md):
- one CBOR message per ZMQ message (never multipart), beginning with the self-described CBOR tag
  55799 (bytes d9 d9 f7; the reference parser refuses a message without it): a map whose "type"
  is "start" (sent at arm), "image" (one per exposure) or "end" (at disarm);
- arrays are RFC 8746 typed arrays (tags 64..87: a byte string of elements; DECTRIS sends 64
  uint8, 69 uint16 LE and 70 uint32 LE) inside tag 40 row-major multi-dimensional arrays
  `[[size_y, size_x], typed array]`;
- a byte string may be replaced by tag 56500 `[algorithm, modifier, bytes]`: "bslz4" (modifier:
  the bitshuffle element size) or "lz4" (modifier unused, 0), both framed exactly as their HDF5
  filters write a chunk (a 12-byte header: uncompressed bytes u64 BE, block bytes u32 BE; then
  the blocks), which is what `sources.chunk_codecs` decodes;
- the image message's times are rationals `[numerator, denominator]` in seconds, the
  denominator the time base (50 MHz on the DCUs whose messages were checked), `start_time` and
  `stop_time` relative to `series_date`.

What a row holds (DESIGN.md: types never widened, arrays as arrow.fixed_shape_tensor; only the
types a live stream can store in its run file):
- `time` (timestamp[ns, UTC]): series_date + start_time, null without series_date;
- `series_id`, `image_id` (uint64), as the detector numbers them;
- `start_time`, `stop_time`, `real_time` (int64 nanoseconds): the rationals converted exactly
  when the time base divides 1 GHz (50 MHz does), else rounded to the nearest nanosecond;
- `data/<channel>` (e.g. `data/threshold_1`): arrow.fixed_shape_tensor of the stored type
  (uint8/16/32 as sent) and shape [size_y, size_x], decompressed straight into the buffer Arrow
  wraps; an uncompressed little-endian frame is wrapped without a copy.
Text (series_unique_id, the image's user_data) has no column: a run file stores numbers only.

The start message becomes the stream's metadata under `dectris.start` (JSON): its fields as
sent, arrays (pixel masks, flatfields, the count-rate table) by shape, dtype and compression
rather than their values, and `units` where the specification states them.

An image whose start was not seen is decoded: every image message describes itself (shape and
type in its arrays), and a PULL client may miss the start (DECTRIS deals messages round-robin
among connected clients) or connect mid-series. An image of the announced series is checked
against its start (channels, dtype, size); one of another series is decoded unchecked.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
import numpy as np
import pyarrow as pa

from flight_server.buffers import allocate
from flight_server.live.bridges.formats import BadMessage, Decoded
from flight_server.sources import chunk_codecs
from schemas import metadata as md

SELF_DESCRIBED = b"\xd9\xd9\xf7"  # tag 55799 (RFC 8949 section 3.4.6)
TAG_MULTI_DIM = 40  # RFC 8746 section 3.1.1, row-major
TAG_MULTI_DIM_COLUMN_MAJOR = 1040
TAG_COMPRESSED = 56500  # DECTRIS compressed byte string
METADATA_KEY = "dectris.start"
NS_PER_S = 1_000_000_000
INT64_MAX = (1 << 63) - 1
LIST_SIZE_MAX = (1 << 31) - 1  # elements of one fixed_size_list value (int32)
COMPRESSION_HEADER = struct.Struct(">QI")  # both HDF5 framings: total bytes, block bytes
# An LZ4 sequence cannot expand more than about 255x; a compressed payload claiming more is
# corrupt, and is refused before anything is allocated for it.
MAX_EXPANSION = 256
SUMMARISED_LIST = 1024  # a plain CBOR array in the start message longer than this: its length

# RFC 8746 section 2.1: tag 0b010_f_s_e_ll. Tag 68 is uint8 "clamped" (uint8 for us); 76 is
# reserved; 83 and 87 are binary128, which neither numpy (portably) nor Arrow holds.
TYPED_ARRAYS: dict[int, np.dtype] = {
    tag: np.dtype(code) for tag, code in {
        64: "u1", 65: ">u2", 66: ">u4", 67: ">u8", 68: "u1", 69: "<u2", 70: "<u4", 71: "<u8",
        72: "i1", 73: ">i2", 74: ">i4", 75: ">i8", 77: "<i2", 78: "<i4", 79: "<i8",
        80: ">f2", 81: ">f4", 82: ">f8", 84: "<f2", 85: "<f4", 86: "<f8",
    }.items()
}
UNSUPPORTED_TYPED = {76: "reserved", 83: "float128, big-endian", 87: "float128, little-endian"}
# Units the Stream V2 specification states for start message fields.
START_UNITS = {
    "detector_translation": "m",
    "incident_energy": "eV",
    "incident_wavelength": "angstrom",
    "threshold_energy": "eV",
}
IMAGE_DTYPES = ("uint8", "uint16", "uint32", "int8", "int16", "int32", "int64", "uint64",
                "float16", "float32", "float64")

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_TIME, _INT64, _UINT64 = pa.timestamp("ns", tz="UTC"), pa.int64(), pa.uint64()
_NS = {md.UNITS: b"ns"}
_TIME_FIELDS = [
    pa.field(md.TIME_COLUMN, _TIME,
             metadata={md.DERIVED: b"series_date + start_time"}),
    pa.field("series_id", pa.uint64(), nullable=False),
    pa.field("image_id", pa.uint64(), nullable=False),
    pa.field("start_time", pa.int64(), metadata=_NS),
    pa.field("stop_time", pa.int64(), metadata=_NS),
    pa.field("real_time", pa.int64(), metadata=_NS),
]


# What the CBOR tags become while the message is parsed: descriptions, not decoded arrays, so
# nothing is decompressed before the message as a whole is known to be good, and a start
# message's arrays are summarised without being decoded at all.


class _Compressed:
    __slots__ = ("algorithm", "modifier", "data")

    def __init__(self, algorithm: Any, modifier: Any, data: Any) -> None:
        self.algorithm, self.modifier, self.data = algorithm, modifier, data


class _Typed:
    __slots__ = ("tag", "payload")

    def __init__(self, tag: int, payload: Any) -> None:
        self.tag, self.payload = tag, payload


class _MultiDim:
    __slots__ = ("dims", "array", "column_major")

    def __init__(self, dims: Any, array: Any, column_major: bool) -> None:
        self.dims, self.array, self.column_major = dims, array, column_major


def _tag_hook(first: Any, second: Any) -> Any:
    """cbor2 >= 6 calls tag_hook(tag, immutable), 5.x tag_hook(decoder, tag). Called innermost
    tag first, so a typed array receives its `_Compressed` and a multi-dim array its `_Typed`;
    the byte strings stay the `bytes` objects cbor2 made (the only copy of the payload)."""
    tag = first if isinstance(first, cbor2.CBORTag) else second
    number, value = tag.tag, tag.value
    if 64 <= number <= 87:
        return _Typed(number, value)
    if number == TAG_COMPRESSED and isinstance(value, (list, tuple)) and len(value) == 3:
        return _Compressed(*value)
    if number in (TAG_MULTI_DIM, TAG_MULTI_DIM_COLUMN_MAJOR) and \
            isinstance(value, (list, tuple)) and len(value) == 2:
        return _MultiDim(value[0], value[1], number == TAG_MULTI_DIM_COLUMN_MAJOR)
    return tag


@dataclass(frozen=True)
class _Series:
    """What a start message announced, to check the series' images against."""

    series_id: int
    unique_id: str | None
    dtype: np.dtype | None  # image_dtype
    shape: tuple[int, int] | None  # (image_size_y, image_size_x)
    channels: tuple[str, ...] | None

    def owns(self, series_id: int, unique_id: Any) -> bool:
        if self.unique_id is not None and isinstance(unique_id, str):
            return unique_id == self.unique_id
        return series_id == self.series_id


class Stream2:
    """DECTRIS Stream V2 messages -> one row per image (see the module docstring).

    Give `decode` the message as `bytes`: cbor2 copies any other buffer (a memoryview of a
    zero-copy ZMQ frame) through a slower file-like path, so it is converted once here."""

    name = "dectris-stream2"
    socket_type = "PULL"

    def __init__(self) -> None:
        self._series: _Series | None = None
        self._schemas: dict[tuple, pa.Schema] = {}

    def request(self) -> bytes | None:
        return None

    def decode(self, parts: list[bytes | memoryview]) -> Decoded:
        if len(parts) != 1:
            raise BadMessage(f"a DECTRIS Stream V2 message is one ZMQ frame, got {len(parts)}")
        raw = parts[0] if isinstance(parts[0], bytes) else bytes(parts[0])
        if not raw.startswith(SELF_DESCRIBED):
            raise BadMessage("not a DECTRIS Stream V2 message: it does not begin with the "
                             f"self-described CBOR tag 55799 (d9 d9 f7) but {raw[:3].hex(' ')!r}")
        try:
            msg = cbor2.loads(raw, tag_hook=_tag_hook)
        except cbor2.CBORDecodeEOF:
            raise BadMessage(f"truncated CBOR: the message ends early ({len(raw)} bytes)") from None
        except (cbor2.CBORDecodeError, ValueError, OverflowError, RecursionError) as exc:
            raise BadMessage(f"not valid CBOR: {exc}") from None
        if not isinstance(msg, Mapping):
            raise BadMessage(f"a DECTRIS Stream V2 message is a CBOR map, got {_kind(msg)}")
        kind = msg.get("type")
        if kind == "image":
            return Decoded(batch=self._image(msg))
        if kind == "start":
            return Decoded(metadata=self._start(msg))
        if kind == "end":
            if self._series is not None and self._series.owns(msg.get("series_id"),
                                                              msg.get("series_unique_id")):
                self._series = None
            return Decoded(end=True)
        if kind is None:
            raise BadMessage("message has no \"type\" (expected \"start\", \"image\" or \"end\")")
        raise BadMessage(f"unknown message type {kind!r} (expected \"start\", \"image\" or "
                         "\"end\")")

    # -- start ----------------------------------------------------------------------------------

    def _start(self, msg: Mapping) -> dict[str, str]:
        series_id = _uint(msg, "series_id", "start")
        unique_id = msg.get("series_unique_id")
        if unique_id is not None and not isinstance(unique_id, str):
            raise BadMessage(f"start message: series_unique_id is {_kind(unique_id)}, not text")
        dtype = None
        if "image_dtype" in msg:
            name = msg["image_dtype"]
            if name not in IMAGE_DTYPES:
                raise BadMessage(f"start message announces image_dtype {name!r}; known: "
                                 f"{', '.join(IMAGE_DTYPES)}")
            dtype = np.dtype(name)
        shape = None
        if "image_size_x" in msg or "image_size_y" in msg:
            shape = (_uint(msg, "image_size_y", "start"), _uint(msg, "image_size_x", "start"))
        channels = msg.get("channels")
        if channels is not None:
            if not isinstance(channels, (list, tuple)) or \
                    not all(isinstance(c, str) for c in channels):
                raise BadMessage(f"start message: channels is {_kind(channels)}, not a list of "
                                 "channel names")
            channels = tuple(channels)
        self._series = _Series(series_id, unique_id, dtype, shape, channels)
        summary = {str(k): _jsonable(v) for k, v in msg.items() if k != "type"}
        units = {k: u for k, u in START_UNITS.items() if k in msg}
        if units:
            summary.setdefault("units", units)
        return {METADATA_KEY: json.dumps(summary, separators=(",", ":"), ensure_ascii=False)}

    # -- image ----------------------------------------------------------------------------------

    def _image(self, msg: Mapping) -> pa.RecordBatch:
        series_id = _uint(msg, "series_id", "image")
        image_id = _uint(msg, "image_id", "image")
        where = f"image {image_id} of series {series_id}"
        data = msg.get("data")
        if not isinstance(data, Mapping) or not data:
            raise BadMessage(f"{where}: \"data\" is {_kind(data)}, not a map of channel name to "
                             "image")
        series = self._series
        if series is not None and not series.owns(series_id, msg.get("series_unique_id")):
            series = None  # its start went elsewhere: the image describes itself
        if series is not None and series.channels is not None and \
                set(data) != set(series.channels):
            raise BadMessage(f"{where} has channels {sorted(map(str, data))}, its start "
                             f"announced {list(series.channels)}")
        start_ns = _duration_ns(msg, "start_time", where)
        date = msg.get("series_date")
        time_ns = None
        if date is not None and start_ns is not None:
            time_ns = _unix_ns(date, where) + start_ns
        columns = [
            # via int64: pa.array with a tz-aware type looks the zone up each call (20 us)
            pa.array([time_ns], _INT64).view(_TIME),
            pa.array([series_id], _UINT64),
            pa.array([image_id], _UINT64),
            pa.array([start_ns], _INT64),
            pa.array([_duration_ns(msg, "stop_time", where)], _INT64),
            pa.array([_duration_ns(msg, "real_time", where)], _INT64),
        ]
        key = []
        for name, value in data.items():
            if not isinstance(name, str) or not name or "/" in name or "\0" in name:
                raise BadMessage(f"{where}: channel name {name!r} cannot name a column")
            tensor = _channel(f"{where}, channel {name!r}", value, series)
            columns.append(tensor)
            key.append((name, tensor.type))
        schema = self._schemas.get(tuple(key))
        if schema is None:
            schema = pa.schema(_TIME_FIELDS + [
                pa.field(f"data/{name}", t, metadata={md.UNITS: b"counts"}) for name, t in key])
            self._schemas[tuple(key)] = schema
        return pa.RecordBatch.from_arrays(columns, schema=schema)


def _channel(where: str, value: Any, series: _Series | None) -> pa.ExtensionArray:
    """One channel's image as a one-row fixed_shape_tensor column."""
    if not isinstance(value, _MultiDim):
        raise BadMessage(f"{where} is {_kind(value)}, not a multi-dimensional array (tag 40)")
    if value.column_major:
        raise BadMessage(f"{where} is a column-major array (tag 1040); DECTRIS sends row-major "
                         "(tag 40) images")
    dims = value.dims
    if not isinstance(dims, (list, tuple)) or len(dims) != 2 or \
            not all(type(d) is int and d > 0 for d in dims):
        shown = list(dims) if isinstance(dims, (list, tuple)) else dims
        raise BadMessage(f"{where}: dimensions {shown!r} are not [size_y, size_x] (two positive "
                         "integers)")
    shape = (dims[0], dims[1])
    dtype = _typed_dtype(where, value.array)
    native = dtype.newbyteorder("=")
    if series is not None:
        if series.dtype is not None and native != series.dtype:
            raise BadMessage(f"{where} holds {native} values, its start announced image_dtype "
                             f"{series.dtype}")
        if series.shape is not None and shape != series.shape:
            raise BadMessage(f"{where} is {shape[0]} x {shape[1]} (y x), its start announced "
                             f"image_size_y x image_size_x = {series.shape[0]} x "
                             f"{series.shape[1]}")
    n = shape[0] * shape[1]
    if n > LIST_SIZE_MAX:
        raise BadMessage(f"{where}: {n} values in one image are more than an Arrow column holds "
                         "per row")
    nbytes = n * dtype.itemsize
    payload = value.array.payload
    if isinstance(payload, bytes):
        if len(payload) != nbytes:
            raise BadMessage(f"{where}: {len(payload)} bytes of data, but {shape[0]} x "
                             f"{shape[1]} {native} values are {nbytes} bytes")
        if dtype.isnative or dtype.itemsize == 1:
            buffer = pa.py_buffer(payload)  # no copy: Arrow keeps the bytes object alive
        else:
            out = allocate((n,), native)
            out[...] = np.frombuffer(payload, dtype=dtype)
            buffer = pa.py_buffer(out)
    elif isinstance(payload, _Compressed):
        out = _decompress(where, payload, nbytes)
        if not (dtype.isnative or dtype.itemsize == 1):
            out.view(dtype).byteswap(inplace=True)
        buffer = pa.py_buffer(out)
    else:
        raise BadMessage(f"{where}: the typed array holds {_kind(payload)}, not a byte string")
    value_type = pa.from_numpy_dtype(native)
    values = pa.Array.from_buffers(value_type, n, [None, buffer])
    storage = pa.FixedSizeListArray.from_arrays(values, n)
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(value_type, list(shape)), storage)


def _typed_dtype(where: str, typed: Any) -> np.dtype:
    if isinstance(typed, _Typed):
        dtype = TYPED_ARRAYS.get(typed.tag)
        if dtype is None:
            raise BadMessage(f"{where}: typed array tag {typed.tag} "
                             f"({UNSUPPORTED_TYPED.get(typed.tag, 'unknown')}) is not supported; "
                             "supported: RFC 8746 integer and float16/32/64 arrays (tags 64-86)")
        return dtype
    if isinstance(typed, (list, tuple)):
        raise BadMessage(f"{where} holds a plain CBOR array of {len(typed)} items, not a typed "
                         "array (RFC 8746 tags 64-86)")
    if isinstance(typed, cbor2.CBORTag):
        raise BadMessage(f"{where}: tag {typed.tag} is not a typed array tag (RFC 8746 tags "
                         "64-86)")
    raise BadMessage(f"{where} holds {_kind(typed)}, not a typed array (RFC 8746 tags 64-86)")


def _decompress(where: str, payload: _Compressed, nbytes: int) -> np.ndarray:
    """Tag 56500's bytes decoded into a new Arrow-pool buffer of `nbytes` (uint8)."""
    algorithm, modifier, data = payload.algorithm, payload.modifier, payload.data
    if algorithm not in ("bslz4", "lz4"):
        raise BadMessage(f"{where}: unknown compression algorithm {algorithm!r} (tag 56500); "
                         "known: 'bslz4', 'lz4'")
    if not isinstance(data, bytes):
        raise BadMessage(f"{where}: {algorithm} compressed data is {_kind(data)}, not bytes")
    if len(data) < COMPRESSION_HEADER.size:
        raise BadMessage(f"{where}: {algorithm} data of {len(data)} bytes has no "
                         f"{COMPRESSION_HEADER.size}-byte header")
    total, _block = COMPRESSION_HEADER.unpack_from(data)
    if total != nbytes:
        raise BadMessage(f"{where}: {algorithm} data decompresses to {total} bytes, but the "
                         f"array's dimensions and type make {nbytes}")
    if total > MAX_EXPANSION * len(data) + (1 << 16):
        raise BadMessage(f"{where}: {len(data)} bytes of {algorithm} data cannot hold {total} "
                         "bytes: the data is corrupted")
    if algorithm == "bslz4" and (type(modifier) is not int or modifier < 1 or
                                 total % modifier):
        raise BadMessage(f"{where}: bslz4 element size {modifier!r} does not divide the "
                         f"{total} bytes")
    out = allocate((nbytes,), np.uint8)
    stored = np.frombuffer(data, dtype=np.uint8)
    try:
        if algorithm == "bslz4":
            chunk_codecs.decode_bitshuffle(stored, out, modifier, "lz4")
        else:
            chunk_codecs.decode_lz4(stored, out)
    except chunk_codecs.ChunkError as exc:
        raise BadMessage(f"{where}: {exc}") from None
    return out


# -- scalars ------------------------------------------------------------------------------------


def _uint(msg: Mapping, key: str, kind: str) -> int:
    value = msg.get(key)
    if type(value) is not int or not 0 <= value < 1 << 64:
        what = "missing" if value is None else f"{_kind(value)} {value!r}"
        raise BadMessage(f"{kind} message: {key} is {what}, not an unsigned integer")
    return value


def _duration_ns(msg: Mapping, key: str, where: str) -> int | None:
    """A Stream V2 rational [numerator, denominator] of seconds, in nanoseconds (None if the
    message has none)."""
    value = msg.get(key)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2 or \
            not all(type(v) is int and v >= 0 for v in value) or value[1] == 0:
        raise BadMessage(f"{where}: {key} {value!r} is not a rational [numerator, denominator] "
                         "of unsigned integers with a denominator above 0")
    num, den = value
    ns = (num * NS_PER_S + den // 2) // den
    if ns > INT64_MAX:
        raise BadMessage(f"{where}: {key} {num}/{den} s is beyond int64 nanoseconds")
    return ns


def _unix_ns(value: Any, where: str) -> int:
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            raise BadMessage(f"{where}: series_date {value!r} is not an RFC 3339 date") from None
    if not isinstance(value, dt.datetime):
        raise BadMessage(f"{where}: series_date is {_kind(value)}, not a date (tag 0)")
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    delta = value - EPOCH
    return (delta.days * 86_400 + delta.seconds) * NS_PER_S + delta.microseconds * 1_000


def _kind(value: Any) -> str:
    if isinstance(value, _MultiDim):
        return "a multi-dimensional array"
    if isinstance(value, _Typed):
        return f"a typed array (tag {value.tag})"
    if isinstance(value, _Compressed):
        return "a compressed byte string (tag 56500)"
    if isinstance(value, cbor2.CBORTag):
        return f"tag {value.tag}"
    if value is None:
        return "missing"
    if isinstance(value, Mapping):
        return "a map"
    if isinstance(value, (list, tuple)):
        return "an array"
    return {bool: "a boolean", int: "an integer", float: "a float", str: "text",
            bytes: "a byte string"}.get(type(value), type(value).__name__)


# -- start message as JSON ----------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """A start message value as JSON: arrays described by shape, dtype and compression (a
    pixel mask is megabytes; the metadata says it exists and what it is)."""
    if isinstance(value, _MultiDim):
        out = {"shape": _jsonable(value.dims)}
        out.update(_typed_summary(value.array))
        if value.column_major:
            out["order"] = "column-major"
        return out
    if isinstance(value, _Typed):
        return _typed_summary(value)
    if isinstance(value, _Compressed):
        return _bytes_summary(value)
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, cbor2.CBORTag):
        return {"tag": value.tag, "value": _jsonable(value.value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) > SUMMARISED_LIST:
            return {"length": len(value)}
        return [_jsonable(v) for v in value]
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _typed_summary(typed: Any) -> dict[str, Any]:
    if not isinstance(typed, _Typed):
        return {"value": _jsonable(typed)}
    dtype = TYPED_ARRAYS.get(typed.tag)
    out: dict[str, Any] = {"dtype": str(dtype.newbyteorder("=")) if dtype is not None
                           else f"tag {typed.tag}"}
    out.update(_bytes_summary(typed.payload))
    return out


def _bytes_summary(payload: Any) -> dict[str, Any]:
    if isinstance(payload, bytes):
        return {"bytes": len(payload)}
    if isinstance(payload, _Compressed):
        out: dict[str, Any] = {"compression": _jsonable(payload.algorithm)}
        if isinstance(payload.data, bytes):
            out["stored_bytes"] = len(payload.data)
            if len(payload.data) >= COMPRESSION_HEADER.size:
                out["bytes"] = COMPRESSION_HEADER.unpack_from(payload.data)[0]
        return out
    return {"value": _jsonable(payload)}
