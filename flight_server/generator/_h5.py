"""HDF5 writing helpers shared by the layout writers.

Readers (the catalog, the test suite) may look at a file at any moment, so a file either exists
complete or not at all: files are written through `fsutil.atomic_h5` (a temporary sibling,
synced and renamed into place), which the layout writers import from here.
"""

from collections.abc import Iterator

import h5py
import numpy as np

from flight_server.fsutil import atomic_h5

__all__ = ["atomic_h5"]

RAGGED_CHUNK = 1024


def event_dataset(
    parent: h5py.Group,
    name: str,
    n_events: int,
    inner_shape: tuple[int, ...],
    dtype: np.dtype | type,
    chunk_events: int,
    units: str | None = None,
) -> h5py.Dataset:
    """Create a per-event dataset the way acquisition writers do: resizable and chunked by event.

    ``maxshape=None`` on the event axis also makes zero-event runs and chunks longer than the run
    legal, which fixed-size HDF5 datasets would reject.
    """
    ds = parent.create_dataset(
        name,
        shape=(n_events, *inner_shape),
        maxshape=(None, *inner_shape),
        chunks=(chunk_events, *inner_shape),
        dtype=dtype,
    )
    if units is not None:
        ds.attrs["units"] = units
    return ds


def write_events(
    parent: h5py.Group,
    name: str,
    data: np.ndarray,
    chunk_events: int,
    units: str | None = None,
) -> h5py.Dataset:
    """Create a per-event dataset and fill it from an in-memory array (small columns)."""
    ds = event_dataset(parent, name, len(data), data.shape[1:], data.dtype, chunk_events, units)
    if len(data):
        ds[...] = data
    return ds


def write_ragged(
    parent: h5py.Group,
    name: str,
    values: np.ndarray,
    lengths: np.ndarray,
    chunk_events: int,
    units: str | None = None,
) -> None:
    """Write a psana-style ragged column: flat ``var_NAME`` plus per-event ``var_NAME_len``.

    The flat dataset is unlimited so that a run with no entries at all still gets a (0,) dataset.
    """
    flat = parent.create_dataset(
        name, shape=values.shape, maxshape=(None,), chunks=(RAGGED_CHUNK,), dtype=values.dtype
    )
    if len(values):
        flat[...] = values
    if units is not None:
        flat.attrs["units"] = units
    write_events(parent, name + "_len", lengths.astype(np.int64), chunk_events)


def write_config(
    parent: h5py.Group, name: str, value: np.ndarray | float | int, units: str | None = None
) -> h5py.Dataset:
    """Write a per-run (non-event) dataset, contiguous because it is read whole."""
    ds = parent.create_dataset(name, data=value)
    if units is not None:
        ds.attrs["units"] = units
    return ds


def block_ranges(n_events: int, block_events: int) -> Iterator[tuple[int, int]]:
    """Event ranges to generate and write at once, bounding memory whatever the run length."""
    for start in range(0, n_events, block_events):
        yield start, min(n_events, start + block_events)


def block_size(bytes_per_event: int, chunk_events: int, target_bytes: int = 16 << 20) -> int:
    """Events per write block: about ``target_bytes`` and a whole number of HDF5 chunks.

    Whole chunks per write keep HDF5 from reading partially written chunks back from disk.
    """
    chunks = max(1, target_bytes // max(1, bytes_per_event * chunk_events))
    return chunks * chunk_events


def check_counts(**counts: int) -> None:
    """Reject negative event counts and non-positive chunk sizes with a message naming the input."""
    for name, value in counts.items():
        minimum = 0 if name == "n_events" else 1
        if int(value) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
