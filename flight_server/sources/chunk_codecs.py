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
