"""CXI crystallography layout, as Cheetah and psocake write it for LCLS.

Frames are pedestal-subtracted float32, one HDF5 chunk per frame, under
``/entry_1/instrument_1/detector_1/data``; ``/entry_1/data_1/data`` is a soft link to them.
Peak tables are dense (events, max_peaks) with ``nPeaks`` valid entries per row and zeros after.
The file holds what a hit finder kept, so most frames are hits (nPeaks >= 10) but not all.
"""

import os
from pathlib import Path

import h5py
import numpy as np

from . import physics as ph
from ._h5 import atomic_h5, block_ranges, check_counts, event_dataset, write_config, write_events

CXI_VERSION = 150
START_UNIX = 1_560_000_000.0
HIT_FRACTION = 0.7
MIN_HIT_PEAKS = 10
NOISE_ADU = 3.0
RING_ADU_PER_MJ = 10.0
TABLE_CHUNK = 64
DETECTOR_DISTANCE_M = 0.1
PIXEL_SIZE_M = 110e-6
JOULES_PER_EV = 1.602176634e-19


def generate_cxi_run(
    path: str | os.PathLike[str],
    run: int,
    n_events: int = 120,
    seed: int = 0,
    frame_shape: tuple[int, int] = (128, 128),
    max_peaks: int = 64,
) -> Path:
    """Write one CXI file (frames, peak tables, LCLS per-shot values) and return its path."""
    path = Path(path)
    check_counts(n_events=n_events, max_peaks=max_peaks)
    if max_peaks < MIN_HIT_PEAKS:
        raise ValueError(f"max_peaks must be >= {MIN_HIT_PEAKS} to hold a hit, got {max_peaks}")
    h, w = (int(v) for v in frame_shape)
    if min(h, w) < 4 * ph.SPOT_MARGIN:
        raise ValueError(f"frame_shape must be at least {4 * ph.SPOT_MARGIN} pixels a side")
    n = int(n_events)

    unix_ns = ph.event_unix_ns(START_UNIX + run * ph.RUN_SPACING_S, n)
    fid = ph.fiducials(ph.stream(seed, run, "LCLS/fiducial"), n)
    photon = ph.photon_energy_ev(ph.stream(seed, run, "LCLS/photon_energy"), n, 9500.0, 10.0)
    pulse = ph.pulse_energy_mj(ph.stream(seed, run, "LCLS/pulse_energy"), n, mean_mj=2.0)
    counts = ph.spot_counts(
        ph.stream(seed, run, "hits"),
        n,
        HIT_FRACTION,
        MIN_HIT_PEAKS,
        min(30.0, float(max_peaks)),
        max_peaks,
        miss_max=MIN_HIT_PEAKS - 1,
    )
    spots = ph.draw_spots(ph.stream(seed, run, "spots"), counts, pulse, (h, w), 2.0)

    # Dense peak tables: entry j of row i is spot j of event i, unused slots stay 0.
    offsets = spots.offsets
    row = np.repeat(np.arange(n), counts)
    col = np.arange(len(row)) - offsets[row]
    tables = {}
    for name, values in (
        ("peakXPosRaw", spots.x),
        ("peakYPosRaw", spots.y),
        ("peakTotalIntensity", spots.intensity),
    ):
        table = np.zeros((n, max_peaks), dtype=np.float32)
        table[row, col] = values
        tables[name] = table

    noise_rng = ph.stream(seed, run, "noise")
    with atomic_h5(path) as f:
        f.create_dataset("cxi_version", data=np.int64(CXI_VERSION))
        detector = f.create_group("entry_1/instrument_1/detector_1")
        data = event_dataset(detector, "data", n, (h, w), np.float32, 1, units="ADU")
        data.attrs["axes"] = "experiment_identifier:y:x"
        write_config(detector, "distance", np.float64(DETECTOR_DISTANCE_M), units="m")
        write_config(detector, "x_pixel_size", np.float64(PIXEL_SIZE_M), units="m")
        write_config(detector, "y_pixel_size", np.float64(PIXEL_SIZE_M), units="m")
        source = f.create_group("entry_1/instrument_1/source_1")
        mean_ev = float(np.mean(photon)) if n else 9500.0
        write_config(source, "energy", np.float64(mean_ev * JOULES_PER_EV), units="J")
        f.create_group("entry_1/data_1")["data"] = h5py.SoftLink(data.name)

        result = f.create_group("entry_1/result_1")
        write_events(result, "nPeaks", counts.astype(np.int32), TABLE_CHUNK)
        for name, table in tables.items():
            units = "ADU" if name == "peakTotalIntensity" else "pixel"
            write_events(result, name, table, TABLE_CHUNK, units=units)

        lcls = f.create_group("LCLS")
        write_events(lcls, "photon_energy_eV", photon, TABLE_CHUNK, units="eV")
        write_events(lcls, "fiducial", fid, TABLE_CHUNK)
        write_events(lcls, "timestamp", ph.pack_time(unix_ns), TABLE_CHUNK)

        block = max(1, (16 << 20) // (h * w * 4))
        for a, b in block_ranges(n, block):
            data[a:b] = ph.render_frames(
                noise_rng, (h, w), pulse[a:b], spots, a, 0.0, NOISE_ADU, RING_ADU_PER_MJ
            )
    return path
