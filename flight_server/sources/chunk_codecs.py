"""Decode stored HDF5 chunks of the filters detector writers use, outside HDF5: bitshuffle
(32008, LZ4 or zstd inside) and LZ4 (32004), byte for byte as their HDF5 filters would.

Decoding happens on the server's read pool, several chunks at once, so two things matter:
- bitshuffle is called through its C API (`bshuf_decompress_lz4` in bitshuffle's own extension
  module) to decode straight into the batch's buffer without the GIL, where the Python binding
  returns a new array that must then be copied;
- bitshuffle's bundled OpenMP runtime is started with one thread: the pool already keeps every
  core busy with whole chunks, and an OpenMP team per call on top of it stalls at its barriers
  whenever a core is taken (measured: 4x slower decoding on a loaded 2-core machine).
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import h5py
import lz4.block
import numpy as np
from h5py import h5z

_import_lock = threading.Lock()
with _import_lock:
    # libgomp reads OMP_NUM_THREADS once, when it is loaded: set it for bitshuffle's private copy
    # only, and give the process its own value back.
    _saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import bitshuffle
        import bitshuffle.ext
    finally:
        if _saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = _saved

_bshuf = ctypes.CDLL(bitshuffle.ext.__file__)
_DECOMPRESS = {}
for _name, _symbol in (("lz4", "bshuf_decompress_lz4"), ("zstd", "bshuf_decompress_zstd")):
    _fn = getattr(_bshuf, _symbol, None)
    if _fn is not None:
        # int64_t f(const void *in, void *out, size_t size, size_t elem_size, size_t block_size)
        _fn.restype = ctypes.c_int64
        _fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                        ctypes.c_size_t]
        _DECOMPRESS[_name] = _fn

HEADER = struct.Struct(">QI")  # both filters: uncompressed bytes (u64), block bytes (u32)
BITSHUFFLE, LZ4 = 32008, 32004  # HDF5 filter ids
BITSHUFFLE_INNER = {2: "lz4", 3: "zstd"}  # bitshuffle's compression option (cd_values[4])
FILTER_NAMES = {1: "deflate", 2: "shuffle", 3: "fletcher32", 32001: "blosc", LZ4: "lz4",
                BITSHUFFLE: "bitshuffle", 32013: "zfp", 32015: "zstd", 32026: "blosc2"}


def filters(ds: h5py.Dataset) -> list[tuple]:
    """The dataset's filter pipeline: (id, flags, options, name) per filter, in order."""
    plist = ds.id.get_create_plist()
    return [plist.get_filter(i) for i in range(plist.get_nfilters())]


def unavailable_filter(pipeline: list[tuple]) -> str | None:
    """'HDF5 filter 32099 (unregistered)' when no installed plugin provides a filter of the
    pipeline (HDF5 could not read the data either), else None."""
    for fid, _, _, _ in pipeline:
        if not h5z.filter_avail(fid):
            return f"HDF5 filter {fid} ({FILTER_NAMES.get(fid, 'unregistered')})"
    return None


def decoder(pipeline: list[tuple]) -> str | None:
    """Which of our decoders reads chunks of this pipeline: "bitshuffle-lz4",
    "bitshuffle-zstd" or "lz4" when that filter is the only one; None otherwise."""
    if len(pipeline) != 1:
        return None
    fid, _, options, _ = pipeline[0]
    if fid == LZ4:
        return "lz4"
    if fid == BITSHUFFLE and len(options) > 4:
        inner = BITSHUFFLE_INNER.get(options[4])
        if inner is not None and bitshuffle_available(inner):
            return f"bitshuffle-{inner}"
    return None


class ChunkError(OSError):
    """A stored chunk that does not decode to what its dataset says it holds."""


def bitshuffle_available(inner: str) -> bool:
    return inner in _DECOMPRESS


def decode_bitshuffle(stored: np.ndarray, out: np.ndarray, itemsize: int, inner: str) -> None:
    """A bitshuffle chunk (header, then compressed blocks) into `out` (uint8, the chunk's size)."""
    if stored.nbytes < HEADER.size:
        raise ChunkError(f"a bitshuffle chunk of {stored.nbytes} bytes has no header")
    total, block = HEADER.unpack_from(stored)
    if total != out.nbytes or block % itemsize:
        raise ChunkError(f"bitshuffle chunk says {total} bytes in blocks of {block}, expected "
                         f"{out.nbytes} bytes of {itemsize}-byte values")
    body = stored[HEADER.size :]
    _check_blocks(body, total // itemsize, itemsize, block // itemsize)
    used = _DECOMPRESS[inner](body.ctypes.data, out.ctypes.data, total // itemsize, itemsize,
                              block // itemsize)
    if used != body.nbytes:
        raise ChunkError(f"bitshuffle-{inner} decompression failed (code {used}, "
                         f"{body.nbytes} bytes stored)")


def _check_blocks(body: np.ndarray, n: int, itemsize: int, block: int) -> None:
    """Walk the compressed blocks before bitshuffle does: its C API is not told how many bytes
    it may read and trusts each block's stored size, so a corrupt size would make it read past
    the chunk. Layout: n // block full blocks, then the rest rounded down to 8 values as one
    more block, each as (u32 big-endian size, bytes); the last n % 8 values are stored as is."""
    sizes = [block] * (n // block)
    if (n % block) - (n % 8):
        sizes.append((n % block) - (n % 8))
    raw = memoryview(body)
    pos = 0
    for _ in sizes:
        if pos + 4 > len(raw):
            raise ChunkError("bitshuffle chunk ends inside a block header")
        (size,) = struct.unpack_from(">I", raw, pos)
        if pos + 4 + size > len(raw):
            raise ChunkError(f"bitshuffle block at byte {pos} claims {size} bytes: the chunk is "
                             "corrupted")
        pos += 4 + size
    if pos + (n % 8) * itemsize != len(raw):
        raise ChunkError(f"bitshuffle chunk holds {len(raw)} bytes after its header, its blocks "
                         f"account for {pos + (n % 8) * itemsize}")


def decode_lz4(stored: np.ndarray, out: np.ndarray) -> None:
    """An LZ4 chunk as the HDF5 LZ4 filter (32004) writes it: the header, then per block its
    stored size (u32, big-endian) and bytes, a block stored as is when LZ4 would not shrink it."""
    raw = memoryview(stored)
    if len(raw) < HEADER.size:
        raise ChunkError(f"an LZ4 chunk of {len(raw)} bytes has no header")
    total, block = HEADER.unpack_from(raw)
    if total != out.nbytes or block == 0:
        raise ChunkError(f"LZ4 chunk says {total} bytes in blocks of {block}, expected "
                         f"{out.nbytes}")
    pos, done = HEADER.size, 0
    while done < total:
        want = min(block, total - done)
        if pos + 4 > len(raw):
            raise ChunkError("LZ4 chunk ends inside a block header")
        (size,) = struct.unpack_from(">I", raw, pos)
        piece = raw[pos + 4 : pos + 4 + size]
        if len(piece) != size:
            raise ChunkError("LZ4 chunk ends inside a block")
        if size == want:
            out[done : done + want] = np.frombuffer(piece, dtype=np.uint8)
        else:
            try:
                plain = lz4.block.decompress(piece, uncompressed_size=want)
            except lz4.block.LZ4BlockError as exc:
                raise ChunkError(f"LZ4 decompression failed ({exc})") from None
            if len(plain) != want:
                raise ChunkError(f"an LZ4 block decodes to {len(plain)} bytes, expected {want}")
            out[done : done + want] = np.frombuffer(plain, dtype=np.uint8)
        pos += 4 + size
        done += want


# -- reading events of a chunked dataset, chunk by chunk ---------------------------------------


@dataclass(frozen=True)
class ChunkTable:
    """Where a dataset's chunks are stored (chunks span whole events along the first axis, and
    `chunk_events` events each) and how to decode them."""

    offsets: np.ndarray  # file byte offset of chunk k, -1 if never written
    sizes: np.ndarray  # stored bytes of chunk k
    masks: np.ndarray  # HDF5 filter masks: non-zero where the writer skipped a filter
    chunk_events: int
    decoder: str  # "raw" or one of `decoder()`'s answers
    stored: np.dtype  # the values' type in the file (byte order included)
    fill: int | float  # what a chunk never written holds


def chunk_table(ds: h5py.Dataset, decoder_name: str) -> ChunkTable:
    """The dataset's chunk index, read once (H5Dchunk_iter: one pass over the B-tree)."""
    c = ds.chunks[0]
    n = -(-ds.shape[0] // c)
    offsets = np.full(n, -1, dtype=np.int64)
    sizes = np.zeros(n, dtype=np.int64)
    masks = np.zeros(n, dtype=np.uint32)

    def note(info) -> None:
        k = info.chunk_offset[0] // c
        offsets[k], sizes[k], masks[k] = info.byte_offset, info.size, info.filter_mask

    ds.id.chunk_iter(note)
    return ChunkTable(offsets, sizes, masks, c, decoder_name, ds.dtype, ds.fillvalue.item())


def read_events(fd: int, table: ChunkTable, dest: np.ndarray, first: int, step: int,
                pread: Callable[[int, np.ndarray, int], None]) -> None:
    """Events first, first+step, ... (as many as `dest` holds) from their stored chunks:
    decoded straight into `dest` when a chunk is one event in native byte order, else into a
    scratch buffer first. A chunk that does not decode to its size raises OSError."""
    c, stored = table.chunk_events, table.stored
    swap = stored != dest.dtype  # big-endian in the file
    event_bytes = dest[:1].nbytes
    chunk: int | None = None
    scratch: np.ndarray | None = None
    for k in range(len(dest)):
        e = first + k * step
        event = dest[k : k + 1]  # a view even for scalar events (dest[k] would be a copy)
        target = event.reshape(-1).view(np.uint8)
        if e // c != chunk:
            chunk = e // c
            direct = c == 1 and not swap
            scratch = target if direct else np.empty(c * event_bytes, dtype=np.uint8)
            if table.offsets[chunk] < 0:  # never written: HDF5 gives the fill value
                scratch.view(stored)[:] = table.fill
            else:  # a chunk is stored whole, even the last one past the dataset's end
                _decode_chunk(fd, table, chunk, scratch, pread)
            if direct:
                continue
        piece = scratch[(e - chunk * c) * event_bytes : (e - chunk * c + 1) * event_bytes]
        if swap:
            event.reshape(-1)[:] = piece.view(stored)
        else:
            target[:] = piece


def _decode_chunk(fd: int, table: ChunkTable, chunk: int, out: np.ndarray,
                  pread: Callable[[int, np.ndarray, int], None]) -> None:
    size = int(table.sizes[chunk])
    raw = np.empty(size, dtype=np.uint8)
    pread(fd, raw, int(table.offsets[chunk]))
    try:
        if table.decoder == "raw" or table.masks[chunk]:  # a filter skipped for this chunk
            if size != out.nbytes:
                raise ChunkError(f"holds {size} bytes, expected {out.nbytes}")
            out[:] = raw
        elif table.decoder.startswith("bitshuffle"):
            decode_bitshuffle(raw, out, table.stored.itemsize,
                              table.decoder.removeprefix("bitshuffle-"))
        else:
            decode_lz4(raw, out)
    except ChunkError as exc:
        raise OSError(f"chunk {chunk}: {exc}") from None
