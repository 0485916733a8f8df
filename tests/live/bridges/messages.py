"""Messages as the facilities' own software writes them, for the bridge tests and benchmarks.

- lclstreamer: an HDF5 file written with h5py on an `io.BytesIO`, as the LCLStream seed's
  `HDF5BinarySerializer` (slac-lcls/lclstreamer, data_serializers/files/hdf5.py) writes it: one
  dataset per field, events along the first axis, chunks of one event, optional compression.
- karabo-bridge: the parts `karabo_bridge.serialize` makes (protocol 2.2), from train data
  shaped like its simulator's (`karabo_bridge.simulation`). karabo_bridge is imported when
  used, so the lclstreamer makers need only h5py.
"""

from __future__ import annotations

import io
from typing import Any

import h5py
import hdf5plugin
import numpy as np

# The seed's `compression` settings -> h5py create_dataset options (level 3, its default).
COMPRESSIONS = (None, "gzip", "gzip_with_shuffle", "bitshuffle_with_lz4", "bitshuffle_with_zstd")


def _compression_options(compression: str | None, level: int = 3) -> dict[str, Any]:
    if compression is None:
        return {}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": level, "shuffle": False}
    if compression == "gzip_with_shuffle":
        return {"compression": "gzip", "compression_opts": level, "shuffle": True}
    if compression == "bitshuffle_with_lz4":
        return {"compression": hdf5plugin.Bitshuffle(cname="lz4", clevel=level)}
    if compression == "bitshuffle_with_zstd":
        return {"compression": hdf5plugin.Bitshuffle(cname="zstd", clevel=level)}
    raise ValueError(f"unknown compression {compression!r}; known: {COMPRESSIONS}")


def lclstreamer_fields(n_events: int, frame_shape: tuple[int, ...] = (32, 48),
                       seed: int = 0, first_event: int = 0) -> dict[str, np.ndarray]:
    """A batch of `n_events` as the seed's psana sources give them, at the paths of its
    documentation's example (`timestamp: /data/timestamp`, `detector_data: /data/data`), with
    the frame in its detector's dtype (uint16; the seed's default would be float64): name (HDF5
    path without the leading slash) -> values. All of them a live stream can store (a top-level
    `timestamp` would have to be the LCLS2 raw time, an integer; the seed's is float64)."""
    rng = np.random.default_rng(seed)
    return {
        "data/timestamp": (np.arange(first_event, first_event + n_events, dtype=np.float64)
                           + 1.7e9),
        "data/data": rng.integers(0, 4096, (n_events, *frame_shape), dtype=np.uint16),
        "pulseenergy": rng.random(n_events),  # float64, the seed's default dtype
        "peaks": rng.random((n_events, 16)).astype(np.float32),
        "fiducial": np.arange(first_event, first_event + n_events, dtype=np.int32),
    }


def lclstreamer_message(fields: dict[str, np.ndarray] | int, compression: str | None = None,
                        *, scalars: dict[str, Any] | None = None,
                        attrs: dict[str, dict[str, Any]] | None = None,
                        compression_level: int = 3, **fields_options: Any) -> bytes:
    """One lclstreamer message (the bytes of an HDF5 file).

    `fields`: name -> values with the event axis first (names are HDF5 paths without the
    leading slash), or a number of events for `lclstreamer_fields(n, **fields_options)`.
    `scalars` (path -> value) and `attrs` ("/" or "/path" -> {name: value}) add what the seed
    itself never writes, to test what becomes metadata."""
    if isinstance(fields, int):
        fields = lclstreamer_fields(fields, **fields_options)
    options = _compression_options(compression, compression_level)
    with io.BytesIO() as block:
        with h5py.File(block, "w") as fh:
            for name, values in fields.items():
                values = np.asarray(values)
                string = values.dtype.kind in "OU"
                fh.create_dataset(
                    name="/" + name, shape=values.shape,
                    dtype=h5py.string_dtype() if string else values.dtype,
                    chunks=(1,) + values.shape[1:] if values.shape[0] else None,
                    data=values.astype(object) if string else values,
                    **({} if string else options),
                )
            for path, value in (scalars or {}).items():
                fh.create_dataset(path, data=value)
            for path, values in (attrs or {}).items():
                for key, value in values.items():
                    fh[path].attrs[key] = value
        return block.getvalue()


# -- karabo-bridge ---------------------------------------------------------------------------

KARABO_DETECTOR = "SPB_DET_AGIPD1M-1/DET/0CH0:xtdf"
KARABO_MOTOR = "SPB_IRU_MOTORS/MOTOR/X"


def karabo_train(train_id: int, frame_shape: tuple[int, ...] = (64, 128, 16),
                 seed: int | None = None, timestamp: float = 1585926035.7098422,
                 numbers_only: bool = False
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(data, metadata) of one train: an AGIPD-like module (uint16 frames, per-pulse arrays,
    lists and strings as the simulator sends them) and a motor (CONTROL-like scalars).
    `numbers_only` leaves out the text, booleans and the nested map (which holds text): a live
    stream stores numbers only."""
    rng = np.random.default_rng(train_id if seed is None else seed)
    pulses = frame_shape[-1]
    data = {
        KARABO_DETECTOR: {
            "image.data": rng.integers(0, 4096, frame_shape, dtype=np.uint16),
            "image.cellId": np.arange(pulses, dtype=np.uint16),
            "image.pulseId": np.arange(pulses, dtype=np.uint64),
            "image.trainId": np.full(pulses, train_id, dtype=np.uint64),
            "image.gain": rng.random((4, pulses)).astype(np.float32),
            "image.passport": ["SPB_DET_AGIPD1M-1/CAL/THRESHOLDING_Q1M1",
                               "SPB_DET_AGIPD1M-1/CAL/OFFSET_CORR_Q1M1"],
            "modulesPresent": [True, False, True],
            "header.pulseCount": pulses,
        },
        KARABO_MOTOR: {
            "actualPosition": float(rng.random()),
            "encoderPosition": int(rng.integers(-1000, 1000)),
            "state": "ON",
            "isMoving": False,
            "targets": [1.5, 2.5],
            "nested": {"speed": 3.25, "axis": "x"},  # a Karabo Hash: nested keys
        },
    }
    if numbers_only:
        for values in data.values():
            for key in [k for k, v in values.items() if isinstance(v, str | bool | list | dict)
                        and not (isinstance(v, list) and all(type(x) is float for x in v))]:
                del values[key]
    sec, frac = f"{timestamp:.7f}".split(".")
    metadata = {src: {"source": src, "timestamp": timestamp, "timestamp.sec": sec,
                      "timestamp.frac": frac.ljust(18, "0"), "timestamp.tid": train_id}
                for src in data}
    return data, metadata


def karabo_message(train_id: int, **train_options: Any) -> list[bytes | memoryview]:
    """The parts of one karabo-bridge 2.2 message, made by karabo_bridge's own serializer
    (arrays as memoryviews of the numpy data, as it hands them to ZMQ)."""
    from karabo_bridge import serialize

    data, metadata = karabo_train(train_id, **train_options)
    return serialize(data, metadata, protocol_version="2.2")
