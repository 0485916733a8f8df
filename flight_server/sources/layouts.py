"""The file layouts facilities hand to users, told apart by content, not by file name.

A layout says which dataset counts the events, how its raw time is encoded, which groups hold
per-run configuration and which conventions (ragged `var_` datasets, missing-value sentinels) the
writer used. Everything else about reading is common HDF5 and lives in `hdf5.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np

UNIX_EPOCH = 0
LCLS2_EPOCH = 631_152_000  # 1990-01-01T00:00:00Z in Unix seconds: LCLS2 timestamps count from it


@dataclass(frozen=True)
class Layout:
    name: str
    event_count_path: str  # the per-event dataset whose length is the run's event count
    time_path: str | None  # raw (seconds << 32 | ns) time dataset, if the layout has one
    time_epoch_unix: int  # Unix seconds at which the raw time's seconds count from zero
    config_groups: tuple[str, ...] = ()  # groups of per-run configuration, never event columns
    ragged: bool = False  # psana's `var_NAME` flat data + `var_NAME_len` lengths
    missing_as_null: bool = False  # serve the writer's missing-value sentinels as Arrow nulls
    int_sentinel: int = -99999

    def matches(self, f: h5py.File) -> bool:
        raise NotImplementedError


class _Lcls2(Layout):
    def matches(self, f: h5py.File) -> bool:
        return _is_event_vector(f, "timestamp") and "event_time" not in f


class _Lcls1(Layout):
    def matches(self, f: h5py.File) -> bool:
        return _is_event_vector(f, "event_time")


class _Cxi(Layout):
    def matches(self, f: h5py.File) -> bool:
        return "cxi_version" in f or isinstance(f.get("entry_1/data_1/data"), h5py.Dataset)


LCLS2 = _Lcls2(
    name="lcls2-smalldata",
    event_count_path="timestamp",
    time_path="timestamp",
    time_epoch_unix=LCLS2_EPOCH,
    config_groups=("UserDataCfg",),
    ragged=True,
    missing_as_null=True,
)
LCLS1 = _Lcls1(
    name="lcls1-smalldata",
    event_count_path="event_time",
    time_path="event_time",
    time_epoch_unix=UNIX_EPOCH,
    config_groups=("UserDataCfg",),
)
CXI = _Cxi(
    name="cxi",
    event_count_path="entry_1/data_1/data",
    time_path="LCLS/timestamp",
    time_epoch_unix=UNIX_EPOCH,
)

LAYOUTS: tuple[Layout, ...] = (LCLS2, LCLS1, CXI)


def _is_event_vector(f: h5py.File, path: str) -> bool:
    obj = f.get(path)
    return isinstance(obj, h5py.Dataset) and obj.ndim == 1 and obj.dtype.kind in "iu"


def detect(f: h5py.File) -> Layout | None:
    """The layout whose content signature the file carries, or None."""
    for layout in LAYOUTS:
        if layout.matches(f):
            return layout
    return None


def raw_time_to_ns(raw: np.ndarray, epoch_unix: int) -> np.ndarray:
    """Facility time (seconds << 32 | ns) -> Unix nanoseconds."""
    raw = raw.astype(np.int64, copy=False)
    return ((raw >> 32) + epoch_unix) * 1_000_000_000 + (raw & 0xFFFFFFFF)
