"""How one HDF5 dataset becomes one Arrow column (the data model of DESIGN.md).

scalar per event -> primitive; 1-D per event -> fixed_size_list; N-D -> fixed_shape_tensor;
ragged (`var_NAME` + `var_NAME_len`) -> list. Types follow the data and are never widened.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import pyarrow as pa

from schemas import metadata as md

# An attribute on a ragged dataset not named var_NAME (a processing step's lists, stored by a
# live stream's run writer): its per-event lengths are in NAME_len, as for var_NAME.
RAGGED_MARK = "lclstream_ragged"


class Kind(Enum):
    SCALAR = "scalar"
    LIST = "fixed_size_list"
    TENSOR = "tensor"
    RAGGED = "ragged"
    RUN = "run"  # derived: the run number
    TIME = "time"  # derived: the raw facility time as timestamp[ns, UTC]


@dataclass(frozen=True)
class Column:
    """One servable column of a run and everything needed to read it."""

    name: str
    kind: Kind
    field: pa.Field
    path: str | None = None  # dataset read (links resolved); None for derived columns
    dtype: np.dtype | None = None  # native-endian numpy dtype of one value
    shape: tuple[int, ...] = ()  # per-event shape
    event_bytes: float = 0.0  # bytes one event of this column costs on the wire
    chunk_events: int = 1  # events per HDF5 chunk along the event axis (1 if contiguous)
    sentinel: float | None = None  # the writer's missing value, served as null
    lengths_path: str | None = None  # ragged: the `_len` dataset
    whole_chunks: bool = False  # chunks can be copied raw (see Hdf5Reader._read_fixed)
    codec: str | None = None  # chunks decoded by chunk_codecs, not HDF5 (see Hdf5Reader)

    @property
    def stored_event_bytes(self) -> int:
        """Bytes of one event's values as stored in the file (no validity bitmap, no offsets)."""
        return self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64))


TIME_TYPE = pa.timestamp("ns", tz="UTC")


def arrow_value_type(dtype: np.dtype) -> pa.DataType:
    return pa.bool_() if dtype.kind == "b" else pa.from_numpy_dtype(dtype)


def field_metadata(path: str, units: str | None, sentinel: float | None) -> dict[bytes, bytes]:
    meta = {md.HDF5_PATH: ("/" + path).encode()}
    if units:
        meta[md.UNITS] = units.encode()
    detector = detector_name(path)
    if detector:
        meta[md.DETECTOR] = detector.encode()
    if sentinel is not None:
        meta[md.FILL_VALUE] = repr(sentinel).encode()
    return meta


def detector_name(path: str) -> str | None:
    """The detector a dataset belongs to: a `detector*` group if any, else its top-level group."""
    parts = path.split("/")[:-1]
    for part in parts:
        if part.startswith("detector"):
            return part
    return parts[0] if parts else None


def dataset_column(
    name: str,
    path: str,
    dtype: np.dtype,
    shape: tuple[int, ...],
    chunk_events: int,
    units: str | None,
    sentinel: float | None,
    whole_chunks: bool = False,
    codec: str | None = None,
) -> Column:
    """A fixed-shape per-event dataset: scalar, fixed_size_list or fixed_shape_tensor."""
    value_type = arrow_value_type(dtype)
    if not shape:
        kind, arrow_type = Kind.SCALAR, value_type
    elif len(shape) == 1:
        kind, arrow_type = Kind.LIST, pa.list_(value_type, shape[0])
    else:
        kind, arrow_type = Kind.TENSOR, pa.fixed_shape_tensor(value_type, list(shape))
    event_bytes = float(dtype.itemsize * int(np.prod(shape, dtype=np.int64)))
    if sentinel is not None:
        event_bytes += 0.125  # validity bitmap
    field = pa.field(name, arrow_type, metadata=field_metadata(path, units, sentinel))
    return Column(name, kind, field, path, dtype, shape, event_bytes, chunk_events, sentinel,
                  whole_chunks=whole_chunks, codec=codec)


def ragged_column(
    name: str,
    path: str,
    lengths_path: str,
    dtype: np.dtype,
    flat_len: int,
    num_events: int,
    units: str | None,
) -> Column:
    event_bytes = 4.0 + dtype.itemsize * flat_len / max(num_events, 1)  # offsets + mean values
    field = pa.field(
        name, pa.list_(arrow_value_type(dtype)), metadata=field_metadata(path, units, None)
    )
    return Column(
        name, Kind.RAGGED, field, path, dtype, (), event_bytes, 1, None, lengths_path=lengths_path
    )


def run_column() -> Column:
    meta = {md.DERIVED: b"the run number of the event"}
    return Column(md.RUN_COLUMN, Kind.RUN, pa.field(md.RUN_COLUMN, pa.int32(), metadata=meta),
                  event_bytes=4.0)


def time_column(raw_path: str, epoch_unix: int) -> Column:
    meta = {
        md.DERIVED: f"/{raw_path}: (seconds since Unix {epoch_unix}) << 32 | nanoseconds".encode(),
        md.HDF5_PATH: ("/" + raw_path).encode(),
    }
    return Column(md.TIME_COLUMN, Kind.TIME, pa.field(md.TIME_COLUMN, TIME_TYPE, metadata=meta),
                  path=raw_path, event_bytes=8.0)
