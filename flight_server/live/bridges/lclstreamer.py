"""The LCLStream seed's lclstreamer messages: each one an HDF5 file in memory, one batch of events.

What the seed sends (slac-lcls/lclstreamer, `data_serializers/files/hdf5.py`,
`HDF5BinarySerializer`, and `data_handlers/streaming/binary.py`): a single-part ZMQ message from
a PUSH socket, the bytes of an HDF5 file written with h5py on an `io.BytesIO`. It holds one
dataset per configured field, at the HDF5 path the configuration names (`/data/data`,
`/timestamp`), the batch's events along the first axis (all datasets the same length: the
seed refuses to write otherwise), chunked one event per chunk, optionally compressed (gzip,
shuffle+gzip, bitshuffle+LZ4/Zstd, zfp: hdf5plugin's filters); no attributes.

Each dataset becomes a column named by its path without the leading slash, its dtype kept
(the seed's float64 stays float64, a uint16 frame stays uint16): scalar per event ->
primitive, 1-D -> fixed_size_list, N-D -> fixed_shape_tensor, strings -> string. Data without
the event axis (scalar datasets) goes to the stream's metadata (`lclstream.config`, JSON, as a
run's configuration datasets), attributes to `lclstreamer.attrs`, each sent again only when
it changes.

The seed's `timestamp` field is float64 (psana2's raw time cast to float, or psana1's seconds
as "sec.nsec"): it is kept as sent, and no `time` column is derived from it.

A message must carry its own data: datasets whose values live in other files (external raw
storage, virtual datasets) are refused, external and soft links are not followed. Bitshuffle
and LZ4 chunks are cut from the message and decoded here with checked sizes (`_decoder`); every
other filter (gzip, shuffle, zfp, ...) runs in HDF5's own pipeline.
"""

from __future__ import annotations

import io
import json
import logging
import math
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers the seed's compression filters with HDF5)
import numpy as np
import pyarrow as pa
from h5py import h5s

from flight_server.buffers import allocate
from flight_server.live.bridges.formats import BadMessage, Decoded
from flight_server.sources import chunk_codecs
from flight_server.sources.columns import dataset_column
from flight_server.sources.hdf5 import (
    CONFIG_MAX_ELEMENTS,
    config_value,
    dataset_units,
    native_dtype,
    walk_links,
)
from flight_server.sources.hdf5_reader import wrap_fixed
from schemas import metadata as md

log = logging.getLogger(__name__)

CONFIG_KEY = md.CONFIG.decode()  # scalar datasets: {path: value}
ATTRS_KEY = "lclstreamer.attrs"  # attributes: {"/" or "/path": {name: value}}
_NO_MESSAGE = np.zeros(0, dtype=np.uint8)
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
MAX_MESSAGE_VALUES = 4 << 30  # bytes: a batch of 10 Jungfrau 4M float64 frames is 1.3 GiB


class LclstreamerHdf5:
    """Decodes the seed's HDF5 messages into RecordBatches (all of a message's events)."""

    name = "lclstreamer-hdf5"

    def __init__(self, socket_type: str = "PULL", max_bytes: int = MAX_MESSAGE_VALUES) -> None:
        self.socket_type = socket_type  # the seed PUSHes; PULL binds or connects
        self.max_bytes = max_bytes  # values one message may decode to (compressed data grows)
        self.skipped: dict[str, str] = {}  # column name -> why it is not served
        self._metadata: dict[str, str] | None = None  # the last sent
        self._message = _NO_MESSAGE  # the bytes being decoded, where stored chunks are read

    def request(self) -> bytes | None:
        return None

    def decode(self, parts: list[bytes | memoryview]) -> Decoded:
        if len(parts) != 1:
            raise BadMessage(f"a message of {len(parts)} parts: lclstreamer sends each batch as "
                             "one part, an HDF5 file")
        data = parts[0]
        head = bytes(memoryview(data)[:8])
        if head != HDF5_SIGNATURE:
            raise BadMessage(f"not an HDF5 file: it starts {head!r}, not with the HDF5 "
                             f"signature {HDF5_SIGNATURE!r}")
        try:
            # BytesIO shares a bytes object's memory (a memoryview is copied once).
            self._message = np.frombuffer(data, dtype=np.uint8)
            with h5py.File(io.BytesIO(data), "r") as f:
                batch, metadata = self._read(f)
        except BadMessage:
            raise
        except Exception as exc:  # h5py on untrusted bytes raises OSError, KeyError,
            # RuntimeError, OverflowError, even SystemError: each means a damaged file
            raise BadMessage(f"the HDF5 file cannot be read: truncated or corrupted "
                             f"({type(exc).__name__}: {exc})") from None
        finally:
            self._message = _NO_MESSAGE
        if metadata == self._metadata:
            metadata = None
        else:
            self._metadata = metadata
        return Decoded(batch=batch, metadata=metadata or None)

    def _read(self, f: h5py.File) -> tuple[pa.RecordBatch | None, dict[str, str]]:
        datasets, soft = walk_links(f)
        for name in soft:
            self._skip(name, "a soft link (its target is served under its own name)")
        if not datasets:
            raise BadMessage("the HDF5 file holds no datasets")
        for path, ds in datasets.items():
            dcpl = ds.id.get_create_plist()
            if ds.is_virtual or dcpl.get_external_count():
                raise BadMessage(f"dataset /{path} keeps its values in other files ("
                                 f"{'a virtual dataset' if ds.is_virtual else 'external storage'}"
                                 "): refused, a message must carry its own data")
        events = {p: ds.shape[0] for p, ds in datasets.items() if ds.ndim}
        counts = sorted(set(events.values()))
        if len(counts) > 1:
            by_count = {c: sorted(p for p, n in events.items() if n == c) for c in counts}
            raise BadMessage("the datasets disagree on the number of events (first dimension): "
                             + "; ".join(f"{c} in {', '.join('/' + p for p in ps)}"
                                         for c, ps in by_count.items()))
        n = counts[0] if counts else 0
        declared = sum(ds.dtype.itemsize * math.prod(ds.shape) for ds in datasets.values()
                       if ds.ndim)
        if declared > self.max_bytes:
            raise BadMessage(f"the datasets declare {declared} bytes of values, over the "
                             f"{self.max_bytes} a message may hold (a damaged header, or "
                             "batches too large for the bridge)")
        config: dict[str, Any] = {}
        fields, arrays = [], []
        for path, ds in datasets.items():
            if ds.shape is None:  # a null dataspace (h5py.Empty)
                config[path] = None
                continue
            if not ds.ndim:
                config[path] = config_value(ds)
                continue
            got = self._column(path, ds, n)
            if got is not None:
                fields.append(got[0])
                arrays.append(got[1])
        metadata: dict[str, str] = {}
        if config:
            metadata[CONFIG_KEY] = json.dumps(config, separators=(",", ":"))
        attrs = _attributes(f, datasets)
        if attrs:
            metadata[ATTRS_KEY] = json.dumps(attrs, separators=(",", ":"))
        batch = pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields)) if fields else None
        return batch, metadata

    def _column(self, path: str, ds: h5py.Dataset, n: int) -> tuple[pa.Field, pa.Array] | None:
        shape = tuple(int(s) for s in ds.shape[1:])
        if h5py.check_string_dtype(ds.dtype) is not None:
            if _decoder(ds, path) != "hdf5":
                raise BadMessage(f"string dataset /{path} is compressed with bitshuffle or LZ4, "
                                 "which only numeric data can be")
            if shape:
                return self._skip(path, f"per-event arrays {shape} of strings are not served")
            texts = ds.asstr(errors="replace")[()].tolist() if n else []
            field = pa.field(path, pa.string(), metadata=_field_meta(path, ds))
            return field, pa.array(texts, pa.string())
        dtype = native_dtype(ds.dtype)
        if dtype.kind not in "biuf":
            return self._skip(path, f"{ds.dtype} values are not served as a column")
        if 0 in shape:
            return self._skip(path, f"empty entries {shape}")
        col = dataset_column(path, path, dtype, shape, ds.chunks[0] if ds.chunks else 1,
                             dataset_units(ds), None)
        values = allocate((n, *shape), dtype)
        if n:
            decoder = _decoder(ds, path)
            if decoder == "hdf5":
                ds.id.read(h5s.ALL, h5s.ALL, values)
            else:
                _read_chunks(ds, path, decoder, self._message, values)
        return col.field, wrap_fixed(col, values, n)

    def _skip(self, name: str, reason: str) -> None:
        if name not in self.skipped:
            self.skipped[name] = reason
            log.warning("lclstreamer: /%s is not served as a column: %s", name, reason)
        return None


def _decoder(ds: h5py.Dataset, path: str) -> str:
    """How the dataset's chunks are decoded: "hdf5" (HDF5's own pipeline), or here, checked,
    for bitshuffle and LZ4: their HDF5 filters trust the block sizes stored in a chunk, so a
    damaged message made them read past it (a segfault, found by fuzzing), which the checked
    decoders of chunk_codecs (as the NXmx source uses) refuse."""
    pipeline = chunk_codecs.filters(ds)
    missing = chunk_codecs.unavailable_filter(pipeline)
    if missing:
        raise BadMessage(f"dataset /{path} is compressed with {missing}, which no installed "
                         "plugin provides")
    ids = [f[0] for f in pipeline]
    if chunk_codecs.BITSHUFFLE not in ids and chunk_codecs.LZ4 not in ids:
        return "hdf5"
    ours = chunk_codecs.decoder(pipeline)
    if ours is not None:
        return ours
    if ids == [chunk_codecs.BITSHUFFLE] and pipeline[0][2][4:5] in ((), (0,)):
        return "hdf5"  # bitshuffle alone: fixed sizes, nothing stored to trust
    raise BadMessage(f"dataset /{path} has filters {ids}: bitshuffle and LZ4 are decoded "
                     "only alone in a dataset's pipeline")


def _read_chunks(ds: h5py.Dataset, path: str, decoder: str, message: np.ndarray,
                 out: np.ndarray) -> None:
    """The dataset's stored chunks, cut from the message's bytes and decoded into `out`."""
    dims, chunks, stored = ds.shape, ds.chunks, ds.dtype
    found: list = []
    ds.id.chunk_iter(found.append)
    if len(found) < math.prod(-(-d // c) for d, c in zip(dims, chunks, strict=True)):
        out[...] = ds.fillvalue  # chunks never written read as the fill value
    scratch = np.empty(math.prod(chunks) * stored.itemsize, dtype=np.uint8)
    for info in found:
        origin, start, size = info.chunk_offset, info.byte_offset, info.size
        where = f"dataset /{path}, chunk at {tuple(origin)}"
        if any(o % c or not 0 <= o < d for o, c, d in zip(origin, chunks, dims, strict=True)):
            raise BadMessage(f"{where}: not a chunk of its {dims} values")
        if start < 0 or start + size > len(message):
            raise BadMessage(f"{where}: its {size} bytes at {start} lie outside the message "
                             f"({len(message)} bytes): truncated")
        piece = message[start : start + size]
        try:
            if info.filter_mask:  # the writer stored this chunk unfiltered
                if size != scratch.nbytes:
                    raise chunk_codecs.ChunkError(f"holds {size} bytes, expected "
                                                  f"{scratch.nbytes}")
                scratch[:] = piece
            elif decoder == "lz4":
                chunk_codecs.decode_lz4(piece, scratch)
            else:
                chunk_codecs.decode_bitshuffle(piece, scratch, stored.itemsize,
                                               decoder.removeprefix("bitshuffle-"))
        except chunk_codecs.ChunkError as exc:
            raise BadMessage(f"{where}: {exc}") from None
        block = scratch.view(stored).reshape(chunks)
        region = tuple(slice(o, min(o + c, d)) for o, c, d in zip(origin, chunks, dims,
                                                                    strict=True))
        out[region] = block[tuple(slice(0, r.stop - r.start) for r in region)]


def _field_meta(path: str, ds: h5py.Dataset) -> dict[bytes, bytes]:
    return dataset_column(path, path, np.dtype(np.uint8), (), 1, dataset_units(ds),
                          None).field.metadata


def _attributes(f: h5py.File, datasets: dict[str, h5py.Dataset]) -> dict[str, dict[str, Any]]:
    """Attributes of the root group and of the datasets, JSON-ready and small."""
    found: dict[str, dict[str, Any]] = {}
    for where, obj in [("/", f), *(("/" + p, ds) for p, ds in datasets.items())]:
        values = {}
        for name in obj.attrs:
            try:
                values[name] = _attr_value(obj.attrs[name])
            except (OSError, TypeError, ValueError):
                values[name] = {"skipped": "unreadable attribute"}
        if values:
            found[where] = values
    return found


def _attr_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        if value.size > CONFIG_MAX_ELEMENTS or value.dtype.kind not in "biufSUO":
            return {"shape": list(value.shape), "dtype": str(value.dtype)}
        return [_attr_value(v) for v in value.tolist()] if value.dtype.kind in "SUO" \
            else value.tolist()
    if isinstance(value, np.generic):
        return _attr_value(value.item())
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
