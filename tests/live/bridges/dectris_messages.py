"""DECTRIS Stream V2 messages as a detector sends them, for the bridge's tests and benchmark.

Built as DECTRIS's specification and example decoders describe them (github.com/dectris/
documentation, stream_v2/ and cbor/dectris-compression-tag.md), and checked against the messages
of their stream2-test_data branch (an EIGER2 500K, bslz4 and lz4, 8/16/32 bit): a CBOR map behind
the self-described tag 55799, "type" first; images as tag 40 [[size_y, size_x], typed array]
with the typed array's bytes, or tag 56500 ["bslz4" | "lz4", element size | 0, bytes] framed as
the HDF5 filters frame a chunk (12-byte header, 8 KiB blocks, as the DCU writes them); times as
[numerator, denominator] rationals on a 50 MHz time base; dates as tag 0 text.

`stream2_messages(...)` gives the encoded start, images and end; `series_frames(...)` the
frames those images hold (same arguments, same values). The dict builders let a test break one
field and `encode` the result.
"""

from __future__ import annotations

import datetime as dt
import struct

import bitshuffle
import cbor2
import lz4.block
import numpy as np

CHANNELS = ("threshold_1", "threshold_2")
TIME_BASE = 50_000_000  # Hz: the denominator of a DCU's rationals
BLOCK_BYTES = 8192  # the block size of the DCU's bslz4 and lz4 framings
SERIES_DATE = dt.datetime(2023, 2, 10, 15, 49, 5, 281000, tzinfo=dt.timezone(dt.timedelta(hours=1)))
FRAME_TIME = 0.02  # s between image starts
COUNT_TIME = 0.0199998  # s of exposure
HEADER = struct.Struct(">QI")

# RFC 8746 typed array tags (little-endian where the size has an order, as DECTRIS sends).
TYPED_TAGS = {"uint8": 64, "uint16": 69, "uint32": 70, "uint64": 71, "int8": 72, "int16": 77,
              "int32": 78, "int64": 79, "float16": 84, "float32": 85, "float64": 86,
              ">u2": 65, ">u4": 66, ">u8": 67, ">i2": 73, ">i4": 74, ">i8": 75, ">f4": 81,
              ">f8": 82}


def series_frames(n_images: int, shape: tuple[int, int] = (64, 96), dtype: str = "uint16",
                  channels: tuple[str, ...] = CHANNELS, seed: int = 0) -> dict[str, np.ndarray]:
    """{channel: (n_images, size_y, size_x) frames}: low photon counts, a few pixels at the
    type's maximum (module gaps, as DECTRIS marks them), and on the last channel a patch of
    values across the type's whole range (so a narrowed or sign-flipped value shows)."""
    rng = np.random.default_rng(seed)
    dtype_ = np.dtype(dtype)
    top = np.iinfo(dtype_).max
    frames = {}
    for k, name in enumerate(channels):
        f = rng.poisson(2.0, (n_images, *shape)).astype(dtype_)
        f[:, :, shape[1] // 2] = top
        if k == len(channels) - 1:
            h, w = max(1, shape[0] // 4), max(1, shape[1] // 4)
            f[:, :h, :w] = rng.integers(0, top, (n_images, h, w), dtype=dtype_, endpoint=True)
        frames[name] = f
    return frames


def compress(data: np.ndarray, compression: str | None) -> bytes | cbor2.CBORTag:
    """A typed array's bytes, or tag 56500 of them compressed as a DCU compresses them."""
    raw = np.ascontiguousarray(data)
    if compression is None:
        return raw.tobytes()
    itemsize = raw.dtype.itemsize
    if compression == "bslz4":
        body = bitshuffle.compress_lz4(raw.reshape(-1), BLOCK_BYTES // itemsize)
        stored = HEADER.pack(raw.nbytes, BLOCK_BYTES) + body.tobytes()
        return cbor2.CBORTag(56500, ["bslz4", itemsize, stored])
    if compression == "lz4":
        plain = raw.tobytes()
        pieces = [HEADER.pack(len(plain), BLOCK_BYTES)]
        for pos in range(0, len(plain), BLOCK_BYTES):
            block = plain[pos : pos + BLOCK_BYTES]
            packed = lz4.block.compress(block, store_size=False)
            if len(packed) >= len(block):  # the HDF5 LZ4 framing stores such a block as is
                packed = block
            pieces += [struct.pack(">I", len(packed)), packed]
        return cbor2.CBORTag(56500, ["lz4", 0, b"".join(pieces)])
    raise ValueError(f"unknown compression {compression!r}")


def typed_array(data: np.ndarray, compression: str | None = None) -> cbor2.CBORTag:
    key = data.dtype.name if data.dtype.isnative or data.dtype.itemsize == 1 else data.dtype.str
    return cbor2.CBORTag(TYPED_TAGS[key], compress(data, compression))


def multi_dim(data: np.ndarray, compression: str | None = None) -> cbor2.CBORTag:
    """RFC 8746 tag 40 (row-major): [[size_y, size_x], typed array]."""
    return cbor2.CBORTag(40, [list(data.shape), typed_array(data, compression)])


def start_message(shape: tuple[int, int] = (64, 96), dtype: str = "uint16",
                  channels: tuple[str, ...] = CHANNELS, n_images: int = 3,
                  compression: str | None = "bslz4", series_id: int = 1,
                  series_unique_id: str = "01GRXWT80JSDY2FNW8SGCCDZD9") -> dict:
    """A start message with every field of the specification (header_detail "all")."""
    y, x = shape
    mask = np.zeros(shape, np.uint32)
    mask[:, x // 2] = 1  # gap
    mask[0, 0] = 8  # hot pixel
    return {
        "type": "start",
        "series_id": series_id,
        "series_unique_id": series_unique_id,
        "arm_date": SERIES_DATE - dt.timedelta(milliseconds=250),
        "beam_center_x": x / 2 + 0.25,
        "beam_center_y": y / 2 - 0.5,
        "channels": list(channels),
        "count_time": COUNT_TIME,
        "countrate_correction_enabled": True,
        "countrate_correction_lookup_table": typed_array(np.arange(1024, dtype=np.uint32),
                                                         compression),
        "detector_description": "Dectris EIGER2 Si 500K",
        "detector_serial_number": "E-01-0000",
        "detector_translation": [0.01, -0.02, 0.15],
        "flatfield": {c: multi_dim(np.ones(shape, np.float32), compression) for c in channels},
        "flatfield_enabled": True,
        "frame_time": FRAME_TIME,
        "goniometer": {"omega": {"increment": 0.1, "start": 10.0},
                       "phi": {"increment": 0.0, "start": 0.0}},
        "image_dtype": dtype,
        "image_size_x": x,
        "image_size_y": y,
        "incident_energy": 12_398.4,
        "incident_wavelength": 1.0000,
        "number_of_images": n_images,
        "pixel_mask": {c: multi_dim(mask, compression) for c in channels},
        "pixel_mask_enabled": True,
        "pixel_size_x": 75e-6,
        "pixel_size_y": 75e-6,
        "saturation_value": int(np.iinfo(np.dtype(dtype)).max) - 1,
        "sensor_material": "Si",
        "sensor_thickness": 450e-6,
        "threshold_energy": {c: 6_000.0 + 2_000.0 * k for k, c in enumerate(channels)},
        "user_data": {"sample": "lysozyme", "pulse_ids": [1, 2, 3]},
        "virtual_pixel_interpolation_enabled": False,
    }


def image_message(image_id: int, data: dict[str, np.ndarray], compression: str | None = "bslz4",
                  series_id: int = 1,
                  series_unique_id: str = "01GRXWT80JSDY2FNW8SGCCDZD9") -> dict:
    """One image message; `data` maps channel name -> its (size_y, size_x) frame."""
    start = image_id * round(FRAME_TIME * TIME_BASE)
    real = round(COUNT_TIME * TIME_BASE)
    return {
        "type": "image",
        "series_id": series_id,
        "series_unique_id": series_unique_id,
        "image_id": image_id,
        "real_time": [real, TIME_BASE],
        "series_date": SERIES_DATE,
        "start_time": [start, TIME_BASE],
        "stop_time": [start + real, TIME_BASE],
        "user_data": [1, "\U0001f499"],
        "data": {name: multi_dim(frame, compression) for name, frame in data.items()},
    }


def end_message(series_id: int = 1, series_unique_id: str = "01GRXWT80JSDY2FNW8SGCCDZD9") -> dict:
    return {"type": "end", "series_id": series_id, "series_unique_id": series_unique_id}


def encode(message: object) -> bytes:
    """One Stream V2 message: self-described CBOR (tag 55799), dates as tag 0 text."""
    return cbor2.dumps(cbor2.CBORTag(55799, message))


def stream2_messages(n_images: int, shape: tuple[int, int] = (64, 96), dtype: str = "uint16",
                     compression: str | None = "bslz4", channels: tuple[str, ...] = CHANNELS,
                     series_id: int = 1, seed: int = 0) -> list[bytes]:
    """A whole series as the detector sends it: start, `n_images` images, end. The images hold
    `series_frames(n_images, shape, dtype, channels, seed)`."""
    frames = series_frames(n_images, shape, dtype, channels, seed)
    unique = f"SERIES{series_id:020d}"
    messages = [encode(start_message(shape, dtype, channels, n_images, compression, series_id,
                                     unique))]
    for i in range(n_images):
        messages.append(encode(image_message(i, {c: f[i] for c, f in frames.items()},
                                             compression, series_id, unique)))
    messages.append(encode(end_message(series_id, unique)))
    return messages
