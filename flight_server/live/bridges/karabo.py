"""European XFEL's karabo-bridge protocol 2.2: one train per message, one row per train.

What the facility's `karabo_bridge` package (0.7, `serializer.py`) sends, per source (sources
in sorted order):

- a msgpack header `{"source": S, "content": "msgpack", "metadata": {...}}` — the metadata
  carries `timestamp.tid` (the train ID), `timestamp.sec` and `timestamp.frac` (decimal strings:
  Unix seconds and attoseconds) and `timestamp` (float seconds);
- a msgpack map of the source's non-array values (Python scalars, strings, lists; numpy
  scalars already turned into Python ones, so their dtype is not on the wire);
- for each numpy array: a msgpack header `{"source": S, "content": "array", "path": KEY,
  "dtype": str(array.dtype), "shape": [...]}` and then the array's raw C-order bytes.

The servers (`karabo_bridge.ServerInThread`, its simulator, and Karabo's own bridge device)
bind REP (answering a request of b"next", as `karabo_bridge.Client` sends), PUB or PUSH; so the
bridge connects REQ by default, SUB or PULL otherwise.

Columns are named as the euxfel source (extra-data) names them: `<source>/<key>`, with the key
as sent (`image.data`); CONTROL data streamed from files (extra-data's `serve_files`), whose keys
come as `K.value` and `K.timestamp`, is named K as in the archive (`_control_keys`). The
serializer sends numpy scalars as Python numbers, so a float32 CONTROL value arrives, and is
served, as float64 (its dtype is not on the wire). Arrays keep theirs (uint16 frames stay
uint16) and are wrapped without a copy: the Arrow buffer is a view of the ZMQ frame, which
stays alive with the batch.

The parts are parsed here with msgpack, as `karabo_bridge.deserialize` does, rather than by
calling it: `deserialize` pairs parts with `zip`, so a message missing its last part silently
loses a key; it reads a one-part message as protocol 1.0 through msgpack_numpy, which unpickles
object arrays (code from the network); and its errors are bare KeyErrors and ValueErrors. The
tests check that every decoded value equals what `deserialize` returns for the same message.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import msgpack
import numpy as np
import pyarrow as pa

from flight_server.live.bridges.formats import BadMessage, Decoded
from flight_server.sources.columns import TIME_TYPE, Column, dataset_column
from flight_server.sources.hdf5 import native_dtype
from flight_server.sources.hdf5_reader import wrap_fixed
from schemas import metadata as md

log = logging.getLogger(__name__)

TRAIN_ID = "trainId"
REQUEST = b"next"  # what karabo_bridge.Client sends on a REQ socket before each receive
MAX_BIN_LEN = 0x7FFFFFFF  # as karabo_bridge.deserialize: one part may hold 2 GiB
MAX_DIMS = 32  # numpy's limit is 64; a frame stack has 4 or 5
MAX_CACHED_FIELDS = 100_000  # fields kept for the next trains' columns
_INT64_MAX = 2**63 - 1
_UINT64_MAX = 2**64 - 1


_TRAIN_ID_FIELD = pa.field(TRAIN_ID, pa.uint64(), metadata={
    md.DERIVED: b"timestamp.tid of the sources' metadata (the newest, where sources disagree)"})
_TIME_FIELD = pa.field(md.TIME_COLUMN, TIME_TYPE, metadata={
    md.DERIVED: b"timestamp.sec + timestamp.frac (attoseconds) of the train's metadata, as "
                b"nanoseconds since the Unix epoch (null where no source has a timestamp)"})


class KaraboBridge:
    """Decodes karabo-bridge protocol 2.2 messages into one-row batches (one train each).

    It keeps only the keys it has reported as skipped (each is logged once) and the fields of
    the columns it has made (the same come every train)."""

    name = "karabo-bridge"

    def __init__(self, socket_type: str = "REQ") -> None:
        if socket_type not in ("REQ", "SUB", "PULL"):
            raise ValueError(f"karabo-bridge servers bind REP, PUB or PUSH: connect with REQ, "
                             f"SUB or PULL, not {socket_type!r}")
        self.socket_type = socket_type
        self.skipped: dict[str, str] = {}  # column name -> why it is not served
        self._mixed_trains_noted = False
        self._control_noted: set[str] = set()
        self._fields: dict[tuple[str, pa.DataType], pa.Field] = {}
        self._columns: dict[tuple[str, str, tuple[int, ...]], Column] = {}

    def request(self) -> bytes | None:
        return REQUEST if self.socket_type == "REQ" else None

    def decode(self, parts: list[bytes | memoryview]) -> Decoded:
        sources = self._parse(parts)
        train_id, time_ns = self._train(sources)
        fields = [_TRAIN_ID_FIELD, _TIME_FIELD]
        arrays: list[pa.Array | None] = [pa.array([train_id], pa.uint64()),
                                         pa.array([time_ns], TIME_TYPE)]
        # Values of msgpack's types, by Arrow type: one array per type, sliced into columns
        # (a device sends hundreds of scalars a train; an Arrow array each costs 10x more).
        scalars: dict[pa.DataType, list[tuple[int, Any]]] = {}
        for source in sorted(sources):
            values = sources[source].values
            for key in sorted(values):
                name = f"{source}/{key}"
                if name in (TRAIN_ID, md.TIME_COLUMN):
                    self._skip(name, "its name is taken by a derived column")
                    continue
                value = values[key]
                if isinstance(value, np.ndarray):
                    if value.dtype.kind not in "SU":
                        got = self._ndarray(name, source, value)
                        if got is not None:
                            fields.append(got[0])
                            arrays.append(got[1])
                        continue
                    value = _texts(value)
                if isinstance(value, _Unservable):
                    self._skip(name, value.reason)
                    continue
                arrow_type, why = _python_type(value)
                if arrow_type is None:
                    self._skip(name, why)
                    continue
                fields.append(self._field(name, arrow_type, source))
                arrays.append(None)
                scalars.setdefault(arrow_type, []).append((len(arrays) - 1, value))
        for arrow_type, items in scalars.items():
            together = pa.array([v for _, v in items], arrow_type)
            for j, (i, _) in enumerate(items):
                arrays[i] = together.slice(j, 1)
        batch = pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))
        return Decoded(batch=batch)

    # -- the message's structure ------------------------------------------------------------

    def _parse(self, parts: list[bytes | memoryview]) -> dict[str, _Source]:
        if not parts:
            raise BadMessage("an empty message")
        if len(parts) == 1:
            head = bytes(memoryview(parts[0])[:32])
            if head.startswith(b"Error"):
                raise BadMessage(f"the server answered {head.decode('ascii', 'replace')!r}..."
                                 " instead of a train (a request other than b'next'?)")
            try:
                only = msgpack.unpackb(parts[0], raw=False, max_bin_len=MAX_BIN_LEN)
            except (ValueError, TypeError, msgpack.UnpackException):
                only = None
            if isinstance(only, dict) and {"source", "content"} <= only.keys():
                raise BadMessage(f"the message ends after its first header (source "
                                 f"{only['source']!r}): truncated")
            raise BadMessage("a one-part message: karabo-bridge protocol 1.0 or not karabo-"
                             "bridge; this bridge reads protocol 2.2 (header and data parts "
                             "per source), the karabo_bridge servers' default")
        sources: dict[str, _Source] = {}
        i = 0
        while i < len(parts):
            header = _unpack(parts[i], f"part {i} (a header)")
            if not isinstance(header, dict):
                raise BadMessage(f"part {i} should be a header (a msgpack map with 'source' and "
                                 f"'content'), not a msgpack {type(header).__name__}")
            source, content = header.get("source"), header.get("content")
            if not isinstance(source, str) or not source:
                raise BadMessage(f"the header in part {i} has no 'source' name: {_short(header)}")
            if i + 1 >= len(parts):
                raise BadMessage(f"the message ends after the header in part {i} (source "
                                 f"{source!r}, content {content!r}) without the part it "
                                 "announces: truncated")
            payload = parts[i + 1]
            if content == "msgpack":
                if source in sources:
                    raise BadMessage(f"source {source!r} has two data parts (parts "
                                     f"{sources[source].part} and {i + 1})")
                meta = header.get("metadata", {})
                if not isinstance(meta, dict):
                    raise BadMessage(f"the metadata of source {source!r} is a "
                                     f"{type(meta).__name__}, not a map")
                data = _unpack(payload, f"part {i + 1} (the data of source {source!r})")
                if not isinstance(data, dict):
                    raise BadMessage(f"the data of source {source!r} (part {i + 1}) is a "
                                     f"msgpack {type(data).__name__}, not a map")
                values: dict[str, Any] = {}
                _flatten(data, "", values, top=True)
                sources[source] = _Source(meta, values, i + 1)
            elif content == "array":
                src = sources.get(source)
                if src is None:
                    raise BadMessage(f"the array in part {i + 1} belongs to source {source!r}, "
                                     "whose data part has not come before it")
                key = header.get("path")
                if not isinstance(key, str) or not key:
                    raise BadMessage(f"the array header in part {i} (source {source!r}) has no "
                                     "'path'")
                src.values[key] = self._array(header, payload, f"{source}/{key}", i + 1)
            else:
                raise BadMessage(f"the header in part {i} (source {source!r}) announces "
                                 f"content {content!r}; protocol 2.2 knows 'msgpack' and "
                                 "'array'")
            i += 2
        for source, src in sources.items():
            self._control_keys(source, src.values)
        return sources

    def _control_keys(self, source: str, values: dict[str, Any]) -> None:
        """CONTROL data as extra-data sends it from files (`serve_files`, `run.trains()`):
        each key K as `K.value` and `K.timestamp`. The euxfel source names that column K (its
        per-key timestamps are not served), and so does the bridge: the same names live and
        archived. Karabo's own bridge sends K as is."""
        stems = [k[: -len(".value")] for k in values
                 if k.endswith(".value") and k[: -len(".value")] + ".timestamp" in values]
        stems = [stem for stem in stems if stem not in values]
        for stem in stems:
            values[stem] = values.pop(stem + ".value")
            del values[stem + ".timestamp"]
        if stems and source not in self._control_noted:
            self._control_noted.add(source)
            log.info("karabo-bridge: %s sends CONTROL keys as K.value and K.timestamp (data "
                     "from files): served as K, as the euxfel source names them, without "
                     "their timestamps (%d keys)", source, len(stems))

    def _array(self, header: dict, payload: bytes | memoryview, name: str, part: int
               ) -> np.ndarray | _Unservable:
        """The array part as numpy, a view of the frame (no copy)."""
        shape = header.get("shape")
        if not isinstance(shape, list | tuple) or len(shape) > MAX_DIMS or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise BadMessage(f"the header of array {name} (part {part - 1}) has shape "
                             f"{shape!r}; expected a list of sizes")
        text = header.get("dtype")
        try:
            if not isinstance(text, str):
                raise TypeError(text)
            dtype = np.dtype(text)
        except Exception:  # numpy's parser of untrusted text: whatever it raises, no dtype
            return _Unservable(f"its dtype {text!r} is not a numpy dtype")
        if dtype.kind in "OV" or dtype.itemsize == 0:
            return _Unservable(f"{dtype} arrays have no meaning outside the sender's memory"
                               if dtype.kind == "O" else f"{dtype} values are not served")
        nbytes = memoryview(payload).nbytes
        expected = dtype.itemsize * math.prod(shape)
        if nbytes != expected:
            raise BadMessage(f"array {name} (part {part}) holds {nbytes} bytes, but its "
                             f"header says {dtype} of shape {tuple(shape)}: {expected} bytes")
        if not nbytes:
            return np.zeros(shape, dtype=dtype)
        return np.frombuffer(payload, dtype=dtype).reshape(shape)

    def _train(self, sources: dict[str, _Source]) -> tuple[int, int | None]:
        """The train ID and time (ns since the Unix epoch) of the message."""
        tids: dict[str, int] = {}
        for name, src in sources.items():
            tid = src.meta.get("timestamp.tid")
            if tid is None:
                continue
            if not isinstance(tid, int) or isinstance(tid, bool) or not 0 <= tid <= _UINT64_MAX:
                raise BadMessage(f"the metadata of source {name!r} has timestamp.tid {tid!r}, "
                                 "not a train ID (an unsigned 64-bit integer)")
            tids[name] = tid
        if not tids:
            raise BadMessage(f"no source's metadata has timestamp.tid (sources: "
                             f"{', '.join(sorted(sources)) or 'none'}): the train is unknown")
        train_id = max(tids.values())
        if len(set(tids.values())) > 1 and not self._mixed_trains_noted:
            self._mixed_trains_noted = True
            log.warning("karabo-bridge: the sources of one message come from different trains "
                        "(%s); trainId is the newest (the bridge matches trains approximately)",
                        ", ".join(f"{s}: {t}" for s, t in sorted(tids.items())))
        for name in sorted(tids):
            if tids[name] == train_id:
                ns = _time_ns(sources[name].meta)
                if ns is not None:
                    return train_id, ns
        return train_id, None

    # -- values -> columns -------------------------------------------------------------------

    def _field(self, name: str, arrow_type: pa.DataType, source: str) -> pa.Field:
        """The column's field, made once per name and type (the same columns come each train)."""
        field = self._fields.get((name, arrow_type))
        if field is None:
            if len(self._fields) > MAX_CACHED_FIELDS:
                self._fields.clear()
            field = self._fields[(name, arrow_type)] = pa.field(
                name, arrow_type, metadata={md.DETECTOR: source.encode()})
        return field

    def _ndarray(self, name: str, source: str, arr: np.ndarray
                 ) -> tuple[pa.Field, pa.Array] | None:
        """A numeric array as its dtype and shape's column, wrapping the frame's memory."""
        if arr.dtype.kind not in "biuf":
            return self._skip(name, f"{arr.dtype} values are not served as a column")
        if 0 in arr.shape:
            return self._skip(name, f"empty entries {arr.shape}")
        dtype = native_dtype(arr.dtype)
        if dtype != arr.dtype or arr.ctypes.data % dtype.alignment:
            arr = arr.astype(dtype)  # byte-swapped or misaligned: the one case that copies
        key = (name, dtype.str, arr.shape)
        col = self._columns.get(key)
        if col is None:
            if len(self._columns) > MAX_CACHED_FIELDS:
                self._columns.clear()
            col = dataset_column(name, name, dtype, arr.shape, 1, None, None)
            col = self._columns[key] = dataclasses.replace(
                col, field=col.field.with_metadata({md.DETECTOR: source.encode()}))
        return col.field, wrap_fixed(col, arr.reshape(1, *arr.shape), 1)

    def _skip(self, name: str, reason: str) -> None:
        if name not in self.skipped:
            self.skipped[name] = reason
            log.warning("karabo-bridge: %s is not served as a column: %s", name, reason)
        return None


@dataclasses.dataclass
class _Source:
    meta: dict[str, Any]
    values: dict[str, Any]  # key -> Python value, numpy array or _Unservable
    part: int


@dataclasses.dataclass
class _Unservable:
    reason: str


def _unpack(part: bytes | memoryview, what: str) -> Any:
    try:
        return msgpack.unpackb(part, raw=False, max_bin_len=MAX_BIN_LEN)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise BadMessage(f"{what} is not msgpack or is truncated ({exc or type(exc).__name__})"
                         ) from None


def _texts(arr: np.ndarray) -> Any:
    """A numpy string array as msgpack would have carried it: str, or a list of str."""
    def text(t: Any) -> str:
        return t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t)

    if arr.ndim == 0:
        return text(arr[()])
    if arr.ndim == 1:
        return [text(t) for t in arr.tolist()]
    return _Unservable(f"{arr.ndim}-D arrays of strings are not served")


def _flatten(data: dict, prefix: str, out: dict[str, Any], top: bool = False) -> None:
    """Karabo keys are '.'-separated paths; a nested map (a Karabo Hash) becomes its paths.
    The `metadata` map some senders repeat among a source's data (extra-data's trains) is
    the header's metadata again, not data."""
    for key, value in data.items():
        if not isinstance(key, str):
            continue  # msgpack's strict map keys: str or bytes; Karabo keys are str
        if top and key == "metadata" and isinstance(value, dict):
            continue
        path = prefix + key
        if isinstance(value, dict):
            _flatten(value, path + ".", out)
        else:
            out[path] = value


def _python_type(value: Any) -> tuple[pa.DataType | None, str]:
    """The Arrow type of a msgpack value: its dtype is not on the wire (the serializer turns
    numpy scalars into Python ones), so ints are int64 (uint64 beyond), floats float64.
    msgpack arrays (Karabo vectors) may change length between trains: list<T>."""
    if isinstance(value, bool):
        return pa.bool_(), ""
    if isinstance(value, int):
        if -_INT64_MAX - 1 <= value <= _INT64_MAX:
            return pa.int64(), ""
        if 0 <= value <= _UINT64_MAX:
            return pa.uint64(), ""
        return None, f"the integer {value} does not fit 64 bits"
    if isinstance(value, float):
        return pa.float64(), ""
    if isinstance(value, str):
        return pa.string(), ""
    if isinstance(value, bytes):
        return pa.binary(), ""
    if isinstance(value, list):
        if not value:
            return None, "an empty list: its value type is unknown"
        kinds = {type(v) for v in value}
        if kinds == {bool}:
            return pa.list_(pa.bool_()), ""
        if kinds <= {int, float} and float not in kinds:
            if all(-_INT64_MAX - 1 <= v <= _INT64_MAX for v in value):
                return pa.list_(pa.int64()), ""
            if all(0 <= v <= _UINT64_MAX for v in value):
                return pa.list_(pa.uint64()), ""
            return None, "a list of integers that do not fit 64 bits"
        if kinds <= {int, float}:
            return pa.list_(pa.float64()), ""
        if kinds == {str}:
            return pa.list_(pa.string()), ""
        if kinds == {bytes}:
            return pa.list_(pa.binary()), ""
        return None, ("a list of " + ", ".join(sorted(k.__name__ for k in kinds))
                      + " values is not served as a column")
    if value is None:
        return None, "a nil value: its type is unknown"
    return None, f"msgpack {type(value).__name__} values are not served as a column"


def _time_ns(meta: dict[str, Any]) -> int | None:
    """Nanoseconds since the Unix epoch from timestamp.sec and timestamp.frac (attoseconds,
    18 digits), else from the float timestamp; None when neither is there."""
    sec, frac = meta.get("timestamp.sec"), meta.get("timestamp.frac")
    if sec is not None and frac is not None:
        try:
            ns = int(sec) * 1_000_000_000 + int(frac) // 1_000_000_000
        except (TypeError, ValueError):
            ns = None
        if ns is not None and -_INT64_MAX <= ns <= _INT64_MAX:
            return ns
    ts = meta.get("timestamp")
    if isinstance(ts, int | float) and not isinstance(ts, bool) and abs(ts) < 9.2e9:
        return round(ts * 1e9)
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
